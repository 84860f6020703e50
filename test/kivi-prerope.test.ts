// KVCache with policy.store { kind: 'kivi', preRope: true } (KVQuant pre-RoPE keys, methods/kivi.md):
// keys arrive before the rotary embedding and are quantized that way; every output equals float64
// attention over the reference-dequantized pre-RoPE keys (f16 residual) rotated by their positions
// (test/reference/kivi.ts attendPreRope), with the post-RoPE queries as given.
import { describe, expect, it } from 'vitest';

import { KVCache } from '../lib/index.js';
import { Random, relativeL2 } from './helpers/random.js';
import { type Heads, encodeTokens, randomTokens } from './helpers/tokens.js';
import { type Dtype } from './reference/half.js';
import { type KiviConfig, KiviMirror, type RopeSpec, attendPreRope, ropeRows } from './reference/kivi.js';
import { referenceAttention } from './reference/attention.js';
import { expectError } from './helpers/errors.js';
import { expectClose as expectCloseWithin, expectIdentical } from './helpers/outputs.js';
import { disposedAfterEach } from './helpers/lifetime.js';

const TOLERANCE = 1e-4;
const DEVICE = process.env.KVSLIM_TEST_DEVICE === 'cuda' ? 'cuda' : 'cpu';

const open = disposedAfterEach<KVCache>();
function preRopeCache(heads: Heads, config: KiviConfig, rope: RopeSpec, layers = 1, device = 'cpu'): KVCache {
  const cache = new KVCache({
    layers, ...heads, device: device as 'cpu', rope, policy: { store: { kind: 'kivi', ...config, preRope: true } },
  });
  open.push(cache);
  return cache;
}

function expectClose(actual: Float32Array, expected: ArrayLike<number>, what: string, bound = TOLERANCE): void {
  expectCloseWithin(actual, expected, what, bound);
}

interface Case {
  heads: Heads;
  config: KiviConfig;
  rope: RopeSpec;
  sizes: number[];
  input: Dtype;
  maxQueries: number;
}

const CASES: Case[] = [
  {
    heads: { qHeads: 8, kvHeads: 2, headDim: 64 }, config: { bits: 2, group: 32, residual: 64 },
    rope: { theta: 10000, style: 'adjacent' }, sizes: [1, 7, 31, 32, 33, 200, 1, 64, 3], input: 'f32', maxQueries: 24,
  },
  {
    heads: { qHeads: 4, kvHeads: 4, headDim: 32 }, config: { bits: 4, group: 16, residual: 32 },
    rope: { theta: 10000, style: 'half' }, sizes: [200, 1, 1, 31, 33, 7, 64, 1], input: 'f16', maxQueries: 24,
  },
  {
    heads: { qHeads: 8, kvHeads: 1, headDim: 128 }, config: { bits: 8, group: 64, residual: 128 },
    rope: { theta: 500000, style: 'adjacent' }, sizes: [129, 1, 127, 1, 200, 2], input: 'f32', maxQueries: 16,
  },
  {
    heads: { qHeads: 6, kvHeads: 6, headDim: 64 }, config: { bits: 2, group: 32, residual: 96 },
    rope: { theta: 10000, style: 'half' }, sizes: [95, 1, 1, 96, 33, 200, 31, 1], input: 'bf16', maxQueries: 24,
  },
  {
    heads: { qHeads: 12, kvHeads: 3, headDim: 64 }, config: { bits: 4, group: 32, residual: 64, outliers: 0.02 },
    rope: { theta: 10000, style: 'adjacent' }, sizes: [70, 1, 60, 1, 130, 5], input: 'f32', maxQueries: 16,
  },
  {
    heads: { qHeads: 4, kvHeads: 2, headDim: 32 }, config: { bits: 2, group: 16, residual: 32, outliers: 0.05 },
    rope: { theta: 10000, style: 'half' }, sizes: [33, 1, 1, 62, 17, 40], input: 'f16', maxQueries: 16,
  },
];

const label = (c: Case) =>
  `heads ${c.heads.qHeads}/${c.heads.kvHeads}, d=${c.heads.headDim}, bits ${c.config.bits}, G ${c.config.group}, ` +
  `R ${c.config.residual}${c.config.outliers ? `, outliers ${c.config.outliers}` : ''}, ${c.rope.style} theta ${c.rope.theta}`;

