// The addon is a public-facing boundary, not a detail of lib/: anything can require it (a prebuild,
// build/Release/kvslim.node) or take it from lib/native.ts, and C++ never trusts what JavaScript
// passed. So every native entry point must refuse what lib/ refuses first: a KVSlimError whose code
// and message name the argument, never a crash, and the cache or index it was called on unchanged
// and usable. These tests call the addon directly with arguments lib/ would have refused, so that
// lib's checks are not the only ones tested (mutation round 4: no test got past lib/ to the native
// re-checks, which could be removed unnoticed).
import { describe, expect, it } from 'vitest';

import { KVSlimError } from '../lib/index.js';
import { addon, type NativeCache, type NativeSelect } from '../lib/native.js';
import { expectError } from './helpers/errors.js';
import { disposedAfterEach } from './helpers/lifetime.js';
import { Random } from './helpers/random.js';

const heads = { qHeads: 4, kvHeads: 2, headDim: 16 };
const qRow = 4 * 16, kvRow = 2 * 16;
const random = new Random(5150);
const q = random.tensor(qRow), k = random.tensor(kvRow), v = random.tensor(kvRow);

// createCache's options as lib/cache.ts passes them: a dense f32 cache of 2 layers, no policy.
const full: NativeSelect = {
  kind: 'full', sink: 0, window: 0, budget: 0, kernel: 1, pooling: 'max', beta: 1, recent: 0, retrieval: new Uint8Array(0),
  cachePositions: false, pageSize: 1, pages: 1, topK: 1, trainQueries: 1,
  index: { kind: 'flat', dim: 1, lists: 0, probes: 0, degree: 32, beam: 0, neighbors: 100, threads: 0, seed: 1 },
  blockSize: 1, blocks: 1, reprTopK: 1, queryWindow: 1, questionWeight: 0, temperature: 1,
};
const cacheOptions = {
  layers: 2, ...heads, store: 'f32' as const, pageTokens: 4, scale: 0, threads: 0, device: 'cpu', storeKind: 'dense' as const,
  kiviBits: 0, kiviGroup: 0, kiviResidual: 0, kiviOutliers: 0, kiviPreRope: false, select: full, ropeTheta: 0,
  ropeStyle: 'adjacent' as const,
};

const open = disposedAfterEach<{ dispose(): void }>();
/** A native cache holding 3 random tokens in layer 0. */
function nativeCache(): NativeCache {
  const cache = addon.createCache(cacheOptions);
  open.push(cache);
  cache.append(0, random.tensor(3 * kvRow), random.tensor(3 * kvRow), 'f32');
  return cache;
}
/** What a refused call must not change: the token counts and what a query reads. */
function state(cache: NativeCache) {
  return { tokens: [cache.tokens(0), cache.tokens(1)], kept: Array.from(cache.positions(0, 1)), out: Array.from(cache.attend(0, q, 'f32')) };
}

async function expectRejection(promise: Promise<unknown>, code: string, message: RegExp): Promise<void> {
  const error = await promise.then(() => undefined, (reason: unknown) => reason);
  expect(error, `expected ${code}`).toBeInstanceOf(KVSlimError);
  expect((error as KVSlimError).code, (error as KVSlimError).message).toBe(code);
  expect((error as KVSlimError).message).toMatch(message);
}

type Case = [name: string, call: () => unknown, code: string, message: RegExp];
/** expectError for each case, its name in every failure. */
function expectAll(cases: Case[]): void {
  for (const [name, call, code, message] of cases) {
    let thrown: unknown;
    try {
      call();
    } catch (error) {
      thrown = error;
    }
    expect(thrown, `${name}: expected ${code}`).toBeInstanceOf(KVSlimError);
    expect((thrown as KVSlimError).code, `${name}: ${(thrown as KVSlimError).message}`).toBe(code);
    expect((thrown as KVSlimError).message, name).toMatch(message);
  }
}

