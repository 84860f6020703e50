// Loading policies (policy.select quest / retrieval; methods/retrieval-attention.md): every token
// stays stored; a decode call attends the static part (sinks + window) and the tokens the policy
// loads from the rest, merged by log-sum-exp. Checked against test/reference/loading.ts: the loaded
// set per kv head (flat: exact top-k; quest: top pages by the bound), the output equals float64
// attention over exactly the loaded set, incremental indexing of tokens that leave the window,
// stats, fork and errors. The index kinds (ivf, graph) are checked for recall here and in key-index.test.ts.
import { describe, expect, it } from 'vitest';

import { KVCache, KVSlimError, type SelectSpec, createKeyIndex } from '../lib/index.js';
import { expectError } from './helpers/errors.js';
import { roundTo } from './reference/half.js';
import { Random, relativeL2 } from './helpers/random.js';
import { disposedAfterEach } from './helpers/lifetime.js';
import { resealed } from './helpers/saved.js';
import { type LayerData, attentionOver, checkTopK, groupRows, groupScore, pageBound } from './reference/loading.js';

// f32 store: the cache holds exactly the test's keys; outputs differ from float64 by f32 rounding.
const TOLERANCE = 2e-5;
// Scores computed in f32 by the kernels: a near-tie at the top-k boundary may go either way.
const SCORE_SLACK = 1e-4;

interface Shape { layers: number; qHeads: number; kvHeads: number; headDim: number }
const GQA: Shape = { layers: 2, qHeads: 8, kvHeads: 2, headDim: 32 };
const ODD: Shape = { layers: 1, qHeads: 3, kvHeads: 3, headDim: 19 };

const open = disposedAfterEach<KVCache>();

/** A cache and the tokens it was given, per layer. */
class Run {
  readonly cache: KVCache;
  readonly data: LayerData[];
  readonly random: Random;
  lastQ: Float32Array[] = [];
  lastOut: Float32Array[] = [];

  constructor(readonly shape: Shape, select: SelectSpec, seed: number, pageTokens = 8) {
    this.cache = new KVCache({ ...shape, device: 'cpu', pageTokens, policy: { select, store: { kind: 'f32' } } });
    open.push(this.cache);
    this.data = Array.from({ length: shape.layers }, () => ({ keys: [], values: [] }));
    this.random = new Random(seed);
  }

  #tokens(layer: number, n: number, keyOverride?: (t: number, head: number) => Float32Array | null) {
    const { qHeads, kvHeads, headDim } = this.shape;
    const q = this.random.tensor(n * qHeads * headDim);
    const k = this.random.tensor(n * kvHeads * headDim);
    const v = this.random.tensor(n * kvHeads * headDim);
    for (let t = 0; t < n; t++) {
      const keys: number[][] = [];
      const values: number[][] = [];
      for (let h = 0; h < kvHeads; h++) {
        const base = (t * kvHeads + h) * headDim;
        const override = keyOverride?.(this.data[layer].keys.length + t, h) ?? null;
        if (override) k.set(override, base);
        keys.push(Array.from(k.subarray(base, base + headDim)));
        values.push(Array.from(v.subarray(base, base + headDim)));
      }
      this.data[layer].keys.push(keys);
      this.data[layer].values.push(values);
    }
    return { q, k, v };
  }

  prefill(n: number): void {
    for (let layer = 0; layer < this.shape.layers; layer++) {
      const { q, k, v } = this.#tokens(layer, n);
      this.lastQ[layer] = q;
      this.lastOut[layer] = this.cache.prefill(layer, q, k, v);
    }
  }

  /** A decode call of n tokens on every layer; `query` may replace the queries. */
  step(n = 1, options: { query?: (layer: number) => Float32Array; key?: (t: number, head: number) => Float32Array | null } = {}): void {
    for (let layer = 0; layer < this.shape.layers; layer++) {
      const { q, k, v } = this.#tokens(layer, n, options.key);
      const query = options.query?.(layer) ?? q;
      this.lastQ[layer] = query;
      this.lastOut[layer] = this.cache.step(layer, query, k, v);
    }
  }

  loaded(layer: number): number[][] {
    return Array.from({ length: this.shape.kvHeads }, (_, h) => Array.from(this.cache.loadedPositions(layer, h)));
  }

  /** The last call's output equals float64 attention over what each kv head loaded. */
  expectOutputOverLoaded(n = 1): void {
    const { qHeads, kvHeads, headDim } = this.shape;
    for (let layer = 0; layer < this.shape.layers; layer++) {
      const expected = attentionOver(this.lastQ[layer], n, qHeads, kvHeads, headDim, this.data[layer], this.loaded(layer));
      expect(relativeL2(this.lastOut[layer], expected), `layer ${layer}`).toBeLessThan(TOLERANCE);
    }
  }
}

