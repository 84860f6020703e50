// A backend that does not attend an older segment (kept tokens) in the same call as the rest
// (Backend::joinsOlder: CUDA) gets, from core, either two calls merged by log-sum-exp or, when H2O
// needs the call's attention mass, both segments as one view of row pointers. KVSLIM_CPU_JOINS_OLDER=0
// makes the CPU backend such a backend, so core's paths for it run here; read once per process,
// so each setting runs in a child (test/fixtures/join-child.mjs). Through prompts, a second
// prompt over kept tokens and steps, both must keep the same tokens and give the same outputs
// to f32 rounding (the joined and the merged calls sum in different orders).
import { execFileSync } from 'node:child_process';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';

import { ensureCompiled, repositoryRoot } from './helpers/dist.js';

const child = join(repositoryRoot, 'test/fixtures/join-child.mjs');

interface ChildResult { outputs: string[]; positions: string[] }

function run(joins: string | undefined): ChildResult {
  const env: NodeJS.ProcessEnv = { ...process.env };
  delete env.KVSLIM_CPU_JOINS_OLDER;
  if (joins !== undefined) env.KVSLIM_CPU_JOINS_OLDER = joins;
  const stdout = execFileSync(process.execPath, [child], { env, encoding: 'utf8', timeout: 120_000, maxBuffer: 1 << 28 });
  return JSON.parse(stdout.trim().split('\n').at(-1) ?? '') as ChildResult;
}

function floats(base64: string): Float64Array {
  const bytes = Buffer.from(base64, 'base64');
  return Float64Array.from(new Float32Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 4));
}

function relativeL2(actual: Float64Array, expected: Float64Array): number {
  let difference = 0, norm = 0;
  for (let i = 0; i < expected.length; i++) {
    difference += (actual[i] - expected[i]) ** 2;
    norm += expected[i] ** 2;
  }
  return Math.sqrt(difference / norm);
}

describe('an older segment joined by the backend, or by core for one that does not join', () => {
  beforeAll(() => ensureCompiled());

  it('h2o and snapkv keep the same tokens and give the same outputs either way', () => {
    const joining = run(undefined);
    const separate = run('0');
    // 3 cases: 8 + 9 + 5 calls; positions per call and kv head.
    expect(joining.outputs).toHaveLength(22);
    expect(separate.outputs).toHaveLength(joining.outputs.length);
    expect(separate.positions).toEqual(joining.positions);
    // Eviction happened: some call keeps fewer positions than the tokens seen.
    expect(joining.positions.some((p) => p.split(',').length < 100)).toBe(true);
    joining.outputs.forEach((expected, i) => {
      const a = floats(separate.outputs[i]), b = floats(expected);
      expect(a.length, `call ${i}`).toBe(b.length);
      expect(b.some((x) => x !== 0), `call ${i}`).toBe(true);
      expect(relativeL2(a, b), `call ${i}`).toBeLessThan(1e-5);
    });
  });
});