describe.skipIf(DEVICE === 'cuda')('pre-RoPE KIVI attention equals the float64 reference over rotated dequantized keys', () => {
  CASES.forEach((c, index) => {
    const total = c.sizes.reduce((a, b) => a + b, 0);
    it(`${label(c)}, ${c.input} inputs, T=${total}`, () => {
      const random = new Random(7100 + index);
      const { heads } = c;
      const cache = preRopeCache(heads, c.config, c.rope);
      const mirror = new KiviMirror(heads, c.config);
      c.sizes.forEach((size, i) => {
        const tokens = encodeTokens(randomTokens(random, heads, size), c.input);
        const before = mirror.tokens;
        mirror.append(tokens.values.k, tokens.values.v);
        const what = `chunk ${i} (${size} tokens, T ${before} -> ${mirror.tokens})`;
        const mode = size > c.maxQueries ? 'append' : (['step', 'prefill', 'append'] as const)[i % 3];
        if (mode === 'step' || mode === 'prefill') {
          const out = mode === 'step'
            ? cache.step(0, tokens.q, tokens.k, tokens.v, tokens.options)
            : cache.prefill(0, tokens.q, tokens.k, tokens.v, tokens.options);
          expectClose(out, attendPreRope(mirror, tokens.values.q, c.rope, before), `${what}: ${mode}`);
        } else {
          cache.append(0, tokens.k, tokens.v, tokens.options);
          const n = Math.min(mirror.tokens, 1 + random.integer(c.maxQueries));
          const queries = encodeTokens(randomTokens(random, heads, n), c.input);
          expectClose(cache.attend(0, queries.q, queries.options), attendPreRope(mirror, queries.values.q, c.rope), `${what}: attend n=${n}`);
        }
        expect(cache.tokens(0)).toBe(mirror.tokens);
      });
    });
  });

  it('decode steps across several key flushes (GQA, 2 layers)', () => {
    const heads = { qHeads: 8, kvHeads: 2, headDim: 64 };
    const config: KiviConfig = { bits: 2, group: 32, residual: 32 };
    const rope: RopeSpec = { theta: 10000, style: 'adjacent' };
    const random = new Random(7200);
    const cache = preRopeCache(heads, config, rope, 2);
    const mirrors = [new KiviMirror(heads, config), new KiviMirror(heads, config)];
    for (let layer = 0; layer < 2; layer++) {
      const prompt = randomTokens(random, heads, 45);
      mirrors[layer].append(prompt.k, prompt.v);
      expectClose(cache.prefill(layer, prompt.q, prompt.k, prompt.v), attendPreRope(mirrors[layer], prompt.q, rope, 0), `layer ${layer} prefill`);
    }
    for (let step = 0; step < 90; step++) {
      for (let layer = 0; layer < 2; layer++) {
        const t = randomTokens(random, heads, 1);
        const before = mirrors[layer].tokens;
        mirrors[layer].append(t.k, t.v);
        expectClose(cache.step(layer, t.q, t.k, t.v), attendPreRope(mirrors[layer], t.q, rope, before), `layer ${layer} step ${step}`);
      }
    }
  });

  it('long context: positions up to 12000 (angle recurrence across many sub-blocks and thread splits)', () => {
    const heads = { qHeads: 4, kvHeads: 2, headDim: 64 };
    for (const [config, rope] of [
      [{ bits: 4, group: 32, residual: 128 }, { theta: 10000, style: 'adjacent' }],
      [{ bits: 8, group: 16, residual: 48 }, { theta: 500000, style: 'half' }],
    ] as Array<[KiviConfig, RopeSpec]>) {
      const random = new Random(7250);
      const cache = preRopeCache(heads, config, rope);
      const mirror = new KiviMirror(heads, config);
      for (const size of [5000, 1, 7000, 7]) {
        const tokens = randomTokens(random, heads, size);
        cache.append(0, tokens.k, tokens.v);
        mirror.append(tokens.k, tokens.v);
        const q = randomTokens(random, heads, 2).q;
        expectClose(cache.attend(0, q), attendPreRope(mirror, q, rope), `${rope.style}, T ${mirror.tokens}`);
      }
    }
  });

  it('quantization happens pre-RoPE: the output differs from rotating first and quantizing after', () => {
    // With rope, a plain KIVI cache fed post-RoPE keys and a pre-RoPE cache fed the same keys
    // before rotation see the same exact attention but quantize different numbers.
    const heads = { qHeads: 4, kvHeads: 2, headDim: 64 };
    const config: KiviConfig = { bits: 4, group: 32, residual: 32 };
    const rope: RopeSpec = { theta: 10000, style: 'adjacent' };
    const random = new Random(7300);
    const tokens = randomTokens(random, heads, 200);
    const cache = preRopeCache(heads, config, rope);
    cache.append(0, tokens.k, tokens.v);
    const post = new KVCache({ layers: 1, ...heads, device: 'cpu', policy: { store: { kind: 'kivi', ...config } } });
    open.push(post);
    const rotated = Float32Array.from(ropeRows(tokens.k, heads.kvHeads, heads.headDim, rope));
    post.append(0, rotated, tokens.v);
    const q = randomTokens(random, heads, 1).q;
    const a = cache.attend(0, q), b = post.attend(0, q);
    const exact = referenceAttention({ q, k: ropeRows(tokens.k, heads.kvHeads, heads.headDim, rope), v: tokens.v, ...heads, causal: true });
    expect(relativeL2(a, b)).toBeGreaterThan(1e-4);
    // Both are 4-bit approximations of the same exact attention (random keys: no outlier channels).
    expect(relativeL2(a, exact)).toBeLessThan(0.2);
    expect(relativeL2(b, exact)).toBeLessThan(0.2);
  });
});