function range(from: number, to: number): number[] {
  return Array.from({ length: Math.max(0, to - from) }, (_, i) => from + i);
}

/** Static part + dynamic part split of a layer holding T tokens. */
function parts(T: number, sink: number, window: number) {
  return { sinks: range(0, sink), dynamic: range(sink, T - window), window: range(T - window, T) };
}

describe('retrieval flat: exact top-k of the dynamic part', () => {
  for (const [name, shape] of [['GQA 8q/2kv, 2 layers', GQA], ['3 heads, headDim 19', ODD]] as const) {
    it(`loads sinks + top-k + window and attends exactly over them (${name})`, () => {
      const sink = 4, window = 16, topK = 10;
      const run = new Run(shape, { kind: 'retrieval', index: 'flat', topK, sink, window }, 11);
      run.prefill(300);
      for (let s = 0; s < 6; s++) {
        run.step();
        const T = 301 + s;
        const { sinks, dynamic, window: recent } = parts(T, sink, window);
        for (let layer = 0; layer < shape.layers; layer++) {
          for (let h = 0; h < shape.kvHeads; h++) {
            const loaded = run.loaded(layer)[h];
            expect(loaded.slice(0, sink)).toEqual(sinks);
            expect(loaded.slice(-window)).toEqual(recent);
            const chosen = loaded.slice(sink, -window);
            const rows = groupRows(run.lastQ[layer], 1, shape.qHeads, shape.kvHeads, h, shape.headDim);
            const problem = checkTopK(chosen, dynamic, (p) => groupScore(rows, run.data[layer].keys[p][h]), topK, SCORE_SLACK);
            expect(problem, `step ${s} layer ${layer} head ${h}`).toBeNull();
          }
        }
        run.expectOutputOverLoaded();
        expect(run.cache.stats().tokens.loaded).toBe(sink + topK + window);
      }
    });
  }

  it('a dynamic part over 1 MiB (the scan prefetches ahead across pages of 8 tokens): still the exact top-k', () => {
    const shape: Shape = { layers: 1, qHeads: 6, kvHeads: 2, headDim: 40 };
    const sink = 3, window = 9, topK = 25;
    const run = new Run(shape, { kind: 'retrieval', index: 'flat', topK, sink, window }, 14);
    run.prefill(7000);  // 7000 x 40 x 4 bytes = 1.1 MB of keys per kv head
    for (let s = 0; s < 2; s++) {
      run.step();
      const T = 7001 + s;
      const { dynamic } = parts(T, sink, window);
      for (let h = 0; h < shape.kvHeads; h++) {
        const chosen = run.loaded(0)[h].slice(sink, -window);
        const rows = groupRows(run.lastQ[0], 1, shape.qHeads, shape.kvHeads, h, shape.headDim);
        expect(checkTopK(chosen, dynamic, (p) => groupScore(rows, run.data[0].keys[p][h]), topK, SCORE_SLACK), `step ${s} head ${h}`).toBeNull();
      }
      run.expectOutputOverLoaded();
    }
  });

  it('a call of several queries inside the window: static + loaded, causal within the window', () => {
    const run = new Run(GQA, { kind: 'retrieval', index: 'flat', topK: 12, sink: 2, window: 24 }, 12);
    run.prefill(200);
    run.step(5);
    run.expectOutputOverLoaded(5);
    expect(run.loaded(0)[0].length).toBe(2 + 12 + 24);
  });

  it('a call of 70 queries inside a window of 80: 280 rows per kv head, the loaded tokens joined in front of the window in one prefill', () => {
    const run = new Run(GQA, { kind: 'retrieval', index: 'flat', topK: 12, sink: 3, window: 80 }, 14);
    run.prefill(300);
    run.step(70);
    run.expectOutputOverLoaded(70);
    expect(run.loaded(1)[0].length).toBe(3 + 12 + 80);
  });

  it('prefill, short caches and calls wider than the window attend densely', () => {
    const run = new Run(GQA, { kind: 'retrieval', index: 'flat', topK: 4, sink: 4, window: 16 }, 13);
    run.prefill(18);
    expect(run.loaded(1)[1]).toEqual(range(0, 18));
    run.expectOutputOverLoaded(18);
    run.step(1); // 19 tokens <= sink + window: nothing to load from
    expect(run.loaded(0)[0]).toEqual(range(0, 19));
    run.prefill(100);
    run.step(17); // 17 queries > window 16
    expect(run.loaded(0)[1]).toEqual(range(0, 136));
    run.expectOutputOverLoaded(17);
  });

  it('tokens leaving the window are indexed: a key appended during decode is found later', () => {
    const { headDim, kvHeads } = GQA;
    const sink = 2, window = 8;
    for (const index of ['flat', 'ivf', 'graph'] as const) {
      const select: SelectSpec = { kind: 'retrieval', index, topK: 6, sink, window, probes: 1 << 20, beam: 256 };
      const run = new Run(GQA, select, 14);
      run.prefill(120);
      const needle = new Random(99).tensor(headDim);
      const needleAt = 130;
      for (let s = 0; s < 40; s++) run.step(1, { key: (t) => (t === needleAt ? needle : null) });
      // Every query row of the group asks for the needle.
      const query = new Float32Array(GQA.qHeads * headDim);
      for (let h = 0; h < GQA.qHeads; h++) for (let d = 0; d < headDim; d++) query[h * headDim + d] = 4 * needle[d];
      run.step(1, { query: () => query });
      for (let h = 0; h < kvHeads; h++) expect(run.loaded(0)[h], `${index} head ${h}`).toContain(needleAt);
      run.expectOutputOverLoaded();
    }
  });
});