describe('NativeCache methods', () => {
  it('layer, kvHead and tokens: a non-integer is ERR_OPTION, out of range ERR_SHAPE; the cache unchanged', () => {
    const cache = nativeCache();
    const before = state(cache);
    const kv = random.tensor(kvRow);
    expectAll([
      ['tokens(0.5)', () => cache.tokens(0.5), 'ERR_OPTION', /\blayer\b.*integer/],
      ['tokens(layers)', () => cache.tokens(2), 'ERR_SHAPE', /\blayer\b.*\[0, 1\]/],
      ['tokens(-1)', () => cache.tokens(-1), 'ERR_SHAPE', /\blayer\b/],
      ['tokens()', () => (cache.tokens as () => number)(), 'ERR_OPTION', /\blayer\b/],
      ['truncate(0, 1.5)', () => cache.truncate(0, 1.5), 'ERR_OPTION', /\btokens\b.*integer/],
      ['truncate(0, -1)', () => cache.truncate(0, -1), 'ERR_SHAPE', /\btokens\b/],
      ['truncate(0, 4)', () => cache.truncate(0, 4), 'ERR_SHAPE', /\btokens\b/],
      ['truncate(layers, 0)', () => cache.truncate(2, 0), 'ERR_SHAPE', /\blayer\b/],
      ['positions(0, kvHeads)', () => cache.positions(0, 2), 'ERR_SHAPE', /\bkvHead\b/],
      ['positions(layers, 0)', () => cache.positions(2, 0), 'ERR_SHAPE', /\blayer\b/],
      ['positions(0, 0.5)', () => cache.positions(0, 0.5), 'ERR_OPTION', /\bkvHead\b.*integer/],
      ['attend(layers)', () => cache.attend(2, q, 'f32'), 'ERR_SHAPE', /\blayer\b/],
      ['step(0.5)', () => cache.step(0.5, q, kv, kv, 'f32'), 'ERR_OPTION', /\blayer\b.*integer/],
      ['append(0.5)', () => cache.append(0.5, kv, kv, 'f32'), 'ERR_OPTION', /\blayer\b.*integer/],
      ['append(layers)', () => cache.append(2, kv, kv, 'f32'), 'ERR_SHAPE', /\blayer\b/],
      ['append: v of another length', () => cache.append(0, kv, random.tensor(2 * kvRow), 'f32'), 'ERR_SHAPE', /\bv\b/],
      ['append: dtype f64', () => cache.append(0, kv, kv, 'f64' as never), 'ERR_DTYPE', /\bdtype\b/],
      ['step: a Uint16Array q with dtype f32', () => cache.step(0, new Uint16Array(qRow), kv, kv, 'f32'), 'ERR_DTYPE', /\bq\b/],
    ]);
    expect(state(cache)).toEqual(before);
  });

  it('out: a longer or shorter one is ERR_SHAPE, the async calls before they start; the cache unchanged and idle', () => {
    const cache = nativeCache();
    const before = state(cache);
    const kv = random.tensor(kvRow);
    for (const length of [qRow + 1, qRow - 1]) {
      const out = new Float32Array(length);
      expectAll([
        ['attend', () => cache.attend(0, q, 'f32', out), 'ERR_SHAPE', /\bout\b/],
        ['step', () => cache.step(0, q, kv, kv, 'f32', out), 'ERR_SHAPE', /\bout\b/],
        ['prefill', () => cache.prefill(0, q, kv, kv, 'f32', out), 'ERR_SHAPE', /\bout\b/],
        ['attendAsync', () => cache.attendAsync(0, q, 'f32', out), 'ERR_SHAPE', /\bout\b/],
        ['stepAsync', () => cache.stepAsync(0, q, kv, kv, 'f32', out), 'ERR_SHAPE', /\bout\b/],
        ['prefillAsync', () => cache.prefillAsync(0, q, kv, kv, 'f32', out), 'ERR_SHAPE', /\bout\b/],
        ['stepBatch', () => addon.stepBatch([cache], 0, q, kv, kv, 'f32', out), 'ERR_SHAPE', /\bout\b/],
        ['stepBatchAsync', () => addon.stepBatchAsync([cache], 0, q, kv, kv, 'f32', out), 'ERR_SHAPE', /\bout\b/],
      ]);
    }
    expect(state(cache)).toEqual(before);
  });

  it('a disposed cache: ERR_DISPOSED from every method, in a batch too; dispose() twice is harmless', () => {
    const cache = nativeCache();
    const other = nativeCache();
    cache.dispose();
    cache.dispose();
    expectAll([
      ['tokens', () => cache.tokens(0), 'ERR_DISPOSED', /disposed/],
      ['append', () => cache.append(0, k, v, 'f32'), 'ERR_DISPOSED', /disposed/],
      ['stepAsync', () => cache.stepAsync(0, q, k, v, 'f32'), 'ERR_DISPOSED', /disposed/],
      ['saveAsync', () => cache.saveAsync(), 'ERR_DISPOSED', /disposed/],
      ['config', () => cache.config(), 'ERR_DISPOSED', /disposed/],
      ['stepBatch', () => addon.stepBatch([other, cache], 0, random.tensor(2 * qRow), random.tensor(2 * kvRow), random.tensor(2 * kvRow), 'f32'), 'ERR_DISPOSED', /disposed/],
    ]);
    expect(other.tokens(0)).toBe(3);
  });
});

