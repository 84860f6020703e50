// Selection policies (lib/select.ts over native/core/select/): the positions each (layer, kv head)
// keeps equal the float64 reference's (test/reference/select.ts) exactly after every call, and
// every output equals reference attention over what the kv head kept when the call's queries
// attended. Also budgets, stats bytes, fork, and the errors of policy.select.
import { describe, expect, it } from 'vitest';

import { KVCache, type KVCacheOptions, type SelectSpec } from '../lib/index.js';
import { referenceAttention } from './reference/attention.js';
import { roundTo } from './reference/half.js';
import {
  type ReferenceSelectSpec, type SelectShape, SelectMirror, duoRetrievalMask, pool1d, pyramidPrefixBudget, roundHalfEven, topIndices,
} from './reference/select.js';
import { Random, relativeL2 } from './helpers/random.js';
import { LayerMirror, randomTokens } from './helpers/tokens.js';
import { expectError } from './helpers/errors.js';
import { savedH2OScores } from './helpers/saved.js';
import { disposedAfterEach } from './helpers/lifetime.js';
import { type Op, Pair, SELECT_TOLERANCE as TOLERANCE, selectCache } from './helpers/select-pair.js';


const GQA: SelectShape = { layers: 2, qHeads: 8, kvHeads: 2, headDim: 64 };
const MHA: SelectShape = { layers: 2, qHeads: 4, kvHeads: 4, headDim: 32 };

const open = disposedAfterEach<KVCache>();

function cacheOf(shape: SelectShape, select: SelectSpec | ReferenceSelectSpec, extra: Partial<KVCacheOptions> = {}): KVCache {
  return selectCache(open, shape, select, extra);
}

/** Every kept position is one the layer has seen, ascending, no duplicates. */
function expectSubsetOfSeen(pair: Pair): void {
  for (let layer = 0; layer < pair.shape.layers; layer++) {
    const T = pair.cache.tokens(layer);
    for (let h = 0; h < pair.shape.kvHeads; h++) {
      const p = Array.from(pair.cache.positions(layer, h));
      for (let i = 0; i < p.length; i++) {
        expect(Number.isInteger(p[i]) && p[i] >= 0 && p[i] < T).toBe(true);
        if (i > 0) expect(p[i]).toBeGreaterThan(p[i - 1]);
      }
    }
  }
}

const range = (first: number, end: number) => Array.from({ length: Math.max(0, end - first) }, (_, i) => first + i);
const steps = (count: number): Op[] => Array.from({ length: count }, () => ['step', 1] as Op);

// ---------------------------------------------------------------------------------------------
describe('reference helpers', () => {
  it('pool1d, topIndices, pyramid budgets and duo masks follow the written rules', () => {
    const votes = Float64Array.from([1, 5, 2, 0, 0, 3, 1]);
    expect(Array.from(pool1d(votes, 3, 'max'))).toEqual([5, 5, 5, 2, 3, 3, 3]);
    expect(Array.from(pool1d(votes, 3, 'avg'))).toEqual([6 / 3, 8 / 3, 7 / 3, 2 / 3, 3 / 3, 4 / 3, 4 / 3]);
    expect(Array.from(pool1d(votes, 1, 'avg'))).toEqual(Array.from(votes));
    // Ties: the lower index first; the result ascending.
    expect(topIndices(Float64Array.from([1, 3, 3, 2, 3]), 2)).toEqual([1, 2]);
    // m = 40 - 4 = 36, min = 4.5, max = 67.5; four layers: 67.5 - l * 21 rounded half to even
    // (kvpress's round), 68 + 46 + 26 + 4 = 4 x 36: the uniform total (truncation kept 142).
    expect([0, 1, 2, 3].map((l) => pyramidPrefixBudget(40, 8, 4, l, 200, 4))).toEqual([68, 46, 26, 4]);
    expect([0.5, 1.5, 2.5, 3.5, 2.4, 2.6].map(roundHalfEven)).toEqual([0, 2, 2, 4, 2, 3]);
    // Five layers, beta 3, m = 100: 166.67, 133.33, 100, 66.67, 33.33 -> 167, 133, 100, 67, 33 (sum 500).
    expect([0, 1, 2, 3, 4].map((l) => pyramidPrefixBudget(108, 3, 5, l, 1000, 8))).toEqual([167, 133, 100, 67, 33]);
    // Every layer count and beta: the total is the uniform one.
    for (let layers = 2; layers <= 40; layers++) {
      for (const beta of [1.5, 3, 7, 20, 33.3]) {
        const total = Array.from({ length: layers }, (_, l) => pyramidPrefixBudget(2048, beta, layers, l, 16000, 32)).reduce((a, b) => a + b, 0);
        expect(total, `${layers} layers, beta ${beta}`).toBe(layers * (2048 - 32));
      }
    }
    // beta 20: min = 32 / 20 = 1.6 < w = 8, so the uniform m.
    expect([0, 3].map((l) => pyramidPrefixBudget(40, 20, 4, l, 200, 8))).toEqual([32, 32]);
    expect(pyramidPrefixBudget(40, 8, 1, 0, 200, 4)).toBe(36);
    // max clamped to L - w = 40: min = 24 >= w.
    expect([0, 1].map((l) => pyramidPrefixBudget(40, 20, 2, l, 48, 8))).toEqual([40, 24]);
    expect([0, 1, 2, 3].map((l) => pyramidPrefixBudget(40, 20, 4, l, 64, 8))).toEqual([56, 40, 24, 8]);
    // min < w: the uniform budget.
    expect(pyramidPrefixBudget(40, 4, 3, 0, 200, 16)).toBe(24);
    const shape = { layers: 2, qHeads: 4, kvHeads: 2, headDim: 8 };
    expect(Array.from(duoRetrievalMask([[true, false], [false, true]], shape))).toEqual([1, 0, 0, 1]);
    expect(Array.from(duoRetrievalMask(Uint8Array.from([0, 1, 1, 0]), shape))).toEqual([0, 1, 1, 0]);
    expect(Array.from(duoRetrievalMask([0.5, 0.9, 0.5, 0.1], shape))).toEqual([1, 1, 0, 0]);
    expect(Array.from(duoRetrievalMask([0.5, 0.9, 0.5, 0.1], { ...shape, qHeads: 2 }))).toEqual([0, 1, 0, 0]);
    // Per-layer Uint8Array rows are a mask too (not scores whose top half would be [1, 0, 1, 0]).
    expect(Array.from(duoRetrievalMask([Uint8Array.from([1, 1]), Uint8Array.from([0, 1])], shape))).toEqual([1, 1, 0, 1]);
    // threshold: scores clipped to [0, 1], then >= 0.5; copy heads added to either rule.
    expect(Array.from(duoRetrievalMask([0.5, 1.7, 0.49, -2], shape, undefined, 0.5))).toEqual([1, 1, 0, 0]);
    expect(Array.from(duoRetrievalMask([0.5, 0.9, 0.5, 0.1], shape, 0.25, undefined, [false, false, true, true]))).toEqual([0, 1, 1, 1]);
  });
});

