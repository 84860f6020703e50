// Bad input: a KVSlimError with a stable code and a message naming the argument, never a crash,
// never a changed cache (DESIGN.md, Errors).
import { describe, expect, it } from 'vitest';

import { KVCache, attention, backends, probeMachine, setThreads } from '../lib/index.js';
import { Random } from './helpers/random.js';
import { type Heads, randomTokens } from './helpers/tokens.js';
import { encodeHalf } from './reference/half.js';
import { expectError } from './helpers/errors.js';
import { fnv1a, resealed, xxh64 } from './helpers/saved.js';
import { disposedAfterEach } from './helpers/lifetime.js';


const heads: Heads = { qHeads: 4, kvHeads: 2, headDim: 64 };
const random = new Random(4242);
const q = random.tensor(2 * 4 * 64);
const k = random.tensor(5 * 2 * 64);
const v = random.tensor(5 * 2 * 64);
const base = { q, k, v, ...heads };

const open = disposedAfterEach<KVCache>();
function cacheOf(options: Record<string, unknown> = {}): KVCache {
  const cache = new KVCache({ layers: 2, ...heads, device: 'cpu', ...options });
  open.push(cache);
  return cache;
}

describe('attention(): shapes (ERR_SHAPE)', () => {
  it('q, k or v of the wrong length', () => {
    expectError(() => attention({ ...base, q: q.subarray(1) }), 'ERR_SHAPE', /\bq\b/);
    expectError(() => attention({ ...base, q: new Float32Array(0) }), 'ERR_SHAPE', /\bq\b/);
    expectError(() => attention({ ...base, k: k.subarray(3) }), 'ERR_SHAPE', /\bk\b/);
    expectError(() => attention({ ...base, v: v.subarray(0, v.length - 128) }), 'ERR_SHAPE', /\bv\b/);
    expectError(() => attention({ ...base, v: v.subarray(1) }), 'ERR_SHAPE', /\bv\b/);
  });

  it('more causal queries than keys', () => {
    expectError(() => attention({ ...base, k: k.subarray(0, 128), v: v.subarray(0, 128) }), 'ERR_SHAPE', /queries/);
  });

  it('a typed array that lies about its length is caught by the native re-check', () => {
    // lib/ validates with .length; C++ must re-check the real element count before reading.
    class Lying extends Float32Array {
      override get length(): number {
        return 5 * 2 * 64;
      }
    }
    const short = new Lying(100);
    expectError(() => attention({ ...base, k: short }), 'ERR_SHAPE', /\bk\b/);
    expectError(() => attention({ ...base, v: short }), 'ERR_SHAPE', /\bv\b/);
    const cache = cacheOf();
    expectError(() => cache.append(0, short, v.subarray(0, 5 * 128)), 'ERR_SHAPE');
    expect(cache.tokens(0)).toBe(0);
  });

  it('a detached input buffer', () => {
    const detached = k.slice();
    structuredClone(detached.buffer, { transfer: [detached.buffer] });
    expectError(() => attention({ ...base, k: detached }), 'ERR_SHAPE', /\bk\b/);
  });
});

describe('attention(): dtypes (ERR_DTYPE)', () => {
  it('Int8Array, Float64Array or a plain array', () => {
    expectError(() => attention({ ...base, q: new Int8Array(q.length) as never }), 'ERR_DTYPE', /\bq\b.*Int8Array/);
    expectError(() => attention({ ...base, k: new Float64Array(k.length) as never }), 'ERR_DTYPE', /\bk\b.*Float64Array\(640\)/);
    expectError(() => attention({ ...base, v: Array.from(v) as never }), 'ERR_DTYPE', /\bv\b/);
  });

  it('Uint16Array without a dtype, or with dtype f32', () => {
    const qBits = encodeHalf(q, 'f16'), kBits = encodeHalf(k, 'f16'), vBits = encodeHalf(v, 'f16');
    expectError(() => attention({ ...heads, q: qBits, k: kBits, v: vBits }), 'ERR_DTYPE', /dtype/);
    expectError(() => attention({ ...heads, q: qBits, k: kBits, v: vBits, dtype: 'f32' }), 'ERR_DTYPE', /dtype/);
    expectError(() => attention({ ...heads, q: qBits, k: kBits, v: vBits, dtype: 'fp8' as never }), 'ERR_DTYPE', /dtype/);
  });

  it('Float32Array with dtype f16 or bf16, and mixed array types', () => {
    expectError(() => attention({ ...base, dtype: 'f16' }), 'ERR_DTYPE', /Float32Array/);
    expectError(() => attention({ ...base, dtype: 'bf16' }), 'ERR_DTYPE', /Float32Array/);
    expectError(() => attention({ ...base, k: encodeHalf(k, 'bf16'), dtype: 'bf16' }), 'ERR_DTYPE');
    expectError(() => attention({ ...base, k: encodeHalf(k, 'bf16') }), 'ERR_DTYPE', /\bk\b/);
  });
});