describe('NativeCache: one async call at a time', () => {
  it('while one runs, every other call on the cache is ERR_BUSY, dispose() too; afterwards all work', async () => {
    const cache = nativeCache();
    const kv = random.tensor(kvRow);
    const running = cache.stepAsync(0, q, kv, kv, 'f32');
    // The cache stays entered until the completion callback runs on this thread, so each call
    // below meets the running one, whatever the worker thread has done by then.
    try {
      expectAll([
        ['append', () => cache.append(0, kv, kv, 'f32'), 'ERR_BUSY', /async/],
        ['attend', () => cache.attend(0, q, 'f32'), 'ERR_BUSY', /async/],
        ['step', () => cache.step(0, q, kv, kv, 'f32'), 'ERR_BUSY', /async/],
        ['prefill', () => cache.prefill(0, q, kv, kv, 'f32'), 'ERR_BUSY', /async/],
        ['attendAsync', () => cache.attendAsync(0, q, 'f32'), 'ERR_BUSY', /async/],
        ['stepAsync', () => cache.stepAsync(0, q, kv, kv, 'f32'), 'ERR_BUSY', /async/],
        ['saveAsync', () => cache.saveAsync(), 'ERR_BUSY', /async/],
        ['fork', () => cache.fork(), 'ERR_BUSY', /async/],
        ['stats', () => cache.stats(), 'ERR_BUSY', /async/],
        ['save', () => cache.save(), 'ERR_BUSY', /async/],
        ['tokens', () => cache.tokens(0), 'ERR_BUSY', /async/],
        ['truncate', () => cache.truncate(0, 1), 'ERR_BUSY', /async/],
        ['positions', () => cache.positions(0, 0), 'ERR_BUSY', /async/],
        ['positions, loaded', () => cache.positions(0, 0, true), 'ERR_BUSY', /async/],
        ['stepBatch', () => addon.stepBatch([cache], 0, q, kv, kv, 'f32'), 'ERR_BUSY', /async/],
        ['stepBatchAsync', () => addon.stepBatchAsync([cache], 0, q, kv, kv, 'f32'), 'ERR_BUSY', /async/],
        ['dispose', () => cache.dispose(), 'ERR_BUSY', /async.*dispose/],
      ]);
    } finally {
      await running;
    }
    expect(cache.tokens(0)).toBe(4);
    expect(cache.attend(0, q, 'f32').length).toBe(qRow);
    cache.dispose();
    expectError(() => cache.tokens(0), 'ERR_DISPOSED');
  });

  it('stepBatchAsync with a busy cache is ERR_BUSY and leaves the caches entered before it idle', async () => {
    const [first, second, busy] = [nativeCache(), nativeCache(), nativeCache()];
    const running = busy.stepAsync(0, q, k, v, 'f32');
    const batch = () => addon.stepBatchAsync(
      [first, second, busy], 0, random.tensor(3 * qRow), random.tensor(3 * kvRow), random.tensor(3 * kvRow), 'f32');
    try {
      expectError(batch, 'ERR_BUSY', /batch/);
      for (const cache of [first, second]) {
        expect(cache.tokens(0)).toBe(3);
        expect(cache.step(0, q, k, v, 'f32').length).toBe(qRow);
      }
    } finally {
      await running;
    }
    await batch();
    expect([first.tokens(0), second.tokens(0), busy.tokens(0)]).toEqual([5, 5, 5]);
  });

  it('stepBatch(Async) with a cache twice is ERR_OPTION (the async one as its rejection), the cache unchanged and idle', async () => {
    const cache = nativeCache();
    const before = state(cache);
    const [q2, k2, v2] = [random.tensor(2 * qRow), random.tensor(2 * kvRow), random.tensor(2 * kvRow)];
    expectError(() => addon.stepBatch([cache, cache], 0, q2, k2, v2, 'f32'), 'ERR_OPTION', /caches\[1\].*twice/);
    await expectRejection(addon.stepBatchAsync([cache, cache], 0, q2, k2, v2, 'f32'), 'ERR_OPTION', /caches\[1\].*twice/);
    expect(state(cache)).toEqual(before);
  });
});

