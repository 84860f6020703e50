// cache.truncate(layer, tokens): a speculative step's rejected drafts leave the cache. Every case
// is checked against the float64 reference over exactly the accepted tokens (test/helpers/tokens.ts
// LayerMirror, rebuilt from the kept prefix), across page boundaries, for each dense store; forks
// that share the truncated pages keep theirs; bytes fall with the tokens; save/load round-trips;
// and every bad call is an error that leaves the cache as it was.
import { describe, expect, it } from 'vitest';

import { KVCache } from '../lib/index.js';
import { expectError } from './helpers/errors.js';
import { expectClose } from './helpers/outputs.js';
import { Random } from './helpers/random.js';
import { type Heads, LayerMirror, type Tokens, randomTokens, sliceTokens } from './helpers/tokens.js';
import { disposedAfterEach } from './helpers/lifetime.js';

const TOLERANCE = 2e-5;  // f32 accumulation, as cache.test.ts
const DEVICE = process.env.KVSLIM_TEST_DEVICE === 'cuda' ? 'cuda' : 'cpu';
const heads: Heads = { qHeads: 8, kvHeads: 2, headDim: 64 };

const open = disposedAfterEach<KVCache>();

function cacheOf(store: 'f32' | 'f16' | 'bf16', extra: Record<string, unknown> = {}): KVCache {
  // pageTokens 16: truncation points fall inside pages, on their edges, and free whole pages.
  const cache = new KVCache({ layers: 2, ...heads, device: DEVICE, pageTokens: 16, policy: { store: { kind: store } }, ...extra });
  open.push(cache);
  return cache;
}

/** The reference of a layer that received exactly these tokens, in order. */
function mirrorOf(store: 'f32' | 'f16' | 'bf16', parts: Tokens[]): LayerMirror {
  const mirror = new LayerMirror(heads, store);
  for (const part of parts) mirror.append(part.k, part.v);
  return mirror;
}

describe('truncate drops the newest tokens of a layer', () => {
  for (const store of ['f32', 'f16', 'bf16'] as const) {
    it(`${store}: speculative steps (5 drafts, some accepted), the reference over what was accepted`, () => {
      const random = new Random(store.length * 101);
      const cache = cacheOf(store);
      const prompt = randomTokens(random, heads, 37);
      cache.prefill(0, prompt.q, prompt.k, prompt.v);
      const accepted: Tokens[] = [prompt];
      // Accept 2, 0, 5 and 4 of 5 drafts: ends inside a page, on its edge, past it.
      for (const take of [2, 0, 5, 4]) {
        const before = cache.tokens(0);
        const drafts = randomTokens(random, heads, 5);
        const verified = cache.step(0, drafts.q, drafts.k, drafts.v);
        expectClose(verified, mirrorOf(store, [...accepted, drafts]).attend(drafts.q), `${store} verify`, TOLERANCE);
        cache.truncate(0, before + take);
        expect(cache.tokens(0)).toBe(before + take);
        if (take > 0) accepted.push(sliceTokens(drafts, heads, 0, take));
      }
      // The next step sees only the accepted tokens.
      const next = randomTokens(random, heads, 1);
      const out = cache.step(0, next.q, next.k, next.v);
      expectClose(out, mirrorOf(store, [...accepted, next]).attend(next.q), `${store} after`, TOLERANCE);
      // The other layer never moved.
      expect(cache.tokens(1)).toBe(0);
    });
  }

  it('to zero tokens, to the same count, and on a layer never written', () => {
    const random = new Random(3);
    const cache = cacheOf('f16');
    const t = randomTokens(random, heads, 20);
    cache.append(0, t.k, t.v);
    cache.truncate(0, 20);
    expect(cache.tokens(0)).toBe(20);
    cache.truncate(1, 0);
    cache.truncate(0, 0);
    expect(cache.tokens(0)).toBe(0);
    expect(cache.stats().bytes.kv).toBe(0);
    const again = randomTokens(random, heads, 3);
    const out = cache.step(0, again.q, again.k, again.v);
    expectClose(out, mirrorOf('f16', [again]).attend(again.q), 'after emptying', TOLERANCE);
  });

  it('frees the bytes of the dropped tokens', () => {
    const random = new Random(4);
    const cache = cacheOf('f16');
    const t = randomTokens(random, heads, 50);
    cache.append(0, t.k, t.v);
    const perToken = cache.stats().bytes.kv / 50;
    cache.truncate(0, 18);
    expect(cache.stats().bytes.kv).toBeCloseTo(perToken * 18, 6);
    expect(cache.stats().tokens.kept).toBeCloseTo(18 / 2, 6);  // mean over 2 layers, one empty
  });

  it('a fork keeps the tokens its parent drops, and the parent keeps what the fork drops', () => {
    const random = new Random(5);
    const parent = cacheOf('f16');
    const prompt = randomTokens(random, heads, 40);
    parent.append(0, prompt.k, prompt.v);
    const child = parent.fork();
    open.push(child);
    parent.truncate(0, 25);  // inside a page the child still reads
    const p = randomTokens(random, heads, 4);
    const c = randomTokens(random, heads, 2);
    const parentOut = parent.step(0, p.q, p.k, p.v);  // writes into the shared page: copies it first
    const childOut = child.step(0, c.q, c.k, c.v);
    expectClose(parentOut, mirrorOf('f16', [sliceTokens(prompt, heads, 0, 25), p]).attend(p.q), 'parent', TOLERANCE);
    expectClose(childOut, mirrorOf('f16', [prompt, c]).attend(c.q), 'child', TOLERANCE);
    child.truncate(0, 3);
    const q = randomTokens(random, heads, 1).q;
    expectClose(parent.attend(0, q), mirrorOf('f16', [sliceTokens(prompt, heads, 0, 25), p]).attend(q), 'parent after', TOLERANCE);
  });

  it('save and load after a truncation hold the truncated layer', () => {
    const random = new Random(6);
    const cache = cacheOf('bf16');
    const t = randomTokens(random, heads, 33);
    cache.append(0, t.k, t.v);
    cache.truncate(0, 17);
    const loaded = KVCache.load(cache.save(), { device: DEVICE });
    open.push(loaded);
    expect(loaded.tokens(0)).toBe(17);
    const q = randomTokens(random, heads, 2).q;
    expect(Array.from(loaded.attend(0, q))).toEqual(Array.from(cache.attend(0, q)));
  });
});

