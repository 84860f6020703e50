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
    // Over 16 rows per kv head (n x group): the register-tiled path over transposed key blocks.
    // 17 rows, padded channels (100), a partial last key block, two chunks of 2048 keys:
    { n: 17, T: 2100, qHeads: 4, kvHeads: 4, D: 100 },
    // 2 row tiles of 128 (the second partial), GQA, one token:
    { n: 45, T: 1, qHeads: 8, kvHeads: 2, D: 64 },
    // MQA: 32 rows of one kv head from a single query; odd T over three chunks, odd dims:
    { n: 1, T: 4133, qHeads: 32, kvHeads: 1, D: 24 },
    { n: 70, T: 333, qHeads: 8, kvHeads: 2, D: 128 },
    // No padding at all (channels a multiple of the vector width, whole blocks): the key buffer is
    // reused between chunks without zeroing.
    { n: 5, T: 2080, qHeads: 8, kvHeads: 2, D: 64 },
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

  it('writes into out when given: the same array back, the same scores', () => {
    const random = new Random(7790);
    const [n, T, qHeads, kvHeads, D] = [20, 300, 8, 2, 32];
    const q = random.tensor(n * qHeads * D), k = random.tensor(T * kvHeads * D);
    for (const kvHead of [undefined, 1]) {
      const fresh = attentionScores({ q, k, qHeads, kvHeads, headDim: D, kvHead, device: 'cpu' });
      const out = new Float32Array(fresh.length).fill(Number.NaN);
      const returned = attentionScores({ q, k, qHeads, kvHeads, headDim: D, kvHead, device: 'cpu', out });
      expect(returned).toBe(out);
      expect(Array.from(out)).toEqual(Array.from(fresh));
    }
  });

  it('rejects bad input with coded errors', () => {
    const q = new Float32Array(2 * 4 * 8).fill(0.5), k = new Float32Array(3 * 2 * 8).fill(0.25);
    const expectCode = (call: () => unknown, code: string) => {
      let thrown: unknown;
      try { call(); } catch (error) { thrown = error; }
      expect(thrown).toBeInstanceOf(KVSlimError);
      expect((thrown as KVSlimError).code).toBe(code);
    };
    expectCode(() => attentionScores({ q, k, qHeads: 4, kvHeads: 2, headDim: 8, kvHead: 2 }), 'ERR_SHAPE');
    expectCode(() => attentionScores({ q, k, qHeads: 4, kvHeads: 2, headDim: 8, kvHead: 0.5 }), 'ERR_SHAPE');
    expectCode(() => attentionScores({ q, k: k.subarray(1), qHeads: 4, kvHeads: 2, headDim: 8 }), 'ERR_SHAPE');
    expectCode(() => attentionScores({ q, k, qHeads: 3, kvHeads: 2, headDim: 8 }), 'ERR_OPTION');
    const bad = Float32Array.from(k);
    bad[5] = Number.NaN;
    expectCode(() => attentionScores({ q, k: bad, qHeads: 4, kvHeads: 2, headDim: 8 }), 'ERR_VALUE');
    // out: 2 x 4 x 3 floats (all heads), 2 x 2 x 3 (one kv head's group); a Float32Array; no shared memory.
    expectCode(() => attentionScores({ q, k, qHeads: 4, kvHeads: 2, headDim: 8, out: new Float32Array(23) }), 'ERR_SHAPE');
    expectCode(() => attentionScores({ q, k, qHeads: 4, kvHeads: 2, headDim: 8, kvHead: 0, out: new Float32Array(24) }), 'ERR_SHAPE');
    expectCode(() => attentionScores({ q, k, qHeads: 4, kvHeads: 2, headDim: 8, out: new Float64Array(24) as never }), 'ERR_DTYPE');
    const shared = new Float32Array(q.length + 24);
    shared.set(q);
    expectCode(() => attentionScores({ q: shared.subarray(0, q.length), k, qHeads: 4, kvHeads: 2, headDim: 8, out: shared.subarray(q.length - 1, q.length + 23) }), 'ERR_OPTION');
    const sharedK = new Float32Array(24 + k.length);
    sharedK.set(k, 23);
    expectCode(() => attentionScores({ q, k: sharedK.subarray(23, 23 + k.length), qHeads: 4, kvHeads: 2, headDim: 8, out: sharedK.subarray(0, 24) }), 'ERR_OPTION');
  });
});