describe('quest: pages ranked by their upper bound', () => {
  it('loads the pages of highest bound (max over the group) and attends exactly over them', () => {
    const sink = 3, window = 10, pageSize = 8, pages = 4;
    const run = new Run(GQA, { kind: 'quest', sink, window, pageSize, pages }, 21);
    run.prefill(203); // the dynamic part ends in a partial page
    for (let s = 0; s < 5; s++) {
      run.step();
      const T = 204 + s;
      const { dynamic } = parts(T, sink, window);
      for (let layer = 0; layer < GQA.layers; layer++) {
        for (let h = 0; h < GQA.kvHeads; h++) {
          const rows = groupRows(run.lastQ[layer], 1, GQA.qHeads, GQA.kvHeads, h, GQA.headDim);
          const pageCount = Math.ceil(dynamic.length / pageSize);
          const pageTokens = (p: number) => dynamic.slice(p * pageSize, (p + 1) * pageSize);
          const bound = (p: number) => pageBound(rows, pageTokens(p).map((t) => run.data[layer].keys[t][h]));
          const loaded = run.loaded(layer)[h].slice(sink, -window);
          const chosenPages = [...new Set(loaded.map((t) => Math.floor((t - sink) / pageSize)))];
          expect(loaded).toEqual(chosenPages.flatMap(pageTokens));
          expect(checkTopK(chosenPages, range(0, pageCount), bound, pages, SCORE_SLACK), `layer ${layer} head ${h}`).toBeNull();
        }
      }
      run.expectOutputOverLoaded();
    }
    const stats = run.cache.stats();
    expect(stats.bytes.index).toBeGreaterThan(0);
    expect(stats.timeMs.retrieve).toBeGreaterThan(0);
  });
});