describe('attention(): options (ERR_OPTION)', () => {
  it('qHeads not a multiple of kvHeads', () => {
    expectError(() => attention({ ...base, qHeads: 3, kvHeads: 2, q: new Float32Array(3 * 64) }), 'ERR_OPTION', /qHeads.*kvHeads/);
  });

  const bad = [Number.NaN, -1, 0, 1.5, Number.POSITIVE_INFINITY, '4', null];
  for (const name of ['qHeads', 'kvHeads', 'headDim', 'threads'] as const) {
    it(`${name}: NaN, negative, zero, non-integer, Infinity, string, null`, () => {
      for (const value of bad) {
        expectError(() => attention({ ...base, [name]: value as never }), 'ERR_OPTION', new RegExp(name));
      }
    });
  }

  it('headDim above 1024', () => {
    expectError(() => attention({ ...base, headDim: 2048, q: new Float32Array(4 * 2048) }), 'ERR_OPTION', /headDim/);
  });

  it('scale: NaN, negative, zero, Infinity', () => {
    for (const scale of [Number.NaN, -0.5, 0, Number.POSITIVE_INFINITY, Number.NEGATIVE_INFINITY]) {
      expectError(() => attention({ ...base, scale }), 'ERR_OPTION', /scale/);
    }
  });

  it('causal not a boolean; device unknown; options not an object; unknown key', () => {
    expectError(() => attention({ ...base, causal: 1 as never }), 'ERR_OPTION', /causal/);
    expectError(() => attention({ ...base, device: 'tpu' as never }), 'ERR_OPTION', /device/);
    expectError(() => attention(null as never), 'ERR_OPTION');
    expectError(() => attention({ ...base, kvheads: 2 } as never), 'ERR_OPTION', /kvheads/);
  });
});

describe('out arrays', () => {
  it('attention(): out of the wrong type, length, or overlapping an input', () => {
    expectError(() => attention({ ...base, out: new Float64Array(q.length) as never }), 'ERR_DTYPE', /\bout\b/);
    expectError(() => attention({ ...base, out: new Float32Array(q.length - 1) }), 'ERR_SHAPE', /\bout\b/);
    expectError(() => attention({ ...base, out: q }), 'ERR_OPTION', /\bout\b.*\bq\b/);
    const shared = new Float32Array(k.length + q.length);
    shared.set(k);
    expectError(() => attention({ ...base, k: shared.subarray(0, k.length), out: shared.subarray(k.length - 1, k.length - 1 + q.length) }), 'ERR_OPTION', /\bout\b.*\bk\b/);
    const sharedV = new Float32Array(q.length + v.length);
    sharedV.set(v, q.length - 1);
    expectError(() => attention({ ...base, v: sharedV.subarray(q.length - 1, q.length - 1 + v.length), out: sharedV.subarray(0, q.length) }), 'ERR_OPTION', /\bout\b.*\bv\b/);
  });

  it('attention(): an out that starts right where an input ends (one buffer, no shared element) is accepted', () => {
    const expected = attention(base);
    for (const name of ['q', 'k', 'v'] as const) {
      const input = base[name];
      const buffer = new Float32Array(input.length + q.length);
      buffer.set(input);
      const out = buffer.subarray(input.length);
      expect(attention({ ...base, [name]: buffer.subarray(0, input.length), out }), name).toBe(out);
      expect(out).toEqual(expected);
    }
  });

  it('KVCache calls: bad out leaves the cache unchanged', () => {
    const cache = cacheOf();
    const t = randomTokens(new Random(8), heads, 2);
    expectError(() => cache.step(0, t.q, t.k, t.v, { out: new Float32Array(5) }), 'ERR_SHAPE', /\bout\b/);
    expectError(() => cache.prefill(0, t.q, t.k, t.v, { out: t.v as never }), 'ERR_SHAPE', /\bout\b/);
    expectError(() => cache.step(0, t.q, t.k, t.v, { out: [] as never }), 'ERR_DTYPE', /\bout\b/);
    expectError(() => void cache.stepAsync(0, t.q, t.k, t.v, { out: t.q }), 'ERR_OPTION', /\bout\b/);
    expect(cache.tokens(0)).toBe(0);
  });
});