describe.skipIf(DEVICE === 'cuda')('pre-RoPE KIVI state: chunking, save/load', () => {
  const heads = { qHeads: 8, kvHeads: 2, headDim: 64 };
  const rope: RopeSpec = { theta: 10000, style: 'half' };

  it('one-shot and streamed appends (append, step, prefill) save byte-identical state', () => {
    for (const config of [{ bits: 2, group: 32, residual: 64 }, { bits: 4, group: 16, residual: 32, outliers: 0.02 }] as KiviConfig[]) {
      const random = new Random(7400);
      const tokens = randomTokens(random, heads, 300);
      const whole = preRopeCache(heads, config, rope);
      whole.append(0, tokens.k, tokens.v);
      const streamed = preRopeCache(heads, config, rope);
      const width = heads.kvHeads * heads.headDim, qWidth = heads.qHeads * heads.headDim;
      let at = 0;
      [1, 63, 64, 1, 1, 30, 100, 40].forEach((size, i) => {
        const k = tokens.k.subarray(at * width, (at + size) * width), v = tokens.v.subarray(at * width, (at + size) * width);
        const q = tokens.q.subarray(at * qWidth, (at + size) * qWidth);
        if (i % 3 === 0) streamed.append(0, k, v);
        else if (i % 3 === 1) streamed.step(0, q, k, v);
        else streamed.prefill(0, q, k, v);
        at += size;
      });
      expect(at).toBe(300);
      expect(Buffer.compare(whole.save(), streamed.save()), `bits ${config.bits}`).toBe(0);
    }
  });

  it('save()/load() round trip keeps preRope and the rope; attention is bit-identical', () => {
    for (const config of [{ bits: 2, group: 32, residual: 64 }, { bits: 8, group: 32, residual: 32, outliers: 0.01 }] as KiviConfig[]) {
      const random = new Random(7500);
      const cache = preRopeCache(heads, config, rope, 2);
      for (let layer = 0; layer < 2; layer++) {
        const tokens = randomTokens(random, heads, 150 + layer * 7);
        cache.append(layer, tokens.k, tokens.v);
      }
      const bytes = cache.save();
      const loaded = KVCache.load(bytes, { device: 'cpu' });
      open.push(loaded);
      expect(loaded.policy.store).toMatchObject({ kind: 'kivi', preRope: true, bits: config.bits });
      expect(Buffer.compare(loaded.save(), bytes)).toBe(0);
      const q = randomTokens(random, heads, 3).q;
      for (let layer = 0; layer < 2; layer++) expectIdentical(loaded.attend(layer, q), cache.attend(layer, q), `layer ${layer}`);
      // The loaded cache keeps stepping (rope included) and forks.
      const t = randomTokens(random, heads, 1);
      const fork = loaded.fork(), original = cache.fork();
      open.push(fork, original);
      expectIdentical(loaded.step(0, t.q, t.k, t.v), cache.step(0, t.q, t.k, t.v), 'step after load');
      expectIdentical(fork.step(0, t.q, t.k, t.v), original.step(0, t.q, t.k, t.v), 'fork of the loaded cache');
      // A save of a plain KIVI cache is not affected (version 2 or 3 as before).
      const plain = new KVCache({ layers: 1, ...heads, device: 'cpu', policy: { store: { kind: 'kivi', bits: 2 } } });
      open.push(plain);
      expect(plain.save().readUInt32LE(8)).toBe(2);
      expect(bytes.readUInt32LE(8)).toBe(4);
    }
  });

  it('load() rejects damaged pre-RoPE fields', () => {
    const cache = preRopeCache(heads, { bits: 2, group: 32, residual: 64 }, rope);
    const tokens = randomTokens(new Random(7600), heads, 70);
    cache.append(0, tokens.k, tokens.v);
    const bytes = cache.save();
    // Header: magic 8 | version 4 | 5 x i32 | i64 pageTokens | f32 scale | 3 x i32 | i64 residual | f64 outliers
    const preRopeAt = 8 + 4 + 20 + 8 + 4 + 12 + 8 + 8;
    expect(bytes.readInt32LE(preRopeAt)).toBe(1);
    expect(bytes.readFloatLE(preRopeAt + 4)).toBe(10000);
    expect(bytes.readInt32LE(preRopeAt + 8)).toBe(1);
    for (const [offset, value] of [[preRopeAt, 2], [preRopeAt + 8, 5]] as const) {
      const damaged = Buffer.from(bytes);
      damaged.writeInt32LE(value, offset);
      expectError(() => KVCache.load(damaged, { device: 'cpu' }), 'ERR_CORRUPT', /pre-RoPE/);
    }
    const negative = Buffer.from(bytes);
    negative.writeFloatLE(-1, preRopeAt + 4);
    expectError(() => KVCache.load(negative, { device: 'cpu' }), 'ERR_CORRUPT', /pre-RoPE/);
  });
});