describe('retrieval ivf and graph inside a cache', () => {
  // Unclustered random keys: ivf needs about half its lists for this recall (graph: its defaults).
  for (const [index, extra] of [['ivf', { lists: 64, probes: 32 }], ['graph', {}]] as const) {
    it(`${index}: top-k loads, exact attention over them, recall against flat`, () => {
      const sink = 4, window = 16, topK = 16;
      const run = new Run(GQA, { kind: 'retrieval', index, topK, sink, window, ...extra }, 31);
      run.prefill(600);
      let found = 0, total = 0;
      for (let s = 0; s < 4; s++) {
        run.step();
        const T = 601 + s;
        const { dynamic } = parts(T, sink, window);
        for (let layer = 0; layer < GQA.layers; layer++) {
          for (let h = 0; h < GQA.kvHeads; h++) {
            const loaded = run.loaded(layer)[h];
            expect(new Set(loaded).size).toBe(loaded.length);
            expect(loaded.length).toBe(sink + topK + window);
            const rows = groupRows(run.lastQ[layer], 1, GQA.qHeads, GQA.kvHeads, h, GQA.headDim);
            const exact = dynamic.map((p) => [p, groupScore(rows, run.data[layer].keys[p][h])] as const)
              .sort((a, b) => b[1] - a[1]).slice(0, topK).map(([p]) => p);
            const set = new Set(loaded);
            found += exact.filter((p) => set.has(p)).length;
            total += topK;
          }
        }
        run.expectOutputOverLoaded();
      }
      // In-distribution random data at default settings (measured ~0.9+; bound loose for seeds).
      expect(found / total).toBeGreaterThan(0.6);
      const stats = run.cache.stats();
      expect(stats.bytes.index).toBeGreaterThan(600 * GQA.kvHeads * GQA.layers * GQA.headDim * 4 * 0.9);
      expect(stats.timeMs.indexBuild).toBeGreaterThan(0);
    });
  }
});

describe('retrieval graph: training on the prefill queries', () => {
  it('the graph is built from an even sample of trainQueries of the prefill call\'s query rows: the same searches as a standalone index given them', () => {
    // A sparse graph searched with a small beam: what it finds depends on the training queries.
    const shape: Shape = { layers: 1, qHeads: 4, kvHeads: 2, headDim: 16 };
    const sink = 2, window = 6, topK = 6, trainQueries = 50, prompt = 400;
    const graph = { degree: 4, neighbors: 8, beam: 8 };
    const run = new Run(shape, { kind: 'retrieval', index: 'graph', topK, sink, window, trainQueries, ...graph }, 91);
    run.prefill(prompt);
    const { qHeads, kvHeads, headDim } = shape;
    const asRows = (rows: Float64Array[]) => {
      const out = new Float32Array(rows.length * headDim);
      rows.forEach((row, i) => out.set(row, i * headDim));
      return out;
    };
    const indexes = Array.from({ length: kvHeads }, (_, h) => {
      // The group's rows ordered (position, member); row floor(i * available / trainQueries) for i < trainQueries.
      const rows = groupRows(run.lastQ[0], prompt, qHeads, kvHeads, h, headDim);
      const training = Array.from({ length: trainQueries }, (_, i) => rows[Math.floor((i * rows.length) / trainQueries)]);
      const keys = new Float32Array((prompt - window - sink) * headDim);
      for (let p = sink; p < prompt - window; p++) keys.set(run.data[0].keys[p][h], (p - sink) * headDim);
      return createKeyIndex({ kind: 'graph', dim: headDim, keys, queries: asRows(training), ...graph });
    });
    for (let trial = 0; trial < 8; trial++) {
      const q = run.random.tensor(qHeads * headDim);
      run.cache.attend(0, q);
      for (let h = 0; h < kvHeads; h++) {
        const found = Array.from(indexes[h].search(asRows(groupRows(q, 1, qHeads, kvHeads, h, headDim)), topK).ids);
        const expected = found.map((id) => sink + id).sort((a, b) => a - b);
        expect(run.loaded(0)[h].slice(sink, -window), `trial ${trial} head ${h}`).toEqual(expected);
      }
    }
    for (const index of indexes) index.dispose();
  });
});

