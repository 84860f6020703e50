// KVCache with policy.store { kind: 'kivi' } (methods/kivi.md): every output equals float64
// attention over the K and V the cache holds by the flush rules (test/reference/kivi.ts): keys
// quantized per channel in whole multiples of R tokens, values per token except the last R, the
// rest f16. Streamed and one-shot appends give byte-identical state; stats count the bytes held.
import { describe, expect, it } from 'vitest';

import { KVCache, attention } from '../lib/index.js';
import { Random, relativeL2 } from './helpers/random.js';
import { type Encoded, type Heads, type Tokens, encodeTokens, randomTokens, sliceTokens } from './helpers/tokens.js';
import { referenceAttention } from './reference/attention.js';
import { type Dtype, roundTo } from './reference/half.js';
import { type KiviConfig, KiviMirror, kiviHeadBytes, quantizedKeyTokens, quantizedValueTokens } from './reference/kivi.js';
import { expectError } from './helpers/errors.js';
import { expectClose as expectCloseWithin, expectIdentical } from './helpers/outputs.js';
import { disposedAfterEach } from './helpers/lifetime.js';
import { resealed } from './helpers/saved.js';

// Relative L2 against the float64 reference over the reference-dequantized K and V: the kernels
// dequantize exactly as the reference does (code * s + z with the f16 s and z) and add only f32
// rounding of their own. Observed (AVX-512): at most 1.2e-6. One 8-bit value token read in f16
// instead of quantized moves the output by about 1.5e-4.
const TOLERANCE = 1e-4;
// prefill on an empty layer attends over the exact inputs: the same computation as attention().
const PREFILL_TOLERANCE = 1e-6;
// Quantization at 2 bits moves the output by far more than this; zero error means it did not happen.
const LOSSY = 1e-3;

// `npm run test:gpu` (KVSLIM_TEST_DEVICE=cuda) runs the same checks on a cache living on the GPU.
const DEVICE = process.env.KVSLIM_TEST_DEVICE === 'cuda' ? 'cuda' : 'cpu';

const open = disposedAfterEach<KVCache>();
function kiviCache(heads: Heads, config: Pick<KiviConfig, 'bits'> & Partial<KiviConfig>, layers = 1): KVCache {
  const cache = new KVCache({ layers, ...heads, device: DEVICE, policy: { store: { kind: 'kivi', ...config } } });
  open.push(cache);
  return cache;
}

function expectClose(actual: Float32Array, expected: ArrayLike<number>, what: string, bound = TOLERANCE): void {
  expectCloseWithin(actual, expected, what, bound);
}


/**
 * The reference output of a call that appends its tokens and attends with its own queries (step,
 * and prefill on a layer that already holds tokens). As in KIVI's decode loop (methods/kivi.md),
 * the call attends with its own n tokens still in f16 and quantizes them afterwards: the flush
 * rules applied at T - n, the state before the call.
 */
function afterAppend(mirror: KiviMirror, q: ArrayLike<number>): Float64Array {
  const n = q.length / (mirror.heads.qHeads * mirror.heads.headDim);
  return mirror.attend(q, mirror.tokens - n);
}

const label = (heads: Heads, config: KiviConfig) =>
  `heads ${heads.qHeads}/${heads.kvHeads}, d=${heads.headDim}, bits ${config.bits}, G ${config.group}, R ${config.residual}`;

/** `count` copies of the cycle 1, 7, 31, 32, 33, 200 (304 tokens each). */
const cycles = (count: number) => Array.from({ length: count }, () => [1, 7, 31, 32, 33, 200]).flat();

/** The stats of a cache whose layers should hold what `mirrors` hold, checked to the byte. */
function expectStats(cache: KVCache, mirrors: KiviMirror[], what: string): void {
  const stats = cache.stats();
  const { kvHeads, headDim } = mirrors[0].heads;
  let kv = 0, residual = 0, fullF16 = 0, tokens = 0;
  mirrors.forEach((mirror, layer) => {
    const bytes = mirror.bytes();
    kv += bytes.kv;
    residual += bytes.residual;
    fullF16 += mirror.tokens * kvHeads * 2 * headDim * 2;
    tokens += mirror.tokens;
    expect(stats.layers[layer].tokensKept, `${what}: layer ${layer} tokensKept`).toEqual(new Array(kvHeads).fill(mirror.tokens));
    expect(stats.layers[layer].bytes, `${what}: layer ${layer} bytes`).toBe(bytes.kv + bytes.residual);
  });
  expect(stats.layers, what).toHaveLength(mirrors.length);
  expect(stats.bytes.kv, `${what}: bytes.kv`).toBe(kv);
  expect(stats.bytes.residual, `${what}: bytes.residual`).toBe(residual);
  expect(stats.bytes.fullF16, `${what}: bytes.fullF16`).toBe(fullF16);
  expect([stats.bytes.index, stats.bytes.summary], what).toEqual([0, 0]);
  expect(stats.bytes.meta).toBeGreaterThanOrEqual(0);
  expect(stats.bytes.total, `${what}: bytes.total`).toBe(kv + residual + stats.bytes.meta);
  expect(stats.tokens.seen, `${what}: tokens.seen`).toBeCloseTo(tokens / mirrors.length, 9);
  expect(stats.tokens.kept, `${what}: tokens.kept`).toBeCloseTo(tokens / mirrors.length, 9);
  if (fullF16 > 0) expect(stats.compressionRatio).toBeCloseTo(stats.bytes.total / fullF16, 12);
}

// ---- Options ----------------------------------------------------------------------------------

