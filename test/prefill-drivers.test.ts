// The CPU prefill has two drivers: head by head over all keys (the default, and the one that sums
// H2O's prompt mass from its own scores) and in key chunks of every head (beyond
// KVSLIM_PREFILL_HEAD_FLOATS, where H2O's mass takes a second pass). Both run the same kernel over
// the same key blocks in the same order, so their outputs must agree bit for bit; H2O must keep the
// same tokens either way. Head by head, the query rows and outputs are staged head-major up to
// KVSLIM_PREFILL_STAGING_FLOATS, and read and written in place beyond it: the same bits again. The
// budgets are read once per process, so each driver runs in a child
// (test/fixtures/prefill-child.mjs). The outputs themselves are checked against the float64
// reference in attention.test.ts, cache.test.ts and select*.test.ts, in process (head by head).
import { execFileSync } from 'node:child_process';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';

import { ensureCompiled, repositoryRoot } from './helpers/dist.js';

const child = join(repositoryRoot, 'test/fixtures/prefill-child.mjs');

function run(headFloats: string | undefined, stagingFloats?: string): string[] {
  const env: NodeJS.ProcessEnv = { ...process.env };
  delete env.KVSLIM_PREFILL_HEAD_FLOATS;
  delete env.KVSLIM_PREFILL_STAGING_FLOATS;
  if (headFloats !== undefined) env.KVSLIM_PREFILL_HEAD_FLOATS = headFloats;
  if (stagingFloats !== undefined) env.KVSLIM_PREFILL_STAGING_FLOATS = stagingFloats;
  const stdout = execFileSync(process.execPath, [child], { env, encoding: 'utf8', timeout: 120_000, maxBuffer: 1 << 28 });
  return (JSON.parse(stdout.trim().split('\n').at(-1) ?? '') as { outputs: string[] }).outputs;
}

describe('prefill drivers agree', () => {
  beforeAll(() => ensureCompiled());

  it('head by head (rows staged or not) and in chunks: the same output bits, the same H2O positions', () => {
    const byHead = run(undefined);
    const unstaged = run(undefined, '0');
    const chunked = run('0');
    const labels = ['GQA 8/2 d64, 300 causal', 'MHA d100, 277 causal', 'GQA 6/2 d48, 96 queries over 2300 keys',
      'non-causal 70 x 500', 'bf16 cache, prompt 150', 'bf16 cache, 140 more', 'h2o prompt output', 'h2o positions'];
    expect(byHead).toHaveLength(labels.length);
    expect(chunked).toHaveLength(labels.length);
    expect(unstaged).toHaveLength(labels.length);
    labels.forEach((label, i) => {
      expect(Buffer.from(byHead[i], 'base64').length, label).toBeGreaterThan(0);
      expect(chunked[i], label).toBe(byHead[i]);
      expect(unstaged[i], label).toBe(byHead[i]);
    });
  });
});
