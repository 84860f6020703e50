// KVCache (lib/cache.ts over native/core/kv_cache.cc and paged_store.cc): every output equals the
// float64 reference over the token sequence the cache holds, rounded to its store dtype.
import { describe, expect, it } from 'vitest';

import { KVCache, KVSlimError, type KVCacheOptions } from '../lib/index.js';
import { Random, relativeL2, rows } from './helpers/random.js';
import { type Heads, LayerMirror, type Tokens, encodeTokens, randomTokens, sliceTokens } from './helpers/tokens.js';
import { disposedAfterEach } from './helpers/lifetime.js';
import type { Dtype } from './reference/half.js';

// Relative L2 bound against the reference, and between the decode and prefill paths. As in
// attention.test.ts: f32 arithmetic over exactly representable stored values. Observed here
// (AVX-512): at most 6.7e-7, against the reference and between step-by-step decode and prefill.
const TOLERANCE = 2e-5;
// Two computations the engine runs on identical code paths (sync vs async, append+attend vs
// step, a loaded cache vs its original) must agree to the last bit.
const IDENTICAL = 0;

const DTYPES: Dtype[] = ['f32', 'f16', 'bf16'];
const heads: Heads = { qHeads: 8, kvHeads: 2, headDim: 64 };

const open = disposedAfterEach<KVCache>();
/** A cache disposed after the test. */
function cacheOf(options: Partial<KVCacheOptions> & { store?: Dtype } = {}): KVCache {
  const { store, ...rest } = options;
  const cache = new KVCache({
    layers: 1, ...heads, device: 'cpu', ...rest, ...(store ? { policy: { store: { kind: store } } } : {}),
  });
  open.push(cache);
  return cache;
}

function expectClose(actual: Float32Array, expected: ArrayLike<number>, bound = TOLERANCE): void {
  expect(actual).toBeInstanceOf(Float32Array);
  expect(actual.length).toBe(expected.length);
  expect(relativeL2(actual, expected)).toBeLessThanOrEqual(bound);
}

const qRow = heads.qHeads * heads.headDim;

describe('KVCache stores: outputs equal the reference over the rounded stored values', () => {
  for (const store of DTYPES) {
    for (const input of DTYPES) {
      it(`store ${store}, inputs ${input}: prefill, step, append + attend, two layers`, () => {
        const random = new Random(100 + DTYPES.indexOf(store) * 3 + DTYPES.indexOf(input));
        const cache = cacheOf({ layers: 2, pageTokens: 16, store });
        const mirrors = [new LayerMirror(heads, store), new LayerMirror(heads, store)];

        // Layer 0: a prefill across pages, decode steps, then a block appended and 3 queries.
        const prompt = encodeTokens(randomTokens(random, heads, 37), input);
        mirrors[0].append(prompt.values.k, prompt.values.v);
        expectClose(cache.prefill(0, prompt.q, prompt.k, prompt.v, prompt.options), mirrors[0].attend(prompt.values.q));
        for (let t = 0; t < 4; t++) {
          const token = encodeTokens(randomTokens(random, heads, 1), input);
          mirrors[0].append(token.values.k, token.values.v);
          expectClose(cache.step(0, token.q, token.k, token.v, token.options), mirrors[0].attend(token.values.q));
        }
        const block = encodeTokens(randomTokens(random, heads, 5), input);
        cache.append(0, block.k, block.v, block.options);
        mirrors[0].append(block.values.k, block.values.v);
        const queries = encodeTokens(randomTokens(random, heads, 3), input);
        expectClose(cache.attend(0, queries.q, queries.options), mirrors[0].attend(queries.values.q));

        // Layer 1: decode only.
        for (let t = 0; t < 20; t++) {
          const token = encodeTokens(randomTokens(random, heads, 1), input);
          mirrors[1].append(token.values.k, token.values.v);
          expectClose(cache.step(1, token.q, token.k, token.v, token.options), mirrors[1].attend(token.values.q));
        }
        expect(cache.tokens(0)).toBe(46);
        expect(cache.tokens(1)).toBe(20);
      });
    }
  }

  it('the default store is f16, and the output reflects the stored precision', () => {
    const random = new Random(120);
    const cache = cacheOf();
    expect(cache.policy.store.kind).toBe('f16');
    // Pages of 64 tokens by default: one token allocates what it does with pageTokens 64, not 32.
    const pages = (pageTokens?: number) => {
      const paged = new KVCache({ layers: 1, qHeads: 2, kvHeads: 1, headDim: 8, device: 'cpu', ...(pageTokens === undefined ? {} : { pageTokens }) });
      paged.append(0, new Float32Array(8).fill(0.5), new Float32Array(8).fill(-0.25));
      const allocated = paged.stats().bytes.allocated;
      paged.dispose();
      return allocated;
    };
    expect(pages()).toBe(pages(64));
    expect(pages(32)).toBeLessThan(pages(64));
    const tokens = randomTokens(random, heads, 50);
    const out = cache.prefill(0, tokens.q, tokens.k, tokens.v);
    const asF16 = new LayerMirror(heads, 'f16');
    asF16.append(tokens.k, tokens.v);
    expectClose(out, asF16.attend(tokens.q));
    // Rounding k and v to f16 moves the output far more than the tolerance: the test would see
    // a store that kept f32 (or rounded to bf16).
    for (const other of ['f32', 'bf16'] as const) {
      const mirror = new LayerMirror(heads, other);
      mirror.append(tokens.k, tokens.v);
      expect(relativeL2(out, mirror.attend(tokens.q))).toBeGreaterThan(5 * TOLERANCE);
    }
  });

  it('a custom scale applies to every call', () => {
    const random = new Random(121);
    const cache = cacheOf({ scale: 0.37, store: 'f32' });
    const mirror = new LayerMirror(heads, 'f32', 0.37);
    const tokens = randomTokens(random, heads, 30);
    mirror.append(tokens.k, tokens.v);
    expectClose(cache.prefill(0, tokens.q, tokens.k, tokens.v), mirror.attend(tokens.q));
    const next = randomTokens(random, heads, 1);
    mirror.append(next.k, next.v);
    expectClose(cache.step(0, next.q, next.k, next.v), mirror.attend(next.q));
  });
});

