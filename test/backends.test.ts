// backends(), setThreads() and probeMachine() (lib/backends.ts, lib/probes.ts).
import { describe, expect, it } from 'vitest';

import { attention, backends, probeMachine, setThreads } from '../lib/index.js';
import { compareAttention } from './helpers/attention-cases.js';
import { Random, relativeL2 } from './helpers/random.js';
import { referenceAttention } from './reference/attention.js';

// As in attention.test.ts.
const TOLERANCE = 2e-5;

describe('backends()', () => {
  it('describes the CPU and CUDA', () => {
    const found = backends();
    expect(Object.keys(found).sort()).toEqual(['cpu', 'cuda']);
    expect(['scalar', 'avx2', 'avx512']).toContain(found.cpu.simd);
    expect(typeof found.cpu.avx2).toBe('boolean');
    expect(typeof found.cpu.avx512).toBe('boolean');
    // A level is only in use if the CPU has it; AVX-512 kernels imply AVX2 ones.
    if (found.cpu.simd === 'avx2') expect(found.cpu.avx2).toBe(true);
    if (found.cpu.simd === 'avx512') expect(found.cpu.avx512).toBe(true);
    if (found.cpu.avx512) expect(found.cpu.avx2).toBe(true);
    expect(found.cpu.forced === null || typeof found.cpu.forced === 'string').toBe(true);
    expect(Number.isInteger(found.cpu.threads)).toBe(true);
    expect(found.cpu.threads).toBeGreaterThanOrEqual(1);
    if (found.cuda !== null) {
      expect(typeof found.cuda.available).toBe('boolean');
      expect(typeof found.cuda.reason).toBe('string');
      expect(found.cuda).not.toHaveProperty('built');
      if (!found.cuda.available) expect(found.cuda.reason.length).toBeGreaterThan(0);
      else expect(found.cuda.devices).toBeGreaterThanOrEqual(1);
    }
  });

  it('without KVSLIM_SIMD, the best level the CPU has is in use', () => {
    const { cpu } = backends();
    const forced = process.env.KVSLIM_SIMD;
    if (forced !== undefined && forced !== '' && forced !== 'auto') {
      expect(cpu.simd).toBe(forced);
    } else {
      expect(cpu.simd).toBe(cpu.avx512 ? 'avx512' : cpu.avx2 ? 'avx2' : 'scalar');
    }
  });
});

describe('setThreads()', () => {
  it('resizes the pool; attention still matches the reference on one thread', () => {
    const original = backends().cpu.threads;
    try {
      setThreads(1);
      expect(backends().cpu.threads).toBe(1);
      // Decode with key splits, and tiled prefill.
      for (const [shape, seed] of [
        [{ n: 1, T: 3000, qHeads: 8, kvHeads: 2, headDim: 128 }, 11],
        [{ n: 64, T: 200, qHeads: 4, kvHeads: 1, headDim: 80 }, 12],
      ] as const) {
        const { relative } = compareAttention(shape, 'f16', seed);
        expect(relative[0]).toBeLessThanOrEqual(TOLERANCE);
      }
      setThreads(3);
      expect(backends().cpu.threads).toBe(3);
      const { relative } = compareAttention({ n: 5, T: 2100, qHeads: 8, kvHeads: 1, headDim: 64 }, 'f32', 13);
      expect(relative[0]).toBeLessThanOrEqual(TOLERANCE);
    } finally {
      setThreads(original);
    }
    expect(backends().cpu.threads).toBe(original);
  });

  it('the threads option of attention() gives the reference result on one thread', () => {
    const random = new Random(14);
    const [T, qHeads, kvHeads, headDim] = [4096, 4, 1, 64];
    const q = random.tensor(qHeads * headDim), k = random.tensor(T * kvHeads * headDim), v = random.tensor(T * kvHeads * headDim);
    const expected = referenceAttention({ q, k, v, qHeads, kvHeads, headDim });
    const one = attention({ q, k, v, qHeads, kvHeads, headDim, threads: 1 });
    const pool = attention({ q, k, v, qHeads, kvHeads, headDim });
    expect(relativeL2(one, expected)).toBeLessThanOrEqual(TOLERANCE);
    expect(relativeL2(pool, expected)).toBeLessThanOrEqual(TOLERANCE);
  });
});

describe('probeMachine()', () => {
  it('returns positive rates', () => {
    const limits = probeMachine({ bufferMiB: 64, repeats: 1 });
    expect(limits.readBytesPerSecond).toBeGreaterThan(0);
    expect(Number.isFinite(limits.readBytesPerSecond)).toBe(true);
    expect(limits.fmaFlopsPerSecond).toBeGreaterThan(0);
    expect(Number.isFinite(limits.fmaFlopsPerSecond)).toBe(true);
    expect(limits.threads).toBe(backends().cpu.threads);
    const single = probeMachine({ bufferMiB: 16, repeats: 1, threads: 1 });
    expect(single.threads).toBe(1);
    expect(single.readBytesPerSecond).toBeGreaterThan(0);
  });
});
