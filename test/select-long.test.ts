// H2O, SnapKV and PyramidKV on long prompts: the per-token attention mass the backend computes
// (Backend::attentionMass, native/cpu/attention_mass.cc; no rows x tokens matrix) ranks tokens as
// the float64 reference does (test/reference/select.ts). Odd head size (72: SIMD tails), GQA
// 8q/2kv, f16 and f32 stores, pages that tiles cross, and an H2O call whose rows see a kept
// segment and a long tail together. The sums do not depend on the thread count.
import { describe, expect, it } from 'vitest';

import { KVCache, type SelectSpec } from '../lib/index.js';
import { roundTo } from './reference/half.js';
import {
  type ReferenceSelectSpec, type SelectShape, SelectMirror, pool1d, pyramidPrefixBudget, topIndices,
} from './reference/select.js';
import { Random } from './helpers/random.js';
import { randomTokens } from './helpers/tokens.js';
import { disposedAfterEach } from './helpers/lifetime.js';
import { savedH2OScores } from './helpers/saved.js';

const open = disposedAfterEach<KVCache>();

type Call = ['prefill' | 'step', number];

interface Case {
  name: string;
  shape: SelectShape;
  store: 'f16' | 'f32';
  pageTokens: number;
  select: ReferenceSelectSpec;
  calls: Call[];
  threads?: number;
}

const GQA72: SelectShape = { layers: 1, qHeads: 8, kvHeads: 2, headDim: 72 };
const steps = (count: number): Call[] => Array.from({ length: count }, () => ['step', 1] as Call);

const cases: Case[] = [
  { name: 'snapkv, f16, max pool k7, budget 256, window 32, prompt 3000', shape: GQA72, store: 'f16', pageTokens: 64,
    select: { kind: 'snapkv', budget: 256, window: 32 }, calls: [['prefill', 3000], ...steps(3)] },
  { name: 'snapkv, f32, avg pool k9, budget 300, window 24, pages of 16, prompt 3000', shape: GQA72, store: 'f32', pageTokens: 16,
    select: { kind: 'snapkv', budget: 300, window: 24, kernel: 9, pooling: 'avg' }, calls: [['prefill', 3000], ...steps(2)] },
  { name: 'pyramidkv, f16, two layers, budget 200, window 16, beta 4, prompt 2000', shape: { ...GQA72, layers: 2 }, store: 'f16',
    pageTokens: 64, select: { kind: 'pyramidkv', budget: 200, window: 16, beta: 4 }, calls: [['prefill', 2000], ...steps(2)] },
  // H2O's reference reads every row's probabilities (n x T x group dot products in JS): shorter prompts.
  { name: 'h2o, f16, budget 200, recent 50, prompt 2000', shape: GQA72, store: 'f16', pageTokens: 64,
    select: { kind: 'h2o', budget: 200, recent: 50 }, calls: [['prefill', 2000], ...steps(5)] },
  { name: 'h2o, f32, budget 160, recent 40, pages of 16, prompts of 1000 + 1000 (kept + a long tail), one thread', shape: GQA72,
    store: 'f32', pageTokens: 16, select: { kind: 'h2o', budget: 160, recent: 40 }, calls: [['prefill', 1000], ['prefill', 1000], ...steps(5)],
    threads: 1 },
  // 24000 rows of one kv head: more row tiles than slices, so most tiles' mass is summed inside the
  // next tile's kernel (three tiles a slice), the head's last tile shorter than the one it sums.
  { name: 'h2o, f16, 16q/1kv d24, budget 300, recent 60, prompt 1500: tile mass summed inside the next tile',
    shape: { layers: 1, qHeads: 16, kvHeads: 1, headDim: 24 }, store: 'f16', pageTokens: 64,
    select: { kind: 'h2o', budget: 300, recent: 60 }, calls: [['prefill', 1500], ...steps(2)] },
  // Decode steps over more than one 4096-key chunk of the few-rows mass (the kept / tail boundary inside the second).
  { name: 'h2o, f16, budget 4400, recent 200, d16, prompts of 2500 + 2500, steps over two key chunks',
    shape: { layers: 1, qHeads: 2, kvHeads: 1, headDim: 16 }, store: 'f16', pageTokens: 32,
    select: { kind: 'h2o', budget: 4400, recent: 200 }, calls: [['prefill', 2500], ['prefill', 2500], ...steps(5)] },
];