describe('KVCache: step-by-step decode equals one prefill of the same tokens', () => {
  for (const pageTokens of [3, 16, undefined]) {
    for (const store of ['f16', 'bf16', 'f32'] as const) {
      it(`pageTokens ${pageTokens ?? 'default (64)'}, store ${store}, 3 layers x 150 tokens`, () => {
        const random = new Random(200 + (pageTokens ?? 0) + DTYPES.indexOf(store));
        const layers = 3, count = 150;
        const prefilled = cacheOf({ layers, pageTokens, store });
        const stepped = cacheOf({ layers, pageTokens, store });
        // Every layer gets its own tokens; steps interleave layers as a model would.
        const sequence = Array.from({ length: layers }, () => randomTokens(random, heads, count));
        const prefillOut = sequence.map((tokens, layer) => prefilled.prefill(layer, tokens.q, tokens.k, tokens.v));
        const mirrors = sequence.map((tokens) => {
          const mirror = new LayerMirror(heads, store);
          mirror.append(tokens.k, tokens.v);
          return mirror;
        });
        sequence.forEach((tokens, layer) => expectClose(prefillOut[layer], mirrors[layer].attend(tokens.q)));
        for (let t = 0; t < count; t++) {
          for (let layer = 0; layer < layers; layer++) {
            const token = sliceTokens(sequence[layer], heads, t, 1);
            const out = stepped.step(layer, token.q, token.k, token.v);
            expectClose(out, rows(prefillOut[layer], qRow, t, 1));
          }
        }
        for (let layer = 0; layer < layers; layer++) expect(stepped.tokens(layer)).toBe(count);
      });
    }
  }

  it('a prompt prefilled in uneven chunks equals one prefill', () => {
    const random = new Random(210);
    const whole = cacheOf({ pageTokens: 16 });
    const chunked = cacheOf({ pageTokens: 16 });
    const tokens = randomTokens(random, heads, 100);
    const expected = whole.prefill(0, tokens.q, tokens.k, tokens.v);
    let first = 0;
    for (const size of [1, 15, 17, 33, 2, 32]) {
      const chunk = sliceTokens(tokens, heads, first, size);
      expectClose(chunked.prefill(0, chunk.q, chunk.k, chunk.v), rows(expected, qRow, first, size));
      first += size;
    }
    expect(first).toBe(100);
  });

  it('append + attend equals step', () => {
    const random = new Random(220);
    const stepped = cacheOf({ pageTokens: 5 });
    const split = cacheOf({ pageTokens: 5 });
    const prompt = randomTokens(random, heads, 12);
    stepped.prefill(0, prompt.q, prompt.k, prompt.v);
    split.append(0, prompt.k, prompt.v);
    for (let t = 0; t < 30; t++) {
      const n = 1 + (t % 3);
      const token = randomTokens(random, heads, n);
      const expected = stepped.step(0, token.q, token.k, token.v);
      split.append(0, token.k, token.v);
      expect(relativeL2(split.attend(0, token.q), expected)).toBeLessThanOrEqual(IDENTICAL);
    }
    expect(split.tokens(0)).toBe(stepped.tokens(0));
  });
});

