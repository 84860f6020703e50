// `kvslim eval` and `kvslim inspect` (lib/cli.ts): exit statuses, messages, table and files.
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { afterAll, describe, expect, it } from 'vitest';

import { writeSafetensors } from '../../lib/trace/safetensors.js';
import { writeTrace } from '../../lib/trace/trace.js';
import { runCli } from '../helpers/cli.js';

const dir = mkdtempSync(join(tmpdir(), 'kvslim-eval-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const run = runCli;

describe('kvslim eval', () => {
  it('prints help for each command', async () => {
    for (const command of ['eval', 'inspect', 'trace', 'score-heads']) {
      const result = await run([command, '--help']);
      expect(result.status).toBe(0);
      expect(result.stdout).toContain(`kvslim ${command}`);
    }
    expect((await run(['--help'])).stdout).toMatch(/eval .*\n.*inspect/);
  });

  it('rejects bad arguments with status 2 and a message naming the argument', async () => {
    const cases: Array<[string[], RegExp]> = [
      [['eval', '--policy', 'kivi'], /--policy must be one of full, f16, f32, bf16/],
      [['eval', '--policy', '{bad'], /--policy '\{bad' is not valid JSON/],
      [['eval', '--workload', 'needles-1m'], /--workload must be one of needles-4k, needles-32k, not 'needles-1m'/],
      [['eval', '--turns', '0'], /--turns must be an integer >= 1, not '0'/],
      [['eval', '--turns', 'two'], /--turns must be an integer >= 1, not 'two'/],
      [['eval', '--mode', 'sideways'], /--mode must be multi-turn, multi-request or both/],
      [['eval', '--workload', 'needles-4k', '--trace', 'x.safetensors'], /--workload or --trace, not both/],
      [['eval', '--frobnicate'], /Unknown option '--frobnicate'/],
      [['inspect'], /inspect takes one file, received 0/],
    ];
    for (const [argv, message] of cases) {
      const result = await run(argv);
      expect(result.status, argv.join(' ')).toBe(2);
      expect(result.stderr, argv.join(' ')).toMatch(message);
    }
  });

  it('fails with status 1 and the error code for a policy or turn count this version cannot run', async () => {
    const planned = await run(['eval', '--policy', '{"summary":{"kind":"sse"}}']);
    expect(planned.status).toBe(1);
    expect(planned.stderr).toMatch(/\[ERR_OPTION\]: .*policy.summary.*not available in this version/);
    const bits = await run(['eval', '--policy', '{"store":{"kind":"kivi","bits":3}}']);
    expect(bits.status).toBe(1);
    expect(bits.stderr).toMatch(/\[ERR_OPTION\]: .*policy.store.bits/);
    const turns = await run(['eval', '--turns', '9']);
    expect(turns.status).toBe(1);
    expect(turns.stderr).toMatch(/\[ERR_OPTION\]: Expected turns to be an integer in \[1, 4\]/);
    const missing = await run(['inspect', join(dir, 'missing.safetensors')]);
    expect(missing.status).toBe(1);
    expect(missing.stderr).toMatch(/ENOENT/);
  });

  it('evaluates a workload: progress on stderr, a table on stdout, JSON and HTML files', async () => {
    const json = join(dir, 'r.json'), html = join(dir, 'r.html');
    const result = await run(['eval', '--workload', 'needles-4k', '--policy', 'full', '--policy', 'bf16', '--policy', 'snapkv:1024/kivi2',
      '--turns', '2', '--mode', 'both', '--json', json, '--html', html]);
    expect(result.status, result.stderr).toBe(0);
    expect(result.stderr).toMatch(/kvslim eval \[multi-request\] full\/bf16: turn 2\/2/);
    expect(result.stdout).toMatch(/^needles-4k: 4096 context tokens, 2 turns/);
    expect(result.stdout).toMatch(/full\s+multi-turn\s+1\.0\d\d .* 100\.0%\s+100\.0%/);
    expect(result.stdout).toMatch(/full\/bf16\s+multi-request/);
    // <selection>/<store>: SnapKV's 1024 kept tokens in the 2-bit KIVI store.
    expect(result.stdout).toMatch(/snapkv:1024\/kivi2\s+multi-turn/);
    const reports = JSON.parse(readFileSync(json, 'utf8')) as Array<{ schema: string; mode: string; turns: unknown[] }>;
    expect(reports.map((r) => [r.schema, r.mode, r.turns.length])).toEqual([
      ['scbench-report/1', 'multi-turn', 2], ['scbench-report/1', 'multi-turn', 2], ['scbench-report/1', 'multi-turn', 2],
      ['scbench-report/1', 'multi-request', 2], ['scbench-report/1', 'multi-request', 2], ['scbench-report/1', 'multi-request', 2],
    ]);
    const page = readFileSync(html, 'utf8');
    expect(page).toMatch(/^<!doctype html>/);
    expect(page.match(/<svg /g)).toHaveLength(3);
    expect(page).not.toMatch(/https?:\/\/(?!www\.w3\.org\/2000\/svg)/); // self-contained: no fetches
  });

  it('evaluates a trace: rows after the prompt are the queries', async () => {
    const path = join(dir, 'trace.safetensors');
    const rows = 40, qHeads = 4, kvHeads = 2, headDim = 8;
    const fill = (length: number, seed: number) => Float32Array.from({ length }, (_, i) => Math.sin(i * 0.37 + seed));
    writeTrace(path, [{ q: fill(rows * qHeads * headDim, 1), k: fill(rows * kvHeads * headDim, 2), v: fill(rows * kvHeads * headDim, 3) }],
      { config: { layers: 1, qHeads, kvHeads, headDim }, tokens: new Array<number>(rows).fill(1), promptTokens: 36 });
    const result = await run(['eval', '--trace', path, '--policy', 'f32', '--turns', '2']);
    expect(result.status, result.stderr).toBe(0);
    expect(result.stdout).toMatch(/^trace: 36 context tokens, 2 turns/);
    expect(result.stdout).toMatch(/full\/f32\s+multi-turn\s+2\.\d+ .*-\s+-/); // no needles in a trace
  });
});

describe('kvslim inspect', () => {
  it('lists tensors and metadata', async () => {
    const path = join(dir, 'small.safetensors');
    const { writeFileSync } = await import('node:fs');
    writeFileSync(path, writeSafetensors({ 'a.weight': { shape: [2, 3], data: new Float32Array(6) }, b: { dtype: 'BF16', shape: [4], data: new Uint16Array(4) } }, { note: 'hello' }));
    const result = await run(['inspect', path]);
    expect(result.status).toBe(0);
    expect(result.stdout).toContain('2 tensors, 32 bytes');
    expect(result.stdout).toMatch(/a\.weight\s+F32\s+\[2, 3\]\s+24/);
    expect(result.stdout).toMatch(/b\s+BF16\s+\[4\]\s+8/);
    expect(result.stdout).toContain('  note: hello');
  });
});