describe('attention(): values (ERR_VALUE)', () => {
  it('NaN or Infinity anywhere in q, k or v, in every dtype', () => {
    for (const [name, value] of [['q', Number.NaN], ['k', Number.POSITIVE_INFINITY], ['v', Number.NaN], ['v', Number.NEGATIVE_INFINITY]] as const) {
      const tensors = { q: q.slice(), k: k.slice(), v: v.slice() };
      tensors[name][tensors[name].length - 1] = value;
      expectError(() => attention({ ...heads, ...tensors }), 'ERR_VALUE', new RegExp(`\\b${name}\\b`));
    }
    for (const dtype of ['f16', 'bf16'] as const) {
      const infinity = dtype === 'f16' ? 0x7c00 : 0x7f80;
      const nan = dtype === 'f16' ? 0x7e00 : 0x7fc0;
      for (const [name, bits] of [['q', nan], ['k', infinity], ['v', nan | 0x8000]] as const) {
        const tensors = { q: encodeHalf(q, dtype), k: encodeHalf(k, dtype), v: encodeHalf(v, dtype) };
        tensors[name][7] = bits;
        expectError(() => attention({ ...heads, ...tensors, dtype }), 'ERR_VALUE', new RegExp(`\\b${name}\\b`));
      }
    }
  });
});

describe('q values: the first non-finite element is named, in any 4096-element block', () => {
  it('f32, f16 and bf16 queries of 9 blocks, a bad element at block edges and in the middle', () => {
    const cache = cacheOf();
    cache.append(0, k, v);
    const rows = 9 * 4096 / (4 * 64);  // 144 query rows: 36864 elements
    const query = random.tensor(rows * 4 * 64);
    for (const dtype of ['f32', 'f16', 'bf16'] as const) {
      for (const at of [0, 4095, 4096, 20000, 36863]) {
        const bad = dtype === 'f32' ? query.slice() : encodeHalf(query, dtype);
        bad[at] = dtype === 'f32' ? Number.NaN : dtype === 'f16' ? 0x7c00 : 0x7f80;
        if (at < 36863) bad[36863] = dtype === 'f32' ? Number.NaN : 0xffff;  // a later one is not reported
        const kind = dtype === 'f32' ? 'NaN' : 'infinite';
        expectError(() => cache.attend(0, bad, { dtype }), 'ERR_VALUE', new RegExp(`\\bq\\b.*element ${at} is ${kind}`));
      }
    }
  });
});

describe('attention(): device', () => {
  it("device 'cuda' without a usable GPU is ERR_BACKEND_UNAVAILABLE", () => {
    const cuda = backends().cuda;
    if (cuda !== null && cuda.available) return; // gpu.test.ts covers this host
    expectError(() => attention({ ...base, device: 'cuda' }), 'ERR_BACKEND_UNAVAILABLE', /cuda/i);
    expectError(() => new KVCache({ layers: 1, ...heads, device: 'cuda' }), 'ERR_BACKEND_UNAVAILABLE', /cuda/i);
    const saved = cacheOf().save();
    expectError(() => KVCache.load(saved, { device: 'cuda' }), 'ERR_BACKEND_UNAVAILABLE', /cuda/i);
  });
});