describe('KVCache: layers are independent', () => {
  it('appending to one layer changes no other layer', () => {
    const random = new Random(300);
    const cache = cacheOf({ layers: 4, pageTokens: 8 });
    const mirrors = Array.from({ length: 4 }, () => new LayerMirror(heads, 'f16'));
    const counts = [5, 17, 0, 9];
    counts.forEach((count, layer) => {
      if (count === 0) return;
      const tokens = randomTokens(random, heads, count);
      cache.append(layer, tokens.k, tokens.v);
      mirrors[layer].append(tokens.k, tokens.v);
    });
    expect(counts.map((_, layer) => cache.tokens(layer))).toEqual(counts);
    const query = randomTokens(random, heads, 1).q;
    const before = cache.attend(0, query);
    expectClose(before, mirrors[0].attend(query));
    const more = randomTokens(random, heads, 20);
    cache.append(1, more.k, more.v);
    cache.append(2, more.k, more.v);
    expect(cache.attend(0, query)).toEqual(before);
    expect(cache.tokens(3)).toBe(9);
    expectClose(cache.attend(3, query), mirrors[3].attend(query));
    expect(cache.tokens(2)).toBe(20);
  });
});

describe('KVCache.fork: copy-on-write isolation', () => {
  // 32 tokens end exactly on a page (pageTokens 16); 37 end mid-page, so the first append on
  // either side must copy the shared tail page.
  for (const prompt of [32, 37]) {
    it(`fork after ${prompt} tokens (${prompt % 16 === 0 ? 'page boundary' : 'mid-page'}): each side sees only its own tokens`, () => {
      const random = new Random(400 + prompt);
      const parent = cacheOf({ layers: 2, pageTokens: 16 });
      const parentMirrors = [new LayerMirror(heads, 'f16'), new LayerMirror(heads, 'f16')];
      for (let layer = 0; layer < 2; layer++) {
        const tokens = randomTokens(random, heads, prompt);
        parent.prefill(layer, tokens.q, tokens.k, tokens.v);
        parentMirrors[layer].append(tokens.k, tokens.v);
      }
      const child = parent.fork();
      open.push(child);
      const childMirrors = parentMirrors.map((mirror) => mirror.fork());

      expect(child.device).toBe(parent.device);
      expect(child.tokens(0)).toBe(prompt);
      const parentStats = parent.stats();
      expect(parentStats.bytes.shared).toBeGreaterThan(0);
      expect(child.stats().bytes.shared).toBeGreaterThan(0);
      // Every page is shared right after the fork.
      expect(parentStats.bytes.shared).toBe(parentStats.bytes.allocated);

      // Different tokens on each side, interleaved, past the next page boundary.
      for (let t = 0; t < 20; t++) {
        for (let layer = 0; layer < 2; layer++) {
          const mine = randomTokens(random, heads, 1);
          parentMirrors[layer].append(mine.k, mine.v);
          expectClose(parent.step(layer, mine.q, mine.k, mine.v), parentMirrors[layer].attend(mine.q));
          const theirs = randomTokens(random, heads, 1);
          childMirrors[layer].append(theirs.k, theirs.v);
          expectClose(child.step(layer, theirs.q, theirs.k, theirs.v), childMirrors[layer].attend(theirs.q));
        }
      }
      const queries = randomTokens(random, heads, 4).q;
      for (let layer = 0; layer < 2; layer++) {
        expectClose(parent.attend(layer, queries), parentMirrors[layer].attend(queries));
        expectClose(child.attend(layer, queries), childMirrors[layer].attend(queries));
      }
    });
  }

  it("the fork's appends leave the parent's stats and outputs unchanged", () => {
    const random = new Random(410);
    const parent = cacheOf({ layers: 2, pageTokens: 16 });
    for (let layer = 0; layer < 2; layer++) {
      const tokens = randomTokens(random, heads, 37);
      parent.prefill(layer, tokens.q, tokens.k, tokens.v);
    }
    const query = randomTokens(random, heads, 2).q;
    const outputBefore = parent.attend(0, query);
    const before = parent.stats();
    const child = parent.fork();
    open.push(child);
    for (let t = 0; t < 40; t++) {
      const token = randomTokens(random, heads, 1);
      child.step(t % 2, token.q, token.k, token.v);
    }
    const after = parent.stats();
    expect(after.tokens.seen).toBe(before.tokens.seen);
    expect(after.tokens.kept).toBe(before.tokens.kept);
    expect(after.layers).toEqual(before.layers);
    const { shared: _sharedBefore, ...bytesBefore } = before.bytes;
    const { shared: _sharedAfter, ...bytesAfter } = after.bytes;
    expect(bytesAfter).toEqual(bytesBefore);
    expect(after.timeMs).toEqual(before.timeMs);
    expect(parent.attend(0, query)).toEqual(outputBefore);
    expect(child.tokens(0)).toBe(57);
    expect(child.stats().tokens.seen).toBe(57);
  });

  it('a fork outlives its disposed parent, and forks of forks stay isolated', () => {
    const random = new Random(420);
    const parent = cacheOf({ pageTokens: 4, store: 'bf16' });
    const mirror = new LayerMirror(heads, 'bf16');
    const prompt = randomTokens(random, heads, 10);
    parent.prefill(0, prompt.q, prompt.k, prompt.v);
    mirror.append(prompt.k, prompt.v);
    const child = parent.fork();
    open.push(child);
    parent.dispose();
    const grandchild = child.fork();
    open.push(grandchild);
    const childMirror = mirror.fork();
    const grandchildMirror = mirror.fork();
    for (let t = 0; t < 9; t++) {
      const a = randomTokens(random, heads, 1), b = randomTokens(random, heads, 1);
      childMirror.append(a.k, a.v);
      grandchildMirror.append(b.k, b.v);
      expectClose(child.step(0, a.q, a.k, a.v), childMirror.attend(a.q));
      expectClose(grandchild.step(0, b.q, b.k, b.v), grandchildMirror.attend(b.q));
    }
    expect(grandchild.policy.store.kind).toBe('bf16');
  });
});