/**
 * Float64 reference of one cache's kept positions under h2o or snapkv/pyramidkv, by the rules of
 * test/reference/select.ts (SelectMirror, which also computes every output and is too slow at
 * thousands of tokens): only the probabilities the policy reads are computed.
 */
class KeptMirror {
  readonly #shape: SelectShape;
  readonly #select: ReferenceSelectSpec;
  readonly #store: 'f16' | 'f32';
  readonly #scale: number;
  // Per layer: keys by position per kv head, kept positions per kv head (snapkv), h2o state per kv head.
  readonly #layers: Array<{
    keys: Float64Array[][];
    kept: number[][];
    decided: boolean;
    heavy: number[][];
    score: number[][];  // h2o: accumulated attention by position (evicted: no longer read)
    tailStart: number[];
  }>;

  constructor(shape: SelectShape, select: ReferenceSelectSpec, store: 'f16' | 'f32') {
    this.#shape = shape;
    this.#select = select;
    this.#store = store;
    this.#scale = 1 / Math.sqrt(shape.headDim);
    const perHead = <T>(make: () => T) => Array.from({ length: shape.kvHeads }, make);
    this.#layers = Array.from({ length: shape.layers }, () => ({
      keys: perHead(() => []), kept: perHead(() => []), decided: false,
      heavy: perHead(() => []), score: perHead(() => []), tailStart: new Array<number>(shape.kvHeads).fill(0),
    }));
  }

  positions(layer: number, h: number): number[] {
    const state = this.#layers[layer];
    if (this.#select.kind !== 'h2o') return [...state.kept[h]];
    const T = state.keys[h].length;
    const recent = Array.from({ length: T - state.tailStart[h] }, (_, i) => state.tailStart[h] + i);
    return [...[...state.heavy[h]].sort((a, b) => a - b), ...recent];
  }

  /** H2O: the accumulated attention of a position the cache still holds. */
  h2oScore(layer: number, h: number, position: number): number {
    return this.#layers[layer].score[h][position];
  }

  /** prefill() or step(): append, attend (what the policy reads), run the policy. */
  call(layer: number, q: Float32Array, k: Float32Array, prefill: boolean): void {
    const { qHeads, kvHeads, headDim } = this.#shape;
    const state = this.#layers[layer];
    const n = q.length / (qHeads * headDim);
    const keys = roundTo(k, this.#store);
    const T0 = state.keys[0].length;
    for (let h = 0; h < kvHeads; h++) {
      for (let i = 0; i < n; i++) {
        state.keys[h].push(keys.subarray((i * kvHeads + h) * headDim, (i * kvHeads + h + 1) * headDim));
        state.kept[h].push(T0 + i);
        state.score[h][T0 + i] = 0;
      }
    }
    if (this.#select.kind === 'h2o') this.#h2o(layer, q, n);
    else if (prefill && !state.decided) this.#snap(layer, q, n);
  }

  /** Softmax (float64) of query i, member g of kv head h over `positions` (all visible). */
  #probs(layer: number, q: Float32Array, i: number, h: number, g: number, positions: number[]): Float64Array {
    const { qHeads, kvHeads, headDim } = this.#shape;
    const head = h * (qHeads / kvHeads) + g;
    const query = q.subarray((i * qHeads + head) * headDim, (i * qHeads + head + 1) * headDim);
    const keys = this.#layers[layer].keys[h];
    const p = new Float64Array(positions.length);
    let max = -Infinity;
    for (let j = 0; j < positions.length; j++) {
      const key = keys[positions[j]];
      let dot = 0;
      for (let d = 0; d < headDim; d++) dot += query[d] * key[d];
      p[j] = dot * this.#scale;
      max = Math.max(max, p[j]);
    }
    let sum = 0;
    for (let j = 0; j < p.length; j++) sum += (p[j] = Math.exp(p[j] - max));
    for (let j = 0; j < p.length; j++) p[j] /= sum;
    return p;
  }

  #snap(layer: number, q: Float32Array, n: number): void {
    const spec = this.#select as Extract<ReferenceSelectSpec, { kind: 'snapkv' | 'pyramidkv' }>;
    const { qHeads, kvHeads, layers } = this.#shape;
    const state = this.#layers[layer];
    state.decided = true;
    const L = state.keys[0].length;
    const window = spec.window ?? 32, kernel = spec.kernel ?? 7, pooling = spec.pooling ?? 'max';
    const w = Math.min(window, n, L);
    const prefix = L - w;
    const keepPrefix = spec.kind === 'pyramidkv'
      ? pyramidPrefixBudget(spec.budget, spec.beta ?? 20, layers, layer, L, w)
      : spec.budget - w;
    if (keepPrefix >= prefix) return;
    const group = qHeads / kvHeads;
    for (let h = 0; h < kvHeads; h++) {
      const score = new Float64Array(prefix);
      for (let g = 0; g < group; g++) {
        const votes = new Float64Array(prefix);
        for (let i = n - w; i < n; i++) {
          const p = this.#probs(layer, q, i, h, g, Array.from({ length: L - n + i + 1 }, (_, j) => j));
          for (let j = 0; j < prefix; j++) votes[j] += p[j];
        }
        const pooled = pool1d(votes, kernel, pooling);
        for (let j = 0; j < prefix; j++) score[j] += pooled[j] / group;
      }
      state.kept[h] = [...topIndices(score, keepPrefix), ...Array.from({ length: w }, (_, i) => prefix + i)];
    }
  }

  #h2o(layer: number, q: Float32Array, n: number): void {
    const spec = this.#select as Extract<ReferenceSelectSpec, { kind: 'h2o' }>;
    const { qHeads, kvHeads } = this.#shape;
    const state = this.#layers[layer];
    const group = qHeads / kvHeads;
    const recent = spec.recent ?? Math.floor(spec.budget / 2);
    const heavyBudget = spec.budget - recent;
    for (let h = 0; h < kvHeads; h++) {
      const T = state.keys[h].length;
      const score = state.score[h], heavy = state.heavy[h];
      for (let i = 0; i < n; i++) {
        const position = T - n + i;
        const visible = [...heavy];
        for (let p = state.tailStart[h]; p <= position; p++) visible.push(p);
        for (let g = 0; g < group; g++) {
          const p = this.#probs(layer, q, i, h, g, visible);
          for (let j = 0; j < visible.length; j++) score[visible[j]] += p[j];
        }
      }
      while (T - state.tailStart[h] > recent) {
        const candidate = state.tailStart[h]++;
        const candidateScore = score[candidate];
        if (heavy.length < heavyBudget) {
          heavy.push(candidate);
          continue;
        }
        let lowest = 0;
        for (let s = 1; s < heavy.length; s++) {
          const a = score[heavy[s]], b = score[heavy[lowest]];
          if (a < b || (a === b && heavy[s] < heavy[lowest])) lowest = s;
        }
        if (candidateScore > score[heavy[lowest]]) heavy[lowest] = candidate;
      }
    }
  }
}