describe('KVCache constructor (ERR_OPTION)', () => {
  const valid = { layers: 2, ...heads };
  it('qHeads not a multiple of kvHeads', () => {
    expectError(() => new KVCache({ ...valid, qHeads: 6, kvHeads: 4 }), 'ERR_OPTION', /qHeads/);
  });

  for (const name of ['layers', 'qHeads', 'kvHeads', 'headDim', 'pageTokens', 'threads'] as const) {
    it(`${name}: NaN, negative, zero, non-integer, Infinity, string`, () => {
      for (const value of [Number.NaN, -3, 0, 2.5, Number.POSITIVE_INFINITY, '8']) {
        expectError(() => new KVCache({ ...valid, [name]: value as never }), 'ERR_OPTION', new RegExp(name));
      }
    });
  }

  it('scale, device, unknown keys, not an object', () => {
    for (const scale of [Number.NaN, -1, 0, Number.POSITIVE_INFINITY]) {
      expectError(() => new KVCache({ ...valid, scale }), 'ERR_OPTION', /scale/);
    }
    expectError(() => new KVCache({ ...valid, device: 'tpu' as never }), 'ERR_OPTION', /device/);
    expectError(() => new KVCache({ ...valid, pagetokens: 16 } as never), 'ERR_OPTION', /pagetokens/);
    expectError(() => new KVCache(undefined as never), 'ERR_OPTION');
    expectError(() => new KVCache({ ...valid, headDim: 1025 }), 'ERR_OPTION', /headDim/);
  });

  it('parts that are not available, and bad select options, give ERR_OPTION', () => {
    const policies = [
      { select: { kind: 'quest' } },
      { select: { kind: 'retrieval', index: 'hnsw' } },
      { select: { kind: 'streaming', sink: 4 } },
      { select: { kind: 'streaming', sink: -1, window: 8 } },
      { select: { kind: 'streaming', window: 8, budget: 3 } },
      { select: { kind: 'snapkv', budget: 32, window: 32 } },
      { select: { kind: 'snapkv', budget: 64, kernel: 4 } },
      { select: { kind: 'snapkv', budget: 64, pooling: 'min' } },
      { select: { kind: 'pyramidkv', budget: 64, beta: 0.5 } },
      { select: { kind: 'h2o', budget: 8, recent: 8 } },
      { select: { kind: 'h2o', budget: 1 } },
      { select: { kind: 'duo', heads: [true, false, true] } },
      { select: { kind: 'duo', heads: [true, 0.5, false, true] } },
      { select: { kind: 'duo', heads: [true, false, true, false], retrievalRatio: 0.5 } },
      { select: { kind: 'duo', heads: [0.1, 0.2, 0.3, 0.4], retrievalRatio: 2 } },
      { select: { kind: 'quest', pages: 4 }, store: { kind: 'kivi', bits: 2 } },
      { select: { kind: 'nonsense' } },
      { select: { kind: 'full', budget: 3 } },
      { store: { kind: 'f8' } },
      { store: { kind: 'f16', group: 32 } },
      { summary: { kind: 'sse', partitions: 4 } },
      { selector: { kind: 'full' } },
      'f16',
    ];
    for (const policy of policies) {
      expectError(() => new KVCache({ ...valid, policy: policy as never }), 'ERR_OPTION', /policy/);
    }
    expectError(() => new KVCache({ ...valid, policy: { select: { kind: 'snapkv' } } as never }), 'ERR_OPTION', /select/);
    expectError(() => new KVCache({ ...valid, policy: { store: { kind: 'kivi' } } as never }), 'ERR_OPTION', /store/);
  });
});