describe('truncate errors leave the cache unchanged', () => {
  it('tokens out of range or not an integer: ERR_SHAPE; a bad layer: ERR_SHAPE', () => {
    const random = new Random(7);
    const cache = cacheOf('f16');
    const t = randomTokens(random, heads, 10);
    cache.append(0, t.k, t.v);
    expectError(() => cache.truncate(0, 11), 'ERR_SHAPE', /tokens must be in \[0, 10\]/);
    for (const bad of [-1, 2.5, Number.NaN, Number.POSITIVE_INFINITY, '3', null, 2 ** 31]) {
      expectError(() => cache.truncate(0, bad as number), 'ERR_SHAPE', /tokens/);
    }
    for (const layer of [-1, 2, 0.5]) expectError(() => cache.truncate(layer, 0), 'ERR_SHAPE', /layer/);
    expect(cache.tokens(0)).toBe(10);
  });

  it('under a selection policy or a KIVI store: ERR_OPTION naming the policy', () => {
    const random = new Random(8);
    const t = randomTokens(random, heads, 40);
    const cases: Array<[Record<string, unknown>, RegExp]> = [
      [{ policy: { select: { kind: 'streaming', sink: 4, window: 16 } } }, /streaming/],
      [{ policy: { select: { kind: 'h2o', budget: 24 } } }, /h2o/],
      [{ policy: { store: { kind: 'kivi', bits: 4 } } }, /kivi/],
    ];
    for (const [extra, name] of cases) {
      const cache = cacheOf('f16', extra);
      cache.prefill(0, t.q, t.k, t.v);
      const q = t.q.subarray(0, heads.qHeads * heads.headDim);
      const before = cache.attend(0, q);
      expectError(() => cache.truncate(0, 30), 'ERR_OPTION', name);
      expect(cache.tokens(0)).toBe(40);
      expect(Array.from(cache.attend(0, q))).toEqual(Array.from(before));
    }
  });

  it('disposed: ERR_DISPOSED; during an async call: ERR_BUSY', async () => {
    const random = new Random(9);
    const cache = cacheOf('f16');
    const t = randomTokens(random, heads, 8);
    cache.append(0, t.k, t.v);
    const pending = cache.attendAsync(0, t.q.subarray(0, heads.qHeads * heads.headDim));
    expectError(() => cache.truncate(0, 4), 'ERR_BUSY', /truncate/);
    await pending;
    expect(cache.tokens(0)).toBe(8);
    const gone = cacheOf('f16');
    gone.dispose();
    expectError(() => gone.truncate(0, 0), 'ERR_DISPOSED', /dispos/);
  });
});