describe('KVCache.stats', () => {
  const pageTokens = 16;
  for (const [store, bytesPerElement] of [['f32', 4], ['f16', 2], ['bf16', 2]] as const) {
    it(`byte counts are exact (store ${store})`, () => {
      const random = new Random(500 + bytesPerElement);
      const layers = 3, T = 40;
      const cache = cacheOf({ layers, pageTokens, store });
      for (let layer = 0; layer < layers; layer++) {
        const tokens = randomTokens(random, heads, T);
        cache.prefill(layer, tokens.q, tokens.k, tokens.v);
      }
      const stats = cache.stats();
      const { kvHeads, headDim } = heads;
      expect(stats.bytes.kv).toBe(layers * T * kvHeads * headDim * 2 * bytesPerElement);
      expect(stats.bytes.fullF16).toBe(layers * T * kvHeads * headDim * 2 * 2);
      expect(stats.bytes.residual).toBe(0);
      expect(stats.bytes.index).toBe(0);
      expect(stats.bytes.summary).toBe(0);
      expect(stats.bytes.meta).toBeGreaterThanOrEqual(0);
      const { kv, residual, index, summary, meta } = stats.bytes;
      expect(stats.bytes.total).toBe(kv + residual + index + summary + meta);
      expect(stats.compressionRatio).toBeCloseTo(stats.bytes.total / stats.bytes.fullF16, 12);
      // Whole pages per layer and kv head: 40 tokens fill 3 pages of 16.
      const pageBytes = 2 * pageTokens * headDim * bytesPerElement;
      expect(stats.bytes.allocated).toBe(layers * kvHeads * Math.ceil(T / pageTokens) * pageBytes);
      expect(stats.bytes.shared).toBe(0);
      expect(stats.tokens.seen).toBe(T);
      expect(stats.tokens.kept).toBe(T);
      expect(stats.layers).toHaveLength(layers);
      for (const layer of stats.layers) {
        expect(layer.tokensKept).toEqual([T, T]);
        expect(layer.bytes).toBe(T * kvHeads * headDim * 2 * bytesPerElement);
      }
    });
  }

  it('a new cache is empty; counts are means over layers; loaded follows the last attention', () => {
    const random = new Random(510);
    const cache = cacheOf({ layers: 3, pageTokens });
    const empty = cache.stats();
    expect(empty.tokens).toEqual({ seen: 0, kept: 0, loaded: 0 });
    expect(empty.bytes.kv).toBe(0);
    expect(empty.bytes.total).toBe(empty.bytes.meta);
    expect(empty.compressionRatio).toBe(0);
    expect(empty.timeMs).toEqual({ prefill: 0, compress: 0, indexBuild: 0, retrieve: 0, decode: 0 });
    expect(empty.layers.map((layer) => layer.tokensKept)).toEqual([[0, 0], [0, 0], [0, 0]]);

    const a = randomTokens(random, heads, 40), b = randomTokens(random, heads, 11);
    cache.append(0, a.k, a.v);
    cache.append(1, b.k, b.v);
    const stats = cache.stats();
    expect(stats.tokens.seen).toBeCloseTo(51 / 3, 12);
    expect(stats.tokens.kept).toBeCloseTo(51 / 3, 12);
    expect(stats.layers.map((layer) => layer.tokensKept)).toEqual([[40, 40], [11, 11], [0, 0]]);
    expect(stats.bytes.kv).toBe(51 * heads.kvHeads * heads.headDim * 2 * 2);
    cache.attend(1, randomTokens(random, heads, 2).q);
    expect(cache.stats().tokens.loaded).toBe(11);
    cache.attend(0, randomTokens(random, heads, 1).q);
    expect(cache.stats().tokens.loaded).toBe(40);
  });

  it('time is charged to prefill by prefill() and to decode by step() and attend()', () => {
    const random = new Random(520);
    const cache = cacheOf({ layers: 1 });
    const prompt = randomTokens(random, heads, 200);
    cache.prefill(0, prompt.q, prompt.k, prompt.v);
    const afterPrefill = cache.stats().timeMs;
    expect(afterPrefill.prefill).toBeGreaterThan(0);
    expect(afterPrefill.decode).toBe(0);
    const token = randomTokens(random, heads, 1);
    cache.step(0, token.q, token.k, token.v);
    const afterStep = cache.stats().timeMs;
    expect(afterStep.decode).toBeGreaterThan(0);
    expect(afterStep.prefill).toBe(afterPrefill.prefill);
    cache.attend(0, token.q);
    expect(cache.stats().timeMs.decode).toBeGreaterThan(afterStep.decode);
    // A fork starts from its parent's times.
    const child = cache.fork();
    open.push(child);
    expect(child.stats().timeMs).toEqual(cache.stats().timeMs);
  });
});

