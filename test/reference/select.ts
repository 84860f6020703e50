// Float64 reference of the selection policies (policy.select; methods/streaming.md, snapkv.md,
// duoattention.md): which absolute positions each (layer, kv head) keeps after every call, and the
// attention output of each call's queries over the tokens their kv head keeps at that moment.
//
// Written from the rules, not from the native code: one list of kept positions per (layer, kv head),
// rebuilt by each rule (filters and top-k over float64 scores). Keys and values are rounded to the
// store dtype once, as the cache stores them; scores and probabilities are float64.
//
// Call order per layer (the engine's documented order):
//   1. the call's n tokens are appended (positions T .. T + n - 1, never renumbered);
//   2. window policies (streaming, duo streaming heads) trim to sinks + the last max(n, window);
//   3. the call's queries attend (query i sits at position T - n + i and sees the kept tokens of
//      its kv head at positions <= its own);
//   4. the policy runs on what the queries saw (streaming/duo: trim to sinks + the last `window`;
//      snapkv/pyramidkv: select at the end of the layer's first prefill; h2o: accumulate the
//      call's attention probabilities, then push tokens out of the recent window).
import { type Dtype, roundTo } from './half.js';

export interface SelectShape {
  layers: number;
  qHeads: number;
  kvHeads: number;
  headDim: number;
}

/** The select specs of lib/select.ts, restated here (the reference applies its own defaults). */
export type ReferenceSelectSpec =
  | { kind: 'full' }
  | { kind: 'streaming'; sink?: number; window: number }
  | { kind: 'snapkv'; budget: number; window?: number; kernel?: number; pooling?: 'max' | 'avg' }
  | { kind: 'pyramidkv'; budget: number; beta?: number; window?: number; kernel?: number; pooling?: 'max' | 'avg' }
  | { kind: 'h2o'; budget: number; recent?: number }
  | {
      kind: 'duo';
      heads: ArrayLike<number> | ArrayLike<boolean> | Array<ArrayLike<number> | ArrayLike<boolean>>;
      sink?: number;
      window?: number;
      retrievalRatio?: number;
      threshold?: number;
      copyHeads?: ArrayLike<number> | ArrayLike<boolean> | Array<ArrayLike<number> | ArrayLike<boolean>>;
    };

/** A spec with the documented defaults applied. */
export type ResolvedReferenceSpec =
  | { kind: 'full' }
  | { kind: 'streaming'; sink: number; window: number }
  | { kind: 'snapkv' | 'pyramidkv'; budget: number; window: number; kernel: number; pooling: 'max' | 'avg'; beta: number }
  | { kind: 'h2o'; budget: number; recent: number }
  | { kind: 'duo'; sink: number; window: number; retrieval: Uint8Array };

/** Documented defaults: streaming sink 4; snapkv window 32, kernel 7, max; beta 20; h2o recent budget/2; duo 64/256. */
export function resolveReferenceSpec(spec: ReferenceSelectSpec, shape: SelectShape): ResolvedReferenceSpec {
  switch (spec.kind) {
    case 'full':
      return { kind: 'full' };
    case 'streaming':
      return { kind: 'streaming', sink: spec.sink ?? 4, window: spec.window };
    case 'snapkv':
    case 'pyramidkv':
      return {
        kind: spec.kind, budget: spec.budget, window: spec.window ?? 32, kernel: spec.kernel ?? 7,
        pooling: spec.pooling ?? 'max', beta: spec.kind === 'pyramidkv' ? spec.beta ?? 20 : 20,
      };
    case 'h2o':
      return { kind: 'h2o', budget: spec.budget, recent: spec.recent ?? Math.floor(spec.budget / 2) };
    case 'duo':
      return {
        kind: 'duo', sink: spec.sink ?? 64, window: spec.window ?? 256,
        retrieval: duoRetrievalMask(spec.heads, shape, spec.retrievalRatio, spec.threshold, spec.copyHeads),
      };
  }
}

/**
 * Duo retrieval heads, flat `[layers * kvHeads]`: a mask (booleans, or Uint8Arrays flat or per
 * layer) as given; or from scores those whose score clipped to [0, 1] is at least `threshold`,
 * else the top round(ratio * count) scores (ties: the lower index; ratio 0.5 with GQA, 0.25
 * without); then every head of `copyHeads` added.
 */
