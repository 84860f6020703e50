// ActQKV (native/core/select/actqkv.cc, methods/actqkv.md): on every decode call, each kv head
// loads exactly the blocks the float64 reference (test/reference/actqkv.ts) chooses, the output
// equals float64 attention over exactly the loaded positions, the per-layer block counts follow
// the step budget and its clamp, stats().tokens.loaded follows, fork() copies the policy state,
// and bad options throw ERR_OPTION.
import { describe, expect, it } from 'vitest';

import { KVCache, type SelectSpec } from '../lib/index.js';
import { type ActQKVChoice, type ActQKVOptions, type ActQKVShape, ActQKVReference, HISTORY } from './reference/actqkv.js';
import { referenceAttention } from './reference/attention.js';
import { roundTo } from './reference/half.js';
import { Random, relativeL2 } from './helpers/random.js';
import { randomTokens } from './helpers/tokens.js';
import { expectError } from './helpers/errors.js';
import { disposedAfterEach } from './helpers/lifetime.js';

// f32 arithmetic over exactly representable stored values.
const TOLERANCE = 1e-4;

const open = disposedAfterEach<KVCache>();

type Store = 'f32' | 'f16';

function cacheOf(shape: ActQKVShape, options: object, store: Store = 'f16'): KVCache {
  const cache = new KVCache({
    ...shape, device: 'cpu', pageTokens: 4,
    policy: { select: { kind: 'actqkv', ...options } as SelectSpec, store: { kind: store } },
  });
  open.push(cache);
  return cache;
}

/** Float64 attention of n queries over the given positions of each kv head (causal within them). */
function attendOver(
  shape: ActQKVShape, q: ArrayLike<number>, keys: Float64Array[], values: Float64Array[], positions: number[][], tokens: number,
): Float64Array {
  const { qHeads, kvHeads, headDim } = shape;
  const n = q.length / (qHeads * headDim);
  const group = qHeads / kvHeads;
  const out = new Float64Array(q.length);
  for (let h = 0; h < qHeads; h++) {
    const g = Math.floor(h / group);
    const k = new Float64Array(positions[g].length * headDim);
    const v = new Float64Array(positions[g].length * headDim);
    positions[g].forEach((p, i) => {
      for (let t = 0; t < headDim; t++) {
        k[i * headDim + t] = keys[p][g * headDim + t];
        v[i * headDim + t] = values[p][g * headDim + t];
      }
    });
    for (let i = 0; i < n; i++) {
      // Query i sits at tokens - n + i: it sees the loaded positions up to itself.
      const visible = positions[g].filter((p) => p <= tokens - n + i).length;
      const qi = Float64Array.from({ length: headDim }, (_, t) => q[(i * qHeads + h) * headDim + t]);
      const o = referenceAttention({
        q: qi, k: k.subarray(0, visible * headDim), v: v.subarray(0, visible * headDim), qHeads: 1, kvHeads: 1, headDim, causal: false,
      });
      out.set(o, (i * qHeads + h) * headDim);
    }
  }
  return out;
}

interface StepRecord {
  choices: Array<ActQKVChoice | null>;
}

/** A cache and its reference, driven by the same calls on every layer. */
class Pair {
  readonly random: Random;
  readonly keys: Float64Array[][];
  readonly values: Float64Array[][];
  readonly records: StepRecord[] = [];
  /** Rewrites a layer's fresh keys in place before they are used (structured data). */
  keyHook: ((layer: number, k: Float32Array) => void) | null = null;
  /** Rewrites a layer's fresh queries in place before they are used. */
  queryHook: ((layer: number, q: Float32Array) => void) | null = null;

  constructor(
    readonly shape: ActQKVShape, readonly options: ActQKVOptions, readonly store: Store, seed: number,
    readonly cache: KVCache = cacheOf(shape, options, store), readonly reference = new ActQKVReference(shape, options, store),
    keys?: Float64Array[][], values?: Float64Array[][],
  ) {
    this.random = new Random(seed);
    this.keys = keys ?? Array.from({ length: shape.layers }, () => []);
    this.values = values ?? Array.from({ length: shape.layers }, () => []);
  }

  fork(seed: number): Pair {
    const child = this.cache.fork();
    open.push(child);
    return new Pair(
      this.shape, this.options, this.store, seed, child, this.reference.fork(), this.keys.map((l) => [...l]), this.values.map((l) => [...l]),
    );
  }