/**
 * H2O's accumulated scores (save() carries them as f64) against the reference's: a long prompt's
 * mass comes from many row tiles, each summed inside the next tile's kernel, so a row counted twice
 * or missed shows here even where it does not change which tokens are kept.
 */
function expectH2OScores(cache: KVCache, mirror: KeptMirror, shape: SelectShape, call: string): void {
  const saved = savedH2OScores(cache.save(), shape.layers, shape.kvHeads);
  for (let layer = 0; layer < shape.layers; layer++) {
    for (let h = 0; h < shape.kvHeads; h++) {
      const { kept, tail } = saved[layer * shape.kvHeads + h];
      const positions = mirror.positions(layer, h);
      const tailStart = positions.length - tail.length;
      const close = (actual: number, expected: number, what: string) => {
        expect(Math.abs(actual - expected), `${call} layer ${layer} kv head ${h} ${what}: ${actual} vs ${expected}`)
          .toBeLessThanOrEqual(1e-6 + 1e-5 * Math.abs(expected));
      };
      tail.forEach((score, j) => {
        const position = positions[tailStart + j];
        close(score, mirror.h2oScore(layer, h, position), `tail ${j} (position ${position})`);
      });
      // Kept slots come in no particular order: compare sorted scores.
      const expectedKept = positions.slice(0, tailStart).map((p) => mirror.h2oScore(layer, h, p)).sort((a, b) => a - b);
      const sortedKept = [...kept].sort((a, b) => a - b);
      expect(sortedKept.length).toBe(expectedKept.length);
      sortedKept.forEach((score, i) => close(score, expectedKept[i], `kept ${i}`));
    }
  }
}