describe('KVCache.save / KVCache.load', () => {
  for (const store of DTYPES) {
    it(`round trip (store ${store}) gives identical outputs, tokens and config`, () => {
      const random = new Random(600 + DTYPES.indexOf(store));
      const cache = cacheOf({ layers: 3, pageTokens: 5, store, scale: 0.2 });
      const counts = [23, 7, 0];
      counts.forEach((count, layer) => {
        if (count > 0) {
          const tokens = randomTokens(random, heads, count);
          cache.prefill(layer, tokens.q, tokens.k, tokens.v);
        }
      });
      const saved = cache.save();
      expect(Buffer.isBuffer(saved)).toBe(true);
      const loaded = KVCache.load(saved, { device: 'cpu' });
      open.push(loaded);
      expect(loaded.policy.store.kind).toBe(store);
      expect([loaded.layers, loaded.qHeads, loaded.kvHeads, loaded.headDim]).toEqual([3, heads.qHeads, heads.kvHeads, heads.headDim]);
      expect(counts.map((_, layer) => loaded.tokens(layer))).toEqual(counts);
      expect(loaded.stats().tokens).toEqual({ ...cache.stats().tokens, loaded: 0 });
      expect(loaded.stats().layers).toEqual(cache.stats().layers);
      expect(loaded.stats().bytes.kv).toBe(cache.stats().bytes.kv);
      // Same scale, same tokens, same pages: bit-identical outputs, now and after more steps.
      const query = randomTokens(random, heads, 3).q;
      for (const layer of [0, 1]) {
        expect(relativeL2(loaded.attend(layer, query), cache.attend(layer, query))).toBeLessThanOrEqual(IDENTICAL);
      }
      for (let t = 0; t < 6; t++) {
        const token = randomTokens(random, heads, 1);
        for (const layer of [0, 2]) {
          expect(loaded.step(layer, token.q, token.k, token.v)).toEqual(cache.step(layer, token.q, token.k, token.v));
        }
      }
      // The saved bytes do not depend on where the buffer sits.
      const padded = Buffer.alloc(saved.length + 3);
      saved.copy(padded, 3);
      const fromView = KVCache.load(new Uint8Array(padded.buffer, padded.byteOffset + 3, saved.length), { device: 'cpu' });
      open.push(fromView);
      expect(fromView.tokens(0)).toBe(23);
      expect(fromView.save()).toEqual(saved);
    });
  }

  it('an empty cache and a fork round-trip too', () => {
    const random = new Random(610);
    const empty = cacheOf({ layers: 2 });
    const loadedEmpty = KVCache.load(empty.save(), { device: 'cpu' });
    open.push(loadedEmpty);
    expect(loadedEmpty.tokens(0)).toBe(0);
    expect(loadedEmpty.stats().bytes.kv).toBe(0);

    const parent = cacheOf({ pageTokens: 8 });
    const prompt = randomTokens(random, heads, 12);
    parent.prefill(0, prompt.q, prompt.k, prompt.v);
    const child = parent.fork();
    open.push(child);
    const extra = randomTokens(random, heads, 3);
    child.append(0, extra.k, extra.v);
    // On the CPU like the child: load()'s default device is 'auto' (the GPU where there is one).
    const loaded = KVCache.load(child.save(), { device: 'cpu' });
    open.push(loaded);
    const query = randomTokens(random, heads, 1).q;
    expect(loaded.tokens(0)).toBe(15);
    expect(loaded.attend(0, query)).toEqual(child.attend(0, query));
  });
});