export function duoRetrievalMask(
  heads: ArrayLike<number> | ArrayLike<boolean> | Array<ArrayLike<number> | ArrayLike<boolean>>,
  shape: SelectShape,
  ratio?: number,
  threshold?: number,
  copyHeads?: ArrayLike<number> | ArrayLike<boolean> | Array<ArrayLike<number> | ArrayLike<boolean>>,
): Uint8Array {
  const flatOf = (list: typeof heads): Array<number | boolean> => {
    const flat: Array<number | boolean> = [];
    for (let i = 0; i < list.length; i++) {
      const entry = list[i] as unknown;
      if (typeof entry === 'object' && entry !== null) flat.push(...Array.from(entry as ArrayLike<number | boolean>));
      else flat.push(entry as number | boolean);
    }
    return flat;
  };
  const flat = flatOf(heads);
  const count = shape.layers * shape.kvHeads;
  if (flat.length !== count) throw new Error(`duo heads: ${flat.length} entries for ${count} heads`);
  const rowsAreMasks = Array.from(heads as ArrayLike<unknown>).every((row) => row instanceof Uint8Array);
  const isMask = heads instanceof Uint8Array || (heads.length > 0 && rowsAreMasks) || flat.every((x) => typeof x === 'boolean');
  if (isMask) return Uint8Array.from(flat, (x) => (x ? 1 : 0));
  const scores = flat as number[];
  const mask = new Uint8Array(count);
  if (threshold !== undefined) {
    for (let i = 0; i < count; i++) mask[i] = Math.min(1, Math.max(0, scores[i])) >= threshold ? 1 : 0;
  } else {
    const retrieval = Math.round((ratio ?? (shape.qHeads > shape.kvHeads ? 0.5 : 0.25)) * count);
    const taken = new Set<number>();
    for (let r = 0; r < retrieval; r++) {
      // The largest remaining score; the first (lowest index) among equals.
      let best = -1;
      for (let i = 0; i < count; i++) {
        if (!taken.has(i) && (best < 0 || scores[i] > scores[best])) best = i;
      }
      taken.add(best);
      mask[best] = 1;
    }
  }
  if (copyHeads !== undefined) flatOf(copyHeads).forEach((copy, i) => { if (copy) mask[i] = 1; });
  return mask;
}

/**
 * PyramidKV's prefix budget of layer `layer` (kvpress): m = budget - w, min = m / beta,
 * max = 2m - min, clamped to L - w; uniform m when L >= max >= min >= w fails or with one layer;
 * else max - layer * (max - min) / (layers - 1), truncated toward zero.
 */
export function pyramidPrefixBudget(budget: number, beta: number, layers: number, layer: number, L: number, w: number): number {
  const m = budget - w;
  if (layers === 1) return m;
  let low = m / beta;
  let high = 2 * m - low;
  if (high > L - w) {
    high = L - w;
    low = 2 * m - high;
  }
  if (!(L >= high && high >= low && low >= w)) return m;
  // kvpress: round(max - layer * steps), Python's round (half to even). The shares are symmetric
  // about m, so rounding the lower half and mirroring it keeps the total at layers x m exactly.
  const share = (l: number) => roundHalfEven(high - (l * (high - low)) / (layers - 1));
  const mirror = layers - 1 - layer;
  if (mirror === layer) return m;
  return layer < mirror ? share(layer) : 2 * m - share(mirror);
}

/** Python's round(): to the nearest integer, halves to the even one. */
export function roundHalfEven(x: number): number {
  const floor = Math.floor(x);
  const fraction = x - floor;
  if (fraction !== 0.5) return Math.round(x);
  return floor % 2 === 0 ? floor : floor + 1;
}

/** Stride-1 pooling with odd kernel k and padding k/2: max ignores padding; avg sums in-range / k. */
export function pool1d(votes: Float64Array, kernel: number, pooling: 'max' | 'avg'): Float64Array {
  const half = (kernel - 1) / 2;
  const out = new Float64Array(votes.length);
  for (let j = 0; j < votes.length; j++) {
    let value = pooling === 'max' ? -Infinity : 0;
    for (let t = j - half; t <= j + half; t++) {
      if (t < 0 || t >= votes.length) continue;
      value = pooling === 'max' ? Math.max(value, votes[t]) : value + votes[t];
    }
    out[j] = pooling === 'max' ? value : value / kernel;
  }
  return out;
}

/** Indices of the `count` largest scores (ties: the lower index), ascending. */
export function topIndices(scores: Float64Array, count: number): number[] {
  const order = Array.from(scores.keys()).sort((a, b) => (scores[b] - scores[a]) || (a - b));
  return order.slice(0, count).sort((a, b) => a - b);
}