describe('loading policies: fork, stats and errors', () => {
  it('a decode call that fills the static part exactly (sink + window tokens) attends densely, then loading starts: every index kind and quest', () => {
    const sink = 2, window = 6, topK = 3;
    for (const select of [
      { kind: 'retrieval', index: 'flat', topK, sink, window },
      { kind: 'retrieval', index: 'ivf', topK, sink, window, lists: 2 },
      { kind: 'retrieval', index: 'graph', topK, sink, window },
      { kind: 'quest', pages: 2, pageSize: 2, sink, window },
    ] as SelectSpec[]) {
      const run = new Run(GQA, select, 15);
      run.prefill(sink + window - 3);
      for (let T = sink + window - 2; T <= sink + window + 5; T++) {
        run.step();
        expect(run.cache.tokens(0)).toBe(T);
        for (let h = 0; h < GQA.kvHeads; h++) {
          const loaded = run.loaded(1)[h];
          const label = `${select.kind} ${'index' in select ? select.index : ''} at ${T} tokens, head ${h}`;
          if (T <= sink + window) expect(loaded, label).toEqual(range(0, T));
          else if (select.kind === 'retrieval') expect(loaded.length, label).toBe(sink + Math.min(topK, T - sink - window) + window);
        }
        run.expectOutputOverLoaded();
      }
    }
  });

  it('a fork makes the same choices and outputs as its parent', () => {
    for (const select of [
      { kind: 'retrieval', index: 'graph', topK: 8, sink: 2, window: 8 },
      { kind: 'quest', pages: 3, pageSize: 4, sink: 2, window: 8 },
    ] as SelectSpec[]) {
      const run = new Run(GQA, select, 41);
      run.prefill(150);
      run.step();
      const child = run.cache.fork();
      open.push(child);
      const random = new Random(5);
      const q = random.tensor(GQA.qHeads * GQA.headDim), k = random.tensor(GQA.kvHeads * GQA.headDim), v = random.tensor(GQA.kvHeads * GQA.headDim);
      const a = run.cache.step(0, q, k, v), b = child.step(0, q, k, v);
      expect(Array.from(b)).toEqual(Array.from(a));
      expect(Array.from(child.loadedPositions(0, 1))).toEqual(Array.from(run.cache.loadedPositions(0, 1)));
      expect(child.stats().bytes.index).toBe(run.cache.stats().bytes.index);
    }
  });

  it('a fork shares the indexes copy-on-write: parent and child diverge, each as a cache that never forked', () => {
    for (const select of [
      { kind: 'retrieval', index: 'graph', topK: 8, sink: 2, window: 8 },
      { kind: 'retrieval', index: 'ivf', topK: 8, sink: 2, window: 8, lists: 8, probes: 3 },
    ] as SelectSpec[]) {
      // Three caches fed the same calls up to the fork (the graph build is seeded, so they agree).
      const [parent, parentTwin, childTwin] = [0, 1, 2].map(() => new Run(GQA, select, 83));
      for (const run of [parent, parentTwin, childTwin]) {
        run.prefill(140);
        run.step();
      }
      const child = parent.cache.fork();
      open.push(child);
      const random = new Random(9);
      const token = () => ({
        q: random.tensor(GQA.qHeads * GQA.headDim), k: random.tensor(GQA.kvHeads * GQA.headDim), v: random.tensor(GQA.kvHeads * GQA.headDim),
      });
      // Each step adds a key to the indexes (a token leaves the window); parent and child add different ones.
      for (let s = 0; s < 6; s++) {
        const a = token(), b = token();
        const fromParent = parent.cache.step(0, a.q, a.k, a.v), fromParentTwin = parentTwin.cache.step(0, a.q, a.k, a.v);
        const fromChild = child.step(0, b.q, b.k, b.v), fromChildTwin = childTwin.cache.step(0, b.q, b.k, b.v);
        expect(Array.from(fromParent), `${select.kind} step ${s}: parent`).toEqual(Array.from(fromParentTwin));
        expect(Array.from(fromChild), `${select.kind} step ${s}: child`).toEqual(Array.from(fromChildTwin));
        for (let h = 0; h < GQA.kvHeads; h++) {
          expect(Array.from(parent.cache.loadedPositions(0, h))).toEqual(Array.from(parentTwin.cache.loadedPositions(0, h)));
          expect(Array.from(child.loadedPositions(0, h))).toEqual(Array.from(childTwin.cache.loadedPositions(0, h)));
        }
      }
      expect(child.stats().bytes.index).toBe(childTwin.cache.stats().bytes.index);
    }
  });

  // A cache over a 16-bit store and one over f32 holding the same values (rounded to the store's
  // type): the index must make the same choices; its key bytes are what each test checks.
  const sameChoicesAsF32 = (index: 'graph' | 'ivf', store: 'f16' | 'bf16', seed: number, keyScale: number) => {
    const select = { kind: 'retrieval', index, topK: 8, sink: 2, window: 8 } as SelectSpec;
    const make = (kind: 'f16' | 'bf16' | 'f32') => {
      const cache = new KVCache({ ...GQA, device: 'cpu', pageTokens: 8, policy: { select, store: { kind } } });
      open.push(cache);
      return cache;
    };
    const [narrow, wide] = [make(store), make('f32')];
    const random = new Random(seed);
    const values = (n: number, scale = 1) => Float32Array.from(roundTo(random.tensor(n, scale), store));
    const { qHeads, kvHeads, headDim } = GQA;
    for (let layer = 0; layer < GQA.layers; layer++) {
      const [q, k, v] = [values(170 * qHeads * headDim), values(170 * kvHeads * headDim, keyScale), values(170 * kvHeads * headDim)];
      narrow.prefill(layer, q, k, v);
      wide.prefill(layer, q, k, v);
    }
    for (let s = 0; s < 5; s++) {
      for (let layer = 0; layer < GQA.layers; layer++) {
        const [q, k, v] = [values(qHeads * headDim), values(kvHeads * headDim, keyScale), values(kvHeads * headDim)];
        const a = narrow.step(layer, q, k, v), b = wide.step(layer, q, k, v);
        for (let h = 0; h < kvHeads; h++) {
          expect(Array.from(narrow.loadedPositions(layer, h)), `${store} step ${s} layer ${layer} head ${h}`).toEqual(Array.from(wide.loadedPositions(layer, h)));
        }
        expect(relativeL2(a, b)).toBeLessThan(1e-6);
      }
    }
    return { narrow, wide };
  };

  for (const index of ['graph', 'ivf'] as const) it(`${index} over an f16 store keeps f16 keys: the same choices as over an f32 store of the same values, half the key bytes`, () => {
    const { narrow, wide } = sameChoicesAsF32(index, 'f16', 17, 1);
    const keys = narrow.tokens(0) - 2 - 8;  // the indexed (dynamic) part per kv head and layer
    expect(wide.stats().bytes.index - narrow.stats().bytes.index).toBe(GQA.layers * GQA.kvHeads * keys * GQA.headDim * 2);
  });

  for (const index of ['graph', 'ivf'] as const) it(`${index} over a bf16 store keeps f32 keys (f16 would round keys below its normal range): the choices and index bytes of an f32 store of the same values`, () => {
    // Keys mostly below 2^-14, where f16 holds fewer bits than bf16.
    const { narrow, wide } = sameChoicesAsF32(index, 'bf16', 18, 1e-5);
    expect(narrow.stats().bytes.index).toBe(wide.stats().bytes.index);
  });

  it('keeps every token: bytes and kept counts are the full cache, loaded counts are the static part + k', () => {
    const run = new Run(GQA, { kind: 'retrieval', index: 'flat', topK: 5, sink: 4, window: 12 }, 51);
    run.prefill(100);
    run.step();
    const stats = run.cache.stats();
    expect(stats.tokens.kept).toBe(101);
    expect(stats.tokens.loaded).toBe(4 + 5 + 12);
    expect(stats.bytes.index).toBe(0);
    expect(stats.bytes.kv).toBe(101 * GQA.layers * GQA.kvHeads * GQA.headDim * 2 * 4);
  });

  it('async calls choose and attend as the sync ones; a rejected call changes nothing', async () => {
    for (const select of [
      { kind: 'retrieval', index: 'graph', topK: 8, sink: 2, window: 8 },
      { kind: 'quest', pages: 3, pageSize: 4, sink: 2, window: 8 },
    ] as SelectSpec[]) {
      const run = new Run(GQA, select, 71);
      run.prefill(160);
      const twin = run.cache.fork();
      open.push(twin);
      const random = new Random(6);
      for (let s = 0; s < 3; s++) {
        const q = random.tensor(GQA.qHeads * GQA.headDim), k = random.tensor(GQA.kvHeads * GQA.headDim), v = random.tensor(GQA.kvHeads * GQA.headDim);
        // A NaN query is refused before anything is appended or indexed.
        const bad = q.slice();
        bad[3] = NaN;
        expectError(() => twin.step(0, bad, k, v), 'ERR_VALUE');
        const sync = run.cache.step(0, q, k, v);
        const async = await twin.stepAsync(0, q, k, v);
        expect(Array.from(async)).toEqual(Array.from(sync));
        expect(Array.from(twin.loadedPositions(0, 1))).toEqual(Array.from(run.cache.loadedPositions(0, 1)));
      }
      expect(twin.tokens(0)).toBe(run.cache.tokens(0));
    }
  });

  it('rejects bad options with ERR_OPTION naming them', () => {
    const make = (select: unknown, extra: object = {}) => () =>
      new KVCache({ ...GQA, device: 'cpu', policy: { select: select as SelectSpec }, ...extra });
    expectError(make({ kind: 'quest' }), 'ERR_OPTION', /pages is required/);
    expectError(make({ kind: 'quest', pages: 0 }), 'ERR_OPTION', /pages/);
    expectError(make({ kind: 'quest', pages: 2, pageSize: 1.5 }), 'ERR_OPTION', /pageSize/);
    expectError(make({ kind: 'retrieval', index: 'hnsw' }), 'ERR_OPTION', /index/);
    expectError(make({ kind: 'retrieval', topK: 0 }), 'ERR_OPTION', /topK/);
    expectError(make({ kind: 'retrieval', index: 'graph', degree: 1 }), 'ERR_OPTION', /degree/);
    expectError(make({ kind: 'retrieval', index: 'ivf', lists: -1 }), 'ERR_OPTION', /lists/);
    expectError(make({ kind: 'retrieval', window: 0 }), 'ERR_OPTION', /window/);
    expectError(make({ kind: 'retrieval', efSearch: 4 }), 'ERR_OPTION', /efSearch/);
    expectError(make({ kind: 'actqkv', blockSize: 4, reprTopK: 5 }), 'ERR_OPTION', /reprTopK/);
    expectError(make({ kind: 'actqkv', temperature: 0 }), 'ERR_OPTION', /temperature/);
    expectError(() => new KVCache({ ...GQA, device: 'cpu', policy: { select: { kind: 'retrieval' }, store: { kind: 'kivi', bits: 4 } } }), 'ERR_OPTION', /kivi/);
  });

  it('save() / load() keep the tokens, the policy and its state: the loaded cache loads the same (test/loading-save.test.ts: every call after)', () => {
    for (const select of [
      { kind: 'retrieval', index: 'flat', topK: 6, sink: 1, window: 4 },
      { kind: 'quest', pages: 2, pageSize: 4, sink: 1, window: 4 },
      { kind: 'retrieval', index: 'ivf', topK: 6, sink: 1, window: 4, lists: 8, probes: 8 },
      { kind: 'actqkv', blocks: 2, blockSize: 4, sink: 1, window: 4, queryWindow: 8 },
    ] as SelectSpec[]) {
      const run = new Run(ODD, select, 61);
      run.prefill(60);
      run.step();
      const bytes = run.cache.save();
      const loaded = KVCache.load(bytes, { device: 'cpu' });
      open.push(loaded);
      expect(loaded.policy.select).toEqual(run.cache.policy.select);
      expect(loaded.tokens(0)).toBe(run.cache.tokens(0));
      const random = new Random(9);
      const q = random.tensor(ODD.qHeads * ODD.headDim), k = random.tensor(ODD.kvHeads * ODD.headDim), v = random.tensor(ODD.kvHeads * ODD.headDim);
      const a = run.cache.step(0, q, k, v), b = loaded.step(0, q, k, v);
      for (let h = 0; h < ODD.kvHeads; h++) expect(Array.from(loaded.loadedPositions(0, h))).toEqual(Array.from(run.cache.loadedPositions(0, h)));
      expect(relativeL2(b, a)).toBe(0);
    }
  });

  it('load() refuses a damaged loading-policy header with ERR_CORRUPT', () => {
    const run = new Run(ODD, { kind: 'quest', pages: 2, pageSize: 4, sink: 1, window: 4 }, 63);
    run.prefill(20);
    const bytes = run.cache.save();
    // The policy kind sits after the v2 header: magic 8, version 4, 5 x i32, i64, f32, 3 x i32, i64.
    const kindAt = 8 + 4 + 5 * 4 + 8 + 4 + 3 * 4 + 8;
    expect(bytes.readInt32LE(kindAt)).toBe(6);  // SelectKind::Quest
    const damaged = Buffer.from(bytes);
    damaged.writeInt32LE(99, kindAt);
    expectError(() => KVCache.load(damaged, { device: 'cpu' }), 'ERR_CORRUPT', /loading policy kind/);
    const flipped = Buffer.from(bytes);
    flipped.writeInt32LE(7, kindAt);  // a valid kind, but the checksum no longer matches
    expectError(() => KVCache.load(flipped, { device: 'cpu' }), 'ERR_CORRUPT', /checksum/);
  });

  it('load() refuses a saved option that the typed API refuses (an index seed past 2^31 - 1) with ERR_CORRUPT', () => {
    const run = new Run(ODD, { kind: 'retrieval', index: 'graph', topK: 8, sink: 1, window: 4, seed: 77 }, 64);
    run.prefill(40);
    const bytes = run.cache.save();
    // After the policy kind: 8 x i64, 2 x i32, 2 x f64, the index kind and 6 x i32, then the u64 seed.
    const seedAt = 64 + 4 + 8 * 8 + 2 * 4 + 2 * 8 + 4 + 6 * 4;
    expect(bytes.readBigUInt64LE(seedAt)).toBe(77n);
    const error = expectError(() => KVCache.load(resealed(bytes, (view) => view.setBigUint64(seedAt, 1n << 40n, true)), { device: 'cpu' }), 'ERR_CORRUPT', /seed/);
    expect(error.cause).toBeInstanceOf(KVSlimError);
  });
});