describe('KVCache async calls', () => {
  it('attendAsync / stepAsync / prefillAsync give the same results as the sync calls', async () => {
    const random = new Random(700);
    const sync = cacheOf({ layers: 2, pageTokens: 16 });
    const async = cacheOf({ layers: 2, pageTokens: 16 });
    for (let layer = 0; layer < 2; layer++) {
      const prompt = randomTokens(random, heads, 70);
      const expected = sync.prefill(layer, prompt.q, prompt.k, prompt.v);
      expect(await async.prefillAsync(layer, prompt.q, prompt.k, prompt.v)).toEqual(expected);
      for (let t = 0; t < 5; t++) {
        const token = randomTokens(random, heads, 1);
        const stepped = sync.step(layer, token.q, token.k, token.v);
        expect(await async.stepAsync(layer, token.q, token.k, token.v)).toEqual(stepped);
      }
      const queries = randomTokens(random, heads, 3).q;
      expect(await async.attendAsync(layer, queries)).toEqual(sync.attend(layer, queries));
    }
    expect(async.stats().tokens).toEqual(sync.stats().tokens);
  });

  it('many calls issued without awaiting run in call order', async () => {
    const random = new Random(710);
    const replay = cacheOf({ layers: 2, pageTokens: 3 });
    const async = cacheOf({ layers: 2, pageTokens: 3 });
    const prompt = randomTokens(random, heads, 10);
    const pending: Array<Promise<Float32Array>> = [async.prefillAsync(0, prompt.q, prompt.k, prompt.v)];
    const steps: Tokens[] = [];
    for (let t = 0; t < 20; t++) {
      const token = randomTokens(random, heads, 1);
      steps.push(token);
      pending.push(async.stepAsync(t % 2, token.q, token.k, token.v));
      if (t % 5 === 4) pending.push(async.attendAsync(0, token.q));
    }
    const results = await Promise.all(pending);

    const expected: Float32Array[] = [replay.prefill(0, prompt.q, prompt.k, prompt.v)];
    steps.forEach((token, t) => {
      expected.push(replay.step(t % 2, token.q, token.k, token.v));
      if (t % 5 === 4) expected.push(replay.attend(0, token.q));
    });
    expect(results).toHaveLength(expected.length);
    results.forEach((result, i) => expect(result).toEqual(expected[i]));
    expect(async.tokens(0)).toBe(20);
    expect(async.tokens(1)).toBe(10);
  });

  it('a sync call while an async call is pending throws ERR_BUSY, and works once it settles', async () => {
    const random = new Random(720);
    const cache = cacheOf();
    const token = randomTokens(random, heads, 1);
    const pending = cache.stepAsync(0, token.q, token.k, token.v);
    const calls: Array<[string, () => unknown]> = [
      ['attend', () => cache.attend(0, token.q)],
      ['step', () => cache.step(0, token.q, token.k, token.v)],
      ['prefill', () => cache.prefill(0, token.q, token.k, token.v)],
      ['append', () => cache.append(0, token.k, token.v)],
      ['fork', () => cache.fork()],
      ['stats', () => cache.stats()],
      ['save', () => cache.save()],
      // Read-only, but they read what the pending call changes: refused at once, not only once its
      // worker has started.
      ['positions', () => cache.positions(0, 0)],
      ['loadedPositions', () => cache.loadedPositions(0, 0)],
      ['tokens', () => cache.tokens(0)],
      ['truncate', () => cache.truncate(0, 0)],
    ];
    for (const [name, call] of calls) {
      let thrown: unknown;
      try {
        call();
      } catch (error) {
        thrown = error;
      }
      expect(thrown, name).toBeInstanceOf(KVSlimError);
      expect((thrown as KVSlimError).code, name).toBe('ERR_BUSY');
    }
    await pending;
    expect(cache.tokens(0)).toBe(1);
    expect(cache.attend(0, token.q)).toBeInstanceOf(Float32Array);
  });

  it('a rejected async call leaves the cache unchanged and later calls still run', async () => {
    const random = new Random(730);
    const cache = cacheOf();
    const mirror = new LayerMirror(heads, 'f16');
    const good = randomTokens(random, heads, 4);
    mirror.append(good.k, good.v);
    const bad = randomTokens(random, heads, 1);
    bad.v[bad.v.length - 1] = Number.NaN;
    const next = randomTokens(random, heads, 1);
    const first = cache.prefillAsync(0, good.q, good.k, good.v);
    const rejected = cache.stepAsync(0, bad.q, bad.k, bad.v);
    const after = cache.stepAsync(0, next.q, next.k, next.v);
    await first;
    const error = await rejected.then(() => null, (e: unknown) => e);
    expect(error).toBeInstanceOf(KVSlimError);
    expect((error as KVSlimError).code).toBe('ERR_VALUE');
    mirror.append(next.k, next.v);
    expectClose(await after, mirror.attend(next.q));
    expect(cache.tokens(0)).toBe(5);
  });
});

