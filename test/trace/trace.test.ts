// Q/K/V traces (lib/trace/trace.ts) and the `kvslim trace` command (lib/cli.ts): round trips,
// malformed traces, and a trace of the real stories260K model replayed through a fresh cache.
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';

import { afterAll, describe, expect, it, vi } from 'vitest';

import { main } from '../../lib/cli.js';
import { headProbe, KVCache, scoreHeadsDetailed } from '../../lib/index.js';
import { readSafetensors, writeSafetensors } from '../../lib/trace/safetensors.js';
import { encodeTrace, readTrace, type TraceLayer, type TraceMeta, writeTrace } from '../../lib/trace/trace.js';
import { Random } from '../helpers/random.js';

const realkv = resolve(__dirname, '../../../shared/realkv');
const modelPath = join(realkv, 'stories260K.bin');
const tokenizerPath = join(realkv, 'tok512.bin');
const present = existsSync(modelPath) && existsSync(tokenizerPath);
if (!present) console.warn(`kvslim trace CLI tests skipped: ${modelPath} and ${tokenizerPath} not found (they live in the shared/ folder beside the repo)`);

const dir = mkdtempSync(join(tmpdir(), 'kvslim-trace-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** Matches a KVSlimError with this code (for toThrow). */
const failsWith = (code: string) => expect.objectContaining({ name: 'KVSlimError', code });

const config = { layers: 2, qHeads: 4, kvHeads: 2, headDim: 8, rope: { theta: 10000, style: 'adjacent' } };

function syntheticTrace(tokens: number, withOut: boolean): { layers: TraceLayer[]; meta: TraceMeta } {
  const random = new Random(tokens);
  const layers = Array.from({ length: config.layers }, () => ({
    q: random.tensor(tokens * config.qHeads * config.headDim),
    k: random.tensor(tokens * config.kvHeads * config.headDim),
    v: random.tensor(tokens * config.kvHeads * config.headDim),
    ...(withOut && { out: random.tensor(tokens * config.qHeads * config.headDim) }),
  }));
  return { layers, meta: { config, tokens: Array.from({ length: tokens }, (_, i) => i + 1), prompt: 'hi' } };
}

describe('traces', () => {
  it.each([true, false])('round-trip bit-exactly through a file (out included: %s)', (withOut) => {
    const { layers, meta } = syntheticTrace(5, withOut);
    const path = join(dir, `synthetic-${withOut}.safetensors`);
    writeTrace(path, layers, meta);
    const trace = readTrace(path);
    expect(trace.meta).toEqual(meta);
    expect(trace.layers).toEqual(layers);
    expect(readTrace(encodeTrace(layers, meta))).toEqual(trace);
  });

  it('keeps a metadata field named __proto__ as a field', () => {
    const { layers, meta } = syntheticTrace(1, false);
    const hostile = { ...meta, ...JSON.parse('{"__proto__": {"polluted": true}}') } as TraceMeta;
    const read = readTrace(encodeTrace(layers, hostile)).meta;
    expect(Object.getPrototypeOf(read)).toBe(Object.prototype);
    expect(Object.getOwnPropertyDescriptor(read, '__proto__')?.value).toEqual({ polluted: true });
  });

  it('names tensors layers.{i}.q/k/v/out in f32 with [n, heads, headDim] shapes', () => {
    const { layers, meta } = syntheticTrace(3, true);
    const { tensors, metadata } = readSafetensors(encodeTrace(layers, meta));
    expect(Object.keys(tensors).sort()).toEqual(['layers.0.k', 'layers.0.out', 'layers.0.q', 'layers.0.v', 'layers.1.k', 'layers.1.out', 'layers.1.q', 'layers.1.v']);
    expect(tensors['layers.1.k']).toMatchObject({ dtype: 'F32', shape: [3, 2, 8] });
    expect(tensors['layers.1.out']).toMatchObject({ dtype: 'F32', shape: [3, 4, 8] });
    expect(metadata.format).toBe('kvslim-trace/1');
    expect(JSON.parse(metadata.tokens)).toEqual([1, 2, 3]);
  });

  it('refuses to write inconsistent traces', () => {
    const { layers, meta } = syntheticTrace(3, false);
    expect(() => encodeTrace(layers.slice(1), meta)).toThrow(failsWith('ERR_SHAPE'));
    expect(() => encodeTrace(layers, { ...meta, tokens: [1, 2] })).toThrow(failsWith('ERR_SHAPE'));
    expect(() => encodeTrace([{ ...layers[0], k: new Float32Array(5) }, layers[1]], meta)).toThrow(failsWith('ERR_SHAPE'));
    // An optional out is checked like q: a Float32Array of n x qHeads x headDim, named in the message.
    for (const out of [new Float32Array(layers[1].q.length - 1), new Float64Array(layers[1].q.length)]) {
      expect(() => encodeTrace([layers[0], { ...layers[1], out: out as Float32Array }], meta))
        .toThrow(expect.objectContaining({ code: 'ERR_SHAPE', message: expect.stringMatching(/layers\.1\.out/) }));
    }
    expect(() => encodeTrace(layers, { ...meta, config: { ...config, kvHeads: 3 } })).toThrow(failsWith('ERR_OPTION'));
    expect(() => encodeTrace(layers, { ...meta, config: { ...config, layers: 65537 } })).toThrow(failsWith('ERR_OPTION'));
    expect(() => encodeTrace(layers, { ...meta, format: 'other' })).toThrow(failsWith('ERR_OPTION'));
    expect(() => encodeTrace(layers, { ...meta, extra: () => 1 })).toThrow(failsWith('ERR_OPTION'));
  });

  it('rejects files that are not well-formed traces with ERR_CORRUPT', () => {
    const { layers, meta } = syntheticTrace(2, false);
    const good = readSafetensors(encodeTrace(layers, meta));
    const rewrite = (edit: (tensors: typeof good.tensors, metadata: Record<string, string>) => void) => {
      const tensors = { ...good.tensors };
      const metadata = { ...good.metadata };
      edit(tensors, metadata);
      return writeSafetensors(tensors, metadata);
    };
    expect(() => readTrace(rewrite((_, m) => delete m.format))).toThrow(failsWith('ERR_CORRUPT'));
    expect(() => readTrace(rewrite((_, m) => void (m.format = 'kvslim-trace/9')))).toThrow(failsWith('ERR_CORRUPT'));
    expect(() => readTrace(rewrite((_, m) => void (m.config = '{"layers": 2')))).toThrow(failsWith('ERR_CORRUPT'));
    expect(() => readTrace(rewrite((_, m) => void (m.config = '{"layers": 0, "qHeads": 4, "kvHeads": 2, "headDim": 8}')))).toThrow(failsWith('ERR_CORRUPT'));
    expect(() => readTrace(rewrite((_, m) => void (m.tokens = '[1, -2]')))).toThrow(failsWith('ERR_CORRUPT'));
    expect(() => readTrace(rewrite((_, m) => void (m.tokens = '[1, 2, 3]')))).toThrow(failsWith('ERR_CORRUPT'));
    expect(() => readTrace(rewrite((t) => delete t['layers.1.v']))).toThrow(failsWith('ERR_CORRUPT'));
    expect(() => readTrace(rewrite((t) => void (t['layers.0.q'] = { dtype: 'F16', shape: [2, 4, 8], data: new Uint16Array(64) })))).toThrow(failsWith('ERR_CORRUPT'));
    expect(() => readTrace(rewrite((t) => void (t['layers.0.k'] = { dtype: 'F32', shape: [2, 16], data: new Float32Array(32) })))).toThrow(failsWith('ERR_CORRUPT'));
    expect(() => readTrace(encodeTrace(layers, meta).subarray(0, 100))).toThrow(failsWith('ERR_CORRUPT'));
  });
});

describe.skipIf(!present)('kvslim trace', () => {
  function run(argv: string[]): { status: Promise<number>; output: () => string } {
    let output = '';
    const capture = (chunk: string | Uint8Array) => {
      output += typeof chunk === 'string' ? chunk : Buffer.from(chunk).toString();
      return true;
    };
    const out = vi.spyOn(process.stdout, 'write').mockImplementation(capture);
    const err = vi.spyOn(process.stderr, 'write').mockImplementation(capture);
    const status = main(argv).finally(() => {
      out.mockRestore();
      err.mockRestore();
    });
    return { status, output: () => output };
  }

  it('writes a trace whose keys and values reproduce the recorded attention in a fresh cache', async () => {
    const path = join(dir, 'story.safetensors');
    const result = run(['trace', '--model', modelPath, '--tokenizer', tokenizerPath, '--prompt', 'Once upon a time', '--out', path, '--steps', '6']);
    expect(await result.status).toBe(0);
    expect(result.output()).toMatch(/5 layers x 11 tokens \(5 prompt \+ 6 generated\)/);

    const trace = readTrace(path);
    expect(trace.meta.config).toMatchObject({ layers: 5, qHeads: 8, kvHeads: 4, headDim: 8, dim: 64, vocabSize: 512, seqLen: 512, keys: 'post-rope' });
    // The prompt's tokens, then the greedy continuation ", there was a little girl".
    expect(trace.meta.tokens.slice(0, 5)).toEqual([1, 403, 407, 261, 378]);
    expect(trace.meta.tokens).toHaveLength(11);

    // One prefill over the recorded q, k, v gives back each layer's recorded output (the model ran
    // the prompt as a prefill and each generated token as a step: same attention, other kernels).
    const cache = new KVCache({ layers: 5, qHeads: 8, kvHeads: 4, headDim: 8, policy: { store: { kind: 'f32' } } });
    try {
      trace.layers.forEach((layer, i) => {
        const out = cache.prefill(i, layer.q, layer.k, layer.v);
        let max = 0;
        for (let j = 0; j < out.length; j++) max = Math.max(max, Math.abs(out[j] - (layer.out as Float32Array)[j]));
        expect(max, `layer ${i}`).toBeLessThan(1e-5);
      });
    } finally {
      cache.dispose();
    }
  });

  it('traces the retrieval-head probe (--probe), which score-heads scores on its repeated segment', async () => {
    const path = join(dir, 'probe.safetensors');
    const result = run(['trace', '--model', modelPath, '--tokenizer', tokenizerPath, '--probe', '100', '--seed', '7', '--out', path]);
    expect(await result.status).toBe(0);
    expect(result.output()).toMatch(/5 layers x 201 tokens \(201 prompt \+ 0 generated\)/);
    const trace = readTrace(path);
    expect(trace.meta.probe).toEqual({ length: 100, seed: 7, firstId: 3, bos: 1 });
    expect(trace.meta.prompt).toBeUndefined();
    // BOS, then headProbe's segment twice, drawn past llama2.c's special ids 0-2.
    expect(trace.meta.tokens).toEqual(Array.from(headProbe({ length: 100, seed: 7, firstId: 3, bos: 1, vocab: 512 })));
    expect(trace.meta.tokens.slice(1, 101)).toEqual(trace.meta.tokens.slice(101));
    expect(Math.min(...trace.meta.tokens.slice(1))).toBeGreaterThanOrEqual(3);

    const json = join(dir, 'probe-heads.json');
    const scored = run(['score-heads', '--trace', path, '--sink', '4', '--window', '16', '--probes', '32', '--json', json]);
    expect(await scored.status).toBe(0);
    expect(scored.output()).toMatch(/201 tokens; sink 4, window 16, 32 probes per layer, copy score on the repeated 100-token segment/);
    const record = JSON.parse(readFileSync(json, 'utf8')) as { scores: number[][]; copyMode: string; copySegment: number };
    expect(record).toMatchObject({ copyMode: 'segment', copySegment: 100 });
    const detailed = scoreHeadsDetailed(trace, { sink: 4, window: 16, probes: 32, copySegment: 100, device: 'cpu' });
    expect(record.scores.flat()).toEqual(Array.from(detailed.scores));
  });

  it('leaves out the outputs with --no-out', async () => {
    const path = join(dir, 'no-out.safetensors');
    expect(await run(['trace', '--model', modelPath, '--tokenizer', tokenizerPath, '--prompt', 'Hi', '--out', path, '--no-out']).status).toBe(0);
    expect(readTrace(path).layers.every((layer) => layer.out === undefined)).toBe(true);
  });

  it('answers help, usage errors and planned commands with the documented statuses', async () => {
    expect(await run(['--help']).status).toBe(0);
    expect(await run([]).status).toBe(2);
    const noTrace = run(['score-heads']);
    expect(await noTrace.status).toBe(2);
    expect(noTrace.output()).toMatch(/^kvslim: score-heads needs --trace\n\nkvslim score-heads --trace <file>/);
    const benchHelp = run(['bench', '--help']);
    expect(await benchHelp.status).toBe(0);
    expect(benchHelp.output()).toMatch(/^kvslim bench/);
    expect(await run(['frobnicate']).status).toBe(2);
    expect(await run(['trace', '--model', modelPath]).status).toBe(2);
    expect(await run(['trace', '--model', modelPath, '--tokenizer', tokenizerPath, '--prompt', 'x', '--steps', '-1']).status).toBe(2);
    expect(await run(['trace', '--bogus']).status).toBe(2);
    // One of --prompt and --probe; --seed only with --probe; no --steps after a probe.
    const usage: Array<[string[], RegExp]> = [
      [['--prompt', 'x', '--probe', '10'], /one of --prompt or --probe/],
      [[], /one of --prompt or --probe/],
      [['--probe', '0'], /--probe must be an integer >= 1, not '0'/],
      [['--probe', '10', '--steps', '2'], /--steps does not apply to --probe/],
      [['--prompt', 'x', '--seed', '3'], /--seed applies to --probe/],
    ];
    for (const [extra, message] of usage) {
      const result = run(['trace', '--model', modelPath, '--tokenizer', tokenizerPath, ...extra]);
      expect(await result.status, extra.join(' ')).toBe(2);
      expect(result.output(), extra.join(' ')).toMatch(message);
    }
    const corrupt = run(['trace', '--model', tokenizerPath, '--tokenizer', tokenizerPath, '--prompt', 'x', '--out', join(dir, 'x')]);
    expect(await corrupt.status).toBe(1);
    expect(corrupt.output()).toMatch(/ERR_CORRUPT/);
  });
});