interface H2OHead {
  heavy: number[];               // kept (non-recent) positions, in slot order
  score: Map<number, number>;    // accumulated attention, per position in the cache
}

interface LayerState {
  keys: Float64Array[];    // per position: [kvHeads * headDim], rounded to the store dtype
  values: Float64Array[];
  kept: number[][];        // per kv head: kept positions, ascending (h2o: rebuilt from heavy + recent)
  h2o: H2OHead[];
  decided: boolean;        // snapkv/pyramidkv: the layer's first prefill happened
  tailStart: number[];     // h2o: first position of the recent window, per kv head
}

/** What each (layer, kv head) of a cache with this select policy keeps, and what its queries get. */
export class SelectMirror {
  readonly shape: SelectShape;
  readonly spec: ResolvedReferenceSpec;
  readonly #store: Dtype;
  readonly #scale: number;
  #layers: LayerState[];
  /**
   * What attention reads instead of the tokens as appended, [T, kvHeads, headDim] by position (a
   * quantized store's values, e.g. KiviMirror.stored; undefined: the tokens as appended); the
   * kept positions are the policy's.
   */
  storedRows?: (layer: number) => { k: Float64Array; v: Float64Array } | undefined;

  constructor(shape: SelectShape, spec: ReferenceSelectSpec, options: { store?: Dtype; scale?: number } = {}) {
    this.shape = shape;
    this.spec = resolveReferenceSpec(spec, shape);
    this.#store = options.store ?? 'f16';
    this.#scale = options.scale ?? 1 / Math.sqrt(shape.headDim);
    this.#layers = Array.from({ length: shape.layers }, () => ({
      keys: [], values: [], decided: false,
      kept: Array.from({ length: shape.kvHeads }, () => []),
      h2o: Array.from({ length: shape.kvHeads }, () => ({ heavy: [], score: new Map() })),
      tailStart: new Array<number>(shape.kvHeads).fill(0),
    }));
  }

  /** A copy that evolves independently (what fork() should hold). */
  fork(): SelectMirror {
    const copy = new SelectMirror(this.shape, { kind: 'full' }, { store: this.#store, scale: this.#scale });
    (copy as { spec: ResolvedReferenceSpec }).spec = this.spec;
    copy.#layers = this.#layers.map((s) => ({
      keys: [...s.keys], values: [...s.values], decided: s.decided,
      kept: s.kept.map((p) => [...p]),
      h2o: s.h2o.map((h) => ({ heavy: [...h.heavy], score: new Map(h.score) })),
      tailStart: [...s.tailStart],
    }));
    return copy;
  }

  /** H2O: the accumulated score of each kept position of one kv head (float64). */
  h2oScores(layer: number, kvHead: number): Map<number, number> {
    return new Map(this.#layers[layer].h2o[kvHead].score);
  }

  tokens(layer: number): number {
    return this.#layers[layer].keys.length;
  }

  /** Kept absolute positions of one kv head, ascending. */
  positions(layer: number, kvHead: number): number[] {
    return [...this.#layers[layer].kept[kvHead]];
  }

  /** Queries (f32 values as given) attend; nothing is appended or evicted. */
  attend(layer: number, q: ArrayLike<number>): Float64Array {
    return this.#attention(layer, q).out;
  }

  /** step(): append n tokens, trim windows, attend, run the policy. */
  step(layer: number, q: ArrayLike<number>, k: ArrayLike<number>, v: ArrayLike<number>): Float64Array {
    return this.#call(layer, q, k, v, false);
  }

  /** prefill(): as step, and SnapKV/PyramidKV decide at the end of the layer's first one. */
  prefill(layer: number, q: ArrayLike<number>, k: ArrayLike<number>, v: ArrayLike<number>): Float64Array {
    return this.#call(layer, q, k, v, true);
  }

  /** append(): tokens without queries (h2o: score 0). */
  append(layer: number, k: ArrayLike<number>, v: ArrayLike<number>): void {
    const n = this.#appendTokens(layer, k, v);
    this.#trimWindows(layer, this.#attendWindow(n));
    this.#after(layer, null, n, false);
  }

  #call(layer: number, q: ArrayLike<number>, k: ArrayLike<number>, v: ArrayLike<number>, prefill: boolean): Float64Array {
    const n = this.#appendTokens(layer, k, v);
    this.#trimWindows(layer, this.#attendWindow(n));
    const { out, probs } = this.#attention(layer, q);
    this.#after(layer, { q, probs }, n, prefill);
    return out;
  }

  #window(): number {
    return this.spec.kind === 'streaming' || this.spec.kind === 'duo' ? this.spec.window : 0;
  }

  /**
   * Recent positions a windowed head keeps while a call of n tokens attends. Streaming
   * (evict_for_space): the last max(window, n). Duo (its chunked prefill: cached sinks + recent
   * plus the chunk): the last window - 1 + n, so each query sees at least `window` counting itself.
   */
  #attendWindow(n: number): number {
    return this.spec.kind === 'duo' && n > 1 ? this.#window() - 1 + n : Math.max(n, this.#window());
  }

  #appendTokens(layer: number, k: ArrayLike<number>, v: ArrayLike<number>): number {
    const { kvHeads, headDim } = this.shape;
    const row = kvHeads * headDim;
    const n = k.length / row;
    const state = this.#layers[layer];
    const keys = roundTo(k, this.#store), values = roundTo(v, this.#store);
    for (let i = 0; i < n; i++) {
      const position = state.keys.length;
      state.keys.push(keys.subarray(i * row, (i + 1) * row));
      state.values.push(values.subarray(i * row, (i + 1) * row));
      for (let h = 0; h < kvHeads; h++) {
        state.kept[h].push(position);
        if (this.spec.kind === 'h2o') state.h2o[h].score.set(position, 0);
      }
    }
    return n;
  }

  /** Whether a kv head follows the window rule (streaming; duo streaming heads). */
  #windowed(layer: number, head: number): boolean {
    if (this.spec.kind === 'streaming') return true;
    if (this.spec.kind === 'duo') return this.spec.retrieval[layer * this.shape.kvHeads + head] === 0;
    return false;
  }

  /** Sinks (positions < sink) plus the last `keep` positions of the layer. */
  #trimWindows(layer: number, keep: number): void {
    if (this.spec.kind !== 'streaming' && this.spec.kind !== 'duo') return;
    const sink = this.spec.sink;
    const state = this.#layers[layer];
    const T = state.keys.length;
    for (let h = 0; h < this.shape.kvHeads; h++) {
      if (!this.#windowed(layer, h)) continue;
      state.kept[h] = state.kept[h].filter((p) => p < sink || p >= T - keep);
    }
  }

  /**
   * Attention of the n queries over the kept tokens of their kv heads (query i at T - n + i sees
   * kept positions <= its own), with the probabilities per (query, query head) over `kept[head]`.
   */
  #attention(layer: number, q: ArrayLike<number>): { out: Float64Array; probs: Float64Array[][] } {
    const { qHeads, kvHeads, headDim } = this.shape;
    const state = this.#layers[layer];
    const group = qHeads / kvHeads;
    const n = q.length / (qHeads * headDim);
    const T = state.keys.length;
    const out = new Float64Array(n * qHeads * headDim);
    const probs: Float64Array[][] = [];
    const stored = this.storedRows?.(layer);
    const width = kvHeads * headDim;
    const keyRow = (p: number): ArrayLike<number> => (stored ? stored.k.subarray(p * width, (p + 1) * width) : state.keys[p]);
    const valueRow = (p: number): ArrayLike<number> => (stored ? stored.v.subarray(p * width, (p + 1) * width) : state.values[p]);
    for (let i = 0; i < n; i++) {
      const position = T - n + i;
      const rowProbs: Float64Array[] = [];
      for (let h = 0; h < qHeads; h++) {
        const kv = Math.floor(h / group);
        const kept = state.kept[kv];
        const p = new Float64Array(kept.length);
        const qBase = (i * qHeads + h) * headDim;
        let max = -Infinity;
        for (let j = 0; j < kept.length; j++) {
          if (kept[j] > position) {
            p[j] = -Infinity;
            continue;
          }
          const key = keyRow(kept[j]);
          let dot = 0;
          for (let d = 0; d < headDim; d++) dot += q[qBase + d] * key[kv * headDim + d];
          p[j] = dot * this.#scale;
          if (p[j] > max) max = p[j];
        }
        let sum = 0;
        for (let j = 0; j < kept.length; j++) {
          p[j] = kept[j] > position ? 0 : Math.exp(p[j] - max);
          sum += p[j];
        }
        const oBase = (i * qHeads + h) * headDim;
        for (let j = 0; j < kept.length; j++) {
          p[j] /= sum;
          if (p[j] === 0) continue;
          const value = valueRow(kept[j]);
          for (let d = 0; d < headDim; d++) out[oBase + d] += p[j] * value[kv * headDim + d];
        }
        rowProbs.push(p);
      }
      probs.push(rowProbs);
    }
    return { out, probs };
  }

  #after(layer: number, queries: { q: ArrayLike<number>; probs: Float64Array[][] } | null, n: number, prefill: boolean): void {
    const spec = this.spec;
    switch (spec.kind) {
      case 'full':
        return;
      case 'streaming':
      case 'duo':
        this.#trimWindows(layer, spec.window);
        return;
      case 'snapkv':
      case 'pyramidkv':
        if (prefill && queries !== null && !this.#layers[layer].decided) {
          this.#layers[layer].decided = true;
          this.#snapSelect(layer, spec, queries.probs, n);
        }
        return;
      case 'h2o':
        this.#h2o(layer, spec, queries?.probs ?? null);
        return;
    }
  }

  /** SnapKV / PyramidKV selection from the probabilities the window queries just computed. */
  #snapSelect(layer: number, spec: Extract<ResolvedReferenceSpec, { kind: 'snapkv' | 'pyramidkv' }>, probs: Float64Array[][], n: number): void {
    const { qHeads, kvHeads, layers } = this.shape;
    const state = this.#layers[layer];
    const L = state.keys.length;
    const w = Math.min(spec.window, n, L);
    const prefix = L - w;
    const keepPrefix = spec.kind === 'pyramidkv'
      ? pyramidPrefixBudget(spec.budget, spec.beta, layers, layer, L, w)
      : spec.budget - w;
    if (keepPrefix >= prefix) return;
    const group = qHeads / kvHeads;
    for (let kv = 0; kv < kvHeads; kv++) {
      // Before the first selection a snapkv layer keeps everything, so probs index = position.
      if (state.kept[kv].length !== L) throw new Error('snapkv reference: the layer lost tokens before selecting');
      const score = new Float64Array(prefix);
      for (let g = 0; g < group; g++) {
        const votes = new Float64Array(prefix);
        for (let i = 0; i < w; i++) {
          const row = probs[n - w + i][kv * group + g];
          for (let j = 0; j < prefix; j++) votes[j] += row[j];
        }
        const pooled = pool1d(votes, spec.kernel, spec.pooling);
        for (let j = 0; j < prefix; j++) score[j] += pooled[j] / group;
      }
      const chosen = topIndices(score, keepPrefix);
      state.kept[kv] = [...chosen, ...Array.from({ length: w }, (_, i) => prefix + i)];
    }
  }

  /** H2O: accumulate the call's probabilities, then push tokens out of the recent window. */
  #h2o(layer: number, spec: Extract<ResolvedReferenceSpec, { kind: 'h2o' }>, probs: Float64Array[][] | null): void {
    const { qHeads, kvHeads } = this.shape;
    const state = this.#layers[layer];
    const T = state.keys.length;
    const group = qHeads / kvHeads;
    const heavyBudget = spec.budget - spec.recent;
    for (let kv = 0; kv < kvHeads; kv++) {
      const head = state.h2o[kv];
      const kept = state.kept[kv];
      if (probs !== null) {
        for (const row of probs) {
          for (let g = 0; g < group; g++) {
            const p = row[kv * group + g];
            for (let j = 0; j < kept.length; j++) head.score.set(kept[j], (head.score.get(kept[j]) as number) + p[j]);
          }
        }
      }
      while (T - state.tailStart[kv] > spec.recent) {
        const candidate = state.tailStart[kv]++;
        const candidateScore = head.score.get(candidate) as number;
        if (head.heavy.length < heavyBudget) {
          head.heavy.push(candidate);
          continue;
        }
        // The smallest kept score; among equal scores the lower position.
        let lowest = 0;
        for (let s = 1; s < head.heavy.length; s++) {
          const a = head.score.get(head.heavy[s]) as number, b = head.score.get(head.heavy[lowest]) as number;
          if (a < b || (a === b && head.heavy[s] < head.heavy[lowest])) lowest = s;
        }
        if (candidateScore > (head.score.get(head.heavy[lowest]) as number)) {
          head.score.delete(head.heavy[lowest]);
          head.heavy[lowest] = candidate;
        } else {
          head.score.delete(candidate);
        }
      }
      const recent = Array.from({ length: T - state.tailStart[kv] }, (_, i) => state.tailStart[kv] + i);
      state.kept[kv] = [...[...head.heavy].sort((a, b) => a - b), ...recent];
    }
  }
}