describe('KVCache: caller-owned out arrays', () => {
  it('step, prefill, attend and their async forms write into out and return it', async () => {
    const random = new Random(750);
    const plain = cacheOf({ pageTokens: 16 });
    const into = cacheOf({ pageTokens: 16 });
    const prompt = randomTokens(random, heads, 40);
    const promptOut = new Float32Array(40 * qRow).fill(Number.NaN);
    expect(into.prefill(0, prompt.q, prompt.k, prompt.v, { out: promptOut })).toBe(promptOut);
    expect(promptOut).toEqual(plain.prefill(0, prompt.q, prompt.k, prompt.v));
    // One out array reused across decode steps, as a server would.
    const stepOut = new Float32Array(qRow);
    for (let t = 0; t < 10; t++) {
      const token = randomTokens(random, heads, 1);
      expect(into.step(0, token.q, token.k, token.v, { out: stepOut })).toBe(stepOut);
      expect(stepOut).toEqual(plain.step(0, token.q, token.k, token.v));
    }
    const queries = randomTokens(random, heads, 2).q;
    const attendOut = new Float32Array(2 * qRow);
    expect(into.attend(0, queries, { out: attendOut })).toBe(attendOut);
    expect(attendOut).toEqual(plain.attend(0, queries));
    const token = randomTokens(random, heads, 1);
    const asyncOut = new Float32Array(qRow);
    expect(await into.stepAsync(0, token.q, token.k, token.v, { out: asyncOut })).toBe(asyncOut);
    expect(asyncOut).toEqual(plain.step(0, token.q, token.k, token.v));
    const asyncAttendOut = new Float32Array(2 * qRow);
    expect(await into.attendAsync(0, queries, { out: asyncAttendOut })).toBe(asyncAttendOut);
    expect(asyncAttendOut).toEqual(plain.attend(0, queries));
  });
});