describe('pre-RoPE KIVI options', () => {
  const heads = { qHeads: 4, kvHeads: 2, headDim: 64 };
  const make = (options: Record<string, unknown>) => () => {
    const cache = new KVCache({ layers: 1, ...heads, device: 'cpu', ...options } as never);
    open.push(cache);
    return cache;
  };

  it('preRope needs the rope option and must be a boolean (ERR_OPTION naming preRope)', () => {
    expectError(make({ policy: { store: { kind: 'kivi', bits: 2, preRope: true } } }), 'ERR_OPTION', /preRope/);
    for (const preRope of [1, 'yes', null, {}]) {
      expectError(make({ rope: { theta: 10000 }, policy: { store: { kind: 'kivi', bits: 2, preRope } } }), 'ERR_OPTION', /preRope/);
    }
    expectError(make({ policy: { store: { kind: 'f16', preRope: true } } }), 'ERR_OPTION', /preRope/);
    const ok = make({ rope: { theta: 10000 }, policy: { store: { kind: 'kivi', bits: 2, preRope: true } } })();
    expect(ok.policy.store).toMatchObject({ kind: 'kivi', preRope: true });
    const off = make({ policy: { store: { kind: 'kivi', bits: 2, preRope: false } } })();
    expect(off.policy.store).toMatchObject({ kind: 'kivi', preRope: false });
  });

  it.runIf(DEVICE === 'cuda')('the CUDA backend refuses pre-RoPE attention (ERR_BACKEND_UNAVAILABLE naming preRope)', () => {
    const cache = preRopeCache(heads, { bits: 2, group: 32, residual: 64 }, { theta: 10000, style: 'adjacent' }, 1, 'cuda');
    const tokens = randomTokens(new Random(7700), heads, 10);
    cache.append(0, tokens.k, tokens.v);
    expectError(() => cache.attend(0, tokens.q.subarray(0, heads.qHeads * heads.headDim)), 'ERR_BACKEND_UNAVAILABLE', /preRope/);
  });
});