describe('createCache and loadCache', () => {
  it('options lib/ refuses or never passes: ERR_OPTION naming them', () => {
    const snapkv: NativeSelect = { ...full, kind: 'snapkv', budget: 8, window: 2 };
    expectAll([
      ['layers 1.5', () => addon.createCache({ ...cacheOptions, layers: 1.5 }), 'ERR_OPTION', /\blayers\b.*integer/],
      ['headDim 1e10', () => addon.createCache({ ...cacheOptions, headDim: 1e10 }), 'ERR_OPTION', /\bheadDim\b/],
      // The value is capped at 2^20 before the policy checks it: the message still names the one received.
      ['kernel 1025', () => addon.createCache({ ...cacheOptions, select: { ...snapkv, kernel: 1025 } }), 'ERR_OPTION', /\bkernel\b.*1023\].*received 1025$/],
      ['kernel 1024', () => addon.createCache({ ...cacheOptions, select: { ...snapkv, kernel: 1024 } }), 'ERR_OPTION', /\bkernel\b.*received 1024$/],
      ['kernel 2^40 + 1', () => addon.createCache({ ...cacheOptions, select: { ...snapkv, kernel: 2 ** 40 + 1 } }), 'ERR_OPTION', /\bkernel\b/],
      ['ropeStyle', () => addon.createCache({ ...cacheOptions, ropeStyle: 'interleaved' as never }), 'ERR_OPTION', /\bropeStyle\b.*interleaved/],
      ['threads -1', () => addon.createCache({ ...cacheOptions, threads: -1 }), 'ERR_OPTION', /\bthreads\b/],
      ['threads 1025', () => addon.createCache({ ...cacheOptions, threads: 1025 }), 'ERR_OPTION', /\bthreads\b.*\[0, 1024\].*1025/],
      ['select kind', () => addon.createCache({ ...cacheOptions, select: { ...full, kind: 'lru' } }), 'ERR_OPTION', /\blru\b/],
      ['duo heads entry 2', () => addon.createCache({ ...cacheOptions, select: { ...full, kind: 'duo', sink: 2, window: 4, retrieval: Uint8Array.of(1, 0, 0, 2) } }),
        'ERR_OPTION', /\bheads\b.*entry 3 is 2/],
    ]);
  });

  it('loadCache(Async): a device that is not a string, or threads outside [0, 1024], is ERR_OPTION', () => {
    const saved = nativeCache().save();
    for (const load of [addon.loadCache, addon.loadCacheAsync]) {
      expectError(() => load(saved, 5 as never, 0), 'ERR_OPTION', /\bdevice\b/);
      expectError(() => load(saved, 'tpu', 0), 'ERR_OPTION', /\bdevice\b.*tpu/);
      expectError(() => load(saved, 'cpu', -1), 'ERR_OPTION', /\bthreads\b/);
      expectError(() => load(saved, 'cpu', 1025), 'ERR_OPTION', /\bthreads\b.*1025/);
      expectError(() => load(saved, 'cpu', 0.5), 'ERR_OPTION', /\bthreads\b.*integer/);
    }
    const loaded = addon.loadCache(saved, 'cpu', 0);
    open.push(loaded);
    expect(loaded.tokens(0)).toBe(3);
  });
});