  #store(layer: number, k: Float32Array, v: Float32Array): Float64Array {
    const width = this.shape.kvHeads * this.shape.headDim;
    const rk = roundTo(k, this.store);
    const rv = roundTo(v, this.store);
    for (let i = 0; i < k.length / width; i++) {
      this.keys[layer].push(rk.slice(i * width, (i + 1) * width));
      this.values[layer].push(rv.slice(i * width, (i + 1) * width));
    }
    return rk;
  }

  prefill(n: number): void {
    for (let layer = 0; layer < this.shape.layers; layer++) {
      const t = randomTokens(this.random, this.shape, n);
      this.keyHook?.(layer, t.k);
      this.queryHook?.(layer, t.q);
      const actual = this.cache.prefill(layer, t.q, t.k, t.v);
      this.reference.appendKeys(layer, this.#store(layer, t.k, t.v));
      this.reference.addQueries(layer, t.q);
      this.reference.catchUp(layer);
      const tokens = this.keys[layer].length;
      const all = Array.from({ length: this.shape.kvHeads }, () => Array.from({ length: tokens }, (_, p) => p));
      const expected = attendOver(this.shape, t.q, this.keys[layer], this.values[layer], all, tokens);
      expect(relativeL2(actual, expected), `prefill layer ${layer}`).toBeLessThanOrEqual(TOLERANCE);
    }
  }

  /** n tokens append()ed to every layer (no queries; the next decode call indexes them). */
  append(n: number): void {
    for (let layer = 0; layer < this.shape.layers; layer++) {
      const t = randomTokens(this.random, this.shape, n);
      this.keyHook?.(layer, t.k);
      this.cache.append(layer, t.k, t.v);
      this.reference.appendKeys(layer, this.#store(layer, t.k, t.v));
    }
  }

  /** One decode step on every layer: step() of n tokens, or append() then attend() of one token. */
  decode(kind: 'step' | 'append+attend', label: string, n = 1): StepRecord {
    const { layers, kvHeads } = this.shape;
    const { sink, window } = this.options;
    const record: StepRecord = { choices: [] };
    for (let layer = 0; layer < layers; layer++) {
      const t = randomTokens(this.random, this.shape, kind === 'step' ? n : 1);
      this.keyHook?.(layer, t.k);
      this.queryHook?.(layer, t.q);
      let actual: Float32Array;
      let choice: ActQKVChoice | null;
      if (kind === 'step') {
        actual = this.cache.step(layer, t.q, t.k, t.v);
        this.reference.appendKeys(layer, this.#store(layer, t.k, t.v));
        choice = this.reference.decode(layer, t.q);
      } else {
        this.cache.append(layer, t.k, t.v);
        this.reference.appendKeys(layer, this.#store(layer, t.k, t.v));
        this.reference.catchUp(layer); // append indexes before the query arrives
        actual = this.cache.attend(layer, t.q);
        choice = this.reference.decode(layer, t.q);
      }
      record.choices.push(choice);
      const tokens = this.keys[layer].length;
      const positions: number[][] = [];
      for (let h = 0; h < kvHeads; h++) {
        const expected = choice === null
          ? Array.from({ length: tokens }, (_, p) => p)
          : [...Array.from({ length: sink }, (_, p) => p), ...choice.tokens[h], ...Array.from({ length: window }, (_, i) => tokens - window + i)];
        positions.push(expected);
        expect(Array.from(this.cache.loadedPositions(layer, h)), `${label} layer ${layer} head ${h}: loaded positions`).toEqual(expected);
      }
      const expected = attendOver(this.shape, t.q, this.keys[layer], this.values[layer], positions, tokens);
      expect(relativeL2(actual, expected), `${label} layer ${layer}: output`).toBeLessThanOrEqual(TOLERANCE);
      if (layer === layers - 1) {
        const loaded = positions.reduce((a, p) => a + p.length, 0) / kvHeads;
        expect(this.cache.stats().tokens.loaded, `${label}: stats().tokens.loaded`).toBeCloseTo(loaded, 9);
      }
    }
    this.records.push(record);
    return record;
  }
}

/** Blocks per kv head in the loaded dynamic positions (what the cache actually chose). */
function loadedBlocks(cache: KVCache, layer: number, head: number, options: ActQKVOptions): number {
  const tokens = cache.tokens(layer);
  const blocks = new Set<number>();
  for (const p of cache.loadedPositions(layer, head)) {
    if (p >= options.sink && p < tokens - options.window) blocks.add(Math.floor((p - options.sink) / options.blockSize));
  }
  return blocks.size;
}

const CASES: Array<[string, ActQKVShape, ActQKVOptions, Store, number, number]> = [
  [
    'GQA 4q/2kv, d7, 3 layers, f32 store',
    { layers: 3, qHeads: 4, kvHeads: 2, headDim: 7 },
    { sink: 4, window: 16, blockSize: 4, blocks: 4, reprTopK: 2, queryWindow: 8, questionWeight: 4, temperature: 0.05 },
    'f32', 24, 240,
  ],
  [
    'MHA 2q/2kv, d5, 2 layers, f16 store',
    { layers: 2, qHeads: 2, kvHeads: 2, headDim: 5 },
    { sink: 2, window: 8, blockSize: 3, blocks: 2, reprTopK: 3, queryWindow: 5, questionWeight: 1.5, temperature: 0.2 },
    'f16', 13, 230,
  ],
  [
    'GQA 6q/2kv, d9, 2 layers, f16 store, one block of budget',
    { layers: 2, qHeads: 6, kvHeads: 2, headDim: 9 },
    { sink: 0, window: 6, blockSize: 5, blocks: 1, reprTopK: 1, queryWindow: 3, questionWeight: 0, temperature: 1 },
    'f16', 30, 160,
  ],
];

describe('actqkv: loads what the reference chooses', () => {
  for (const [name, shape, options, store, prefill, steps] of CASES) {
    it(`${name}: positions, outputs, budget and stats after every decode step`, () => {
      const pair = new Pair(shape, options, store, 7 + shape.headDim);
      pair.prefill(prefill);
      const indexBytes = pair.cache.stats().bytes.index;
      expect(indexBytes).toBeGreaterThan(0);
      let clampFree = 0;
      let nonUniform = 0;
      for (let s = 0; s < steps; s++) {
        const record = pair.decode(s % 13 === 5 ? 'append+attend' : 'step', `step ${s}`);
        const R0 = options.blocks * shape.layers;
        let total = 0;
        let clamped = false;
        record.choices.forEach((choice, layer) => {
          if (choice === null) return;
          for (let h = 0; h < shape.kvHeads; h++) {
            expect(loadedBlocks(pair.cache, layer, h, options), `step ${s} layer ${layer} head ${h}: blocks`).toBe(choice.k);
          }
          expect(choice.k).toBeGreaterThanOrEqual(Math.min(choice.blocks, Math.ceil((options.blocks * 32) / 46)));
          expect(choice.k).toBeLessThanOrEqual(Math.min(choice.blocks, 2 * options.blocks));
          if (Math.round(choice.want) !== choice.k) clamped = true;
          total += choice.k;
        });
        const full = record.choices.every((c) => c !== null);
        if (full && !clamped) {
          // Without a clamp the layers share exactly blocks x layers (the last takes the rest).
          expect(total, `step ${s}: total blocks`).toBe(R0);
          clampFree++;
        }
        if (full && new Set(record.choices.map((c) => c!.k)).size > 1) nonUniform++;
      }
      // The 100-sample history filled and the entropy split ran with a free budget.
      expect(pair.records.length).toBeGreaterThan(HISTORY + 20);
      expect(clampFree).toBeGreaterThan(0);
      if (shape.layers > 2) expect(nonUniform).toBeGreaterThan(0);
      expect(pair.cache.stats().bytes.index).toBeGreaterThan(indexBytes);
      // Loading cuts what a step reads far below the layer's tokens.
      const tokens = pair.cache.tokens(shape.layers - 1);
      const cap = options.sink + options.window + 2 * options.blocks * options.blockSize;
      expect(pair.cache.stats().tokens.loaded).toBeLessThanOrEqual(cap);
      expect(pair.cache.stats().tokens.loaded).toBeLessThan(tokens / 2);
    });
  }

  it('flat relevance gets more blocks: entropy moves the budget toward the flatter layer', () => {
    const shape = { layers: 2, qHeads: 2, kvHeads: 1, headDim: 6 };
    const options = { sink: 2, window: 8, blockSize: 4, blocks: 6, reprTopK: 2, queryWindow: 6, questionWeight: 4, temperature: 0.05 };
    const pair = new Pair(shape, options, 'f32', 3);
    // Layer 0: keys along one direction plus small noise, so every block scores alike (h near 1);
    // layer 1: random keys, a peaked softmax at temperature 0.05 (h well below 1).
    pair.keyHook = (layer, k) => {
      if (layer !== 0) return;
      for (let i = 0; i < k.length; i++) k[i] = Math.fround((i % 6 === 0 ? 3 : 1) + 0.001 * k[i]);
    };
    pair.prefill(60);
    for (let s = 0; s < HISTORY + 30; s++) pair.decode('step', `step ${s}`);
    const last = pair.records[pair.records.length - 1].choices;
    // lower = ceil(6 * 32 / 46) = 5, upper = 12: layer 0 takes its upper bound, layer 1 the rest.
    expect(last[0]!.k).toBe(12);
    expect(last[1]!.k).toBe(5);
    // Before the history filled, the split was uniform.
    expect(pair.records[10].choices.map((c) => c!.k)).toEqual([6, 6]);
  });

  it('fork(): parent and child continue independently, each as its own reference', () => {
    const [, shape, options, store] = CASES[0];
    const parent = new Pair(shape, options, store, 31);
    parent.prefill(24);
    for (let s = 0; s < 110; s++) parent.decode('step', `parent ${s}`);
    const child = parent.fork(99);
    for (let s = 0; s < 25; s++) {
      parent.decode('step', `parent after fork ${s}`);
      child.decode(s % 4 === 0 ? 'append+attend' : 'step', `child ${s}`);
    }
  });

  it('representatives take the store dtype: an f16 store holds each block in half the bytes of an f32 one', () => {
    // Same options and inputs (the f32 pair mirrors the f16 one's seed); only the stores differ.
    const [, shape, options] = CASES[0];
    const pairs = (['f16', 'f32'] as const).map((store) => new Pair(shape, options, store, 41));
    for (const pair of pairs) {
      pair.prefill(24);
      for (let s = 0; s < 40; s++) pair.decode('step', `${pair.store} ${s}`);
    }
    const [half, full] = pairs.map((pair) => pair.cache.stats().bytes.index);
    // Blocks started per kv head: every dynamic token (sink .. tokens - window) is in one.
    const tokens = pairs[0].cache.tokens(0);
    const blocks = Math.ceil((tokens - options.window - options.sink) / options.blockSize);
    expect(full - half).toBe(shape.layers * shape.kvHeads * blocks * shape.headDim * 2);
  });

  it('decode calls of several queries: the question term is the call\'s last query', () => {
    // questionWeight 4: the current query outweighs the probe, so the first query of a call would choose other blocks.
    const [, shape, options, store] = CASES[0];
    const pair = new Pair(shape, options, store, 53);
    pair.prefill(40);
    for (let s = 0; s < 24; s++) pair.decode('step', `step of ${1 + (s % 4)} ${s}`, 1 + (s % 4));
  });

  it('a query window that completes exactly at the end of a call: the next query takes the oldest one\'s place in the probe', () => {
    // The prefill holds exactly queryWindow queries: the probe's running sums are made over a
    // full ring, and the first decode query must replace the ring's oldest row in them.
    const shape = { layers: 2, qHeads: 4, kvHeads: 2, headDim: 7 };
    const options = { sink: 2, window: 4, blockSize: 2, blocks: 2, reprTopK: 2, queryWindow: 12, questionWeight: 0.5, temperature: 0.1 };
    const pair = new Pair(shape, options, 'f32', 61);
    pair.prefill(options.queryWindow);
    for (let s = 0; s < 30; s++) pair.decode(s % 4 === 1 ? 'append+attend' : 'step', `step ${s}`);
  });

  it('keys that tie against the probe: a block keeps its earliest reprTopK keys as its representative', () => {
    // Queries along channel 0 only and every key with channel 0 = 1, but 2 for one key per block
    // (its last in even blocks, its first in odd ones): the keys indexed by one call score one of
    // two values against the probe, so the tie rule (the earlier key is kept; of the tied lowest,
    // the later one is replaced) decides which keys make the representative. The other channels
    // differ, so the representatives, hence the block choices, depend on it.
    const shape = { layers: 2, qHeads: 4, kvHeads: 2, headDim: 6 };
    const options = { sink: 2, window: 6, blockSize: 4, blocks: 2, reprTopK: 2, queryWindow: 4, questionWeight: 1, temperature: 0.1 };
    const pair = new Pair(shape, options, 'f32', 19);
    // Channel 0 of the queries positive, so that the probes and the queries add up instead of cancelling in u.
    pair.queryHook = (_, q) => {
      for (let i = 0; i < q.length; i++) q[i] = i % shape.headDim === 0 ? Math.abs(q[i]) + 0.5 : 0;
    };
    pair.keyHook = (layer, k) => {
      const first = pair.keys[layer].length;  // the call's first position
      for (let i = 0; i < k.length; i += shape.headDim) {
        const offset = first + Math.floor(i / (shape.kvHeads * shape.headDim)) - options.sink;
        const block = Math.floor(offset / options.blockSize);
        k[i] = offset % options.blockSize === (block % 2 === 0 ? options.blockSize - 1 : 0) ? 2 : 1;
      }
    };
    pair.prefill(80);
    for (let s = 0; s < 40; s++) pair.decode(s % 5 === 2 ? 'append+attend' : 'step', `step ${s}`);
  });

  it('blocks that tie on score: the top blocks take the earlier of two equal blocks', () => {
    // Every pair of blocks (2j, 2j + 1) holds the same keys, so their representatives, norms and
    // scores are equal: which of a tied pair makes the budget is the tie rule alone (the earlier
    // block), checked against the reference at every step.
    const shape = { layers: 2, qHeads: 4, kvHeads: 2, headDim: 6 };
    const options = { sink: 2, window: 6, blockSize: 3, blocks: 3, reprTopK: 2, queryWindow: 4, questionWeight: 1, temperature: 0.5 };
    const pair = new Pair(shape, options, 'f32', 23);
    const row = shape.kvHeads * shape.headDim;
    // One random key row per (layer, twin position); sinks (twin -2, -1) have their own. 40 + 60
    // steps + appends stay below 200 positions.
    const twinRows = 200;
    const table = new Random(24).tensor(shape.layers * twinRows * row);
    pair.keyHook = (layer, k) => {
      const first = pair.keys[layer].length;  // the call's first position
      for (let i = 0; i < k.length; i++) {
        const offset = first + Math.floor(i / row) - options.sink;
        const block = Math.floor(offset / options.blockSize);
        const twin = offset < 0 ? offset : Math.floor(block / 2) * options.blockSize + (offset - block * options.blockSize);
        k[i] = table[(layer * twinRows + twin + 2) * row + (i % row)];
      }
    };
    pair.prefill(40);
    for (let s = 0; s < 60; s++) pair.decode(s % 7 === 3 ? 'append+attend' : 'step', `step ${s}`);
  });

  it('new keys past 4 MiB at one decode call (read head by head, not in one gather), then more steps', () => {
    // 8 kv heads x 128 dims x 4 bytes = 4 KiB of f32 keys per token: 1100 tokens to index are 4.3 MiB.
    const shape = { layers: 1, qHeads: 8, kvHeads: 8, headDim: 128 };
    const options = { sink: 4, window: 16, blockSize: 8, blocks: 4, reprTopK: 2, queryWindow: 8, questionWeight: 4, temperature: 0.05 };
    const pair = new Pair(shape, options, 'f32', 17);
    pair.prefill(24);
    pair.append(1100);
    for (let s = 0; s < 6; s++) pair.decode(s % 2 ? 'step' : 'append+attend', `after a long append ${s}`);
  });

  it('prefill longer than the window indexes at once; short caches attend densely', () => {
    const shape = { layers: 2, qHeads: 4, kvHeads: 2, headDim: 3 };
    const options = { sink: 3, window: 5, blockSize: 2, blocks: 3, reprTopK: 2, queryWindow: 4, questionWeight: 4, temperature: 0.05 };
    const pair = new Pair(shape, options, 'f32', 5);
    pair.prefill(1);
    for (let s = 0; s < 7; s++) pair.decode('step', `short ${s}`); // tokens <= sink + window: dense
    pair.prefill(50);
    for (let s = 0; s < 20; s++) pair.decode(s % 2 ? 'step' : 'append+attend', `long ${s}`);
  });
});

describe('actqkv: options', () => {
  const shape = { layers: 1, qHeads: 2, kvHeads: 1, headDim: 4 };
  it('resolves the defaults', () => {
    const cache = cacheOf(shape, {});
    expect(cache.stats().bytes.index).toBe(0);
  });
  for (const [options, pattern] of [
    [{ reprTopK: 5, blockSize: 4 }, /reprTopK/],
    [{ reprTopK: 33 }, /reprTopK/],
    [{ temperature: 0 }, /temperature/],
    [{ temperature: -1 }, /temperature/],
    [{ questionWeight: -1 }, /questionWeight/],
    [{ blocks: 0 }, /blocks/],
    [{ queryWindow: 0 }, /queryWindow/],
    [{ blockSize: 2.5 }, /blockSize/],
    [{ window: 0 }, /window/],
    [{ topK: 3 }, /topK/],
    [{ pages: 3 }, /pages/],
  ] as Array<[Record<string, unknown>, RegExp]>) {
    it(`rejects ${JSON.stringify(options)}`, () => {
      expectError(() => cacheOf(shape, options), 'ERR_OPTION', pattern);
    });
  }
});
