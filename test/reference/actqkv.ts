// Float64 reference of the ActQKV loading policy (methods/actqkv.md with the engine mapping of
// native/core/select/actqkv.cc), written from the spec: what each decode call of one layer loads.
//
// The cache's calls map onto it as follows (the engine's timing, which the probe depends on):
// - prefill(q, k, v): the keys are stored, the queries join the layer's query history, then the
//   tokens that left the window are indexed;
// - append(k, v): stored, then indexed (no queries);
// - a decode call (step, or attend after an append): its queries join the history first, then
//   the index catches up, then the blocks are chosen.
// Stored keys are what the index sees (f16-rounded with the default store); representatives are
// rounded to f32 and then kept in the store's dtype like the engine's, the rest in float64.

import { type Dtype, roundTo } from './half.js';

export interface ActQKVShape {
  layers: number;
  qHeads: number;
  kvHeads: number;
  headDim: number;
}

export interface ActQKVOptions {
  sink: number;
  window: number;
  blockSize: number;
  blocks: number;
  reprTopK: number;
  queryWindow: number;
  questionWeight: number;
  temperature: number;
}

/** Windows of queries seen before the activation weighting starts (the engine's warm-up). */
export const WARMUP_WINDOWS = 4;
/** Entropy samples per layer before the entropy-driven split starts. */
export const HISTORY = 100;

/** What one decode call of a layer decided. */
export interface ActQKVChoice {
  /** Blocks in the dynamic part. */
  blocks: number;
  /** Blocks each kv head loads, the clamp bounds, and the unrounded share. */
  k: number;
  lo: number;
  hi: number;
  want: number;
  /** The step's remaining budget before this layer. */
  remaining: number;
  /** Per kv head: positions loaded from the dynamic part, ascending. */
  tokens: number[][];
}

interface KeyEntry {
  position: number;
  score: number;
}

class LayerState {
  keys: Float64Array[][] = []; // [kvHead][position] stored key
  queries: Float64Array[] = []; // every query of the layer, in order
  windows = 0;
  mu: Float64Array | null = null;
  s2: Float64Array | null = null;
  indexed: number[] = []; // per kv head: positions [sink, indexed) are indexed
  entries: KeyEntry[][][] = []; // [kvHead][block]: indexed keys with their scores
  history: number[] = [];

  clone(): LayerState {
    const copy = new LayerState();
    copy.keys = this.keys.map((head) => [...head]);
    copy.queries = [...this.queries];
    copy.windows = this.windows;
    copy.mu = this.mu && Float64Array.from(this.mu);
    copy.s2 = this.s2 && Float64Array.from(this.s2);
    copy.indexed = [...this.indexed];
    copy.entries = this.entries.map((head) => head.map((block) => block.map((e) => ({ ...e }))));
    copy.history = [...this.history];
    return copy;
  }
}

function dot(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let s = 0;
  for (let i = 0; i < a.length; i++) s += a[i] * b[i];
  return s;
}

function cosine(a: ArrayLike<number>, b: ArrayLike<number>): number {
  const na = Math.sqrt(dot(a, a));
  const nb = Math.sqrt(dot(b, b));
  return na > 0 && nb > 0 ? dot(a, b) / (na * nb) : 0;
}

/** Round half away from zero (C's round). */
function roundHalfAway(x: number): number {
  return Math.sign(x) * Math.round(Math.abs(x));
}

export class ActQKVReference {
  readonly shape: ActQKVShape;
  readonly options: ActQKVOptions;
  #layers: LayerState[];
  #lastLayer = Infinity;
  #remaining = 0;

  /** The store's dtype: representatives are kept in it (as the reference code keeps them in the model's). */
  readonly store: Dtype;