describe("policy.store { kind: 'kivi' }: options", () => {
  const heads: Heads = { qHeads: 4, kvHeads: 2, headDim: 64 };

  it('group defaults to 32 and residual to 128', () => {
    const random = new Random(2000);
    for (const bits of [2, 4, 8] as const) {
      const cache = kiviCache(heads, { bits });
      expect(cache.policy.store.kind).toBe('kivi');
      const mirror = new KiviMirror(heads, { bits, group: 32, residual: 128 });
      for (const size of [100, 200, 33]) {
        const tokens = randomTokens(random, heads, size);
        cache.append(0, tokens.k, tokens.v);
        mirror.append(tokens.k, tokens.v);
        expectStats(cache, [mirror], `bits ${bits}, T ${mirror.tokens}`);
      }
      const q = randomTokens(random, heads, 3).q;
      expectClose(cache.attend(0, q), mirror.attend(q), `bits ${bits}`);
    }
  });

  it('bad bits, group, residual, headDim % group, unknown keys (ERR_OPTION naming the option)', () => {
    const valid = { bits: 2, group: 32, residual: 128 };
    const make = (store: Record<string, unknown>, headDim = 64) => () => {
      const cache = new KVCache({ layers: 1, qHeads: 4, kvHeads: 2, headDim, device: DEVICE, policy: { store: { kind: 'kivi', ...store } as never } });
      open.push(cache);
      return cache;
    };
    for (const bits of [1, 3, 16, 0, -2, 2.5, Number.NaN, '2', null]) expectError(make({ ...valid, bits }), 'ERR_OPTION', /bits/);
    expectError(make({ group: 32 }), 'ERR_OPTION', /bits/);
    for (const group of [0, -32, 8, 24, 33, 40, 1.5, Number.NaN, '32', null]) {
      expectError(make({ ...valid, group, residual: 96 }), 'ERR_OPTION', /group/);
    }
    // 48 is a multiple of 16 but not a divisor of headDim 64; 128 is larger than headDim 64.
    expectError(make({ ...valid, group: 48, residual: 96 }), 'ERR_OPTION', /group|headDim/);
    expectError(make({ ...valid, group: 128, residual: 128 }), 'ERR_OPTION', /group|headDim/);
    for (const residual of [0, -128, 16, 48, 100, 1.5, Number.NaN, '128', null]) {
      expectError(make({ ...valid, residual }), 'ERR_OPTION', /residual/);
    }
    expectError(make({ ...valid, sink: 4 }), 'ERR_OPTION', /sink/);
    expectError(make({ ...valid, bits: 4, bitsK: 2 }), 'ERR_OPTION', /bitsK/);
    // The same numbers are valid where they fit.
    expect(make({ bits: 8, group: 48, residual: 96 }, 96)().policy.store.kind).toBe('kivi');
    expect(make({ bits: 4, group: 16, residual: 16 })().policy.store.kind).toBe('kivi');
    expect(make({ bits: 2, group: 64, residual: 192 })().policy.store.kind).toBe('kivi');
  });
});

// ---- Attention over the stored form -------------------------------------------------------------

interface StreamCase {
  heads: Heads;
  config: KiviConfig;
  /** Append sizes, in order. */
  sizes: number[];
  input: Dtype;
  /** Most queries per attend (reference cost grows with queries x qHeads x T x headDim). */
  maxQueries: number;
}

const STREAMS: StreamCase[] = [
  { heads: { qHeads: 8, kvHeads: 2, headDim: 64 }, config: { bits: 2, group: 32, residual: 64 }, sizes: cycles(2), input: 'f32', maxQueries: 40 },
  {
    heads: { qHeads: 32, kvHeads: 8, headDim: 128 }, config: { bits: 2, group: 32, residual: 128 },
    sizes: [200, 1, 33, 7, 32, 31, 200, 1, 128, 1], input: 'f16', maxQueries: 8,
  },
  { heads: { qHeads: 4, kvHeads: 4, headDim: 32 }, config: { bits: 4, group: 16, residual: 32 }, sizes: [...cycles(6), 200], input: 'bf16', maxQueries: 40 },
  { heads: { qHeads: 8, kvHeads: 1, headDim: 128 }, config: { bits: 8, group: 64, residual: 128 }, sizes: cycles(2), input: 'f32', maxQueries: 16 },
  { heads: { qHeads: 4, kvHeads: 2, headDim: 64 }, config: { bits: 4, group: 64, residual: 64 }, sizes: [64, 1, 63, 1, 64, 7, 200, 33], input: 'f16', maxQueries: 40 },
  { heads: { qHeads: 12, kvHeads: 3, headDim: 32 }, config: { bits: 2, group: 32, residual: 96 }, sizes: [95, 1, 1, 96, 33, 200, 31, 7, 32, 1], input: 'f32', maxQueries: 24 },
  { heads: { qHeads: 6, kvHeads: 6, headDim: 64 }, config: { bits: 8, group: 16, residual: 48 }, sizes: [7, 31, 1, 32, 33, 47, 200, 1, 1], input: 'bf16', maxQueries: 32 },
];

