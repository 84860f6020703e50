// saveAsync() and KVCache.loadAsync(): save() and load() on a worker thread. The bytes are the
// sync call's, the loaded cache is the sync load's, calls on one cache stay in order, and errors
// arrive as the sync calls' (bad arguments throw at the call, damaged bytes reject).
import { describe, expect, it } from 'vitest';

import { KVCache, KVSlimError, type PolicySpec } from '../lib/index.js';
import { Random } from './helpers/random.js';
import { type Heads, randomTokens } from './helpers/tokens.js';
import { expectError } from './helpers/errors.js';
import { expectIdentical } from './helpers/outputs.js';
import { disposedAfterEach } from './helpers/lifetime.js';

const SHAPE: Heads & { layers: number } = { layers: 2, qHeads: 6, kvHeads: 3, headDim: 32 };
const open = disposedAfterEach<KVCache>();
// `npm run test:gpu` (KVSLIM_TEST_DEVICE=cuda): caches on the GPU.
const DEVICE = process.env.KVSLIM_TEST_DEVICE === 'cuda' ? 'cuda' : 'cpu';

function filled(policy: PolicySpec | undefined, seed: number): KVCache {
  const cache = new KVCache({ ...SHAPE, device: DEVICE, pageTokens: 8, policy });
  open.push(cache);
  const random = new Random(seed);
  for (let layer = 0; layer < SHAPE.layers; layer++) {
    const t = randomTokens(random, SHAPE, 70);
    cache.prefill(layer, t.q, t.k, t.v);
    for (let i = 0; i < 3; i++) {
      const s = randomTokens(random, SHAPE, 1);
      cache.step(layer, s.q, s.k, s.v);
    }
  }
  return cache;
}

async function expectRejection(promise: Promise<unknown>, code: string, message?: RegExp): Promise<void> {
  const error = await promise.then(() => null, (e: unknown) => e);
  expect(error, `expected a rejection with ${code}`).toBeInstanceOf(KVSlimError);
  expect((error as KVSlimError).code).toBe(code);
  if (message) expect((error as KVSlimError).message).toMatch(message);
}

describe('saveAsync() / KVCache.loadAsync()', () => {
  const policies: Array<[string, PolicySpec | undefined]> = [
    ['full f16', undefined],
    ['KIVI-2', { store: { kind: 'kivi', bits: 2, group: 16, residual: 16 } }],
    ['h2o', { select: { kind: 'h2o', budget: 32, recent: 8 } }],
    ['graph retrieval (version 8)', { select: { kind: 'retrieval', index: 'graph', topK: 6, sink: 2, window: 6, degree: 6 } }],
  ];
  for (const [name, policy] of policies) {
    it(`${name}: the bytes of save(), and a cache that goes on as load()'s`, async () => {
      const cache = filled(policy, name.length);
      const bytes = await cache.saveAsync();
      expect(Buffer.isBuffer(bytes)).toBe(true);
      expect(bytes.equals(cache.save())).toBe(true);
      const loaded = await KVCache.loadAsync(bytes, { device: DEVICE });
      open.push(loaded);
      const control = KVCache.load(bytes, { device: DEVICE });
      open.push(control);
      expect(loaded.policy).toEqual(control.policy);
      expect(loaded.save().equals(bytes)).toBe(true);
      const t = randomTokens(new Random(3), SHAPE, 1);
      for (let layer = 0; layer < SHAPE.layers; layer++) {
        expectIdentical(loaded.step(layer, t.q, t.k, t.v), control.step(layer, t.q, t.k, t.v), `${name} layer ${layer}`);
      }
    });
  }

  it('runs in order with the cache\'s other async calls, and sync calls wait for it (ERR_BUSY)', async () => {
    const cache = filled(undefined, 7);
    const before = cache.tokens(0);
    const t = randomTokens(new Random(4), SHAPE, 1);
    const stepped = cache.stepAsync(0, t.q, t.k, t.v);
    const saved = cache.saveAsync();
    expectError(() => cache.save(), 'ERR_BUSY', /save/);
    expectError(() => cache.append(0, t.k, t.v), 'ERR_BUSY');
    await stepped;
    const loaded = KVCache.load(await saved, { device: DEVICE });
    open.push(loaded);
    expect(loaded.tokens(0), 'the step queued before the save is in it').toBe(before + 1);
    expect(loaded.tokens(1)).toBe(cache.tokens(1));
  });

  it('dispose() while a save is pending: the save completes, then the cache is released', async () => {
    const cache = filled(undefined, 8);
    const saved = cache.saveAsync();
    cache.dispose();
    expect(cache.disposed).toBe(true);
    const loaded = KVCache.load(await saved, { device: DEVICE });
    open.push(loaded);
    expect(loaded.tokens(0)).toBe(73);
    expectError(() => cache.saveAsync(), 'ERR_DISPOSED');
  });

  it('bad arguments throw at the call; damaged bytes reject with ERR_CORRUPT', async () => {
    expectError(() => KVCache.loadAsync([1, 2, 3] as unknown as Uint8Array), 'ERR_OPTION', /Buffer or Uint8Array/);
    expectError(() => KVCache.loadAsync(new Uint8Array(8), { device: 'tpu' as 'cpu' }), 'ERR_OPTION', /device/);
    expectError(() => KVCache.loadAsync(new Uint8Array(8), { threads: 0 }), 'ERR_OPTION', /threads/);
    await expectRejection(KVCache.loadAsync(new Uint8Array(64), { device: DEVICE }), 'ERR_CORRUPT', /KVSLIM02/);
    const bytes = filled(undefined, 9).save();
    bytes[bytes.length - 20] ^= 1;
    await expectRejection(KVCache.loadAsync(bytes, { device: DEVICE }), 'ERR_CORRUPT', /checksum/);
    await expectRejection(KVCache.loadAsync(bytes.subarray(0, 100), { device: DEVICE }), 'ERR_CORRUPT');
  });
});