// ---------------------------------------------------------------------------------------------
describe('streaming: sinks + the last window', () => {
  const plan: Op[] = [
    ['prefill', 1], ['prefill', 7], ...steps(14), ['prefill', 3], ['step', 5],
    ['step', 40], // n > window: dense within the block, then trimmed
    ...steps(6), ['append', 5], ['attend', 3], ['append', 20], ['step', 2], ...steps(20), ['attend', 8],
  ];
  for (const [name, shape, pageTokens, select] of [
    ['GQA 8q/2kv, d64, pages of 4, sink 4, window 12', GQA, 4, { kind: 'streaming', window: 12 }],
    ['MHA 4q/4kv, d32, pages of 8, sink 2, window 13', MHA, 8, { kind: 'streaming', sink: 2, window: 13 }],
    ['GQA, no sinks, window 9', GQA, 4, { kind: 'streaming', sink: 0, window: 9 }],
  ] as Array<[string, SelectShape, number, ReferenceSelectSpec]>) {
    it(`${name}: positions and outputs equal the reference after every call`, () => {
      const pair = new Pair(open, shape, select, 11 + pageTokens, pageTokens);
      pair.runAll(plan, name);
      expectSubsetOfSeen(pair);
      pair.expectStats(name);
      const sink = select.kind === 'streaming' ? select.sink ?? 4 : 0;
      const window = select.kind === 'streaming' ? select.window : 0;
      const T = pair.cache.tokens(0);
      for (let l = 0; l < shape.layers; l++) {
        for (let h = 0; h < shape.kvHeads; h++) {
          expect(Array.from(pair.cache.positions(l, h))).toEqual([...range(0, sink), ...range(T - window, T)]);
        }
      }
    });
  }

  it('boundaries: T = 1 .. sink + window + 3 one step at a time; each query sees sinks + the last window counting itself', () => {
    const shape: SelectShape = { layers: 1, qHeads: 4, kvHeads: 2, headDim: 32 };
    const sink = 3, window = 5;
    const cache = cacheOf(shape, { kind: 'streaming', sink, window });
    const random = new Random(5);
    const keys: Float64Array[] = [], values: Float64Array[] = [];
    for (let T = 1; T <= sink + window + 3 + 8; T++) {
      const t = randomTokens(random, shape, 1);
      keys.push(roundTo(t.k, 'f16'));
      values.push(roundTo(t.v, 'f16'));
      const out = cache.step(0, t.q, t.k, t.v);
      // Written independently of the mirror: positions < sink and the window [p - window + 1, p].
      const p = T - 1;
      const seen = range(0, T).filter((j) => j < sink || j > p - window);
      const expected = referenceAttention({
        q: t.q, k: concatRows(seen.map((j) => keys[j])), v: concatRows(seen.map((j) => values[j])),
        qHeads: shape.qHeads, kvHeads: shape.kvHeads, headDim: shape.headDim,
      });
      expect(relativeL2(out, expected), `T=${T}`).toBeLessThanOrEqual(TOLERANCE);
      for (let h = 0; h < shape.kvHeads; h++) expect(Array.from(cache.positions(0, h)), `T=${T}`).toEqual(seen);
      expect(cache.stats().layers[0].tokensKept).toEqual([seen.length, seen.length]);
    }
  });

  // A block of 1 < n <= window: the window is trimmed once before the block attends (the
  // reference's evict_for_space: cache + block <= sink + window), so query i of the block sees the
  // last `window` tokens of cache + block up to itself, i.e. window - (n - 1 - i) recent tokens, not
  // `window` tokens of its own. Only the block's last query sees exactly `window`. (Reported: the
  // lib/select.ts doc "a query counts itself" holds for single steps only.)
  it('a block of 1 < n <= window attends to the last window of cache + block (trimmed once, before attention)', () => {
    const shape: SelectShape = { layers: 1, qHeads: 2, kvHeads: 1, headDim: 16 };
    const window = 8;
    const cache = cacheOf(shape, { kind: 'streaming', sink: 0, window });
    const random = new Random(3);
    const a = randomTokens(random, shape, 20), b = randomTokens(random, shape, 4);
    cache.prefill(0, a.q, a.k, a.v);
    const out = cache.step(0, b.q, b.k, b.v);
    const keys = concatRows([roundTo(a.k, 'f16'), roundTo(b.k, 'f16')]);
    const values = concatRows([roundTo(a.v, 'f16'), roundTo(b.v, 'f16')]);
    const row = shape.qHeads * shape.headDim;
    for (let i = 0; i < 4; i++) {
      const p = 20 + i;
      const first = 24 - window; // 16 for every query of the block
      const expected = referenceAttention({
        q: b.q.subarray(i * row, (i + 1) * row), k: keys.subarray(first * 16, (p + 1) * 16), v: values.subarray(first * 16, (p + 1) * 16), ...shape,
      });
      expect(relativeL2(out.subarray(i * row, (i + 1) * row), expected), `query at ${p}`).toBeLessThanOrEqual(TOLERANCE);
    }
    expect(Array.from(cache.positions(0, 0))).toEqual(range(16, 24));
  });

  it('a block longer than the window attends densely within itself (a first prefill is full attention)', () => {
    const shape: SelectShape = { layers: 1, qHeads: 8, kvHeads: 2, headDim: 64 };
    const cache = cacheOf(shape, { kind: 'streaming', window: 8 });
    const full = new LayerMirror(shape, 'f16');
    const t = randomTokens(new Random(6), shape, 50);
    full.append(t.k, t.v);
    expect(relativeL2(cache.prefill(0, t.q, t.k, t.v), full.attend(t.q))).toBeLessThanOrEqual(TOLERANCE);
    expect(Array.from(cache.positions(0, 1))).toEqual([...range(0, 4), ...range(42, 50)]);
  });
});