describe('KVCache calls: shapes, dtypes and layers', () => {
  const t1 = randomTokens(new Random(5), heads, 1);
  const t3 = randomTokens(new Random(6), heads, 3);

  it('layer out of range or not an integer (ERR_SHAPE)', () => {
    const cache = cacheOf();
    for (const layer of [-1, 2, 1.5, Number.NaN, Number.POSITIVE_INFINITY, '0', null]) {
      expectError(() => cache.append(layer as never, t1.k, t1.v), 'ERR_SHAPE', /layer/);
      expectError(() => cache.attend(layer as never, t1.q), 'ERR_SHAPE', /layer/);
      expectError(() => cache.step(layer as never, t1.q, t1.k, t1.v), 'ERR_SHAPE', /layer/);
      expectError(() => cache.prefill(layer as never, t1.q, t1.k, t1.v), 'ERR_SHAPE', /layer/);
      expectError(() => cache.tokens(layer as never), 'ERR_SHAPE', /layer/);
    }
  });

  it('wrong lengths and k/v mismatch (ERR_SHAPE)', () => {
    const cache = cacheOf();
    expectError(() => cache.append(0, t1.k.subarray(1), t1.v.subarray(1)), 'ERR_SHAPE', /\bk\b/);
    expectError(() => cache.append(0, t3.k, t1.v), 'ERR_SHAPE', /\bv\b/);
    expectError(() => cache.append(0, new Float32Array(0), new Float32Array(0)), 'ERR_SHAPE', /\bk\b/);
    expectError(() => cache.step(0, t1.q.subarray(64), t1.k, t1.v), 'ERR_SHAPE', /\bq\b/);
    expectError(() => cache.attend(0, t1.q.subarray(0, 100)), 'ERR_SHAPE', /\bq\b/);
    expect(cache.tokens(0)).toBe(0);
  });

  it('q and k token counts differ in step and prefill (ERR_SHAPE)', () => {
    const cache = cacheOf();
    expectError(() => cache.step(0, t3.q, t1.k, t1.v), 'ERR_SHAPE', /\bq\b.*\bk\b/);
    expectError(() => cache.prefill(0, t1.q, t3.k, t3.v), 'ERR_SHAPE', /\bq\b.*\bk\b/);
    expect(cache.tokens(0)).toBe(0);
  });

  it('attend with more queries than tokens (ERR_SHAPE)', () => {
    const cache = cacheOf();
    expectError(() => cache.attend(0, t1.q), 'ERR_SHAPE', /tokens/);
    cache.append(0, t1.k, t1.v);
    expectError(() => cache.attend(0, t3.q), 'ERR_SHAPE', /tokens/);
    expect(cache.attend(0, t1.q)).toBeInstanceOf(Float32Array);
  });

  it('dtypes (ERR_DTYPE)', () => {
    const cache = cacheOf();
    expectError(() => cache.append(0, new Int8Array(128) as never, new Int8Array(128) as never), 'ERR_DTYPE', /\bk\b/);
    expectError(() => cache.append(0, Array.from(t1.k) as never, Array.from(t1.v) as never), 'ERR_DTYPE', /\bk\b/);
    expectError(() => cache.append(0, encodeHalf(t1.k, 'f16'), encodeHalf(t1.v, 'f16')), 'ERR_DTYPE', /dtype/);
    expectError(() => cache.append(0, t1.k, t1.v, { dtype: 'f16' }), 'ERR_DTYPE', /Float32Array/);
    expectError(() => cache.attend(0, encodeHalf(t1.q, 'bf16')), 'ERR_DTYPE', /dtype/);
    expectError(() => cache.step(0, t1.q, encodeHalf(t1.k, 'f16'), encodeHalf(t1.v, 'f16'), { dtype: 'f16' }), 'ERR_DTYPE', /\bq\b/);
    expectError(() => cache.step(0, t1.q, t1.k, new Float64Array(t1.v) as never), 'ERR_DTYPE', /\bv\b/);
    expect(cache.tokens(0)).toBe(0);
  });

  it('async calls validate before queueing', () => {
    const cache = cacheOf();
    expectError(() => void cache.stepAsync(5, t1.q, t1.k, t1.v), 'ERR_SHAPE', /layer/);
    expectError(() => void cache.attendAsync(0, new Int8Array(256) as never), 'ERR_DTYPE', /\bq\b/);
    expectError(() => void cache.prefillAsync(0, t3.q, t1.k, t1.v), 'ERR_SHAPE');
  });
});

