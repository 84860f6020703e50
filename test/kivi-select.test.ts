// SnapKV and PyramidKV over a KIVI store (policy { select: snapkv | pyramidkv, store: kivi }).
// Until a layer's first prefill the tokens stay in f16 and the policy selects exactly as over an
// f16 store (test/reference/select.ts); then the kept tokens are quantized: every later output
// equals float64 attention over what a KIVI layer holds after receiving each kv head's kept tokens
// in order (test/reference/kivi.ts, the flush rules), positions stay absolute, and the bytes are
// the KIVI bytes of the kept count.
import { describe, expect, it } from 'vitest';

import { KVCache, type SelectSpec } from '../lib/index.js';
import { Random, relativeL2 } from './helpers/random.js';
import { type Tokens, randomTokens } from './helpers/tokens.js';
import { expectError } from './helpers/errors.js';
import { expectClose } from './helpers/outputs.js';
import { disposedAfterEach } from './helpers/lifetime.js';
import { type KiviConfig, KiviMirror } from './reference/kivi.js';
import { type ReferenceSelectSpec, type SelectShape, SelectMirror, pyramidPrefixBudget } from './reference/select.js';

// As in kivi-cache.test.ts: the kernels dequantize exactly as the reference (f32 rounding only);
// the prefill over f16 tokens is select.test.ts's f16 case.
const TOLERANCE = 1e-4;
// 2-bit quantization moves an output far more than this: less would mean nothing was quantized.
const LOSSY = 1e-3;

const DEVICE = process.env.KVSLIM_TEST_DEVICE === 'cuda' ? 'cuda' : 'cpu';

const GQA: SelectShape = { layers: 2, qHeads: 8, kvHeads: 2, headDim: 64 };
const MHA: SelectShape = { layers: 3, qHeads: 4, kvHeads: 4, headDim: 32 };

const open = disposedAfterEach<KVCache>();

function cacheOf(shape: SelectShape, select: ReferenceSelectSpec, kivi: KiviConfig, pageTokens = 16): KVCache {
  const cache = new KVCache({
    ...shape, device: DEVICE, pageTokens, policy: { select: select as SelectSpec, store: { kind: 'kivi', ...kivi } },
  });
  open.push(cache);
  return cache;
}

/** Rows [count, kvHeads, headDim] where head h's row t is its token at positions[h][t]. */
function keptRows(x: Float32Array, shape: SelectShape, positions: number[][]): Float32Array {
  const { kvHeads, headDim } = shape;
  const count = positions[0].length;
  const out = new Float32Array(count * kvHeads * headDim);
  for (let h = 0; h < kvHeads; h++) {
    expect(positions[h].length, `head ${h} keeps as many tokens as head 0`).toBe(count);
    for (let t = 0; t < count; t++) {
      const from = (positions[h][t] * kvHeads + h) * headDim;
      out.set(x.subarray(from, from + headDim), (t * kvHeads + h) * headDim);
    }
  }
  return out;
}

/**
 * A cache, its selection reference (which tokens each head keeps) and, per layer once the layer
 * has been quantized, its KIVI reference (what the kept tokens become).
 */
class Pair {
  readonly cache: KVCache;
  readonly select: SelectMirror;
  readonly kivi: Array<KiviMirror | null>;
  /** Every token appended per layer, in order (the f32 values the engine received). */
  readonly history: Array<{ k: number[]; v: number[] }>;
  readonly random: Random;

  constructor(
    readonly shape: SelectShape,
    readonly spec: ReferenceSelectSpec,
    readonly config: KiviConfig,
    seed: number,
    from?: Pair,
    /** The selection the reference applies, when it differs from the cache's spec. */
    reference: ReferenceSelectSpec = spec,
  ) {
    this.random = new Random(seed);
    if (from) {
      this.cache = from.cache.fork();
      open.push(this.cache);
      this.select = from.select.fork();
      this.kivi = from.kivi.map((m) => m?.fork() ?? null);
      this.history = from.history.map((h) => ({ k: [...h.k], v: [...h.v] }));
    } else {
      this.cache = cacheOf(shape, spec, config);
      this.select = new SelectMirror(shape, reference);
      this.kivi = Array.from({ length: shape.layers }, () => null);
      this.history = Array.from({ length: shape.layers }, () => ({ k: [], v: [] }));
    }
  }

  fork(seed: number): Pair {
    return new Pair(this.shape, this.spec, this.config, seed, this);
  }

  tokens(n: number): Tokens {
    return randomTokens(this.random, this.shape, n);
  }

