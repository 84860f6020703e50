// KVCache.stepBatch: one decode step of many caches in one call. Row i of its output, and cache
// i's state after it, are those of caches[i].step(...) on a fork taken before (bit for bit), for
// every kind of policy and store, with more caches than threads (the parallel path) and fewer
// (one after another). A refused batch changes no cache.
import { describe, expect, it } from 'vitest';

import { KVCache, type PolicySpec } from '../lib/index.js';
import { Random } from './helpers/random.js';
import { type Heads, randomTokens } from './helpers/tokens.js';
import { expectError } from './helpers/errors.js';
import { expectIdentical } from './helpers/outputs.js';
import { encodeHalf } from './reference/half.js';
import { disposedAfterEach, held } from './helpers/lifetime.js';

const SHAPE: Heads & { layers: number } = { layers: 2, qHeads: 8, kvHeads: 2, headDim: 32 };
const open = disposedAfterEach<KVCache>();
// `npm run test:gpu` (KVSLIM_TEST_DEVICE=cuda): the same on the GPU (where the caches step one after another).
const DEVICE = process.env.KVSLIM_TEST_DEVICE === 'cuda' ? 'cuda' : 'cpu';

/** A cache of the batch: its own policy and prompt length (prefilled, so query-aware policies chose). */
function member(policy: PolicySpec | undefined, tokens: number, random: Random): KVCache {
  const cache = held(open, new KVCache({ ...SHAPE, device: DEVICE, pageTokens: 8, policy }));
  for (let layer = 0; layer < SHAPE.layers; layer++) {
    const t = randomTokens(random, SHAPE, tokens);
    cache.prefill(layer, t.q, t.k, t.v);
  }
  return cache;
}

/** n tokens packed for a batch of n caches: q [n, qHeads, headDim], k, v [n, kvHeads, headDim]. */
const batchTokens = (random: Random, n: number) => randomTokens(random, SHAPE, n);
const qRow = SHAPE.qHeads * SHAPE.headDim, kvRow = SHAPE.kvHeads * SHAPE.headDim;