  constructor(shape: ActQKVShape, options: ActQKVOptions, store: Dtype = 'f32') {
    this.shape = shape;
    this.options = options;
    this.store = store;
    this.#layers = Array.from({ length: shape.layers }, () => {
      const state = new LayerState();
      state.keys = Array.from({ length: shape.kvHeads }, () => []);
      state.indexed = Array.from({ length: shape.kvHeads }, () => options.sink);
      state.entries = Array.from({ length: shape.kvHeads }, () => []);
      return state;
    });
  }

  fork(): ActQKVReference {
    const copy = new ActQKVReference(this.shape, this.options, this.store);
    copy.#layers = this.#layers.map((layer) => layer.clone());
    copy.#lastLayer = this.#lastLayer;
    copy.#remaining = this.#remaining;
    return copy;
  }

  get lower(): number {
    return Math.ceil((this.options.blocks * 32) / 46);
  }

  tokens(layer: number): number {
    return this.#layers[layer].keys[0].length;
  }

  /** Stores keys ([n, kvHeads, headDim], already rounded to the store type). */
  appendKeys(layer: number, k: ArrayLike<number>): void {
    const { kvHeads, headDim } = this.shape;
    const n = k.length / (kvHeads * headDim);
    for (let i = 0; i < n; i++) {
      for (let h = 0; h < kvHeads; h++) {
        const base = (i * kvHeads + h) * headDim;
        this.#layers[layer].keys[h].push(Float64Array.from({ length: headDim }, (_, d) => k[base + d]));
      }
    }
  }

  /** Adds queries ([n, qHeads, headDim]) to the layer's history; each c-th completes a window. */
  addQueries(layer: number, q: ArrayLike<number>): void {
    const state = this.#layers[layer];
    const D = this.shape.qHeads * this.shape.headDim;
    const c = this.options.queryWindow;
    for (let i = 0; i < q.length / D; i++) {
      state.queries.push(Float64Array.from({ length: D }, (_, j) => q[i * D + j]));
      if (state.queries.length % c === 0) this.#updateStatistics(state, state.queries.slice(-c));
    }
  }

  #updateStatistics(state: LayerState, window: Float64Array[]): void {
    const D = window[0].length;
    const c = window.length;
    const m = new Float64Array(D);
    const v = new Float64Array(D);
    for (let j = 0; j < D; j++) {
      for (const x of window) m[j] += x[j];
      m[j] /= c;
      for (const x of window) v[j] += (x[j] - m[j]) ** 2;
      v[j] /= c; // population variance of the window
    }
    if (state.windows === 0) {
      // The first window initialises: mean, and the unbiased variance.
      state.mu = m;
      state.s2 = Float64Array.from(v, (x) => (c > 1 ? (x / (c - 1)) * c : 0));
    } else {
      const mu = state.mu!;
      const s2 = state.s2!;
      const n = Math.min(state.windows, 1000);
      for (let j = 0; j < D; j++) {
        s2[j] = (s2[j] * (n - 1 / c) + v[j] + (m[j] - mu[j]) ** 2 / (1 + 1 / n)) / (n + 1 - 1 / c);
        mu[j] = (mu[j] * n + m[j]) / (n + 1);
      }
    }
    state.windows++;
  }

  /** The activation weights of the ring (the last queryWindow queries, oldest first). */
  weights(layer: number): number[] {
    const state = this.#layers[layer];
    const ring = state.queries.slice(-this.options.queryWindow);
    const uniform = ring.map(() => 1 / ring.length);
    if (state.windows < WARMUP_WINDOWS) return uniform;
    const mu = state.mu!;
    const s2 = state.s2!;
    const D = mu.length;
    let meanS2 = 0;
    for (let j = 0; j < D; j++) meanS2 += s2[j];
    meanS2 /= D;
    const bias = ring.map((x) => {
      let b = 0;
      for (let j = 0; j < D; j++) {
        const denominator = s2[j] + meanS2 / 100;
        if (denominator > 0) b += (x[j] - mu[j]) ** 2 / denominator;
      }
      return b / D;
    });
    const total = bias.reduce((a, b) => a + b, 0);
    if (!(total > 0) || !Number.isFinite(total)) return uniform;
    return bias.map((b) => b / total);
  }

  /** The probe of one q-head: sum_i w_i x_i over the ring, restricted to the head's features. */
  probe(layer: number, qHead: number): Float64Array {
    const state = this.#layers[layer];
    const d = this.shape.headDim;
    const ring = state.queries.slice(-this.options.queryWindow);
    const w = this.weights(layer);
    const p = new Float64Array(d);
    ring.forEach((x, i) => {
      for (let t = 0; t < d; t++) p[t] += w[i] * x[qHead * d + t];
    });
    return p;
  }

  /** Indexes the tokens that left the window, scored against the current probes. */
  catchUp(layer: number): void {
    const state = this.#layers[layer];
    const { sink, window, blockSize } = this.options;
    const group = this.shape.qHeads / this.shape.kvHeads;
    const end = Math.max(sink, this.tokens(layer) - window);
    for (let h = 0; h < this.shape.kvHeads; h++) {
      if (state.indexed[h] >= end) continue;
      const probes = Array.from({ length: group }, (_, g) => this.probe(layer, h * group + g));
      for (let position = state.indexed[h]; position < end; position++) {
        const key = state.keys[h][position];
        let score = 0;
        for (const p of probes) score += dot(p, key);
        const block = Math.floor((position - sink) / blockSize);
        (state.entries[h][block] ??= []).push({ position, score });
      }
      state.indexed[h] = end;
    }
  }

  /** A block's representative: the mean of its reprTopK best-scored keys, rounded to f32, then to the store's dtype. */
  representative(layer: number, h: number, block: number): Float64Array {
    const state = this.#layers[layer];
    const best = [...state.entries[h][block]]
      .sort((a, b) => b.score - a.score || a.position - b.position)
      .slice(0, this.options.reprTopK)
      .sort((a, b) => a.position - b.position);
    const d = this.shape.headDim;
    const r = new Float64Array(d);
    for (let t = 0; t < d; t++) {
      let total = 0;
      for (const e of best) total += state.keys[h][e.position][t];
      r[t] = Math.fround(total / best.length);
    }
    return roundTo(r, this.store);
  }

  /**
   * A decode call of one layer with queries q ([n, qHeads, headDim]): returns what each kv head
   * loads from the dynamic part, or null when the layer has no dynamic part yet.
   */
  decode(layer: number, q: ArrayLike<number>): ActQKVChoice | null {
    const { layers, qHeads, kvHeads, headDim } = this.shape;
    const { sink, window, blockSize, blocks: budget, questionWeight, temperature } = this.options;
    if (layer <= this.#lastLayer) this.#remaining = budget * layers;
    this.#lastLayer = layer;
    this.addQueries(layer, q);
    this.catchUp(layer);
    const tokens = this.tokens(layer);
    if (tokens <= sink + window) return null;
    const end = tokens - window;
    const nb = Math.ceil((end - sink) / blockSize);
    const group = qHeads / kvHeads;
    const n = q.length / (qHeads * headDim);
    const last = (g: number) => Array.from({ length: headDim }, (_, t) => q[((n - 1) * qHeads + g) * headDim + t]);

    const scores: number[][] = [];
    let entropySum = 0;
    for (let h = 0; h < kvHeads; h++) {
      const probes = Array.from({ length: group }, (_, g) => this.probe(layer, h * group + g));
      const current = Array.from({ length: group }, (_, g) => last(h * group + g));
      const s: number[] = [];
      for (let b = 0; b < nb; b++) {
        const r = this.representative(layer, h, b);
        let score = 0;
        for (let g = 0; g < group; g++) score += cosine(r, probes[g]) + questionWeight * cosine(r, current[g]);
        s.push(score);
      }
      scores.push(s);
      // Normalised entropy of softmax(s / temperature).
      if (nb === 1) {
        entropySum += 1;
      } else {
        const max = Math.max(...s);
        const e = s.map((x) => Math.exp((x - max) / temperature));
        const z = e.reduce((a, b) => a + b, 0);
        let H = 0;
        for (const x of e) {
          const p = x / z;
          if (p > 0) H -= p * Math.log(p);
        }
        entropySum += H / Math.log(nb);
      }
    }
    const state = this.#layers[layer];
    state.history.push(entropySum / kvHeads);
    if (state.history.length > HISTORY) state.history.shift();

    // The layer's share of the step's remaining budget.
    const lo = Math.min(nb, this.lower);
    const hi = Math.min(nb, 2 * budget);
    const mean = (v: number[]) => v.reduce((a, b) => a + b, 0) / v.length;
    let want: number;
    if (this.#layers.every((l) => l.history.length >= HISTORY)) {
      let rest = 0;
      for (let j = layer; j < layers; j++) rest += mean(this.#layers[j].history);
      want = (mean(state.history) / rest) * this.#remaining;
    } else {
      want = this.#remaining / (layers - layer);
    }
    const k = Math.max(lo, Math.min(hi, Number.isFinite(want) ? roundHalfAway(want) : lo));
    const remaining = this.#remaining;
    this.#remaining -= k;

    const chosen = scores.map((s) => {
      const order = s.map((_, b) => b).sort((a, b) => s[b] - s[a] || a - b).slice(0, k).sort((a, b) => a - b);
      const positions: number[] = [];
      for (const b of order) {
        for (let t = sink + b * blockSize; t < Math.min(sink + (b + 1) * blockSize, end); t++) positions.push(t);
      }
      return positions;
    });
    return { blocks: nb, k, lo, hi, want, remaining, tokens: chosen };
  }
}