  /** One call on one layer; checks its output and the kept positions; returns both outputs. */
  call(kind: 'prefill' | 'step' | 'append', layer: number, t: Tokens): { actual: Float32Array; expected: Float64Array } | null {
    const mirror = this.kivi[layer];
    this.history[layer].k.push(...t.k);
    this.history[layer].v.push(...t.v);
    let result: { actual: Float32Array; expected: Float64Array } | null = null;
    if (kind === 'append') {
      this.cache.append(layer, t.k, t.v);
      this.select.append(layer, t.k, t.v);
      mirror?.append(t.k, t.v);
    } else {
      const actual = kind === 'prefill' ? this.cache.prefill(layer, t.q, t.k, t.v) : this.cache.step(layer, t.q, t.k, t.v);
      const exact = kind === 'prefill' ? this.select.prefill(layer, t.q, t.k, t.v) : this.select.step(layer, t.q, t.k, t.v);
      let expected = exact;
      if (mirror) {
        // In the KIVI store: the call attends with its own tokens in f16, then they are flushed.
        mirror.append(t.k, t.v);
        expected = mirror.attend(t.q, mirror.tokens - t.n);
      }
      result = { actual, expected };
      expectClose(actual, expected, `${kind} of ${t.n} on layer ${layer}`, TOLERANCE);
      // The layer's first prefill (SnapKV selects there) or decode step moves it to the KIVI store.
      if (!mirror) this.#quantize(layer);
    }
    for (let h = 0; h < this.shape.kvHeads; h++) {
      expect(Array.from(this.cache.positions(layer, h)), `layer ${layer} kv head ${h} positions`).toEqual(this.select.positions(layer, h));
    }
    expect(this.cache.tokens(layer)).toBe(this.select.tokens(layer));
    return result;
  }

  /** The layer's kept tokens enter a KIVI reference, in each head's order. */
  #quantize(layer: number): void {
    const positions = Array.from({ length: this.shape.kvHeads }, (_, h) => this.select.positions(layer, h));
    const mirror = new KiviMirror(this.shape, this.config);
    const { k, v } = this.history[layer];
    mirror.append(keptRows(Float32Array.from(k), this.shape, positions), keptRows(Float32Array.from(v), this.shape, positions));
    this.kivi[layer] = mirror;
  }

  /** stats() bytes and kept tokens per layer equal the KIVI references'. */
  checkStats(): void {
    const stats = this.cache.stats();
    let kv = 0, residual = 0;
    for (let layer = 0; layer < this.shape.layers; layer++) {
      const mirror = this.kivi[layer];
      expect(mirror, `layer ${layer} is quantized`).not.toBeNull();
      const bytes = mirror!.bytes();
      expect(stats.layers[layer].bytes, `layer ${layer} bytes`).toBeCloseTo(bytes.kv + bytes.residual, 6);
      expect(stats.layers[layer].tokensKept).toEqual(new Array(this.shape.kvHeads).fill(mirror!.tokens));
      kv += bytes.kv;
      residual += bytes.residual;
    }
    expect(stats.bytes.kv).toBeCloseTo(kv, 6);
    expect(stats.bytes.residual).toBeCloseTo(residual, 6);
    expect(stats.tokens.seen).toBe(this.select.tokens(0));
  }
}

function run(pair: Pair, calls: Array<['prefill' | 'step' | 'append', number]>): void {
  for (const [kind, n] of calls) {
    for (let layer = 0; layer < pair.shape.layers; layer++) pair.call(kind, layer, pair.tokens(n));
  }
}

const steps = (count: number, n = 1): Array<['step', number]> => Array.from({ length: count }, () => ['step', n]);