describe('KIVI attention equals the float64 reference over the dequantized stored K and V', () => {
  STREAMS.forEach((stream, index) => {
    const total = stream.sizes.reduce((a, b) => a + b, 0);
    it(`${label(stream.heads, stream.config)}, ${stream.input} inputs, appends ${stream.sizes.length} chunks to T=${total}`, () => {
      const random = new Random(2100 + index);
      const { heads } = stream;
      const cache = kiviCache(heads, stream.config);
      const mirror = new KiviMirror(heads, stream.config);
      stream.sizes.forEach((size, i) => {
        const tokens = encodeTokens(randomTokens(random, heads, size), stream.input);
        const before = mirror.tokens;
        mirror.append(tokens.values.k, tokens.values.v);
        const what = `chunk ${i} (${size} tokens, T ${before} -> ${mirror.tokens})`;
        // Small chunks go through step or prefill (their own queries); large ones through append,
        // then a block of queries. prefill on an empty layer is exact and tested below.
        const mode = size > stream.maxQueries ? 'append' : (['step', 'prefill', 'append'] as const)[i % 3];
        if (mode === 'step') {
          expectClose(cache.step(0, tokens.q, tokens.k, tokens.v, tokens.options), afterAppend(mirror, tokens.values.q), `${what}: step`);
        } else if (mode === 'prefill' && before > 0) {
          expectClose(cache.prefill(0, tokens.q, tokens.k, tokens.v, tokens.options), afterAppend(mirror, tokens.values.q), `${what}: prefill`);
        } else {
          cache.append(0, tokens.k, tokens.v, tokens.options);
          const n = i % 3 === 0 ? 1 : Math.min(mirror.tokens, 1 + random.integer(stream.maxQueries));
          const queries = encodeTokens(randomTokens(random, heads, n), stream.input);
          expectClose(cache.attend(0, queries.q, queries.options), mirror.attend(queries.values.q), `${what}: attend n=${n}`);
        }
        expect(cache.tokens(0)).toBe(mirror.tokens);
      });
    });
  });

  const decodes: Array<{ heads: Heads; config: KiviConfig; steps: number }> = [
    { heads: { qHeads: 8, kvHeads: 2, headDim: 64 }, config: { bits: 2, group: 16, residual: 32 }, steps: 150 },
    { heads: { qHeads: 4, kvHeads: 1, headDim: 128 }, config: { bits: 4, group: 32, residual: 64 }, steps: 200 },
  ];
  decodes.forEach(({ heads, config, steps }, index) => {
    it(`decode one token at a time: ${label(heads, config)}, T = 1..${steps}`, () => {
      const random = new Random(2200 + index);
      const cache = kiviCache(heads, config);
      const mirror = new KiviMirror(heads, config);
      for (let t = 0; t < steps; t++) {
        const token = randomTokens(random, heads, 1);
        mirror.append(token.k, token.v);
        expectClose(cache.step(0, token.q, token.k, token.v), afterAppend(mirror, token.q), `T ${mirror.tokens}`);
      }
    });
  });
  // A step attends to its own token before quantizing it; a later attend() reads it quantized.
  it('step attends before it flushes; append + attend reads the flushed state', () => {
    const random = new Random(2250);
    const heads: Heads = { qHeads: 8, kvHeads: 2, headDim: 64 };
    const config: KiviConfig = { bits: 2, group: 16, residual: 32 };
    const stepped = kiviCache(heads, config);
    const split = kiviCache(heads, config);
    const mirror = new KiviMirror(heads, config);
    for (const size of [1, 7, 31, 32, 33, 1, 1, 30, 2]) {
      const tokens = randomTokens(random, heads, size);
      mirror.append(tokens.k, tokens.v);
      expectClose(stepped.step(0, tokens.q, tokens.k, tokens.v), afterAppend(mirror, tokens.q), `step -> T ${mirror.tokens}`);
      split.append(0, tokens.k, tokens.v);
      expectClose(split.attend(0, tokens.q), mirror.attend(tokens.q), `append + attend -> T ${mirror.tokens}`);
    }
    expect(Buffer.compare(stepped.save(), split.save())).toBe(0);
  });
});

describe('prefill on an empty layer attends over its inputs in f16, then stores them quantized', () => {
  const heads: Heads = { qHeads: 8, kvHeads: 2, headDim: 64 };
  const config: KiviConfig = { bits: 2, group: 32, residual: 128 };
  const inputs: Dtype[] = ['f32', 'f16', 'bf16'];
  [1, 50, 127, 128, 300].forEach((T, index) => {
    const input = inputs[index % 3];
    it(`T=${T} (${quantizedKeyTokens(T, 128)} keys, ${quantizedValueTokens(T, 128)} values quantized), ${input} inputs`, () => {
      const random = new Random(2300 + index);
      const cache = kiviCache(heads, config);
      const mirror = new KiviMirror(heads, config);
      const prompt = encodeTokens(randomTokens(random, heads, T), input);
      const out = cache.prefill(0, prompt.q, prompt.k, prompt.v, prompt.options);
      // Every input is rounded to f16 first (the residual's precision): exact for f16 inputs.
      const exact = attention({
        q: new Float32Array(prompt.values.q), k: new Float32Array(roundTo(prompt.values.k, 'f16')),
        v: new Float32Array(roundTo(prompt.values.v, 'f16')), ...heads, causal: true, device: DEVICE,
      });
      expectClose(out, exact, 'vs attention() over f16 K/V', PREFILL_TOLERANCE);
      const { q, k, v } = prompt.values;
      expectClose(out, referenceAttention({ q, k: roundTo(k, 'f16'), v: roundTo(v, 'f16'), ...heads, causal: true }),
        'vs the float64 reference', 2e-5);
      mirror.append(k, v);

      // What follows reads the stored form: a step, a prefill of 37 more tokens, a step.
      for (const size of [1, 37, 1]) {
        const more = encodeTokens(randomTokens(random, heads, size), input);
        mirror.append(more.values.k, more.values.v);
        const call = size === 1 ? cache.step.bind(cache) : cache.prefill.bind(cache);
        expectClose(call(0, more.q, more.k, more.v, more.options), afterAppend(mirror, more.values.q), `+${size} -> T ${mirror.tokens}`);
      }
      expectStats(cache, [mirror], `T ${mirror.tokens}`);
    });
  });
});

