// A backend that does not attend an older segment (kept tokens) in the same call as the rest
// (Backend::joinsOlder: CUDA) gets, from core, either two calls merged by log-sum-exp or, when H2O
// needs the call's attention mass, both segments as one view of row pointers. KVSLIM_CPU_JOINS_OLDER=0
// makes the CPU backend such a backend, so core's paths for it run here; read once per process,
// so each setting runs in a child (test/fixtures/join-child.mjs). Through prompts, a second
// prompt over kept tokens and steps, both must keep the same tokens and give the same outputs
// to f32 rounding (the joined and the merged calls sum in different orders). The same holds with
// KVSLIM_CPU_FUSES_MASS=0, where H2O's mass comes from attentionMass after the call, as on a
// backend whose attention cannot sum it.
import { execFileSync } from 'node:child_process';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';

import { ensureCompiled, repositoryRoot } from './helpers/dist.js';

const child = join(repositoryRoot, 'test/fixtures/join-child.mjs');

interface ChildResult { outputs: string[]; positions: string[] }

function run(settings: Record<string, string> = {}): ChildResult {
  const env: NodeJS.ProcessEnv = { ...process.env };
  delete env.KVSLIM_CPU_JOINS_OLDER;
  delete env.KVSLIM_CPU_FUSES_MASS;
  Object.assign(env, settings);
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
    expectSame(run(), run({ KVSLIM_CPU_JOINS_OLDER: '0' }));
  });

  // KVSLIM_CPU_FUSES_MASS=0: the attention call sums no mass, so H2O asks attentionMass per head
  // after it (core's path for such a backend), over the kept tokens and the tail.
  it('h2o keeps the same tokens whether the attention sums the mass or attentionMass does', () => {
    expectSame(run(), run({ KVSLIM_CPU_FUSES_MASS: '0' }));
  });
});

// Both runs keep the same tokens and give the same outputs to f32 rounding.
function expectSame(reference: ChildResult, other: ChildResult): void {
  // 3 cases: 8 + 9 + 5 calls; positions per call and kv head.
  expect(reference.outputs).toHaveLength(22);
  expect(other.outputs).toHaveLength(reference.outputs.length);
  expect(other.positions).toEqual(reference.positions);
  // Eviction happened: some call keeps fewer positions than the tokens seen.
  expect(reference.positions.some((p) => p.split(',').length < 100)).toBe(true);
  reference.outputs.forEach((expected, i) => {
    const a = floats(other.outputs[i]), b = floats(expected);
    expect(a.length, `call ${i}`).toBe(b.length);
    expect(b.some((x) => x !== 0), `call ${i}`).toBe(true);
    expect(relativeL2(a, b), `call ${i}`).toBeLessThan(1e-5);
  });
}