describe('snapkv and pyramidkv over a KIVI store: select from f16 tokens, then quantize what is kept', () => {
  const cases: Array<[string, SelectShape, ReferenceSelectSpec, KiviConfig, Array<['prefill' | 'step' | 'append', number]>]> = [
    ['GQA snapkv, 2 bits, R 32', GQA, { kind: 'snapkv', budget: 72, window: 8 }, { bits: 2, group: 32, residual: 32 },
      [['prefill', 200], ...steps(40), ['step', 3], ['prefill', 21], ...steps(5)]],
    ['GQA snapkv avg pooling, 4 bits, R 64, kept count below R', GQA, { kind: 'snapkv', budget: 40, window: 6, kernel: 5, pooling: 'avg' },
      { bits: 4, group: 32, residual: 64 }, [['prefill', 130], ...steps(30)]],
    ['MHA snapkv after appended context, 8 bits, G 16', MHA, { kind: 'snapkv', budget: 50, window: 10, kernel: 3 },
      { bits: 8, group: 16, residual: 32 }, [['append', 70], ['prefill', 30], ...steps(20)]],
    ['MHA pyramidkv, per-layer budgets, 2 bits', MHA, { kind: 'pyramidkv', budget: 48, window: 8, beta: 4 },
      { bits: 2, group: 16, residual: 16 }, [['prefill', 160], ...steps(24)]],
    ['GQA pyramidkv with outliers', GQA, { kind: 'pyramidkv', budget: 64, window: 8 }, { bits: 2, group: 32, residual: 32, outliers: 0.02 },
      [['prefill', 180], ...steps(12)]],
    ['a prompt within the budget keeps every token', GQA, { kind: 'snapkv', budget: 96, window: 8 }, { bits: 4, group: 32, residual: 32 },
      [['prefill', 70], ...steps(8)]],
  ];
  for (const [label, shape, spec, config, calls] of cases) {
    // The CUDA backend refuses KIVI outliers (ERR_BACKEND_UNAVAILABLE; kivi-cache.test.ts).
    it.skipIf(DEVICE === 'cuda' && config.outliers !== undefined)(label, () => {
      const pair = new Pair(shape, spec, config, 7 + label.length);
      run(pair, calls);
      pair.checkStats();
    });
  }

  it('keeps budget tokens per kv head (per layer for pyramidkv), and the outputs are quantized ones', () => {
    const prompt = 200, budget = 48, window = 8, beta = 4;
    const pair = new Pair(MHA, { kind: 'pyramidkv', budget, window, beta }, { bits: 2, group: 16, residual: 16 }, 3);
    run(pair, [['prefill', prompt]]);
    for (let layer = 0; layer < MHA.layers; layer++) {
      const prefix = pyramidPrefixBudget(budget, beta, MHA.layers, layer, prompt, window);
      for (let h = 0; h < MHA.kvHeads; h++) expect(pair.cache.positions(layer, h)).toHaveLength(prefix + window);
    }
    // Decode output vs attention over the same kept tokens unquantized: 2 bits must show.
    const t = pair.tokens(1);
    const exact = pair.select.fork().step(0, t.q, t.k, t.v);
    const result = pair.call('step', 0, t)!;
    expect(relativeL2(result.actual, exact)).toBeGreaterThan(LOSSY);
    const stats = pair.cache.stats();
    expect(stats.bytes.kv + stats.bytes.residual).toBeLessThan(stats.bytes.fullF16 / 4);
  });

  it('a layer decoded before any prefill moves to the KIVI store whole (snapkv selects at prefill only)', () => {
    // Over an f16 store SnapKV would still select at that later prefill; over KIVI the tokens are
    // quantized by then, so the layer keeps them all (the reference: no selection).
    const pair = new Pair(GQA, { kind: 'snapkv', budget: 24, window: 4 }, { bits: 2, group: 32, residual: 32 }, 11, undefined, { kind: 'full' });
    run(pair, [['append', 50], ...steps(20), ['prefill', 30], ...steps(3)]);
    expect(Array.from(pair.cache.positions(0, 1))).toEqual(Array.from({ length: 103 }, (_, i) => i));
    pair.checkStats();
  });

  it('fork after the selection shares the quantized layers; parent and child go on independently', () => {
    const pair = new Pair(GQA, { kind: 'snapkv', budget: 80, window: 8 }, { bits: 2, group: 32, residual: 32 }, 13);
    run(pair, [['prefill', 220], ...steps(6)]);
    const child = pair.fork(14);
    expect(child.cache.stats().bytes.shared).toBeGreaterThan(0);
    run(child, steps(40));
    run(pair, [...steps(3), ['step', 2]]);
    child.checkStats();
    pair.checkStats();
  });

  it('refuses the policies that load single tokens anywhere, and preRope keys (streaming and duo: kivi-window.test.ts; h2o: h2o-kivi.test.ts)', () => {
    const bad: SelectSpec[] = [
      { kind: 'quest', pages: 4 },
      { kind: 'retrieval', index: 'flat' },
    ];
    for (const select of bad) {
      expectError(
        () => new KVCache({ ...GQA, device: 'cpu', policy: { select, store: { kind: 'kivi', bits: 4 } } }),
        'ERR_OPTION', new RegExp(`policy\\.select '${select.kind}' cannot be combined with store 'kivi'`),
      );
    }
    expectError(
      () => new KVCache({
        ...GQA, device: 'cpu', rope: { theta: 10000 },
        policy: { select: { kind: 'snapkv', budget: 64 }, store: { kind: 'kivi', bits: 4, preRope: true } },
      }),
      'ERR_OPTION', /preRope/,
    );
  });
});