describe('KVCache calls: values (ERR_VALUE), and the cache is unchanged', () => {
  /** Tokens, attend output and stats that a rejected call must leave as they were. */
  function snapshot(cache: KVCache, query: Float32Array) {
    return { tokens: [cache.tokens(0), cache.tokens(1)], out: cache.attend(0, query), stats: cache.stats().bytes };
  }

  it('NaN or Infinity in q, k or v of append, step and prefill', () => {
    const random = new Random(77);
    for (const store of ['f32', 'f16', 'bf16'] as const) {
      // pageTokens 3: a rejected 7-token append would span three pages.
      const cache = cacheOf({ pageTokens: 3, policy: { store: { kind: store } } });
      const prompt = randomTokens(random, heads, 4);
      cache.prefill(0, prompt.q, prompt.k, prompt.v);
      const query = randomTokens(random, heads, 2).q;
      const before = snapshot(cache, query);
      const attempts: Array<[string, RegExp, () => unknown]> = [];
      for (const value of [Number.NaN, Number.POSITIVE_INFINITY, Number.NEGATIVE_INFINITY]) {
        const bad = randomTokens(random, heads, 7);
        const lastK = bad.k.slice(); lastK[lastK.length - 1] = value;   // the last token's last element
        const lastV = bad.v.slice(); lastV[lastV.length - 1] = value;
        const lastQ = bad.q.slice(); lastQ[lastQ.length - 1] = value;
        // The message names the element (in the caller's array, not in the page it was bound for).
        const lastElement = new RegExp(`element ${lastK.length - 1} is`);
        attempts.push(
          ['append k', /\bk\b/, () => cache.append(0, lastK, bad.v)],
          ['append v', /\bv\b/, () => cache.append(0, bad.k, lastV)],
          ['append k element', lastElement, () => cache.append(0, lastK, bad.v)],
          ['append v element', lastElement, () => cache.append(0, bad.k, lastV)],
          ['step q', /\bq\b/, () => cache.step(0, lastQ, bad.k, bad.v)],
          ['step v', /\bv\b/, () => cache.step(0, bad.q, bad.k, lastV)],
          ['prefill k', /\bk\b/, () => cache.prefill(0, bad.q, lastK, bad.v)],
          ['attend q', /\bq\b/, () => cache.attend(0, lastQ.subarray(lastQ.length - 2 * 4 * 64))],
        );
      }
      const nanBits = encodeHalf(randomTokens(random, heads, 2).k, 'bf16');
      nanBits[nanBits.length - 1] = 0x7fc0;
      attempts.push(['append bf16 NaN', /\bk\b/, () => cache.append(0, nanBits, nanBits.slice().fill(0x3f80), { dtype: 'bf16' })]);
      for (const [name, message, call] of attempts) {
        expectError(call, 'ERR_VALUE', message);
        expect(snapshot(cache, query), `${store}: ${name}`).toEqual(before);
      }
    }
  });

  it('an f32 value outside the f16 range into an f16 store', () => {
    const random = new Random(78);
    const cache = cacheOf({ policy: { store: { kind: 'f16' } } });
    const prompt = randomTokens(random, heads, 3);
    cache.append(0, prompt.k, prompt.v);
    const query = prompt.q.subarray(0, 4 * 64);
    const before = snapshot(cache, query);
    for (const value of [1e6, -1e6, 65520, 3.4e38]) {
      const bad = randomTokens(random, heads, 2);
      bad.v[bad.v.length - 1] = value;
      expectError(() => cache.step(0, bad.q, bad.k, bad.v), 'ERR_VALUE', /\bv\b/);
      bad.v[bad.v.length - 1] = 1;
      bad.k[5] = value;
      expectError(() => cache.append(0, bad.k, bad.v), 'ERR_VALUE', /\bk\b/);
      expect(snapshot(cache, query)).toEqual(before);
    }
    // The largest finite f16 (and values that round to it) are accepted; bf16 and f32 stores
    // hold 1e6 as well.
    const edge = randomTokens(random, heads, 1);
    edge.k[0] = 65504;
    edge.v[0] = -65519;
    cache.append(0, edge.k, edge.v);
    expect(cache.tokens(0)).toBe(4);
    for (const store of ['bf16', 'f32'] as const) {
      const wide = cacheOf({ policy: { store: { kind: store } } });
      const big = randomTokens(random, heads, 1);
      big.v[3] = 1e6;
      expect(wide.step(0, big.q, big.k, big.v)).toBeInstanceOf(Float32Array);
    }
  });
});