describe('stateless ops', () => {
  const scoresBase = { q: random.tensor(2 * qRow), k: random.tensor(3 * kvRow), dtype: 'f32' as const, ...heads, kvHead: 0, scale: 0, device: 'cpu', threads: 0, outCount: 2 * 2 * 3 };
  const attentionBase = { q: scoresBase.q, k: scoresBase.k, v: random.tensor(3 * kvRow), dtype: 'f32' as const, ...heads, causal: true, scale: 0, device: 'cpu', threads: 0 };

  it('attention: one causal query more than keys, a longer out, negative scale or threads', () => {
    expect(addon.attention({ ...attentionBase, q: random.tensor(3 * qRow) }).length).toBe(3 * qRow);
    expectAll([
      ['causal n = T + 1', () => addon.attention({ ...attentionBase, q: random.tensor(4 * qRow) }), 'ERR_SHAPE', /causal.*n=4 queries and T=3 keys/],
      ['out longer', () => addon.attention({ ...attentionBase, out: new Float32Array(2 * qRow + 1) }), 'ERR_SHAPE', /\bout\b/],
      ['scale -1', () => addon.attention({ ...attentionBase, scale: -1 }), 'ERR_OPTION', /\bscale\b/],
      ['threads -1', () => addon.attention({ ...attentionBase, threads: -1 }), 'ERR_OPTION', /\bthreads\b/],
      ['threads 1025', () => addon.attention({ ...attentionBase, threads: 1025 }), 'ERR_OPTION', /\bthreads\b.*1025/],
      ['threads 0.5', () => addon.attention({ ...attentionBase, threads: 0.5 }), 'ERR_OPTION', /\bthreads\b.*integer/],
    ]);
  });

  it('attentionScores: kvHead == kvHeads, outCount 0 or not an integer, a longer out, negative scale', () => {
    expect(addon.attentionScores({ ...scoresBase, kvHead: 1 }).length).toBe(12);
    expectAll([
      ['kvHead == kvHeads', () => addon.attentionScores({ ...scoresBase, kvHead: 2 }), 'ERR_SHAPE', /\bkvHead\b.*\[0, 1\].*received 2/],
      ['kvHead -2', () => addon.attentionScores({ ...scoresBase, kvHead: -2 }), 'ERR_SHAPE', /\bkvHead\b/],
      ['outCount 0', () => addon.attentionScores({ ...scoresBase, outCount: 0, out: new Float32Array(0) }), 'ERR_SHAPE', /\boutCount\b/],
      ['outCount 0.5', () => addon.attentionScores({ ...scoresBase, outCount: 0.5 }), 'ERR_SHAPE', /\boutCount\b/],
      ['outCount 12.5', () => addon.attentionScores({ ...scoresBase, outCount: 12.5 }), 'ERR_SHAPE', /\boutCount\b/],
      ['outCount 13', () => addon.attentionScores({ ...scoresBase, outCount: 13 }), 'ERR_SHAPE', /\bout\b.*12/],
      ['out longer', () => addon.attentionScores({ ...scoresBase, out: new Float32Array(13) }), 'ERR_SHAPE', /\bout\b/],
      ['scale -1', () => addon.attentionScores({ ...scoresBase, scale: -1 }), 'ERR_OPTION', /\bscale\b/],
    ]);
  });

  it('dequantize: tokens 0, negative or not an integer is ERR_OPTION', () => {
    const x = random.tensor(16 * 32);
    const quantized = addon.quantize({ x, dtype: 'f32', channels: 32, axis: 'token', bits: 2, group: 16 });
    const base = { axis: 'token', bits: 2, group: 16, channels: 32, ...quantized };
    expect(addon.dequantize(base).length).toBe(x.length);
    for (const tokens of [0, -16, 15.5, Number.NaN]) {
      expectError(() => addon.dequantize({ ...base, tokens }), 'ERR_OPTION', /\btokens\b/);
    }
  });

  it('pageBounds: dim 0, past 4096 or not an integer; pageSize 0', () => {
    const keys = random.tensor(4097 * 2), query = random.tensor(4097);
    expectAll([
      ['dim 4097', () => addon.pageBounds(4097, 1, keys, query), 'ERR_OPTION', /\bdim\b.*4096/],
      ['dim 0', () => addon.pageBounds(0, 1, keys, query), 'ERR_OPTION', /\bdim\b/],
      ['dim 1.5', () => addon.pageBounds(1.5, 1, keys, query), 'ERR_OPTION', /\bdim\b.*integer/],
      ['pageSize 0', () => addon.pageBounds(17, 0, keys.subarray(0, 17 * 4), query.subarray(0, 17)), 'ERR_OPTION', /\bpageSize\b/],
    ]);
  });

  it('NativeKeyIndex: k not a positive integer, a partial row; the index unchanged', () => {
    const options = { kind: 'flat' as const, dim: 8, lists: 0, probes: 0, degree: 32, beam: 0, neighbors: 100, threads: 0, seed: 1 };
    const index = new addon.NativeKeyIndex(options, random.tensor(10 * 8), undefined);
    open.push(index);
    const query = random.tensor(8);
    const before = index.search(query, 3, 0, 0);
    expectAll([
      ['k 1.5', () => index.search(query, 1.5, 0, 0), 'ERR_OPTION', /\bk\b.*integer/],
      ['k 0', () => index.search(query, 0, 0, 0), 'ERR_OPTION', /\bk\b/],
      ['probes -1', () => index.search(query, 1, -1, 0), 'ERR_OPTION', /\bprobes\b/],
      ['add a partial row', () => index.add(random.tensor(8 + 3)), 'ERR_SHAPE', /\bkeys\b/],
      ['dim 4097', () => new addon.NativeKeyIndex({ ...options, dim: 4097 }, random.tensor(4097), undefined), 'ERR_OPTION', /\bdim\b/],
      ['seed -1', () => new addon.NativeKeyIndex({ ...options, kind: 'ivf', lists: 2, probes: 1, seed: -1 }, random.tensor(10 * 8), undefined), 'ERR_OPTION', /\bseed\b.*-1/],
    ]);
    expect(index.size()).toBe(10);
    expect(index.search(query, 3, 0, 0)).toEqual(before);
    // N8 (more than 2^32 - 1 keys in one index) would need 2^32 keys: not tested.
  });

  it('setThreads: 0, past 1024 or not an integer is ERR_OPTION, the pool unchanged', () => {
    const threads = addon.backends().cpu.threads;
    for (const value of [0, 1025, 4096, 1.5, -1]) {
      expectError(() => addon.setThreads(value), 'ERR_OPTION', /\bthreads\b/);
    }
    expect(addon.backends().cpu.threads).toBe(threads);
  });

  it('probeBandwidth, probeFmaPeak: megabytes, threads and repeats out of range are ERR_OPTION', () => {
    // 2^31 - 1 first: were its bound gone, allocating 2 PiB fails at once (no ERR_OPTION) where
    // 65537 MiB would try to map 64 GiB.
    expectAll([
      ['megabytes 0', () => addon.probeBandwidth(0, 1, 1), 'ERR_OPTION', /\bmegabytes\b/],
      ['megabytes 2^31 - 1', () => addon.probeBandwidth(2 ** 31 - 1, 1, 1), 'ERR_OPTION', /\bmegabytes\b/],
      ['megabytes 65537', () => addon.probeBandwidth(65537, 1, 1), 'ERR_OPTION', /\bmegabytes\b.*65536/],
      ['megabytes 1.5', () => addon.probeBandwidth(1.5, 1, 1), 'ERR_OPTION', /\bmegabytes\b.*integer/],
      ['bandwidth threads -1', () => addon.probeBandwidth(1, -1, 1), 'ERR_OPTION', /\bthreads\b/],
      ['bandwidth threads 1025', () => addon.probeBandwidth(1, 1025, 1), 'ERR_OPTION', /\bthreads\b/],
      ['bandwidth repeats 0', () => addon.probeBandwidth(1, 1, 0), 'ERR_OPTION', /\brepeats\b/],
      ['bandwidth repeats 101', () => addon.probeBandwidth(1, 1, 101), 'ERR_OPTION', /\brepeats\b/],
      ['fma threads -1', () => addon.probeFmaPeak(-1, 1), 'ERR_OPTION', /\bthreads\b/],
      ['fma repeats 101', () => addon.probeFmaPeak(1, 101), 'ERR_OPTION', /\brepeats\b/],
    ]);
    expect(addon.probeBandwidth(1, 1, 1)).toBeGreaterThan(0);
  });
});