describe('selection on long prompts: kept positions equal the float64 reference', () => {
  it('the lean reference keeps what SelectMirror keeps (short prompts)', () => {
    const shape: SelectShape = { layers: 2, qHeads: 8, kvHeads: 2, headDim: 24 };
    const selects: ReferenceSelectSpec[] = [
      { kind: 'snapkv', budget: 40, window: 8, kernel: 5, pooling: 'avg' },
      { kind: 'pyramidkv', budget: 40, window: 4, beta: 8 },
      { kind: 'h2o', budget: 30, recent: 10 },
    ];
    for (const [index, select] of selects.entries()) {
      const random = new Random(90_000 + index);
      const lean = new KeptMirror(shape, select, 'f16');
      const full = new SelectMirror(shape, select, { store: 'f16' });
      for (const [kind, n] of [['prefill', 150], ['prefill', 60], ...steps(4)] as Call[]) {
        for (let layer = 0; layer < shape.layers; layer++) {
          const t = randomTokens(random, shape, n);
          lean.call(layer, t.q, t.k, kind === 'prefill');
          full[kind](layer, t.q, t.k, t.v);
          for (let h = 0; h < shape.kvHeads; h++) {
            expect(lean.positions(layer, h), `${select.kind} ${kind}(${n}) layer ${layer} kv head ${h}`).toEqual(full.positions(layer, h));
          }
        }
      }
    }
  });

  it('h2o scores do not depend on the thread count (save() carries them as f64, bit for bit)', () => {
    const shape: SelectShape = { layers: 1, qHeads: 8, kvHeads: 4, headDim: 72 };
    const random = new Random(92_000);
    const t = randomTokens(random, shape, 3000);
    // Decode steps over the kept tokens and the tail: their mass comes from the decode call, whose
    // key splits follow the thread count (5500 tokens x 4 kv heads: 2 splits per head on one
    // thread, 4 on two).
    const steps = Array.from({ length: 3 }, () => randomTokens(random, shape, 1));
    const saved = [1, 2, 5].map((threads) => {
      const cache = new KVCache({ ...shape, device: 'cpu', threads, policy: { select: { kind: 'h2o', budget: 5500, recent: 2500 } } });
      open.push(cache);
      cache.prefill(0, t.q, t.k, t.v);
      cache.prefill(0, t.q, t.k, t.v);
      for (const s of steps) cache.step(0, s.q, s.k, s.v);
      return cache.save();
    });
    expect(Buffer.compare(saved[0], saved[1])).toBe(0);
    expect(Buffer.compare(saved[0], saved[2])).toBe(0);
  });

  for (const [index, c] of cases.entries()) {
    it(c.name, () => {
      const random = new Random(91_000 + index);
      const cache = new KVCache({
        ...c.shape, device: 'cpu', pageTokens: c.pageTokens, threads: c.threads,
        policy: { select: c.select as SelectSpec, store: { kind: c.store } },
      });
      open.push(cache);
      const mirror = new KeptMirror(c.shape, c.select, c.store);
      for (const [kind, n] of c.calls) {
        for (let layer = 0; layer < c.shape.layers; layer++) {
          const t = randomTokens(random, c.shape, n);
          cache[kind](layer, t.q, t.k, t.v);
          mirror.call(layer, t.q, t.k, kind === 'prefill');
          for (let h = 0; h < c.shape.kvHeads; h++) {
            expect(Array.from(cache.positions(layer, h)), `${kind}(${n}) layer ${layer} kv head ${h}`).toEqual(mirror.positions(layer, h));
          }
        }
        if (c.select.kind === 'h2o') expectH2OScores(cache, mirror, c.shape, `${kind}(${n})`);
      }
    });
  }
});