describe('quantization is real: lossy at 2 bits, exact below the first flush', () => {
  const heads: Heads = { qHeads: 8, kvHeads: 2, headDim: 64 };
  const config: KiviConfig = { bits: 2, group: 32, residual: 128 };

  it('T = 300 > R: attention moves away from exact attention, and matches the quantized reference', () => {
    const random = new Random(2400);
    const cache = kiviCache(heads, config);
    const mirror = new KiviMirror(heads, config);
    for (const size of [100, 100, 100]) {
      const tokens = randomTokens(random, heads, size);
      cache.append(0, tokens.k, tokens.v);
      mirror.append(tokens.k, tokens.v);
    }
    const q = randomTokens(random, heads, 4).q;
    const out = cache.attend(0, q);
    expectClose(out, mirror.attend(q), 'vs quantized reference');
    expect(relativeL2(out, mirror.attendExact(q))).toBeGreaterThan(LOSSY);
  });

  it('T = R - 1 holds everything in f16; T = R quantizes every key (and no value)', () => {
    const random = new Random(2401);
    const cache = kiviCache(heads, config);
    const mirror = new KiviMirror(heads, config);
    const first = randomTokens(random, heads, config.residual - 1);
    cache.append(0, first.k, first.v);
    mirror.append(first.k, first.v);
    const q = randomTokens(random, heads, 2).q;
    expectClose(cache.attend(0, q), mirror.attendExact(q), 'T = R - 1 vs exact f16');
    const last = randomTokens(random, heads, 1);
    mirror.append(last.k, last.v);
    cache.append(0, last.k, last.v);
    const out = cache.attend(0, q);
    expectClose(out, mirror.attend(q), 'T = R');
    expect(relativeL2(out, mirror.attendExact(q)), 'T = R: keys quantized').toBeGreaterThan(LOSSY);
  });
});

// ---- State: chunk invariance, stats, fork, save/load, layers ------------------------------------

describe('streamed and one-shot appends give byte-identical state', () => {
  const cases: Array<{ heads: Heads; config: KiviConfig; total: number; chunkings: number[][] }> = [
    {
      heads: { qHeads: 8, kvHeads: 2, headDim: 64 }, config: { bits: 2, group: 32, residual: 128 }, total: 303,
      chunkings: [new Array(303).fill(1), [7, 31, 32, 33, 200], [200, 103], [128, 1, 127, 1, 46], [1, 127, 128, 47]],
    },
    {
      heads: { qHeads: 4, kvHeads: 4, headDim: 32 }, config: { bits: 8, group: 16, residual: 32 }, total: 150,
      chunkings: [new Array(150).fill(1), [7, 31, 32, 33, 47], [32, 1, 31, 86], [16, 16, 16, 102]],
    },
    {
      heads: { qHeads: 8, kvHeads: 1, headDim: 128 }, config: { bits: 4, group: 64, residual: 64 }, total: 200,
      chunkings: [new Array(200).fill(1), [63, 1, 64, 72], [33, 33, 33, 101]],
    },
  ];
  cases.forEach(({ heads, config, total, chunkings }, index) => {
    it(`${label(heads, config)}: ${total} tokens in ${chunkings.length + 2} ways, 2 layers`, () => {
      const random = new Random(2500 + index);
      const layers = [randomTokens(random, heads, total), randomTokens(random, heads, total)];
      const oneShot = kiviCache(heads, config, 2);
      layers.forEach((tokens, layer) => oneShot.append(layer, tokens.k, tokens.v));
      const saved = oneShot.save();
      const query = randomTokens(random, heads, 3).q;
      const outputs = [0, 1].map((layer) => oneShot.attend(layer, query));
      // The one-shot cache holds the reference's stored form.
      layers.forEach((tokens, layer) => {
        const mirror = new KiviMirror(heads, config);
        mirror.append(tokens.k, tokens.v);
        expectClose(outputs[layer], mirror.attend(query), `one-shot, layer ${layer}`);
      });

      const ways: Array<[string, (cache: KVCache, layer: number, tokens: Tokens) => void]> = chunkings.map((sizes) => [
        `appends [${sizes.length > 8 ? `${sizes.length} x 1` : sizes.join(', ')}]`,
        (cache, layer, tokens) => {
          let first = 0;
          for (const size of sizes) {
            const chunk = sliceTokens(tokens, heads, first, size);
            cache.append(layer, chunk.k, chunk.v);
            first += size;
          }
          expect(first).toBe(total);
        },
      ]);
      ways.push(['prefill 40, then steps of 1', (cache, layer, tokens) => {
        const prompt = sliceTokens(tokens, heads, 0, 40);
        cache.prefill(layer, prompt.q, prompt.k, prompt.v);
        for (let t = 40; t < total; t++) {
          const token = sliceTokens(tokens, heads, t, 1);
          cache.step(layer, token.q, token.k, token.v);
        }
      }]);
      ways.push(['prefill of everything', (cache, layer, tokens) => void cache.prefill(layer, tokens.q, tokens.k, tokens.v)]);
      for (const [name, fill] of ways) {
        const cache = kiviCache(heads, config, 2);
        // Layers interleaved would be the same; filled one after the other here.
        layers.forEach((tokens, layer) => fill(cache, layer, tokens));
        expect(cache.tokens(0)).toBe(total);
        expect(Buffer.compare(cache.save(), saved), `${name}: save() differs from the one-shot append's`).toBe(0);
        [0, 1].forEach((layer) => expectIdentical(cache.attend(layer, query), outputs[layer], `${name}, layer ${layer}`));
      }
    });
  });
});

