// Stateless attention() against the float64 reference (test/reference/attention.ts), over the
// shapes of helpers/attention-cases.ts, which select each CPU path: decode (n x group <= 16 rows
// per kv head, one or several row groups, split over keys when T > 1024) and tiled prefill (more
// rows, keys in 2048-key chunks).
import { describe, expect, it } from 'vitest';

import { attention } from '../lib/index.js';
import { ATTENTION_CASES, compareAttention, label } from './helpers/attention-cases.js';
import { Random, relativeL2 } from './helpers/random.js';
import { referenceAttention } from './reference/attention.js';
import { type Dtype, encodeHalf, roundTo } from './reference/half.js';

// Relative L2 error bound per input dtype. The kernels compute in f32 (exp2 by a degree-6
// polynomial on the SIMD levels) from inputs that are exact once decoded, so every dtype meets
// the same bound. Observed over this file's cases, at KVSLIM_SIMD=scalar, avx2 and avx512:
// 1e-7 .. 6e-7 for flat softmax, at most 1.8e-6 for scale 1.7 (scores ~ +-20, where f32
// rounding of q * scale shows). 2e-5 leaves a 10x margin, and stays 100x below what an
// off-by-one causal window costs (test below).
const TOLERANCE: Record<Dtype, number> = { f32: 2e-5, f16: 2e-5, bf16: 2e-5 };

let seed = 1;
for (const group of ATTENTION_CASES) {
  describe(`attention: ${group.title}`, () => {
    for (const { shape, dtypes } of group.cases) {
      for (const dtype of dtypes) {
        const caseSeed = seed++;
        it(label(shape, dtype), () => {
          const { relative } = compareAttention(shape, dtype, caseSeed);
          expect(relative[0]).toBeLessThanOrEqual(TOLERANCE[dtype]);
        });
      }
    }
  });
}

describe('attention: the bound can fail', () => {
  it('a causal window one key short, or aligned at the start, is far outside the tolerance', () => {
    const random = new Random(9000);
    const [n, T, qHeads, kvHeads, headDim] = [4, 1025, 8, 2, 64];
    const q = random.tensor(n * qHeads * headDim), k = random.tensor(T * kvHeads * headDim), v = random.tensor(T * kvHeads * headDim);
    const out = attention({ q, k, v, qHeads, kvHeads, headDim });
    const rowLength = kvHeads * headDim;
    // One key fewer: the last key dropped (every query's window shrinks by one).
    const short = referenceAttention({ q, k: k.subarray(0, (T - 1) * rowLength), v: v.subarray(0, (T - 1) * rowLength), qHeads, kvHeads, headDim });
    expect(relativeL2(out, short)).toBeGreaterThan(100 * TOLERANCE.f32);
    // Aligned at the start instead of the end: query i attends keys <= i.
    const misaligned = referenceAttention({ q, k: k.subarray(0, n * rowLength), v: v.subarray(0, n * rowLength), qHeads, kvHeads, headDim });
    expect(relativeL2(out, misaligned)).toBeGreaterThan(100 * TOLERANCE.f32);
    expect(relativeL2(out, referenceAttention({ q, k, v, qHeads, kvHeads, headDim }))).toBeLessThanOrEqual(TOLERANCE.f32);
  });
});

describe('attention: defaults', () => {
  it('causal defaults to true and scale to 1/sqrt(headDim)', () => {
    const random = new Random(9001);
    const shape = { qHeads: 4, kvHeads: 2, headDim: 64 };
    const q = random.tensor(5 * 4 * 64), k = random.tensor(9 * 2 * 64), v = random.tensor(9 * 2 * 64);
    const implicit = attention({ q, k, v, ...shape });
    const explicit = attention({ q, k, v, ...shape, causal: true, scale: 1 / 8 });
    expect(relativeL2(implicit, explicit)).toBeLessThanOrEqual(1e-7);
    const nonCausal = attention({ q, k, v, ...shape, causal: false });
    expect(relativeL2(nonCausal, implicit)).toBeGreaterThan(1e-2);
  });

  it('reads inputs that are views into larger buffers at odd offsets', () => {
    const random = new Random(9003);
    const [n, T, qHeads, kvHeads, headDim] = [3, 40, 8, 2, 72];
    const q = random.tensor(n * qHeads * headDim), k = random.tensor(T * kvHeads * headDim), v = random.tensor(T * kvHeads * headDim);
    // Everything around the view is NaN: reading past it would show in the output or as ERR_VALUE.
    const view = <A extends Float32Array | Uint16Array>(x: A, offset: number): A => {
      const nan = x instanceof Float32Array ? Number.NaN : 0x7fc0;
      const backing = new (x.constructor as new (length: number) => A)(x.length + offset + 5).fill(nan as never);
      backing.set(x, offset);
      return backing.subarray(offset, offset + x.length) as A;
    };
    const expected = referenceAttention({ q, k, v, qHeads, kvHeads, headDim });
    const out = attention({ q: view(q, 3), k: view(k, 1), v: view(v, 7), qHeads, kvHeads, headDim });
    expect(relativeL2(out, expected)).toBeLessThanOrEqual(TOLERANCE.f32);
    const bits = (x: Float32Array) => view(encodeHalf(x, 'bf16'), 1);
    const halfOut = attention({ q: bits(q), k: bits(k), v: bits(v), qHeads, kvHeads, headDim, dtype: 'bf16' });
    const halfExpected = referenceAttention({ q: roundTo(q, 'bf16'), k: roundTo(k, 'bf16'), v: roundTo(v, 'bf16'), qHeads, kvHeads, headDim });
    expect(relativeL2(halfOut, halfExpected)).toBeLessThanOrEqual(TOLERANCE.bf16);
  });

  it('writes into a caller-owned out array when given one', () => {
    const random = new Random(9004);
    const [n, T, qHeads, kvHeads, headDim] = [20, 50, 4, 2, 64];
    const q = random.tensor(n * qHeads * headDim), k = random.tensor(T * kvHeads * headDim), v = random.tensor(T * kvHeads * headDim);
    const fresh = attention({ q, k, v, qHeads, kvHeads, headDim });
    const out = new Float32Array(q.length).fill(Number.NaN);
    const returned = attention({ q, k, v, qHeads, kvHeads, headDim, out });
    expect(returned).toBe(out);
    expect(out).toEqual(fresh);
    // A view into a larger buffer: only the view is written.
    const backing = new Float32Array(q.length + 10).fill(-1);
    const view = backing.subarray(5, 5 + q.length);
    attention({ q, k, v, qHeads, kvHeads, headDim, out: view });
    expect(view).toEqual(fresh);
    expect([...backing.subarray(0, 5), ...backing.subarray(5 + q.length)]).toEqual(new Array(10).fill(-1));
  });

  it('does not modify its inputs', () => {
    const random = new Random(9002);
    const q = random.tensor(3 * 8 * 64), k = random.tensor(11 * 2 * 64), v = random.tensor(11 * 2 * 64);
    const copies = [q.slice(), k.slice(), v.slice()];
    attention({ q, k, v, qHeads: 8, kvHeads: 2, headDim: 64 });
    expect([q, k, v]).toEqual(copies);
  });
});
