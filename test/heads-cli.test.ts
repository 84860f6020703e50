// `kvslim score-heads` (lib/cli.ts): a synthetic trace whose kv heads either attend locally or
// retrieve needles far back, scored by the command; the table, the JSON (equal to
// scoreHeadsDetailed's and usable as duo's heads), the ratio, the warning for a trace too short to
// have distant tokens, and coded failures.
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { afterAll, describe, expect, it } from 'vitest';

import { KVCache, scoreHeadsDetailed } from '../lib/index.js';
import { readTrace, type TraceLayer, writeTrace } from '../lib/trace/trace.js';
import { Random } from './helpers/random.js';
import { runCli } from './helpers/cli.js';

const dir = mkdtempSync(join(tmpdir(), 'kvslim-heads-cli-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const shape = { layers: 2, qHeads: 8, kvHeads: 4, headDim: 32 };
const T = 1024;
const SINK = 4, WINDOW = 64, PROBES = 32;
/** `[layer][kvHead]`: 1 where the kv head's query heads retrieve needles (two per layer). */
const RETRIEVING = [[0, 1, 0, 1], [1, 0, 1, 0]];

/**
 * Keys N(0, 1) scaled to norm √D; a local query head's row t asks 6·k_t (its own key), a
 * retrieving one 6·k_needle with the needle in [SINK, t - 2·WINDOW): far outside sink ∪ recent.
 */
function needleTrace(path: string): void {
  const { layers, qHeads, kvHeads, headDim: D } = shape;
  const random = new Random(91);
  const group = qHeads / kvHeads;
  const traceLayers: TraceLayer[] = [];
  for (let layer = 0; layer < layers; layer++) {
    const k = random.tensor(T * kvHeads * D), v = random.tensor(T * kvHeads * D);
    for (let row = 0; row < T * kvHeads; row++) {
      const x = k.subarray(row * D, (row + 1) * D);
      const norm = Math.hypot(...x);
      for (let d = 0; d < D; d++) x[d] *= Math.sqrt(D) / norm;
    }
    const q = random.tensor(T * qHeads * D, 0.1);
    for (let h = 0; h < qHeads; h++) {
      const kvHead = Math.floor(h / group);
      for (let t = 0; t < T; t++) {
        const far = RETRIEVING[layer][kvHead] === 1 && t > 2 * WINDOW + SINK;
        const target = far ? SINK + random.integer(t - 2 * WINDOW - SINK) : t;
        for (let d = 0; d < D; d++) q[(t * qHeads + h) * D + d] += 6 * k[(target * kvHeads + kvHead) * D + d];
      }
    }
    traceLayers.push({ q, k, v });
  }
  // The last 4 rows are kvslim eval's query turns.
  writeTrace(path, traceLayers, { config: shape, tokens: Array.from({ length: T }, (_, i) => i % 500), promptTokens: T - 4 });
}

const tracePath = join(dir, 'needles.safetensors');
needleTrace(tracePath);

const run = runCli;

/** The table's rows: [layer, kvHead, role]. */
function roles(stdout: string): Array<[number, number, string]> {
  return [...stdout.matchAll(/^\s+(\d+)\s+(\d+)\s+\S+\s+\S+\s+\S+\s+\S+\s+(retrieval|streaming)$/gm)]
    .map((m) => [Number(m[1]), Number(m[2]), m[3]]);
}

describe('kvslim score-heads', () => {
  it('marks the retrieving kv heads retrieval, writes scoreHeadsDetailed\'s numbers as JSON, reports progress', async () => {
    const json = join(dir, 'heads.json');
    const result = await run(['score-heads', '--trace', tracePath, '--sink', String(SINK), '--window', String(WINDOW),
      '--probes', String(PROBES), '--json', json]);
    expect(result.status, result.stderr).toBe(0);
    expect(result.stdout).toMatch(/2 layers, 8 q \/ 4 kv heads of 32, 1024 tokens; sink 4, window 64, 32 probes per layer, copy score by the sequential-copy proxy/);
    expect(result.stderr).toMatch(/kvslim score-heads: layer 2\/2/);
    expect(roles(result.stdout)).toEqual(RETRIEVING.flatMap((row, layer) => row.map((r, kvHead) => [layer, kvHead, r ? 'retrieval' : 'streaming'])));
    expect(result.stdout).toMatch(/4 of 8 kv heads are retrieval heads at ratio 0\.5/);

    const record = JSON.parse(readFileSync(json, 'utf8'));
    const detailed = scoreHeadsDetailed(readTrace(tracePath), { sink: SINK, window: WINDOW, probes: PROBES, device: 'cpu' });
    expect(record).toMatchObject({
      format: 'kvslim-head-scores/1', layers: 2, qHeads: 8, kvHeads: 4, headDim: 32, tokens: T, sink: SINK, window: WINDOW,
      probes: [PROBES, PROBES], copyMode: 'proxy', copySegment: null, retrievalRatio: 0.5,
    });
    expect(record.scores.flat()).toEqual(Array.from(detailed.scores));
    expect(record.deviation.flat()).toEqual(Array.from(detailed.deviation));
    expect(record.distantMass.flat()).toEqual(Array.from(detailed.distantMass));
    expect(record.copyHeads.flat()).toEqual(Array.from(detailed.copyHeads, (c) => c === 1));
    expect(record.retrieval).toEqual(RETRIEVING.map((row) => row.map((r) => r === 1)));

    // The JSON drives a DuoAttention cache: the retrieval heads keep every token, the others sink + window.
    const cache = new KVCache({
      ...shape, policy: { select: { kind: 'duo', heads: record.scores, sink: record.sink, window: record.window, retrievalRatio: record.retrievalRatio } },
    });
    try {
      const tokens = new Float32Array(300 * shape.kvHeads * shape.headDim).fill(0.25);
      for (let layer = 0; layer < 2; layer++) cache.append(layer, tokens, tokens);
      expect(cache.stats().layers.map((l) => l.tokensKept)).toEqual(RETRIEVING.map((row) => row.map((r) => (r ? 300 : SINK + WINDOW))));
    } finally {
      cache.dispose();
    }
  });

  it('feeds kvslim eval: --policy duo:<heads.json> evaluates DuoAttention with those scores', async () => {
    const json = join(dir, 'eval-heads.json');
    expect((await run(['score-heads', '--trace', tracePath, '--sink', '4', '--window', '64', '--probes', '16', '--json', json])).status).toBe(0);
    const result = await run(['eval', '--trace', tracePath, '--policy', 'full', '--policy', `duo:${json}`, '--turns', '2']);
    expect(result.status, result.stderr).toBe(0);
    // Half the kv heads keep all 1020 context tokens, half sink 4 + window 64: about (1020 + 68) / 2 of them.
    const duo = /duo:4\+64\s+multi-turn\s+(\d\.\d+)/.exec(result.stdout);
    expect(duo, result.stdout).not.toBeNull();
    expect(Number(duo![1])).toBeCloseTo(0.53, 1);
    const bad: Array<[string, RegExp]> = [
      [`duo:${join(dir, 'missing.json')}`, /--policy duo:.*missing\.json: ENOENT/],
      [`duo:${tracePath}`, /--policy duo:.*: /],
    ];
    writeFileSync(join(dir, 'other.json'), '{"format":"something-else"}');
    bad.push([`duo:${join(dir, 'other.json')}`, /not a kvslim score-heads file/]);
    for (const [policy, message] of bad) {
      const failed = await run(['eval', '--trace', tracePath, '--policy', policy]);
      expect(failed.status, policy).toBe(2);
      expect(failed.stderr, policy).toMatch(message);
    }
  });

  it('keeps the top --ratio of kv heads across layers', async () => {
    const result = await run(['score-heads', '--trace', tracePath, '--sink', '4', '--window', '64', '--probes', '16', '--ratio', '0.25']);
    expect(result.status, result.stderr).toBe(0);
    expect(roles(result.stdout).filter(([, , role]) => role === 'retrieval')).toHaveLength(2);
    expect(result.stdout).toMatch(/2 of 8 kv heads are retrieval heads at ratio 0\.25/);
  });

  it('--threshold keeps whole the kv heads whose clipped score reaches it; the JSON carries it to duo', async () => {
    const json = join(dir, 'threshold.json');
    const result = await run(['score-heads', '--trace', tracePath, '--sink', '4', '--window', '64', '--probes', '16', '--threshold', '0.5', '--json', json]);
    expect(result.status, result.stderr).toBe(0);
    const record = JSON.parse(readFileSync(json, 'utf8'));
    expect(record).toMatchObject({ threshold: 0.5, retrievalRatio: null });
    const expected = (record.scores as number[][]).flat().map((score, i) => Math.min(1, Math.max(0, score)) >= 0.5 || record.copyHeads.flat()[i]);
    // The retrieving heads of this trace score about 1 and the local ones about 0: the threshold splits them.
    expect(expected).toEqual(RETRIEVING.flat().map((r) => r === 1));
    expect(roles(result.stdout).map(([, , role]) => role === 'retrieval')).toEqual(expected);
    expect(record.retrieval.flat()).toEqual(expected);
    expect(result.stdout).toMatch(/4 of 8 kv heads are retrieval heads at threshold 0\.5/);
    const evaluated = await run(['eval', '--trace', tracePath, '--policy', `duo:${json}`, '--turns', '1']);
    expect(evaluated.status, evaluated.stderr).toBe(0);
    const both = await run(['score-heads', '--trace', tracePath, '--ratio', '0.5', '--threshold', '0.5']);
    expect(both.status).toBe(2);
    expect(both.stderr).toMatch(/--ratio or --threshold, not both/);
  });

  it('warns when sink + window cover the whole trace (no distant mass; E only rounding)', async () => {
    const result = await run(['score-heads', '--trace', tracePath, '--probes', '8', '--sink', '64', '--window', '2000']);
    expect(result.status, result.stderr).toBe(0);
    expect(result.stdout).toMatch(/warning: every probe sees at most 1024 tokens, all inside sink \+ window \(2064\)/);
    const rows = [...result.stdout.matchAll(/^\s+\d+\s+\d+\s+(\S+)\s+(\S+)\s+(\S+)\s+\S+\s+(?:retrieval|streaming)$/gm)];
    expect(rows).toHaveLength(8);
    for (const [, score, deviation, mass] of rows) {
      expect(mass).toBe('0');
      expect(Number(deviation)).toBeLessThan(1e-9);
      expect(Number(score)).toBeLessThan(1e-9);
    }
  });

  it('rejects bad arguments with status 2 and a message naming the argument; bad files with status 1', async () => {
    const cases: Array<[string[], RegExp]> = [
      [['score-heads'], /score-heads needs --trace/],
      [['score-heads', '--trace', tracePath, '--ratio', '1.5'], /--ratio must be a number in \[0, 1\], not '1\.5'/],
      [['score-heads', '--trace', tracePath, '--ratio', ''], /--ratio must be a number in \[0, 1\]/],
      [['score-heads', '--trace', tracePath, '--device', 'gpu'], /--device must be cpu or cuda, not 'gpu'/],
      [['score-heads', '--trace', tracePath, '--sink=-1'], /--sink must be an integer >= 0, not '-1'/],
      [['score-heads', '--trace', tracePath, '--window', '0'], /--window must be an integer >= 1, not '0'/],
      [['score-heads', '--trace', tracePath, '--copy-segment', 'x'], /--copy-segment must be an integer >= 1, not 'x'/],
      [['score-heads', 'extra', '--trace', tracePath], /Unexpected argument 'extra'/],
      [['score-heads', '--trace', tracePath, '--frobnicate'], /Unknown option '--frobnicate'/],
    ];
    for (const [argv, message] of cases) {
      const result = await run(argv);
      expect(result.status, argv.join(' ')).toBe(2);
      expect(result.stderr, argv.join(' ')).toMatch(message);
      expect(result.stderr, argv.join(' ')).toMatch(/kvslim score-heads --trace <file>/);  // the command's usage
    }
    const missing = await run(['score-heads', '--trace', join(dir, 'missing.safetensors')]);
    expect(missing.status).toBe(1);
    expect(missing.stderr).toMatch(/ENOENT/);
    const junk = join(dir, 'junk.safetensors');
    writeFileSync(junk, Buffer.from('not a safetensors file at all'));
    const corrupt = await run(['score-heads', '--trace', junk]);
    expect(corrupt.status).toBe(1);
    expect(corrupt.stderr).toMatch(/\[ERR_CORRUPT\]/);
    // A copy segment longer than the trace allows is scoreHeads' own ERR_OPTION.
    const long = await run(['score-heads', '--trace', tracePath, '--copy-segment', '4000']);
    expect(long.status).toBe(1);
    expect(long.stderr).toMatch(/\[ERR_OPTION\]: .*copySegment/);
  });
});