describe('KIVI stats count the bytes held, exactly', () => {
  const cases: Array<{ heads: Heads; config: KiviConfig; layers: number[][] }> = [
    // Per layer, its append sizes; layers get different token counts.
    { heads: { qHeads: 8, kvHeads: 2, headDim: 128 }, config: { bits: 2, group: 32, residual: 128 }, layers: [cycles(3), [37, 300, 1]] },
    { heads: { qHeads: 4, kvHeads: 4, headDim: 64 }, config: { bits: 4, group: 16, residual: 32 }, layers: [cycles(2)] },
    { heads: { qHeads: 2, kvHeads: 1, headDim: 32 }, config: { bits: 8, group: 32, residual: 64 }, layers: [cycles(2), [], [64, 64, 1]] },
  ];
  cases.forEach(({ heads, config, layers }, index) => {
    it(`${label(heads, config)}, ${layers.length} layer(s), after every append`, () => {
      const random = new Random(2600 + index);
      const cache = kiviCache(heads, config, layers.length);
      const mirrors = layers.map(() => new KiviMirror(heads, config));
      expectStats(cache, mirrors, 'empty');
      const longest = Math.max(...layers.map((sizes) => sizes.length));
      for (let i = 0; i < longest; i++) {
        layers.forEach((sizes, layer) => {
          if (i >= sizes.length) return;
          const tokens = randomTokens(random, heads, sizes[i]);
          cache.append(layer, tokens.k, tokens.v);
          mirrors[layer].append(tokens.k, tokens.v);
          expectStats(cache, mirrors, `layer ${layer} at T ${mirrors[layer].tokens}`);
        });
      }
    });
  });

  it('headDim 128, group 32, 2 bits: 96 bytes per token per kv head once quantized', () => {
    const random = new Random(2650);
    const heads: Heads = { qHeads: 32, kvHeads: 8, headDim: 128 };
    const config: KiviConfig = { bits: 2, group: 32, residual: 128 };
    expect(kiviHeadBytes(512, 128, config).kv - kiviHeadBytes(384, 128, config).kv).toBe(96 * 128);
    const cache = kiviCache(heads, config);
    const prompt = randomTokens(random, heads, 256);
    cache.append(0, prompt.k, prompt.v);
    const before = cache.stats().bytes;
    const more = randomTokens(random, heads, 128);
    cache.append(0, more.k, more.v);
    const after = cache.stats().bytes;
    expect((after.kv - before.kv) / (128 * heads.kvHeads)).toBe(96);
    // The f16 residual stays R values and 0 keys at every multiple of R.
    expect(after.residual).toBe(before.residual);
    expect(after.residual).toBe(128 * 128 * 2 * heads.kvHeads);
  });
});

describe('KIVI fork and save/load', () => {
  const heads: Heads = { qHeads: 8, kvHeads: 2, headDim: 64 };

  it('a fork after compression: parent and child diverge, each equals its own reference', () => {
    const random = new Random(2700);
    const config: KiviConfig = { bits: 2, group: 32, residual: 64 };
    const parent = kiviCache(heads, config, 2);
    const parentMirrors = [new KiviMirror(heads, config), new KiviMirror(heads, config)];
    [300, 150].forEach((T, layer) => {
      const tokens = randomTokens(random, heads, T);
      parent.append(layer, tokens.k, tokens.v);
      parentMirrors[layer].append(tokens.k, tokens.v);
    });
    const child = parent.fork();
    open.push(child);
    const childMirrors = parentMirrors.map((mirror) => mirror.fork());
    expect(Buffer.compare(child.save(), parent.save())).toBe(0);
    expect(child.policy.store).toEqual(parent.policy.store);

    // 45 steps: 300 -> 345 crosses the key flush at 320, 150 -> 195 the one at 192.
    for (let t = 0; t < 45; t++) {
      for (let layer = 0; layer < 2; layer++) {
        const mine = randomTokens(random, heads, 1);
        parentMirrors[layer].append(mine.k, mine.v);
        expectClose(parent.step(layer, mine.q, mine.k, mine.v), afterAppend(parentMirrors[layer], mine.q), `parent, layer ${layer}, step ${t}`);
        const theirs = randomTokens(random, heads, 1);
        childMirrors[layer].append(theirs.k, theirs.v);
        expectClose(child.step(layer, theirs.q, theirs.k, theirs.v), afterAppend(childMirrors[layer], theirs.q), `child, layer ${layer}, step ${t}`);
      }
    }
    const queries = randomTokens(random, heads, 5).q;
    for (let layer = 0; layer < 2; layer++) {
      expectClose(parent.attend(layer, queries), parentMirrors[layer].attend(queries), `parent, layer ${layer}`);
      expectClose(child.attend(layer, queries), childMirrors[layer].attend(queries), `child, layer ${layer}`);
    }
    expectStats(parent, parentMirrors, 'parent');
    expectStats(child, childMirrors, 'child');
  });

  it('save() / KVCache.load() round trip: same outputs, state and stats, now and after more steps', () => {
    const random = new Random(2710);
    const config: KiviConfig = { bits: 4, group: 32, residual: 64 };
    const cache = kiviCache(heads, config, 3);
    const mirrors = [0, 1, 2].map(() => new KiviMirror(heads, config));
    [300, 77, 0].forEach((T, layer) => {
      if (T === 0) return;
      const tokens = encodeTokens(randomTokens(random, heads, T), 'f16');
      cache.append(layer, tokens.k, tokens.v, tokens.options);
      mirrors[layer].append(tokens.values.k, tokens.values.v);
    });
    const saved = cache.save();
    const loaded = KVCache.load(saved, { device: DEVICE });
    open.push(loaded);
    expect(loaded.policy.store).toEqual(cache.policy.store);
    expect([0, 1, 2].map((layer) => loaded.tokens(layer))).toEqual([300, 77, 0]);
    expect(Buffer.compare(loaded.save(), saved)).toBe(0);
    expectStats(loaded, mirrors, 'loaded');
    const query = randomTokens(random, heads, 4).q;
    for (const layer of [0, 1]) expectIdentical(loaded.attend(layer, query), cache.attend(layer, query), `layer ${layer}`);
    // 300 -> 340 crosses the key flush at 320; layer 2 starts empty.
    for (let t = 0; t < 40; t++) {
      for (const layer of [0, 2]) {
        const token: Encoded = encodeTokens(randomTokens(random, heads, 1), 'f16');
        mirrors[layer].append(token.values.k, token.values.v);
        const out = loaded.step(layer, token.q, token.k, token.v, token.options);
        expectIdentical(out, cache.step(layer, token.q, token.k, token.v, token.options), `layer ${layer}, step ${t}: loaded vs original`);
        expectClose(out, afterAppend(mirrors[layer], token.values.q), `layer ${layer}, step ${t}`);
      }
    }
    expect(Buffer.compare(loaded.save(), cache.save())).toBe(0);
  });
});

