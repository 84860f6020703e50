// attentionScores(): raw q.k * scale for every (query, head, key), against a float64 reference,
// for all heads and for one kv head's group, f32 and f16 inputs.
import { describe, expect, it } from 'vitest';

import { attentionScores, KVSlimError } from '../lib/index.js';
import { Random, relativeL2 } from './helpers/random.js';
import { encodeHalf, roundTo } from './reference/half.js';

function reference(q: ArrayLike<number>, k: ArrayLike<number>, n: number, T: number, qHeads: number, kvHeads: number, D: number,
  scale: number, kvHead: number | null): Float64Array {
  const group = qHeads / kvHeads;
  const heads = kvHead === null ? Array.from({ length: qHeads }, (_, h) => h) : Array.from({ length: group }, (_, g) => kvHead * group + g);
  const out = new Float64Array(n * heads.length * T);
  for (let i = 0; i < n; i++) {
    heads.forEach((h, slot) => {
      const kv = Math.floor(h / group);
      for (let t = 0; t < T; t++) {
        let dot = 0;
        for (let d = 0; d < D; d++) dot += q[(i * qHeads + h) * D + d] * k[(t * kvHeads + kv) * D + d];
        out[(i * heads.length + slot) * T + t] = dot * scale;
      }
    });
  }
  return out;
}

describe('attentionScores', () => {
  const shapes = [
    { n: 1, T: 1, qHeads: 4, kvHeads: 1, D: 16 },
    { n: 3, T: 777, qHeads: 8, kvHeads: 2, D: 64 },
    { n: 9, T: 2100, qHeads: 4, kvHeads: 4, D: 100 },
    // Over 1 MiB of f32 keys per head: the kernel prefetches rows ahead.
    { n: 2, T: 4500, qHeads: 4, kvHeads: 2, D: 72 },
  ];
  for (const [index, s] of shapes.entries()) {
    it(`n ${s.n}, T ${s.T}, ${s.qHeads}/${s.kvHeads}/${s.D}`, () => {
      const random = new Random(7700 + index);
      const q = random.tensor(s.n * s.qHeads * s.D), k = random.tensor(s.T * s.kvHeads * s.D);
      const scale = 1 / Math.sqrt(s.D);
      const all = attentionScores({ q, k, qHeads: s.qHeads, kvHeads: s.kvHeads, headDim: s.D, device: 'cpu' });
      expect(relativeL2(all, reference(q, k, s.n, s.T, s.qHeads, s.kvHeads, s.D, scale, null))).toBeLessThanOrEqual(1e-6);
      const kvHead = s.kvHeads - 1;
      const one = attentionScores({ q, k, qHeads: s.qHeads, kvHeads: s.kvHeads, headDim: s.D, kvHead, scale: 0.5, device: 'cpu' });
      expect(relativeL2(one, reference(q, k, s.n, s.T, s.qHeads, s.kvHeads, s.D, 0.5, kvHead))).toBeLessThanOrEqual(1e-6);
      const half = attentionScores({
        q: encodeHalf(q, 'f16'), k: encodeHalf(k, 'f16'), dtype: 'f16', qHeads: s.qHeads, kvHeads: s.kvHeads, headDim: s.D, device: 'cpu',
      });
      expect(relativeL2(half, reference(roundTo(q, 'f16'), roundTo(k, 'f16'), s.n, s.T, s.qHeads, s.kvHeads, s.D, scale, null)))
        .toBeLessThanOrEqual(1e-6);
    });
  }

  it('rejects bad input with coded errors', () => {
    const q = new Float32Array(2 * 4 * 8).fill(0.5), k = new Float32Array(3 * 2 * 8).fill(0.25);
    const expectCode = (call: () => unknown, code: string) => {
      let thrown: unknown;
      try { call(); } catch (error) { thrown = error; }
      expect(thrown).toBeInstanceOf(KVSlimError);
      expect((thrown as KVSlimError).code).toBe(code);
    };
    expectCode(() => attentionScores({ q, k, qHeads: 4, kvHeads: 2, headDim: 8, kvHead: 2 }), 'ERR_SHAPE');
    expectCode(() => attentionScores({ q, k: k.subarray(1), qHeads: 4, kvHeads: 2, headDim: 8 }), 'ERR_SHAPE');
    expectCode(() => attentionScores({ q, k, qHeads: 3, kvHeads: 2, headDim: 8 }), 'ERR_OPTION');
    const bad = Float32Array.from(k);
    bad[5] = Number.NaN;
    expectCode(() => attentionScores({ q, k: bad, qHeads: 4, kvHeads: 2, headDim: 8 }), 'ERR_VALUE');
  });
});
