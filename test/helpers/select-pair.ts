// A cache with a selection policy driven in step with its float64 reference (SelectMirror): every
// call's outputs and every kv head's kept positions are checked against the reference's.
import { expect } from 'vitest';

import { KVCache, type KVCacheOptions, type SelectSpec } from '../../lib/index.js';
import { type ReferenceSelectSpec, type SelectShape, SelectMirror } from '../reference/select.js';
import { expectError } from './errors.js';
import { held } from './lifetime.js';
import { Random, relativeL2 } from './random.js';
import { type Tokens, randomTokens } from './tokens.js';

// f16 store, f32 arithmetic over exactly representable stored values: errors are ~1e-6.
export const SELECT_TOLERANCE = 1e-4;
export const F16_BYTES = 2;

/** A CPU cache with pages of 4 tokens (unless `extra` says otherwise) and this select policy, on `open`. */
export function selectCache(
  open: KVCache[], shape: SelectShape, select: SelectSpec | ReferenceSelectSpec, extra: Partial<KVCacheOptions> = {},
): KVCache {
  return held(open, new KVCache({ ...shape, device: 'cpu', pageTokens: 4, policy: { select: select as SelectSpec }, ...extra }));
}

export type Op = ['prefill' | 'step' | 'append' | 'attend', number];

/** A cache and its reference, driven by the same calls on every layer. */
export class Pair {
  readonly cache: KVCache;
  readonly mirror: SelectMirror;
  readonly shape: SelectShape;
  readonly random: Random;
  readonly #open: KVCache[];
  /** Outputs of the last call per layer (cache, reference). */
  last: Array<{ actual: Float32Array; expected: Float64Array }> = [];
  /** Tokens of the last call per layer. */
  lastTokens: Tokens[] = [];

  /** Caches it opens go onto `open` (a disposedAfterEach array). */
  constructor(
    open: KVCache[], shape: SelectShape, select: ReferenceSelectSpec, seed: number, pageTokens = 4, cache?: KVCache, mirror?: SelectMirror,
  ) {
    this.#open = open;
    this.shape = shape;
    this.random = new Random(seed);
    this.cache = cache ?? selectCache(open, shape, select, { pageTokens });
    this.mirror = mirror ?? new SelectMirror(shape, select);
  }

  fork(seed: number): Pair {
    const child = held(this.#open, this.cache.fork());
    return new Pair(this.#open, this.shape, { kind: 'full' }, seed, 4, child, this.mirror.fork());
  }

  tokens(n: number): Tokens {
    return randomTokens(this.random, this.shape, n);
  }

  /** Runs one call on every layer (fresh tokens per layer); checks outputs and positions. */
  run(op: Op, label = ''): void {
    const [kind, n] = op;
    this.last = [];
    this.lastTokens = [];
    for (let layer = 0; layer < this.shape.layers; layer++) {
      const t = this.tokens(n);
      this.lastTokens.push(t);
      let actual: Float32Array | null = null;
      let expected: Float64Array | null = null;
      if (kind === 'append') {
        this.cache.append(layer, t.k, t.v);
        this.mirror.append(layer, t.k, t.v);
      } else if (kind === 'attend') {
        actual = this.cache.attend(layer, t.q);
        expected = this.mirror.attend(layer, t.q);
      } else {
        actual = this.cache[kind](layer, t.q, t.k, t.v);
        expected = this.mirror[kind](layer, t.q, t.k, t.v);
      }
      if (actual !== null && expected !== null) {
        const error = relativeL2(actual, expected);
        expect(error, `${label} ${kind}(${n}) layer ${layer}: output vs reference`).toBeLessThanOrEqual(SELECT_TOLERANCE);
        this.last.push({ actual, expected });
      }
    }
    this.expectPositions(`${label} after ${kind}(${n})`);
  }

  runAll(ops: Op[], label = ''): void {
    for (const op of ops) this.run(op, label);
  }

  expectPositions(label: string): void {
    for (let layer = 0; layer < this.shape.layers; layer++) {
      const T = this.mirror.tokens(layer);
      expect(this.cache.tokens(layer), `${label}: tokens(${layer})`).toBe(T);
      for (let h = 0; h < this.shape.kvHeads; h++) {
        const positions = this.cache.positions(layer, h);
        expect(positions).toBeInstanceOf(Float64Array);
        expect(Array.from(positions), `${label}: positions(${layer}, ${h})`).toEqual(this.mirror.positions(layer, h));
      }
      // Never more heads than kvHeads.
      expectError(() => this.cache.positions(layer, this.shape.kvHeads), 'ERR_SHAPE', /kvHead/);
    }
  }

  /** stats(): tokens kept per head and layer, bytes of the kept tokens to the byte. */
  expectStats(label = ''): void {
    const { layers, kvHeads, headDim } = this.shape;
    const stats = this.cache.stats();
    let keptRows = 0;
    let seen = 0;
    let keptMean = 0;
    for (let layer = 0; layer < layers; layer++) {
      const T = this.mirror.tokens(layer);
      seen += T / layers;
      const perHead = Array.from({ length: kvHeads }, (_, h) => this.mirror.positions(layer, h).length);
      expect(stats.layers[layer].tokensKept, `${label}: layers[${layer}].tokensKept`).toEqual(perHead);
      const rowsKept = perHead.reduce((a, b) => a + b, 0);
      expect(stats.layers[layer].bytes, `${label}: layers[${layer}].bytes`).toBe(rowsKept * headDim * 2 * F16_BYTES);
      keptRows += rowsKept;
      keptMean += rowsKept / kvHeads / layers;
    }
    const fullRows = Array.from({ length: layers }, (_, l) => this.mirror.tokens(l)).reduce((a, b) => a + b, 0) * kvHeads;
    expect(stats.bytes.kv, `${label}: bytes.kv`).toBe(keptRows * headDim * 2 * F16_BYTES);
    expect(stats.bytes.fullF16, `${label}: bytes.fullF16`).toBe(fullRows * headDim * 2 * F16_BYTES);
    // Dropped by exactly the evicted tokens' bytes.
    expect(stats.bytes.fullF16 - stats.bytes.kv).toBe((fullRows - keptRows) * headDim * 2 * F16_BYTES);
    expect(stats.tokens.seen).toBeCloseTo(seen, 9);
    expect(stats.tokens.kept).toBeCloseTo(keptMean, 9);
  }

  keptCounts(layer: number): number[] {
    return Array.from({ length: this.shape.kvHeads }, (_, h) => this.cache.positions(layer, h).length);
  }
}