describe('KVCache.dispose', () => {
  function expectDisposed(name: string, call: () => unknown): Promise<void> | void {
    let result: unknown;
    try {
      result = call();
    } catch (error) {
      expect(error, name).toBeInstanceOf(KVSlimError);
      expect((error as KVSlimError).code, name).toBe('ERR_DISPOSED');
      return;
    }
    // Async methods may report through their promise instead.
    expect(result, `${name} should fail`).toBeInstanceOf(Promise);
    return (result as Promise<unknown>).then(
      () => expect.fail(`${name} resolved on a disposed cache`),
      (error: unknown) => {
        expect(error, name).toBeInstanceOf(KVSlimError);
        expect((error as KVSlimError).code, name).toBe('ERR_DISPOSED');
      },
    );
  }

  it('every call on a disposed cache throws ERR_DISPOSED; dispose twice is fine', async () => {
    const random = new Random(800);
    const cache = new KVCache({ layers: 1, ...heads, device: 'cpu' });
    const token = randomTokens(random, heads, 1);
    cache.step(0, token.q, token.k, token.v);
    expect(cache.disposed).toBe(false);
    cache.dispose();
    expect(cache.disposed).toBe(true);
    cache.dispose();
    const calls: Array<[string, () => unknown]> = [
      ['append', () => cache.append(0, token.k, token.v)],
      ['attend', () => cache.attend(0, token.q)],
      ['step', () => cache.step(0, token.q, token.k, token.v)],
      ['prefill', () => cache.prefill(0, token.q, token.k, token.v)],
      ['attendAsync', () => cache.attendAsync(0, token.q)],
      ['stepAsync', () => cache.stepAsync(0, token.q, token.k, token.v)],
      ['prefillAsync', () => cache.prefillAsync(0, token.q, token.k, token.v)],
      ['fork', () => cache.fork()],
      ['tokens', () => cache.tokens(0)],
      ['stats', () => cache.stats()],
      ['save', () => cache.save()],
    ];
    for (const [name, call] of calls) await expectDisposed(name, call);
  });

  it('dispose() while async calls are pending lets them finish first (TSDoc of dispose)', async () => {
    const random = new Random(810);
    const cache = new KVCache({ layers: 1, ...heads, device: 'cpu' });
    const replay = cacheOf();
    const tokens = Array.from({ length: 3 }, () => randomTokens(random, heads, 1));
    const pending = tokens.map((token) => cache.stepAsync(0, token.q, token.k, token.v));
    cache.dispose();
    expect(cache.disposed).toBe(true);
    const expected = tokens.map((token) => replay.step(0, token.q, token.k, token.v));
    const settled = await Promise.allSettled(pending);
    settled.forEach((result, t) => {
      const reason = result.status === 'rejected' ? String(result.reason) : '';
      expect(result.status, `stepAsync #${t} ${reason}`).toBe('fulfilled');
      if (result.status === 'fulfilled') expect(result.value).toEqual(expected[t]);
    });
    await expectDisposed('attend', () => cache.attend(0, tokens[0].q));
  });
});