describe('KVCache.stepBatch', () => {
  const policies: Array<PolicySpec | undefined> = [
    undefined,
    { store: { kind: 'bf16' } },
    { select: { kind: 'h2o', budget: 24, recent: 6 } },
    { select: { kind: 'snapkv', budget: 20, window: 4 } },
    { select: { kind: 'streaming', sink: 2, window: 12 } },
    { store: { kind: 'kivi', bits: 2, group: 32, residual: 32 } },
    { select: { kind: 'retrieval', index: 'graph', topK: 8, sink: 2, window: 6, degree: 6 } },
    { select: { kind: 'actqkv', blocks: 2, blockSize: 4, sink: 1, window: 4, queryWindow: 4 } },
  ];
  for (const count of [policies.length, 1]) {
    it(`${count} cache(s) of every policy and store, several steps: each row and state as the cache's own step()`, () => {
      const random = new Random(count * 13 + 5);
      const caches = policies.slice(0, count).map((policy, i) => member(policy, 30 + 7 * i, random));
      const controls = caches.map((cache) => held(open, cache.fork()));
      for (let step = 0; step < 4; step++) {
        for (let layer = 0; layer < SHAPE.layers; layer++) {
          const t = batchTokens(random, count);
          const out = KVCache.stepBatch(caches, layer, t.q, t.k, t.v);
          expect(out).toHaveLength(count * qRow);
          controls.forEach((control, i) => {
            const expected = control.step(layer, t.q.subarray(i * qRow, (i + 1) * qRow), t.k.subarray(i * kvRow, (i + 1) * kvRow),
              t.v.subarray(i * kvRow, (i + 1) * kvRow));
            expectIdentical(out.subarray(i * qRow, (i + 1) * qRow), expected, `step ${step}, layer ${layer}, cache ${i}`);
          });
        }
      }
      caches.forEach((cache, i) => expect(cache.save().equals(controls[i].save()), `cache ${i} state`).toBe(true));
    });
  }

  it('f16 inputs and a caller\'s out array', () => {
    const random = new Random(3);
    const caches = [0, 1, 2].map((i) => member(undefined, 10 + i, random));
    const controls = caches.map((cache) => held(open, cache.fork()));
    const t = batchTokens(random, 3);
    const half = (x: Float32Array) => encodeHalf(x, 'f16');
    const out = new Float32Array(3 * qRow);
    expect(KVCache.stepBatch(caches, 1, half(t.q), half(t.k), half(t.v), { dtype: 'f16', out })).toBe(out);
    controls.forEach((control, i) => {
      const expected = control.step(1, half(t.q.subarray(i * qRow, (i + 1) * qRow)), half(t.k.subarray(i * kvRow, (i + 1) * kvRow)),
        half(t.v.subarray(i * kvRow, (i + 1) * kvRow)), { dtype: 'f16' });
      expectIdentical(out.subarray(i * qRow, (i + 1) * qRow), expected, `cache ${i}`);
    });
  });

  it('stepBatchAsync: the same rows, in order with each cache\'s async calls, sync calls refused meanwhile', async () => {
    const random = new Random(21);
    const caches = [0, 1, 2].map((i) => member(undefined, 20 + i, random));
    const controls = caches.map((cache) => held(open, cache.fork()));
    const before = randomTokens(random, SHAPE, 1), t = batchTokens(random, 3), after = randomTokens(random, SHAPE, 1);
    // A step queued on cache 0 before the batch runs first; one queued after runs after it.
    const first = caches[0].stepAsync(0, before.q, before.k, before.v);
    const batch = KVCache.stepBatchAsync(caches, 0, t.q, t.k, t.v);
    const last = caches[2].stepAsync(0, after.q, after.k, after.v);
    expectError(() => caches[1].step(0, after.q, after.k, after.v), 'ERR_BUSY');
    expectError(() => KVCache.stepBatch(caches, 0, t.q, t.k, t.v), 'ERR_BUSY');
    const [firstOut, rows, lastOut] = await Promise.all([first, batch, last]);
    expectIdentical(firstOut, controls[0].step(0, before.q, before.k, before.v), 'the step before the batch');
    controls.forEach((control, i) => {
      const expected = control.step(0, t.q.subarray(i * qRow, (i + 1) * qRow), t.k.subarray(i * kvRow, (i + 1) * kvRow), t.v.subarray(i * kvRow, (i + 1) * kvRow));
      expectIdentical(rows.subarray(i * qRow, (i + 1) * qRow), expected, `batch row ${i}`);
    });
    expectIdentical(lastOut, controls[2].step(0, after.q, after.k, after.v), 'the step after the batch');
    caches.forEach((cache, i) => expect(cache.save().equals(controls[i].save()), `cache ${i}`).toBe(true));
    // A refused batch rejects (a NaN) and leaves the caches usable.
    const nan = Float32Array.from(t.k);
    nan[0] = Number.NaN;
    const error = await KVCache.stepBatchAsync(caches, 1, t.q, nan, t.v).then(() => null, (e: unknown) => e);
    expect((error as { code?: string })?.code).toBe('ERR_VALUE');
    expect(KVCache.stepBatch(caches, 1, t.q, t.k, t.v)).toHaveLength(3 * qRow);
  });

  it('stepBatchAsync waits for the pending async calls of every cache, not only those of caches[0]', async () => {
    const random = new Random(22);
    const caches = [0, 1, 2].map((i) => member(undefined, 12 + i, random));
    const controls = caches.map((cache) => held(open, cache.fork()));
    const before = randomTokens(random, SHAPE, 1), t = batchTokens(random, 3);
    // Steps queued on caches 1 and 2 (none on cache 0) before the batch run first.
    const pending = [1, 2].map((i) => caches[i].stepAsync(0, before.q, before.k, before.v));
    const rows = await KVCache.stepBatchAsync(caches, 0, t.q, t.k, t.v);
    const outs = await Promise.all(pending);
    [1, 2].forEach((i, j) => expectIdentical(outs[j], controls[i].step(0, before.q, before.k, before.v), `cache ${i}: the step before the batch`));
    controls.forEach((control, i) => {
      const expected = control.step(0, t.q.subarray(i * qRow, (i + 1) * qRow), t.k.subarray(i * kvRow, (i + 1) * kvRow), t.v.subarray(i * kvRow, (i + 1) * kvRow));
      expectIdentical(rows.subarray(i * qRow, (i + 1) * qRow), expected, `batch row ${i}`);
    });
  });

  it('refuses a bad batch without changing any cache', () => {
    const random = new Random(9);
    const caches = [0, 1, 2].map((i) => member(undefined, 12 + i, random));
    const tokensBefore = caches.map((cache) => cache.tokens(0));
    const t = batchTokens(random, 3);
    expectError(() => KVCache.stepBatch([], 0, t.q, t.k, t.v), 'ERR_OPTION', /non-empty array/);
    expectError(() => KVCache.stepBatch([caches[0], {} as KVCache], 0, t.q, t.k, t.v), 'ERR_OPTION', /caches\[1\]/);
    expectError(() => KVCache.stepBatch([caches[0], caches[1], caches[0]], 0, t.q, t.k, t.v), 'ERR_OPTION', /caches\[2\] appears twice/);
    expectError(() => KVCache.stepBatch(caches.slice(0, 2), 0, t.q, t.k, t.v), 'ERR_SHAPE', /one token per cache/);
    expectError(() => KVCache.stepBatch(caches, 0, t.q, t.k.subarray(kvRow), t.v), 'ERR_SHAPE');
    expectError(() => KVCache.stepBatch(caches, 2, t.q, t.k, t.v), 'ERR_SHAPE', /layer/);
    const other = held(open, new KVCache({ ...SHAPE, kvHeads: 4, device: DEVICE }));
    expectError(() => KVCache.stepBatch([caches[0], other, caches[2]], 0, t.q, t.k, t.v), 'ERR_SHAPE', /caches\[1\]/);
    // A NaN in the last cache's token, or a key an f16 store cannot hold: no cache took its token.
    const nan = Float32Array.from(t.k);
    nan[2 * kvRow + 5] = Number.NaN;
    expectError(() => KVCache.stepBatch(caches, 0, t.q, nan, t.v), 'ERR_VALUE', /k/);
    const huge = Float32Array.from(t.v);
    huge[2 * kvRow + 1] = 1e6;
    expectError(() => KVCache.stepBatch(caches, 0, t.q, t.k, huge), 'ERR_VALUE', /caches\[2\]/);
    expect(caches.map((cache) => cache.tokens(0))).toEqual(tokensBefore);
    // A disposed cache, and one with an async call pending.
    const disposed = member(undefined, 5, random);
    disposed.dispose();
    expectError(() => KVCache.stepBatch([caches[0], disposed, caches[2]], 0, t.q, t.k, t.v), 'ERR_DISPOSED');
    const pending = caches[1].attendAsync(0, t.q.subarray(0, qRow));
    expectError(() => KVCache.stepBatch(caches, 0, t.q, t.k, t.v), 'ERR_BUSY');
    return pending.then(() => {
      expect(caches.map((cache) => cache.tokens(0))).toEqual(tokensBefore);
      expect(KVCache.stepBatch(caches, 0, t.q, t.k, t.v)).toHaveLength(3 * qRow);
      expect(caches.map((cache) => cache.tokens(0))).toEqual(tokensBefore.map((n) => n + 1));
    });
  });
});