function concatRows(parts: Float64Array[]): Float64Array {
  const out = new Float64Array(parts.reduce((n, p) => n + p.length, 0));
  let offset = 0;
  for (const part of parts) {
    out.set(part, offset);
    offset += part.length;
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
describe('snapkv: the observation window votes once, at the end of the first prefill', () => {
  const cases: Array<[string, SelectShape, number, ReferenceSelectSpec, Op[]]> = [
    ['GQA d64, max pool k7, budget 40, window 8, one prompt of 150', GQA, 4,
      { kind: 'snapkv', budget: 40, window: 8 }, [['prefill', 150], ...steps(6), ['prefill', 20], ['attend', 10], ['append', 3], ...steps(4), ['attend', 2]]],
    ['MHA d32, avg pool k5, budget 24, window 6, pages of 8', MHA, 8,
      { kind: 'snapkv', budget: 24, window: 6, kernel: 5, pooling: 'avg' }, [['prefill', 90], ...steps(5), ['step', 3], ['attend', 4]]],
    ['GQA, defaults (window 32, k7 max), budget 64, prompt of 260', GQA, 8,
      { kind: 'snapkv', budget: 64 }, [['prefill', 260], ...steps(3)]],
    ['GQA, a first prefill shorter than the window (w = n), after appended tokens', GQA, 4,
      { kind: 'snapkv', budget: 30, window: 16, kernel: 3 }, [['append', 60], ['prefill', 5], ...steps(3), ['prefill', 40], ['attend', 1]]],
    ['MHA, kernel 1, budget 20 window 4, chunked: only the first chunk decides', MHA, 4,
      { kind: 'snapkv', budget: 20, window: 4, kernel: 1 }, [['prefill', 50], ['prefill', 50], ['prefill', 50], ...steps(2)]],
    // 80 queries x 4 = 320 rows per kv head: on the CPU the kept tokens join the new ones in one
    // head-by-head prefill (one softmax), instead of two calls merged by log-sum-exp.
    ['GQA, a second prompt of 80 over the kept tokens', GQA, 4,
      { kind: 'snapkv', budget: 40, window: 8 }, [['prefill', 150], ...steps(2), ['prefill', 80], ...steps(2), ['prefill', 70]]],
    // Decode over 1060 kept + 201 tail tokens: the CPU splits the keys in two, and the kept/tail
    // seam falls inside the second split (each side's softmax state merged there first).
    ['GQA, budget 1060 of a prompt of 1150, 200 appended: a decode split across the kept/tail seam', GQA, 16,
      { kind: 'snapkv', budget: 1060, window: 8 }, [['prefill', 1150], ['append', 200], ...steps(3)]],
  ];
  for (const [name, shape, pageTokens, select, plan] of cases) {
    it(`${name}: positions per kv head and outputs equal the reference`, () => {
      const pair = new Pair(open, shape, select, 21 + pageTokens + plan.length, pageTokens);
      // The deciding prefill attends over everything (selection runs after its attention).
      const [first, ...rest] = plan;
      pair.run(first, name);
      pair.expectStats(name);
      if (first[0] === 'prefill') {
        for (let layer = 0; layer < shape.layers; layer++) {
          const full = new LayerMirror(shape, 'f16');
          const t = pair.lastTokens[layer];
          full.append(t.k, t.v);
          expect(relativeL2(pair.last[layer].actual, full.attend(t.q)), 'full attention').toBeLessThanOrEqual(TOLERANCE);
        }
      }
      pair.runAll(rest, name);
      expectSubsetOfSeen(pair);
      pair.expectStats(name);
    });
  }

  it('budgets: every kv head keeps budget tokens after the decision, decisions differ per kv head, decode appends', () => {
    const budget = 32, window = 8;
    const pair = new Pair(open, GQA, { kind: 'snapkv', budget, window }, 31);
    pair.run(['prefill', 120]);
    let differ = false;
    for (let l = 0; l < GQA.layers; l++) {
      expect(pair.keptCounts(l)).toEqual([budget, budget]);
      const heads = [0, 1].map((h) => Array.from(pair.cache.positions(l, h)));
      for (const p of heads) expect(p.slice(-window)).toEqual(range(120 - window, 120));
      differ ||= heads[0].join() !== heads[1].join();
    }
    expect(differ, 'the two kv heads chose different prefixes').toBe(true);
    pair.runAll([...steps(5), ['prefill', 7]]);
    for (let l = 0; l < GQA.layers; l++) {
      expect(pair.keptCounts(l)).toEqual([budget + 12, budget + 12]);
      for (let h = 0; h < 2; h++) expect(Array.from(pair.cache.positions(l, h)).slice(-12)).toEqual(range(120, 132));
    }
    pair.expectStats();
  });

  // Every window query attends almost only to itself (its own key on a channel of its own, a
  // score of 18), so each row's votes for the prefix are about e^-18 of its mass, and rows vote
  // with different random preferences. A vote that missed a row's own (last visible) key would
  // give that row's mass to the prefix and decide the choice alone. The prompt of 321 tokens puts
  // the last query's own key first in a new block of 32 keys.
  it('window queries that attend to themselves: every row\'s softmax includes its own key (prompt 321, window 32)', () => {
    const shape: SelectShape = { layers: 1, qHeads: 1, kvHeads: 1, headDim: 64 };
    const select = { kind: 'snapkv', budget: 64 } as const;
    const random = new Random(321);
    const L = 321, w = 32, D = 64, prefix = L - w;
    const q = new Float32Array(L * D), k = new Float32Array(L * D), v = random.tensor(L * D);
    for (let t = 0; t < L; t++) {
      // Channels 0-31: random keys and query preferences; channels 32-63: one per window token.
      q.set(random.tensor(32), t * D);
      k.set(random.tensor(32, 0.5), t * D);
      if (t >= prefix) {
        q[t * D + 32 + (t - prefix)] = 12;
        k[t * D + 32 + (t - prefix)] = 12;
      }
    }
    const cache = cacheOf(shape, select);
    const mirror = new SelectMirror(shape, select);
    cache.prefill(0, q, k, v);
    mirror.prefill(0, q, k, v);
    const kept = Array.from(cache.positions(0, 0));
    expect(kept).toEqual(mirror.positions(0, 0));
    expect(kept).toHaveLength(64);
    expect(kept.slice(-w)).toEqual(range(prefix, L));
  });

  it('a prompt that fits (budget - w >= prefix) keeps everything', () => {
    const pair = new Pair(open, MHA, { kind: 'snapkv', budget: 40, window: 8 }, 32);
    pair.runAll([['prefill', 40], ['prefill', 30], ...steps(2)]);
    for (let l = 0; l < MHA.layers; l++) for (let h = 0; h < MHA.kvHeads; h++) expect(pair.cache.positions(l, h).length).toBe(72);
    pair.expectStats();
  });
});

// ---------------------------------------------------------------------------------------------
describe('pyramidkv: per-layer budgets', () => {
  const shape: SelectShape = { layers: 4, qHeads: 8, kvHeads: 2, headDim: 32 };
  for (const [name, select, prompt] of [
    ['budget 40, window 4, beta 8, prompt 200 (68/46/26/4 prefix tokens)', { kind: 'pyramidkv', budget: 40, window: 4, beta: 8 }, 200],
    ['default beta 20 with budget 40, window 8: min < w, uniform', { kind: 'pyramidkv', budget: 40, window: 8 }, 200],
    ['budget 40, window 8, max clamped to L - w (prompt 56)', { kind: 'pyramidkv', budget: 40, window: 8, beta: 20 }, 56],
    // max = 62.4 lies between L - w = 56 and L = 64: clamped to 56 (min 8 = w: 56/40/24/8), not left at 62.4 (min < w: uniform).
    ['budget 40, window 8, max between L - w and L (prompt 64)', { kind: 'pyramidkv', budget: 40, window: 8, beta: 20 }, 64],
    ['budget 30, window 6, beta 4, avg k3 (min >= w)', { kind: 'pyramidkv', budget: 30, window: 6, beta: 4, kernel: 3, pooling: 'avg' }, 120],
    ['fallback to uniform (beta 2: min < w)', { kind: 'pyramidkv', budget: 20, window: 8, beta: 2 }, 100],
  ] as Array<[string, ReferenceSelectSpec & { budget: number; window: number }, number]>) {
    it(`${name}: positions equal the reference, layer budgets sum to the uniform total`, () => {
      const pair = new Pair(open, shape, select, 41 + prompt);
      pair.runAll([['prefill', prompt], ...steps(3), ['attend', 2]], name);
      pair.expectStats(name);
      const w = select.window;
      const beta = select.kind === 'pyramidkv' ? select.beta ?? 20 : 20;
      const prefixes = range(0, shape.layers).map((l) => pyramidPrefixBudget(select.budget, beta, shape.layers, l, prompt, w));
      let total = 0;
      for (let l = 0; l < shape.layers; l++) {
        const kept = Math.min(prefixes[l], prompt - w) + w + 3;
        expect(pair.keptCounts(l), `layer ${l}`).toEqual([kept, kept]);
        total += kept - 3;
      }
      // The total equals the uniform total (methods/snapkv.md).
      expect(total).toBe(shape.layers * select.budget);
    });
  }

  it('five layers, shares of thirds: rounded to the nearest, the middle layer keeps the mean, the total the uniform one', () => {
    const five: SelectShape = { ...shape, layers: 5 };
    const select = { kind: 'pyramidkv', budget: 36, window: 6, beta: 3 } as const;
    const pair = new Pair(open, five, select, 47);
    pair.runAll([['prefill', 150], ...steps(2)], 'five layers');
    pair.expectStats('five layers');
    // m = 30, min = 10, max = 50: 50, 40, 30, 20, 10 exactly; beta 3.5 gives thirds below.
    const kept = range(0, 5).map((l) => pair.keptCounts(l)[0] - 2);
    expect(kept).toEqual([56, 46, 36, 26, 16]);
    const thirds = new Pair(open, five, { ...select, beta: 4.5 }, 48);
    thirds.runAll([['prefill', 150], ...steps(2)], 'beta 4.5');
    // min = 30 / 4.5 = 6.67, max = 53.33, step 11.67: 53.33, 41.67, 30, 18.33, 6.67 -> 53, 42, 30, 18, 7.
    const keptThirds = range(0, 5).map((l) => thirds.keptCounts(l)[0] - 2 - 6);
    expect(keptThirds).toEqual([53, 42, 30, 18, 7]);
    expect(keptThirds.reduce((a, b) => a + b, 0)).toBe(5 * 30);
  });

  it('one layer: the uniform budget (snapkv)', () => {
    const one: SelectShape = { ...shape, layers: 1 };
    const pair = new Pair(open, one, { kind: 'pyramidkv', budget: 24, window: 4 }, 45);
    pair.runAll([['prefill', 80], ...steps(2)]);
    expect(pair.keptCounts(0)).toEqual([26, 26]);
    const snap = new Pair(open, one, { kind: 'snapkv', budget: 24, window: 4 }, 45);
    snap.runAll([['prefill', 80], ...steps(2)]);
    for (let h = 0; h < 2; h++) expect(Array.from(pair.cache.positions(0, h))).toEqual(Array.from(snap.cache.positions(0, h)));
  });
});

// ---------------------------------------------------------------------------------------------
describe('h2o: heavy hitters + recent window', () => {
  const cases: Array<[string, SelectShape, number, ReferenceSelectSpec, Op[]]> = [
    ['GQA d64, budget 24 (recent 12), pages of 4', GQA, 4, { kind: 'h2o', budget: 24 },
      [['prefill', 30], ['prefill', 20], ...steps(40), ['append', 5], ...steps(10), ['attend', 12], ['step', 4]]],
    ['MHA d32, budget 20, recent 5, pages of 8', MHA, 8, { kind: 'h2o', budget: 20, recent: 5 },
      [['prefill', 3], ['prefill', 60], ...steps(50), ['append', 30], ['step', 3], ...steps(5)]],
    ['GQA d32 keys, budget 40 recent 1, a long prefill (rows in blocks)', { ...GQA, headDim: 32 }, 4, { kind: 'h2o', budget: 40, recent: 1 },
      [['prefill', 150], ...steps(30)]],
    ['MHA, appends first (all scores 0: ties keep the lower position)', MHA, 4, { kind: 'h2o', budget: 10, recent: 4 },
      [['append', 20], ['append', 3], ...steps(15)]],
    ['MHA d32, an odd budget 21 (default recent 10, the floor of half), pages of 8', MHA, 8, { kind: 'h2o', budget: 21 },
      [['prefill', 40], ...steps(20)]],
  ];
  for (const [name, shape, pageTokens, select, plan] of cases) {
    it(`${name}: positions and outputs equal the reference after every call`, () => {
      const pair = new Pair(open, shape, select, 51 + pageTokens + plan.length, pageTokens);
      let T = 0;
      for (const op of plan) {
        pair.run(op, name);
        if (op[0] !== 'attend') T += op[1];
        const budget = (select as { budget: number }).budget;
        for (let l = 0; l < shape.layers; l++) expect(pair.keptCounts(l)).toEqual(new Array(shape.kvHeads).fill(Math.min(T, budget)));
      }
      expectSubsetOfSeen(pair);
      pair.expectStats(name);
      // The recent window is always kept.
      const recent = (select as { recent?: number }).recent ?? Math.floor((select as { budget: number }).budget / 2);
      for (let h = 0; h < shape.kvHeads; h++) expect(Array.from(pair.cache.positions(0, h)).slice(-recent)).toEqual(range(T - recent, T));
    });
  }

  // The mass each call adds (a prefill's from its own attention, a decode call's from the attention
  // over kept tokens and tail together) against float64 softmax sums: a wrong temperature or a row
  // that misses a token changes scores long before it changes which tokens are kept.
  it('accumulated scores equal the float64 reference after every call', () => {
    const pair = new Pair(open, GQA, { kind: 'h2o', budget: 24, recent: 8 }, 71, 4);
    const plan: Op[] = [['prefill', 30], ...steps(12), ['prefill', 20], ...steps(12), ['attend', 3], ['step', 2]];
    let T = 0;
    for (const op of plan) {
      pair.run(op);
      if (op[0] !== 'attend') T += op[1];
      const saved = savedH2OScores(pair.cache.save(), GQA.layers, GQA.kvHeads);
      for (let l = 0; l < GQA.layers; l++) {
        for (let h = 0; h < GQA.kvHeads; h++) {
          const { kept, tail } = saved[l * GQA.kvHeads + h];
          const reference = pair.mirror.h2oScores(l, h);
          const close = (actual: number, expected: number | undefined, what: string) =>
            expect(Math.abs(actual - (expected ?? NaN)), `${op[0]}(${op[1]}) layer ${l} head ${h} ${what}: ${actual} vs ${expected}`)
              .toBeLessThanOrEqual(1e-6 + 1e-5 * Math.abs(expected ?? 0));
          // Tail tokens are the newest, in position order; kept slots in no particular order.
          tail.forEach((score, j) => close(score, reference.get(T - tail.length + j), `tail ${j}`));
          const tailStart = T - tail.length;
          const keptExpected = [...reference].filter(([p]) => p < tailStart).map(([, s]) => s).sort((a, b) => a - b);
          expect(kept.length).toBe(keptExpected.length);
          [...kept].sort((a, b) => a - b).forEach((score, i) => close(score, keptExpected[i], `kept ${i}`));
        }
      }
    }
  });

  it('a full heavy set gives up its oldest lowest token (ties at exactly zero mass)', () => {
    const cache = new KVCache({ layers: 1, qHeads: 1, kvHeads: 1, headDim: 4, policy: { select: { kind: 'h2o', budget: 3, recent: 1 } } });
    try {
      const rng = new Random(61);
      const token = (x: number) => Float32Array.from([x, rng.normal(), rng.normal(), rng.normal()].map((v, i) => (i === 0 ? v : v * 1e-3)));
      const q = Float32Array.from([100, 0, 0, 0]);
      // Tokens 0 and 1 score about -5000 against q: probability exactly 0 in f32, so their mass stays 0.
      const k01 = new Float32Array([...token(-100), ...token(-100)]);
      cache.append(0, k01, k01.map(() => rng.normal()));
      cache.step(0, q, token(0), token(1));  // token 2: mass 1; token 1 joins the heavy set (one slot free)
      expect(Array.from(cache.positions(0, 0))).toEqual([0, 1, 2]);
      cache.step(0, q, token(0), token(1));  // token 2 leaves the window with mass 1.5 > 0: token 0 (older) goes
      expect(Array.from(cache.positions(0, 0))).toEqual([1, 2, 3]);
    } finally {
      cache.dispose();
    }
  });

  // Ties at exactly zero mass: keys that score about -5000 against every query get probability 0 in
  // f32. Over the KIVI store the same decisions are taken by its own code path (flags, from the
  // first call with queries on).
  for (const store of [{ kind: 'f16' }, { kind: 'kivi', bits: 8, group: 32, residual: 32 }] as const) {
    it(`${store.kind}: ties keep the older token, whether the lowest heavy hitter or the leaving token`, () => {
      const dim = 32;
      const cache = new KVCache({ layers: 1, qHeads: 1, kvHeads: 1, headDim: dim, policy: { select: { kind: 'h2o', budget: 3, recent: 1 }, store } });
      try {
        const rng = new Random(62);
        const token = (x: number) => Float32Array.from({ length: dim }, (_, i) => (i === 0 ? x : rng.normal() * 1e-3));
        const q = Float32Array.from({ length: dim }, (_, i) => (i === 0 ? 100 : 0));
        const cold = () => token(-100);
        const values = () => Float32Array.from({ length: dim }, () => rng.normal());
        cache.append(0, new Float32Array([...cold(), ...cold()]), new Float32Array([...values(), ...values()]));
        cache.step(0, q, token(0), values());  // token 2 takes every query's mass; tokens 0 and 1 (mass 0) are the heavy set
        expect(Array.from(cache.positions(0, 0))).toEqual([0, 1, 2]);
        cache.step(0, q, cold(), values());    // token 2 leaves with mass 2 > 0: of the two zeros the older, token 0, goes
        expect(Array.from(cache.positions(0, 0))).toEqual([1, 2, 3]);
        cache.step(0, q, cold(), values());    // token 3 leaves with mass 0, tying token 1's: the older, token 1, stays
        expect(Array.from(cache.positions(0, 0))).toEqual([1, 2, 4]);
      } finally {
        cache.dispose();
      }
    });
  }

  it('one candidate left after filling the heavy set: a tie keeps the older token', () => {
    // Appends carry no queries: every mass is 0. Heavy 2, recent 1.
    const dim = 8;
    const cache = new KVCache({ layers: 1, qHeads: 1, kvHeads: 1, headDim: dim, policy: { select: { kind: 'h2o', budget: 3, recent: 1 } } });
    try {
      const rng = new Random(63);
      const rows = (n: number) => Float32Array.from({ length: n * dim }, () => rng.normal());
      cache.append(0, rows(2), rows(2));  // token 0 leaves the window into the heavy set
      expect(Array.from(cache.positions(0, 0))).toEqual([0, 1]);
      cache.append(0, rows(2), rows(2));  // tokens 1 and 2 leave: 1 fills the free slot, 2 ties token 0 at 0 and goes
      expect(Array.from(cache.positions(0, 0))).toEqual([0, 1, 3]);
    } finally {
      cache.dispose();
    }
  });

  it('many tokens leaving in one call: a later winner displaces the older of two equal earlier winners', () => {
    // Keys and queries 100 in one channel: q.k / 4 = 2500 on a match, 0 otherwise, so every
    // probability is exactly 0 or 1 / matches and the scores are exact. Heavy 3, recent 13.
    const dim = 16;
    const unit = (channel: number) => Float32Array.from({ length: dim }, (_, i) => (i === channel ? 100 : 0));
    const tokens = (...channels: number[]) => new Float32Array(channels.flatMap((c) => Array.from(unit(c))));
    const values = (n: number) => new Float32Array(n * dim).fill(0.5);
    const cache = new KVCache({ layers: 1, qHeads: 1, kvHeads: 1, headDim: dim, pageTokens: 4, policy: { select: { kind: 'h2o', budget: 16, recent: 13 } } });
    try {
      cache.append(0, tokens(15, 15, 15), values(3));                       // tokens 0-2: score 0
      for (let c = 0; c < 5; c++) cache.step(0, unit(c), unit(c), values(1)); // tokens 3-7 (c0..c4): 1 each from their own query
      for (const target of [0, 1, 3, 4, 4]) cache.step(0, unit(target), unit(14), values(1));  // c0..c4 end at 2, 2, 1, 2, 3
      // Eight more: tokens 0-7 leave the window in one call. 0-2 fill the heavy set; c0, c1, c2 beat
      // them; c3 (2) beats c2 (1); c4 (3) beats the lowest of c0, c1, c3 (all 2): the oldest, c0.
      cache.append(0, tokens(14, 14, 14, 14, 14, 14, 14, 14), values(8));
      expect(Array.from(cache.positions(0, 0))).toEqual([4, 6, 7, ...range(8, 21)]);
    } finally {
      cache.dispose();
    }
  });

  it('the kv heads of a GQA cache decide separately', () => {
    const pair = new Pair(open, GQA, { kind: 'h2o', budget: 30, recent: 4 }, 57);
    pair.runAll([['prefill', 60], ...steps(10)]);
    for (let l = 0; l < GQA.layers; l++) {
      const heads = [0, 1].map((h) => Array.from(pair.cache.positions(l, h)).join());
      expect(heads[0], `layer ${l}`).not.toBe(heads[1]);
    }
  });
});

// ---------------------------------------------------------------------------------------------
describe('duo: retrieval heads keep everything, streaming heads sinks + window', () => {
  const cases: Array<[string, SelectShape, ReferenceSelectSpec]> = [
    ['GQA, nested boolean mask', GQA, { kind: 'duo', heads: [[true, false], [false, false]], sink: 4, window: 10 }],
    ['MHA, flat Uint8Array mask, default sink 64 (> window)', MHA, { kind: 'duo', heads: Uint8Array.from([0, 1, 0, 0, 1, 1, 0, 0]), window: 16 }],
    ['MHA, scores (default ratio 0.25: 2 of 8)', MHA, { kind: 'duo', heads: [0.1, 0.7, 0.3, 0.7, 0.2, 0.05, 0.9, 0.0], sink: 2, window: 8 }],
    ['GQA, Float32Array scores with ties (default ratio 0.5: 2 of 4)', GQA, { kind: 'duo', heads: Float32Array.from([0.5, 0.2, 0.5, 0.5]), sink: 3, window: 12 }],
    ['GQA, scores with retrievalRatio 0.25', GQA, { kind: 'duo', heads: [0.4, 0.1, 0.3, 0.9], retrievalRatio: 0.25, sink: 1, window: 7 }],
    // ratio x heads not whole: rounded to the nearest (3.6 -> 4, 2.4 -> 2), neither floored nor raised.
    ['MHA, retrievalRatio 0.45 of 8: 4 retrieval heads', MHA, { kind: 'duo', heads: [0.1, 0.7, 0.3, 0.6, 0.2, 0.05, 0.9, 0.0], retrievalRatio: 0.45, sink: 2, window: 8 }],
    ['MHA, retrievalRatio 0.3 of 8: 2 retrieval heads', MHA, { kind: 'duo', heads: [0.1, 0.7, 0.3, 0.6, 0.2, 0.05, 0.9, 0.0], retrievalRatio: 0.3, sink: 2, window: 8 }],
    ['GQA, per-layer Uint8Array rows: a mask, not scores', GQA, { kind: 'duo', heads: [Uint8Array.from([1, 1]), Uint8Array.from([0, 1])], sink: 2, window: 9 }],
    ['MHA, per-layer Float32Array rows: scores', MHA, { kind: 'duo', heads: [Float32Array.from([0.3, 0.1, 0.8, 0.2]), Float32Array.from([0.9, 0, 0.4, 0.5])], sink: 2, window: 9 }],
    ['GQA, threshold 0.5 over scores clipped to [0, 1] (Duo gates)', GQA, { kind: 'duo', heads: [0.5, 1.7, 0.49, -2], threshold: 0.5, sink: 2, window: 8 }],
    ['MHA, copy heads kept past retrievalRatio 0.25 (3 copies + top 2)', MHA,
      { kind: 'duo', heads: [0.1, 0.7, 0.3, 0.6, 0.2, 0.05, 0.9, 0.0], copyHeads: [[false, false, true, false], [true, true, false, false]], sink: 2, window: 8 }],
  ];
  for (const [name, shape, select] of cases) {
    it(`${name}: positions per head and outputs equal the reference`, () => {
      const pair = new Pair(open, shape, select, 61 + name.length);
      pair.runAll([['prefill', 40], ...steps(12), ['prefill', 30], ['append', 4], ['attend', 5], ...steps(3)], name);
      expectSubsetOfSeen(pair);
      pair.expectStats(name);
      const spec = pair.mirror.spec as Extract<typeof pair.mirror.spec, { kind: 'duo' }>;
      const T = pair.cache.tokens(0);
      for (let l = 0; l < shape.layers; l++) {
        for (let h = 0; h < shape.kvHeads; h++) {
          const expected = spec.retrieval[l * shape.kvHeads + h] ? range(0, T) : [...range(0, Math.min(spec.sink, T - spec.window)), ...range(T - spec.window, T)];
          expect(Array.from(pair.cache.positions(l, h)), `${name}: layer ${l} head ${h}`).toEqual(expected);
        }
      }
    });
  }

  // Duo's chunked prefill (duo_attn/patch/llama.py, the static cache's forward): a chunk attends over
  // the cached sinks + recent tokens and the chunk itself, causal, and is trimmed after. Written
  // independently of the mirror: query p of a chunk sees positions < sink, the last window - 1
  // positions before the chunk, and the chunk up to p. Streaming (evict_for_space) would leave the
  // chunk's first query the sinks and itself alone.
  it('a chunk after the first attends over the cached window (window - 1 before it) and densely within itself', () => {
    const shape: SelectShape = { layers: 1, qHeads: 4, kvHeads: 2, headDim: 32 };
    const sink = 3, window = 10;
    const cache = cacheOf(shape, { kind: 'duo', heads: [true, false], sink, window });
    const random = new Random(17);
    const keys: Float64Array[] = [], values: Float64Array[] = [];
    let T = 0;
    for (const n of [40, 25, 6, 1, 12]) {
      const t = randomTokens(random, shape, n);
      keys.push(roundTo(t.k, 'f16'));
      values.push(roundTo(t.v, 'f16'));
      const k = concatRows(keys), v = concatRows(values);
      const out = cache.prefill(0, t.q, t.k, t.v);
      const width = shape.kvHeads * shape.headDim, row = shape.qHeads * shape.headDim;
      for (let i = 0; i < n; i++) {
        const p = T + i;
        // kv head 0 retrieves (every position up to p), kv head 1 streams.
        const visible = [range(0, p + 1), range(0, p + 1).filter((j) => j < sink || j >= T - (window - 1))];
        const group = shape.qHeads / shape.kvHeads;
        for (let h = 0; h < shape.kvHeads; h++) {
          const seen = visible[h];
          const head = (x: Float64Array) => concatRows(seen.map((j) => x.subarray(j * width + h * shape.headDim, j * width + (h + 1) * shape.headDim)));
          const expected = referenceAttention({
            q: t.q.subarray(i * row + h * group * shape.headDim, i * row + (h + 1) * group * shape.headDim), k: head(k), v: head(v),
            qHeads: group, kvHeads: 1, headDim: shape.headDim,
          });
          const actual = out.subarray(i * row + h * group * shape.headDim, i * row + (h + 1) * group * shape.headDim);
          expect(relativeL2(actual, expected), `chunk of ${n}, query ${p}, kv head ${h}`).toBeLessThanOrEqual(TOLERANCE);
        }
      }
      T += n;
      expect(Array.from(cache.positions(0, 1)), `after the chunk of ${n}`).toEqual([...range(0, sink), ...range(T - window, T)]);
      expect(Array.from(cache.positions(0, 0))).toEqual(range(0, T));
    }
  });
});

// ---------------------------------------------------------------------------------------------
describe('fork() after compression', () => {
  const cases: Array<[string, ReferenceSelectSpec, Op[]]> = [
    ['snapkv', { kind: 'snapkv', budget: 24, window: 6 }, [['prefill', 80]]],
    ['h2o', { kind: 'h2o', budget: 20, recent: 8 }, [['prefill', 40], ...steps(5)]],
    ['streaming', { kind: 'streaming', window: 10 }, [['prefill', 30], ...steps(5)]],
    ['duo', { kind: 'duo', heads: [true, false, false, true], sink: 2, window: 9 }, [['prefill', 30], ...steps(3)]],
  ];
  for (const [name, select, plan] of cases) {
    it(`${name}: pages shared, then parent and child diverge and both match their references`, () => {
      const parent = new Pair(open, GQA, select, 71);
      parent.runAll(plan, `${name} parent`);
      const child = parent.fork(72);
      expect(child.cache.stats().bytes.shared).toBeGreaterThan(0);
      expect(parent.cache.stats().bytes.shared).toBeGreaterThan(0);
      child.expectPositions(`${name} child at fork`);
      child.expectStats(`${name} child at fork`);
      const more: Op[] = [...steps(12), ['prefill', 9], ['attend', 3], ['append', 2], ...steps(2)];
      child.runAll(more, `${name} child`);
      parent.runAll([...steps(7), ['step', 2]], `${name} parent`);
      child.expectPositions(`${name} child after parent moved`);
      parent.expectStats(`${name} parent`);
      child.expectStats(`${name} child`);
    });
  }
});

// Rows written after a fork that differ between the sides (the fork tests above write the same
// prompt tokens on both): each side must copy a shared kept page before it writes to it.
describe('fork(): parent and child write shared kept pages in turn, and each still reads only its own rows', () => {
  /** Alternating steps (child first), every output and position checked against each side's own reference. */
  function alternate(parent: Pair, child: Pair, count: number): void {
    for (let i = 0; i < count; i++) {
      child.run(['step', 1], `child step ${i}`);
      parent.run(['step', 1], `parent step ${i}`);
    }
    const more: Op[] = [['attend', 2], ['step', 3], ['attend', 1]];
    child.runAll(more, 'child');
    parent.runAll(more, 'parent');
  }

  it('h2o filling its heavy set: the first tokens of the fork fill slots of a kept page both sides share', () => {
    // budget 20, recent 2 (18 heavy), pages of 4. After prefill(7) 5 heavy slots are kept: the
    // second kept page holds one row and is shared by the fork. Two shared prompt tokens fill rows
    // 5 and 6, then each side's own first step fills row 7 of that page: each must own its copy.
    const parent = new Pair(open, GQA, { kind: 'h2o', budget: 20, recent: 2 }, 301);
    parent.run(['prefill', 7], 'parent');
    const child = parent.fork(302);
    alternate(parent, child, 8);
  });

  it('h2o with a full heavy set: each side replaces slots of kept pages both sides share', () => {
    // budget 12, recent 4 (8 heavy): append(12) (no queries: every score 0) fills the two kept
    // pages, shared by the fork. Then each side's own queries decide which tokens leaving its
    // window replace which slots (overwriteKept): the sides choose differently, page by page.
    const parent = new Pair(open, GQA, { kind: 'h2o', budget: 12, recent: 4 }, 303);
    parent.run(['append', 12], 'parent');
    const child = parent.fork(304);
    alternate(parent, child, 12);
  });
});

// ---------------------------------------------------------------------------------------------
describe('async calls run the same policy', () => {
  for (const select of [
    { kind: 'streaming', window: 10 }, { kind: 'snapkv', budget: 20, window: 5 }, { kind: 'h2o', budget: 16, recent: 6 },
    { kind: 'duo', heads: [false, true, true, false], sink: 2, window: 7 },
  ] as ReferenceSelectSpec[]) {
    it(`${select.kind}: prefillAsync / stepAsync / attendAsync equal the reference`, async () => {
      const cache = cacheOf(GQA, select);
      const mirror = new SelectMirror(GQA, select);
      const random = new Random(91);
      for (const [kind, n] of [['prefill', 40], ['step', 1], ['step', 3], ['attend', 2], ['prefill', 12], ['step', 1]] as Op[]) {
        for (let layer = 0; layer < GQA.layers; layer++) {
          const t = randomTokens(random, GQA, n);
          const actual = kind === 'attend' ? await cache.attendAsync(layer, t.q)
            : kind === 'prefill' ? await cache.prefillAsync(layer, t.q, t.k, t.v) : await cache.stepAsync(layer, t.q, t.k, t.v);
          const expected = kind === 'attend' ? mirror.attend(layer, t.q)
            : kind === 'prefill' ? mirror.prefill(layer, t.q, t.k, t.v) : mirror.step(layer, t.q, t.k, t.v);
          expect(relativeL2(actual, expected), `${kind}(${n}) layer ${layer}`).toBeLessThanOrEqual(TOLERANCE);
          for (let h = 0; h < GQA.kvHeads; h++) expect(Array.from(cache.positions(layer, h))).toEqual(mirror.positions(layer, h));
        }
      }
    });
  }
});

// ---------------------------------------------------------------------------------------------
describe('errors', () => {
  it('attend() with more queries than the policy keeps in order: ERR_SHAPE, and the cache is unchanged', () => {
    const shape: SelectShape = { layers: 1, qHeads: 4, kvHeads: 2, headDim: 32 };
    const cases: Array<[ReferenceSelectSpec, Op[], number]> = [
      [{ kind: 'streaming', window: 8 }, [['prefill', 30]], 8],
      [{ kind: 'snapkv', budget: 16, window: 4 }, [['prefill', 40], ['step', 2]], 6],
      [{ kind: 'h2o', budget: 12, recent: 6 }, [['prefill', 30]], 6],
      [{ kind: 'duo', heads: [true, false], sink: 4, window: 8 }, [['prefill', 30]], 8],
    ];
    for (const [select, plan, inOrder] of cases) {
      const pair = new Pair(open, shape, select, 81);
      pair.runAll(plan, select.kind);
      const q = pair.tokens(inOrder + 1).q;
      expectError(() => pair.cache.attend(0, q), 'ERR_SHAPE', /quer/);
      pair.expectPositions(`${select.kind} after the rejected attend`);
      pair.runAll([['attend', inOrder], ['step', 1]], select.kind);
    }
  });

  it('option errors name the option', () => {
    const bad: Array<[unknown, RegExp]> = [
      [{ kind: 'streaming' }, /policy\.select\.window/],
      [{ kind: 'streaming', window: 0 }, /policy\.select\.window/],
      [{ kind: 'streaming', window: 2.5 }, /policy\.select\.window/],
      [{ kind: 'streaming', window: 8, sink: -1 }, /policy\.select\.sink/],
      [{ kind: 'streaming', window: 8, budget: 4 }, /policy\.select\.budget/],
      [{ kind: 'snapkv' }, /policy\.select\.budget/],
      [{ kind: 'snapkv', budget: 0 }, /policy\.select\.budget/],
      [{ kind: 'snapkv', budget: 16, window: 16 }, /policy\.select\.window/],
      [{ kind: 'snapkv', budget: 16 }, /policy\.select\.window/], // default window 32 >= 16
      [{ kind: 'snapkv', budget: 64, kernel: 4 }, /policy\.select\.kernel/],
      [{ kind: 'snapkv', budget: 64, kernel: 0 }, /policy\.select\.kernel/],
      [{ kind: 'snapkv', budget: 64, kernel: 1025 }, /policy\.select\.kernel/],
      [{ kind: 'snapkv', budget: 64, pooling: 'min' }, /policy\.select\.pooling/],
      [{ kind: 'snapkv', budget: 64, beta: 2 }, /policy\.select\.beta/],
      [{ kind: 'pyramidkv', budget: 64, beta: 0.5 }, /policy\.select\.beta/],
      [{ kind: 'pyramidkv', budget: 64, beta: Infinity }, /policy\.select\.beta/],
      [{ kind: 'h2o' }, /policy\.select\.budget/],
      [{ kind: 'h2o', budget: 1 }, /policy\.select\.budget/],
      [{ kind: 'h2o', budget: 8, recent: 8 }, /policy\.select\.recent/],
      [{ kind: 'h2o', budget: 8, recent: 0 }, /policy\.select\.recent/],
      [{ kind: 'duo' }, /policy\.select\.heads/],
      [{ kind: 'duo', heads: [] }, /policy\.select\.heads/],
      [{ kind: 'duo', heads: [true, false, true] }, /policy\.select\.heads/],
      [{ kind: 'duo', heads: [true, 0.5, true, false] }, /policy\.select\.heads/],
      [{ kind: 'duo', heads: Uint8Array.from([0, 2, 1, 0]) }, /policy\.select\.heads/],
      [{ kind: 'duo', heads: [1, 2, 3, NaN] }, /policy\.select\.heads/],
      [{ kind: 'duo', heads: [true, false, true, false], retrievalRatio: 0.5 }, /policy\.select\.retrievalRatio/],
      [{ kind: 'duo', heads: [1, 2, 3, 4], retrievalRatio: 1.5 }, /policy\.select\.retrievalRatio/],
      [{ kind: 'duo', heads: [1, 2, 3, 4], retrievalRatio: 0.5, threshold: 0.5 }, /retrievalRatio and policy\.select\.threshold/],
      [{ kind: 'duo', heads: [1, 2, 3, 4], threshold: -0.1 }, /policy\.select\.threshold but received -0\.1/],
      [{ kind: 'duo', heads: [1, 2, 3, 4], threshold: NaN }, /policy\.select\.threshold/],
      [{ kind: 'duo', heads: [true, false, true, false], threshold: 0.5 }, /policy\.select\.threshold applies to scores/],
      [{ kind: 'duo', heads: [true, false, true, false], copyHeads: [true, false, false, false] }, /policy\.select\.copyHeads applies to scores/],
      [{ kind: 'duo', heads: [1, 2, 3, 4], copyHeads: [true, false, false] }, /policy\.select\.copyHeads to have the shape/],
      [{ kind: 'duo', heads: [1, 2, 3, 4], copyHeads: [1, 0, 0, 0] }, /policy\.select\.copyHeads to be a mask/],
      [{ kind: 'duo', heads: [1, 2, 3, 4], copyHeads: Uint8Array.from([0, 2, 0, 0]) }, /policy\.select\.copyHeads but entry 1 is 2/],
      [{ kind: 'duo', heads: [[1, 2], [3, 4]], copyHeads: [[true], [false, false, true]] }, /policy\.select\.copyHeads to have the shape/],
      // Rows must be [layers][kvHeads]: ragged rows with the right total would put heads in the wrong layers.
      [{ kind: 'duo', heads: [[true], [true, false, false]] }, /policy\.select\.heads to hold 2 rows \(layers\) of 2 \(kv heads\) but its rows hold 1, 3/],
      [{ kind: 'duo', heads: [[0.1, 0.2], 0.3, 0.4] }, /policy\.select\.heads to be flat or one row per layer/],
      [{ kind: 'duo', heads: [Uint8Array.from([1, 0]), Float32Array.from([0.5, 0.1])] }, /all masks \(Uint8Array\) or all scores/],
      [{ kind: 'duo', heads: [Int32Array.from([1, 0]), Int32Array.from([0, 1])] }, /policy\.select\.heads\[0\] to be an array, Uint8Array or Float32Array/],
      [{ kind: 'duo', heads: [Uint8Array.from([1, 0]), Uint8Array.from([0, 1])], retrievalRatio: 0.5 }, /retrievalRatio applies to scores/],
      [{ kind: 'duo', heads: [1, 2, 3, 4], window: 0 }, /policy\.select\.window/],
      [{ kind: 'duo', heads: [1, 2, 3, 4], sink: 1.5 }, /policy\.select\.sink/],
      [{ kind: 'quest' }, /policy\.select\.pages/],
      [{ kind: 'nope' }, /policy\.select\.kind/],
      ['streaming', /policy\.select/],
    ];
    for (const [select, message] of bad) {
      expectError(() => cacheOf(GQA, select as SelectSpec), 'ERR_OPTION', message);
    }
    expectError(
      () => new KVCache({ ...GQA, device: 'cpu', policy: { select: { kind: 'quest', pages: 4 }, store: { kind: 'kivi', bits: 4 } } }),
      'ERR_OPTION', /policy\.select/,
    );
  });
});
