// Random tokens for cache tests, and a float64 mirror of what one cache layer should hold, so
// every cache output can be compared with the reference over the same token sequence.
import { referenceAttention } from '../reference/attention.js';
import { type Dtype, type HalfDtype, decodeHalf, encodeHalf, roundTo } from '../reference/half.js';
import { type Random, concat, rows } from './random.js';

export interface Heads {
  qHeads: number;
  kvHeads: number;
  headDim: number;
}

/** n tokens: queries [n, qHeads, headDim], keys and values [n, kvHeads, headDim], as f32. */
export interface Tokens {
  n: number;
  q: Float32Array;
  k: Float32Array;
  v: Float32Array;
}

export function randomTokens(random: Random, heads: Heads, n: number): Tokens {
  return {
    n,
    q: random.tensor(n * heads.qHeads * heads.headDim),
    k: random.tensor(n * heads.kvHeads * heads.headDim),
    v: random.tensor(n * heads.kvHeads * heads.headDim),
  };
}

/** Tokens [first, first + count). */
export function sliceTokens(tokens: Tokens, heads: Heads, first: number, count: number): Tokens {
  return {
    n: count,
    q: rows(tokens.q, heads.qHeads * heads.headDim, first, count),
    k: rows(tokens.k, heads.kvHeads * heads.headDim, first, count),
    v: rows(tokens.v, heads.kvHeads * heads.headDim, first, count),
  };
}

/** Tokens as a call takes them: f32 arrays, or f16/bf16 bits with the dtype option. */
export interface Encoded {
  q: Float32Array | Uint16Array;
  k: Float32Array | Uint16Array;
  v: Float32Array | Uint16Array;
  options: { dtype?: HalfDtype };
  /** The values the engine receives (what the reference must use). */
  values: { q: Float64Array; k: Float64Array; v: Float64Array };
}

export function encodeTokens(tokens: Tokens, dtype: Dtype): Encoded {
  if (dtype === 'f32') {
    return {
      q: tokens.q, k: tokens.k, v: tokens.v, options: {},
      values: { q: Float64Array.from(tokens.q), k: Float64Array.from(tokens.k), v: Float64Array.from(tokens.v) },
    };
  }
  const q = encodeHalf(tokens.q, dtype), k = encodeHalf(tokens.k, dtype), v = encodeHalf(tokens.v, dtype);
  return {
    q, k, v, options: { dtype },
    values: { q: decodeHalf(q, dtype), k: decodeHalf(k, dtype), v: decodeHalf(v, dtype) },
  };
}

/** What one cache layer should hold: every key and value appended, rounded to the store dtype. */
export class LayerMirror {
  readonly #heads: Heads;
  readonly #store: Dtype;
  readonly #scale: number | undefined;
  #keys: Float64Array[] = [];
  #values: Float64Array[] = [];

  constructor(heads: Heads, store: Dtype, scale?: number) {
    this.#heads = heads;
    this.#store = store;
    this.#scale = scale;
  }

  get tokens(): number {
    return this.#keys.reduce((total, part) => total + part.length, 0) / (this.#heads.kvHeads * this.#heads.headDim);
  }

  append(k: ArrayLike<number>, v: ArrayLike<number>): void {
    this.#keys.push(roundTo(k, this.#store));
    this.#values.push(roundTo(v, this.#store));
  }

  /** A copy holding the same tokens (what a fork should hold). */
  fork(): LayerMirror {
    const copy = new LayerMirror(this.#heads, this.#store, this.#scale);
    copy.#keys = [...this.#keys];
    copy.#values = [...this.#values];
    return copy;
  }

  /** Reference output of n queries (the values the engine received) attending causally. */
  attend(q: ArrayLike<number>): Float64Array {
    return referenceAttention({
      q, k: concat(this.#keys), v: concat(this.#values), ...this.#heads, causal: true, scale: this.#scale,
    });
  }
}