describe('KIVI layers are independent', () => {
  it('each layer follows its own flush schedule; appending to one changes no other', () => {
    const random = new Random(2800);
    const heads: Heads = { qHeads: 4, kvHeads: 2, headDim: 32 };
    const config: KiviConfig = { bits: 2, group: 16, residual: 32 };
    const cache = kiviCache(heads, config, 3);
    const mirrors = [0, 1, 2].map(() => new KiviMirror(heads, config));
    const schedule: Array<[number, number]> = [[2, 200], [1, 33], [0, 5], [2, 300], [1, 97], [2, 200], [1, 1]];
    for (const [layer, size] of schedule) {
      const tokens = randomTokens(random, heads, size);
      cache.append(layer, tokens.k, tokens.v);
      mirrors[layer].append(tokens.k, tokens.v);
    }
    expect([0, 1, 2].map((layer) => cache.tokens(layer))).toEqual([5, 131, 700]);
    const query = randomTokens(random, heads, 3).q;
    const before = [0, 1, 2].map((layer) => cache.attend(layer, query));
    before.forEach((out, layer) => expectClose(out, mirrors[layer].attend(query), `layer ${layer}`));
    const more = randomTokens(random, heads, 40);
    cache.append(1, more.k, more.v);
    expectIdentical(cache.attend(0, query), before[0], 'layer 0');
    expectIdentical(cache.attend(2, query), before[2], 'layer 2');
    mirrors[1].append(more.k, more.v);
    expectClose(cache.attend(1, query), mirrors[1].attend(query), 'layer 1 after 40 more');
    expectStats(cache, mirrors, 'three layers');
  });
});

describe('KIVI cache: bad values (ERR_VALUE) leave the state unchanged', () => {
  // Appended values are rounded to f16 first, so values beyond f16 are rejected as an f16 store rejects them.
  it('NaN, Infinity or a value beyond f16 in k or v of append, step and prefill', () => {
    const random = new Random(2900);
    const heads: Heads = { qHeads: 4, kvHeads: 2, headDim: 64 };
    const cache = kiviCache(heads, { bits: 2, group: 32, residual: 32 });
    const prompt = randomTokens(random, heads, 70);
    cache.append(0, prompt.k, prompt.v);
    const saved = cache.save();
    for (const value of [Number.NaN, Number.POSITIVE_INFINITY, Number.NEGATIVE_INFINITY, 1e6, -65520]) {
      // 30 tokens would cross the key flush at 96: a rejected call must not flush either.
      const bad = randomTokens(random, heads, 30);
      const k = bad.k.slice(); k[k.length - 1] = value;
      const v = bad.v.slice(); v[v.length - 1] = value;
      expectError(() => cache.append(0, k, bad.v), 'ERR_VALUE', /\bk\b/);
      expectError(() => cache.step(0, bad.q, bad.k, v), 'ERR_VALUE', /\bv\b/);
      expectError(() => cache.prefill(0, bad.q, k, bad.v), 'ERR_VALUE', /\bk\b/);
      expect(cache.tokens(0)).toBe(70);
      expect(Buffer.compare(cache.save(), saved)).toBe(0);
    }
  });
});

// ---- Dense-and-sparse (KVQuant per-vector outliers, policy.store.outliers) --------------------