describe('KVCache.load: damaged bytes (ERR_CORRUPT, never a crash)', () => {
  function savedCache(): Buffer {
    const random = new Random(90);
    const cache = cacheOf({ pageTokens: 4, policy: { store: { kind: 'f16' } } });
    const tokens = randomTokens(random, heads, 3);
    cache.append(0, tokens.k, tokens.v);
    cache.append(1, tokens.k.subarray(0, 128), tokens.v.subarray(0, 128));
    return cache.save();
  }

  it('the untouched bytes load (the control)', () => {
    const loaded = KVCache.load(savedCache());
    open.push(loaded);
    expect(loaded.tokens(0)).toBe(3);
    // Resealing untouched bytes reproduces them: the edits below really pass the checksum.
    expect(resealed(savedCache(), () => {})).toEqual(savedCache());
  });

  it('saves carry magic KVSLIM02 and an XXH64 checksum; KVSLIM01 saves (FNV-1a 64) still load', () => {
    // The test helper's XXH64 against xxHash's reference values (seed 0).
    const pattern = Uint8Array.from({ length: 1000 }, (_, i) => (i * 131 + 7) & 0xff);
    expect(xxh64(new Uint8Array(0))).toBe(0xef46db3751d8e999n);
    expect(xxh64(Buffer.from('abc'))).toBe(0x44bc2cf5ad770999n);
    expect(xxh64(pattern.subarray(0, 33))).toBe(0x09f85eeb4e1cbe9fn);
    expect(xxh64(pattern.subarray(0, 100))).toBe(0x9ddada11d3dc2d8fn);
    expect(xxh64(pattern)).toBe(0x0bf0bdbcc82eb373n);
    const saved = savedCache();
    expect(saved.subarray(0, 8).toString('latin1')).toBe('KVSLIM02');
    expect(saved.readBigUInt64LE(saved.length - 8)).toBe(xxh64(saved.subarray(0, saved.length - 8)));
    const old = resealed(saved, (view) => view.setUint8(7, '1'.charCodeAt(0)));
    expect(old.readBigUInt64LE(old.length - 8)).toBe(fnv1a(old.subarray(0, old.length - 8)));
    const loaded = KVCache.load(old);
    open.push(loaded);
    expect(loaded.save().equals(saved), 'an old save loads as the cache it was').toBe(true);
    // The magic decides the checksum: KVSLIM01 bytes with an XXH64 checksum are damaged.
    const mixed = Buffer.from(saved);
    mixed[7] = '1'.charCodeAt(0);
    expectError(() => KVCache.load(mixed), 'ERR_CORRUPT', /checksum/);
    expectError(() => KVCache.load(Buffer.concat([Buffer.from('KVSLIM03'), saved.subarray(8)])), 'ERR_CORRUPT', /KVSLIM02/);
  });

  it('garbage, empty, and magic-only buffers', () => {
    const random = new Random(91);
    const garbage = Buffer.from(Array.from({ length: 1000 }, () => random.integer(256)));
    expectError(() => KVCache.load(garbage), 'ERR_CORRUPT');
    expectError(() => KVCache.load(Buffer.alloc(0)), 'ERR_CORRUPT');
    expectError(() => KVCache.load(Buffer.from('KVSLIM01')), 'ERR_CORRUPT');
    expectError(() => KVCache.load(Buffer.concat([Buffer.from('KVSLIM01'), garbage])), 'ERR_CORRUPT');
  });

  it('every truncation', () => {
    const saved = savedCache();
    for (let length = 0; length < saved.length; length++) {
      expectError(() => KVCache.load(saved.subarray(0, length)), 'ERR_CORRUPT');
    }
    expectError(() => KVCache.load(Buffer.concat([saved, Buffer.from([0])])), 'ERR_CORRUPT');
  });

  it('every single bit flipped', () => {
    const saved = savedCache();
    for (let byte = 0; byte < saved.length; byte++) {
      for (let bit = 0; bit < 8; bit++) {
        const flipped = Buffer.from(saved);
        flipped[byte] ^= 1 << bit;
        expectError(() => KVCache.load(flipped), 'ERR_CORRUPT');
      }
    }
  });

  // Header (little-endian): magic 0..8 | u32 version 8 | i32 layers 12, qHeads 16, kvHeads 20,
  // headDim 24, store 28 | i64 pageTokens 32 | f32 scale 40 | i32 storeKind 44, kiviBits 48,
  // kiviGroup 52 | i64 kiviResidual 56 | i64 tokens[layers] 64 ... (2 layers: payload from 80)
  const edits: Array<[string, (view: DataView) => void]> = [
    ['version 3', (view) => view.setUint32(8, 3, true)],
    ['layers 0', (view) => view.setInt32(12, 0, true)],
    ['layers -1', (view) => view.setInt32(12, -1, true)],
    ['kvHeads 3 (qHeads 4)', (view) => view.setInt32(20, 3, true)],
    ['headDim 0', (view) => view.setInt32(24, 0, true)],
    ['headDim 4096', (view) => view.setInt32(24, 4096, true)],
    ['store 7', (view) => view.setInt32(28, 7, true)],
    ['pageTokens 0', (view) => view.setBigInt64(32, 0n, true)],
    ['pageTokens -4', (view) => view.setBigInt64(32, -4n, true)],
    ['pageTokens 2^40', (view) => view.setBigInt64(32, 2n ** 40n, true)],
    ['scale 0', (view) => view.setFloat32(40, 0, true)],
    ['scale NaN', (view) => view.setFloat32(40, Number.NaN, true)],
    ['scale Infinity', (view) => view.setFloat32(40, Number.POSITIVE_INFINITY, true)],
    ['store kind 2', (view) => view.setInt32(44, 2, true)],
    ['tokens -1', (view) => view.setBigInt64(64, -1n, true)],
    ['tokens 2^62', (view) => view.setBigInt64(64, 2n ** 62n, true)],
    ['tokens 4 (payload of 3)', (view) => view.setBigInt64(64, 4n, true)],
    ['an f16 Inf key', (view) => view.setUint16(88, 0x7c00, true)],
    ['an f16 NaN value', (view) => view.setUint16(view.byteLength - 10, 0x7e00, true)],
  ];
  for (const [name, edit] of edits) {
    it(`a header or payload with a valid checksum: ${name}`, () => {
      expectError(() => KVCache.load(resealed(savedCache(), edit)), 'ERR_CORRUPT');
    });
  }

  // A KIVI cache (1 layer, 70 tokens, 2 bits, group 16, residual 32): 64 keys and 38 values
  // quantized. Payload from 72: per head i64 quantizedKeys, quantizedValues, then 4 key group
  // records of 512 bytes (256 of codes, then f16 scales and minima), 38 value records of 32 bytes
  // (16 of codes, then f16 scales and minima), 6 f16 key rows, 32 f16 value rows.
  function savedKiviCache(): Buffer {
    const cache = cacheOf({ layers: 1, policy: { store: { kind: 'kivi', bits: 2, group: 16, residual: 32 } } });
    const tokens = randomTokens(new Random(91), heads, 70);
    cache.append(0, tokens.k, tokens.v);
    return cache.save();
  }
  const kiviEdits: Array<[string, (view: DataView) => void]> = [
    ['bits 3', (view) => view.setInt32(48, 3, true)],
    ['group 0', (view) => view.setInt32(52, 0, true)],
    ['group 24', (view) => view.setInt32(52, 24, true)],
    ['residual 0', (view) => view.setBigInt64(56, 0n, true)],
    ['residual 40 (not a multiple of group)', (view) => view.setBigInt64(56, 40n, true)],
    ['quantizedKeys 8 (not a multiple of group)', (view) => view.setBigInt64(72, 8n, true)],
    ['quantizedKeys 80 (more than the tokens)', (view) => view.setBigInt64(72, 80n, true)],
    ['quantizedValues -1', (view) => view.setBigInt64(80, -1n, true)],
    // A residual that is a valid option, but not the one the counts were flushed with (64 keys and
    // 38 values of 70 tokens at 32): the payload's size still matches, and a later flush's row
    // arithmetic went negative (std::length_error killed the process).
    ['residual 96 (the counts were flushed at 32)', (view) => view.setBigInt64(56, 96n, true)],
    ['residual 48 (the counts were flushed at 32)', (view) => view.setBigInt64(56, 48n, true)],
    ['an f16 Inf key scale', (view) => view.setUint16(88 + 256, 0x7c00, true)],
    ['an f16 NaN value minimum', (view) => view.setUint16(88 + 2048 + 16 + 4, 0x7e00, true)],
    ['an f16 Inf residual key', (view) => view.setUint16(88 + 2048 + 38 * 32, 0x7c00, true)],
  ];
  it('a KIVI cache: the control loads, every truncation and bit flip is refused', () => {
    const saved = savedKiviCache();
    const loaded = KVCache.load(saved);
    open.push(loaded);
    expect(Buffer.compare(loaded.save(), saved)).toBe(0);
    for (let length = 0; length < saved.length; length += 97) expectError(() => KVCache.load(saved.subarray(0, length)), 'ERR_CORRUPT');
    for (let byte = 0; byte < saved.length; byte += 13) {
      const flipped = Buffer.from(saved);
      flipped[byte] ^= 1 << (byte % 8);
      expectError(() => KVCache.load(flipped), 'ERR_CORRUPT');
    }
  });
  for (const [name, edit] of kiviEdits) {
    it(`a KIVI header or payload with a valid checksum: ${name}`, () => {
      expectError(() => KVCache.load(resealed(savedKiviCache(), edit)), 'ERR_CORRUPT');
    });
  }

  it('a non-byte argument', () => {
    expectError(() => KVCache.load('KVSLIM01' as never), 'ERR_OPTION');
    expectError(() => KVCache.load(new Float32Array(16) as never), 'ERR_OPTION');
    expectError(() => KVCache.load(savedCache(), { devices: 'cpu' } as never), 'ERR_OPTION', /devices/);
  });
});

describe('disposed caches and module-level functions', () => {
  it('a disposed cache throws ERR_DISPOSED, naming the method', () => {
    const cache = new KVCache({ layers: 1, ...heads });
    cache.dispose();
    const t = randomTokens(new Random(1), heads, 1);
    expectError(() => cache.step(0, t.q, t.k, t.v), 'ERR_DISPOSED', /step/);
    expectError(() => cache.stats(), 'ERR_DISPOSED', /stats/);
  });

  it('setThreads and probeMachine reject bad options', () => {
    for (const threads of [0, -1, 1.5, Number.NaN, Number.POSITIVE_INFINITY, 5000]) {
      expectError(() => setThreads(threads), 'ERR_OPTION', /threads/);
    }
    expectError(() => probeMachine({ bufferMiB: 0 }), 'ERR_OPTION', /bufferMiB/);
    expectError(() => probeMachine({ repeats: 1.5 }), 'ERR_OPTION', /repeats/);
    expectError(() => probeMachine({ threads: -2 }), 'ERR_OPTION', /threads/);
  });
});