describe('KIVI dense-and-sparse outliers (policy.store.outliers)', () => {
  // The CUDA backend rejects outliers (tested below); these checks run on the CPU cache.
  const cpuCache = (heads: Heads, config: KiviConfig, layers = 1): KVCache => {
    const cache = new KVCache({ layers, ...heads, device: 'cpu', policy: { store: { kind: 'kivi', ...config } } });
    open.push(cache);
    return cache;
  };
  /** Random tokens whose keys carry fixed outlier channels and whose k and v carry rare spikes. */
  const spiky = (random: Random, heads: Heads, n: number): Tokens => {
    const tokens = randomTokens(random, heads, n);
    const { headDim } = heads;
    for (let i = 0; i < tokens.k.length; i++) {
      const c = i % headDim;
      if (c === 3 || c === headDim - 5) tokens.k[i] *= 12;  // outlier channels (keys)
      if (random.uniform() < 0.01) tokens.k[i] += (random.uniform() < 0.5 ? -1 : 1) * 20;
      if (random.uniform() < 0.02) tokens.v[i] *= 15;
    }
    return tokens;
  };

  const streams: Array<{ heads: Heads; config: KiviConfig; sizes: number[] }> = [
    { heads: { qHeads: 8, kvHeads: 2, headDim: 64 }, config: { bits: 2, group: 32, residual: 64, outliers: 0.01 }, sizes: [150, 1, 1, 7, 33, 1, 64] },
    { heads: { qHeads: 4, kvHeads: 4, headDim: 32 }, config: { bits: 4, group: 16, residual: 32, outliers: 0.05 }, sizes: [1, 31, 1, 100, 2, 40] },
    { heads: { qHeads: 8, kvHeads: 1, headDim: 128 }, config: { bits: 8, group: 32, residual: 32, outliers: 0.02 }, sizes: [70, 1, 1, 1, 90] },
    { heads: { qHeads: 4, kvHeads: 2, headDim: 64 }, config: { bits: 2, group: 64, residual: 64, outliers: 0.2 }, sizes: [200, 1, 65, 3] },
    // Every entry an outlier: all-outlier groups keep the normal rule; x^ + delta is f16 x.
    { heads: { qHeads: 2, kvHeads: 1, headDim: 32 }, config: { bits: 2, group: 16, residual: 16, outliers: 1 }, sizes: [40, 1, 20] },
    // A fraction that rounds to 0 value outliers per token (0.004 * 64) but 8 per key group.
    { heads: { qHeads: 4, kvHeads: 2, headDim: 64 }, config: { bits: 4, group: 32, residual: 32, outliers: 0.004 }, sizes: [100, 1, 30] },
  ];
  streams.forEach(({ heads, config, sizes }, index) => {
    it(`attention equals the reference with corrections: ${label(heads, config)}, outliers ${config.outliers}`, () => {
      const random = new Random(2900 + index);
      const cache = cpuCache(heads, config);
      const mirror = new KiviMirror(heads, config);
      sizes.forEach((size, i) => {
        const tokens = spiky(random, heads, size);
        const before = mirror.tokens;
        mirror.append(tokens.k, tokens.v);
        const what = `chunk ${i} (T ${before} -> ${mirror.tokens})`;
        if (size <= 8 && i % 2 === 1) {
          expectClose(cache.step(0, tokens.q, tokens.k, tokens.v), afterAppend(mirror, tokens.q), `${what}: step`);
        } else if (size <= 40 && before > 0) {
          expectClose(cache.prefill(0, tokens.q, tokens.k, tokens.v), afterAppend(mirror, tokens.q), `${what}: prefill`);
        } else {
          cache.append(0, tokens.k, tokens.v);
          const q = randomTokens(random, heads, 1 + random.integer(3)).q;
          expectClose(cache.attend(0, q), mirror.attend(q), `${what}: attend`);
        }
        expectStats(cache, [mirror], what);
      });
    });
  });

  it('the corrections are real: 2-bit attention moves toward exact attention on spiky K and V', () => {
    const random = new Random(2950);
    const heads: Heads = { qHeads: 8, kvHeads: 2, headDim: 64 };
    const tokens = spiky(random, heads, 400);
    const q = randomTokens(random, heads, 4).q;
    const errors = [0, 0.01, 0.05].map((outliers) => {
      const config: KiviConfig = { bits: 2, group: 32, residual: 128, outliers };
      const cache = cpuCache(heads, config);
      cache.append(0, tokens.k, tokens.v);
      const mirror = new KiviMirror(heads, config);
      mirror.append(tokens.k, tokens.v);
      const out = cache.attend(0, q);
      expectClose(out, mirror.attend(q), `outliers ${outliers}`);
      return relativeL2(out, mirror.attendExact(q));
    });
    expect(errors[0]).toBeGreaterThan(LOSSY);
    expect(errors[1]).toBeLessThan(errors[0]);
    expect(errors[2]).toBeLessThan(errors[1]);
  });

  it('outliers 0 is the plain KIVI cache: same save() bytes (version 2), outputs and stats', () => {
    const random = new Random(2960);
    const heads: Heads = { qHeads: 4, kvHeads: 2, headDim: 64 };
    const plain = cpuCache(heads, { bits: 2, group: 32, residual: 64 });
    const zero = cpuCache(heads, { bits: 2, group: 32, residual: 64, outliers: 0 });
    for (const size of [100, 1, 50]) {
      const tokens = spiky(random, heads, size);
      expectIdentical(zero.prefill(0, tokens.q, tokens.k, tokens.v), plain.prefill(0, tokens.q, tokens.k, tokens.v), `T +${size}`);
    }
    const saved = plain.save();
    expect(Buffer.compare(zero.save(), saved)).toBe(0);
    expect(saved.readUInt32LE(8)).toBe(2);
    expect(zero.stats().bytes).toEqual(plain.stats().bytes);
    expect(zero.stats().layers).toEqual(plain.stats().layers);
    expect(zero.policy.store).toEqual({ kind: 'kivi', bits: 2, group: 32, residual: 64, outliers: 0, preRope: false });
    const loaded = KVCache.load(saved, { device: 'cpu' });
    open.push(loaded);
    expect(loaded.policy.store).toEqual(zero.policy.store);
  });

  it('stats count 4 bytes per outlier exactly: headDim 128, group 32, 2 bits, 1%', () => {
    const random = new Random(2970);
    const heads: Heads = { qHeads: 8, kvHeads: 2, headDim: 128 };
    const config: KiviConfig = { bits: 2, group: 32, residual: 128, outliers: 0.01 };
    // round(0.01 * 32 * 128) = 41 per key group, round(0.01 * 128) = 1 per value token.
    expect(kiviHeadBytes(512, 128, config).kv - kiviHeadBytes(384, 128, config).kv).toBe(96 * 128 + 4 * (41 * 4 + 128));
    const cache = cpuCache(heads, config, 2);
    const mirrors = [new KiviMirror(heads, config), new KiviMirror(heads, config)];
    for (const [layer, size] of [[0, 300], [1, 129], [0, 84], [1, 1]]) {
      const tokens = spiky(random, heads, size);
      cache.append(layer, tokens.k, tokens.v);
      mirrors[layer].append(tokens.k, tokens.v);
      expectStats(cache, mirrors, `layer ${layer} at T ${mirrors[layer].tokens}`);
    }
  });

  const chunkCases: Array<{ heads: Heads; config: KiviConfig; total: number; chunkings: number[][] }> = [
    { heads: { qHeads: 8, kvHeads: 2, headDim: 64 }, config: { bits: 2, group: 32, residual: 64, outliers: 0.01 }, total: 200, chunkings: [new Array(200).fill(1), [7, 57, 1, 135], [64, 64, 72]] },
    { heads: { qHeads: 4, kvHeads: 4, headDim: 32 }, config: { bits: 8, group: 16, residual: 32, outliers: 0.1 }, total: 100, chunkings: [new Array(100).fill(1), [31, 2, 67]] },
  ];
  chunkCases.forEach(({ heads, config, total, chunkings }, index) => {
    it(`chunking invariance (save bytes): ${label(heads, config)}, outliers ${config.outliers}`, () => {
      const random = new Random(2980 + index);
      const tokens = spiky(random, heads, total);
      const oneShot = cpuCache(heads, config);
      oneShot.append(0, tokens.k, tokens.v);
      const saved = oneShot.save();
      expect(saved.readUInt32LE(8)).toBe(3);
      const query = randomTokens(random, heads, 2).q;
      const output = oneShot.attend(0, query);
      for (const sizes of chunkings) {
        const cache = cpuCache(heads, config);
        let first = 0;
        for (const size of sizes) {
          const chunk = sliceTokens(tokens, heads, first, size);
          if (size === 1) cache.step(0, chunk.q, chunk.k, chunk.v);
          else cache.append(0, chunk.k, chunk.v);
          first += size;
        }
        const what = `[${sizes.length > 8 ? `${sizes.length} x 1` : sizes.join(', ')}]`;
        expect(Buffer.compare(cache.save(), saved), `${what}: save() differs`).toBe(0);
        expectIdentical(cache.attend(0, query), output, what);
      }
    });
  });

  it('save() / load() carry the outliers (version 3): same outputs, stats and bytes, now and after more steps', () => {
    const random = new Random(2990);
    const heads: Heads = { qHeads: 8, kvHeads: 2, headDim: 64 };
    const config: KiviConfig = { bits: 4, group: 32, residual: 64, outliers: 0.03 };
    const cache = cpuCache(heads, config, 2);
    const mirrors = [new KiviMirror(heads, config), new KiviMirror(heads, config)];
    [250, 70].forEach((T, layer) => {
      const tokens = spiky(random, heads, T);
      cache.append(layer, tokens.k, tokens.v);
      mirrors[layer].append(tokens.k, tokens.v);
    });
    const saved = cache.save();
    const loaded = KVCache.load(saved, { device: 'cpu' });
    open.push(loaded);
    expect(loaded.policy.store).toEqual({ kind: 'kivi', bits: 4, group: 32, residual: 64, outliers: 0.03, preRope: false });
    expect(Buffer.compare(loaded.save(), saved)).toBe(0);
    expectStats(loaded, mirrors, 'loaded');
    for (let t = 0; t < 20; t++) {
      for (const layer of [0, 1]) {
        const token = spiky(random, heads, 1);
        mirrors[layer].append(token.k, token.v);
        const out = loaded.step(layer, token.q, token.k, token.v);
        expectIdentical(out, cache.step(layer, token.q, token.k, token.v), `layer ${layer}, step ${t}`);
        expectClose(out, afterAppend(mirrors[layer], token.q), `layer ${layer}, step ${t}`);
      }
    }
    // A delta byte or an index pushed out of range, resealed, is refused.
    // Header of 64 bytes + f64 outliers + 2 i64 token counts, then layer 0 head 0: its 2 counts and
    // its first key record (codes, f16 scales and minima, then the outlier indices and deltas).
    const keyOutlierAt = 64 + 8 + 16 + 16 + (64 * 32 * 4) / 8 + 4 * 64;
    for (const [what, value] of [['index', 0xffff], ['delta', 0x7c00]] as const) {
      const at = what === 'index' ? keyOutlierAt : keyOutlierAt + 2 * Math.round(0.03 * 32 * 64);
      const damaged = resealed(saved, (view) => view.setUint16(at, value, true));
      expectError(() => KVCache.load(damaged), 'ERR_CORRUPT', what === 'index' ? /outlier index/ : /not finite/);
    }
  });

  it('bad outliers (ERR_OPTION naming the option)', () => {
    const make = (outliers: unknown, headDim = 64, group = 32) => () => {
      const cache = new KVCache({
        layers: 1, qHeads: 4, kvHeads: 2, headDim, device: 'cpu',
        policy: { store: { kind: 'kivi', bits: 2, group, residual: 128, outliers } as never },
      });
      open.push(cache);
    };
    for (const bad of [-0.01, 1.5, Number.NaN, Number.POSITIVE_INFINITY, '0.01', null, true]) {
      expectError(make(bad), 'ERR_OPTION', /policy\.store\.outliers/);
    }
    // Key outlier indices are uint16: group * headDim <= 65536.
    expectError(make(0.01, 1024, 128), 'ERR_OPTION', /outliers/);
    expect(make(0, 1024, 128)).not.toThrow();
    expect(make(0.01, 1024, 64)).not.toThrow();
  });

  it.runIf(DEVICE === 'cuda')('the CUDA backend refuses records with outliers (ERR_BACKEND_UNAVAILABLE)', () => {
    const heads: Heads = { qHeads: 4, kvHeads: 2, headDim: 64 };
    const cache = kiviCache(heads, { bits: 2, group: 32, residual: 32, outliers: 0.01 });
    const tokens = randomTokens(new Random(2999), heads, 40);
    cache.append(0, tokens.k, tokens.v);
    expectError(() => cache.attend(0, tokens.q.subarray(0, heads.qHeads * heads.headDim)), 'ERR_BACKEND_UNAVAILABLE', /outliers/);
  });
});
