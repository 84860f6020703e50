// Quest's page boxes and bounds computed by the backend (Backend::pageBoxes / pageBounds;
// native/cpu/page_bounds.cc, native/core/select/quest.cc) on the CPU. The cache's boxes grow as
// tokens leave the window, often a token at a time, so the last Quest page is extended across
// many calls. Checked at every call, per kv head: the loaded pages are exactly the top pages by
// pageBounds() (the standalone host PageBoxes, which the CPU backend matches bit for bit) over the
// keys as stored, and a top-k by the float64 bound (test/reference/loading.ts). Plus page sizes 1
// and larger than the dynamic part, f32 / f16 / bf16 stores, GQA and headDim 40, Quest pages that
// straddle store pages, fork with diverging appends, and stats().bytes.index.
import { describe, expect, it } from 'vitest';

import { KVCache, type SelectSpec, pageBounds } from '../lib/index.js';
import { Random } from './helpers/random.js';
import { disposedAfterEach } from './helpers/lifetime.js';
import { type Dtype, roundTo } from './reference/half.js';
import { checkTopK, groupRows, pageBound } from './reference/loading.js';

const SCORE_SLACK = 1e-4;

interface Shape { layers: number; qHeads: number; kvHeads: number; headDim: number }
const GQA: Shape = { layers: 2, qHeads: 8, kvHeads: 2, headDim: 32 };
const ODD: Shape = { layers: 1, qHeads: 6, kvHeads: 3, headDim: 40 };

interface Quest { sink: number; window: number; pageSize: number; pages: number }

const open = disposedAfterEach<KVCache>();

/** A quest cache and the keys it stores (rounded to the store dtype), per layer and kv head. */
class QuestRun {
  readonly cache: KVCache;
  readonly keys: number[][][][];  // [layer][kvHead][token] -> key as stored
  lastQ: Float32Array[] = [];

  constructor(readonly shape: Shape, readonly quest: Quest, readonly store: Dtype, readonly random: Random,
    pageTokens = 8, cache?: KVCache, keys?: number[][][][]) {
    this.cache = cache ?? new KVCache({
      ...shape, device: 'cpu', pageTokens, policy: { select: { kind: 'quest', ...quest } as SelectSpec, store: { kind: store } },
    });
    open.push(this.cache);
    this.keys = keys ?? Array.from({ length: shape.layers }, () => Array.from({ length: shape.kvHeads }, () => []));
  }

  fork(random: Random): QuestRun {
    return new QuestRun(this.shape, this.quest, this.store, random, 0, this.cache.fork(), this.keys.map((layer) => layer.map((head) => head.slice())));
  }

  #kv(layer: number, n: number, keyScale: number) {
    const { kvHeads, headDim } = this.shape;
    const k = this.random.tensor(n * kvHeads * headDim, keyScale);
    const v = this.random.tensor(n * kvHeads * headDim);
    const stored = roundTo(k, this.store);
    for (let t = 0; t < n; t++) {
      for (let h = 0; h < kvHeads; h++) {
        const base = (t * kvHeads + h) * headDim;
        this.keys[layer][h].push(Array.from(stored.subarray(base, base + headDim)));
      }
    }
    return { k, v };
  }

  prefill(n: number): void {
    for (let layer = 0; layer < this.shape.layers; layer++) {
      const q = this.random.tensor(n * this.shape.qHeads * this.shape.headDim);
      const { k, v } = this.#kv(layer, n, 1);
      this.cache.prefill(layer, q, k, v);
    }
  }

  append(n: number): void {
    for (let layer = 0; layer < this.shape.layers; layer++) {
      const { k, v } = this.#kv(layer, n, 1);
      this.cache.append(layer, k, v);
    }
  }

  /** A decode call of n tokens on every layer; keyScale scales the new keys. */
  step(n = 1, keyScale = 1): void {
    for (let layer = 0; layer < this.shape.layers; layer++) {
      const q = this.random.tensor(n * this.shape.qHeads * this.shape.headDim);
      const { k, v } = this.#kv(layer, n, keyScale);
      this.lastQ[layer] = q;
      this.cache.step(layer, q, k, v);
    }
  }

  /** Dynamic tokens of a layer (every layer holds the same count). */
  dynamic(): number {
    return Math.max(0, this.cache.tokens(0) - this.quest.window - this.quest.sink);
  }

  /** The last call (n queries) loaded, per kv head, exactly the pages the host bound ranks first. */
  expectLoads(where: string, n = 1): void {
    const { qHeads, kvHeads, headDim } = this.shape;
    const { sink, window, pageSize, pages } = this.quest;
    const T = this.cache.tokens(0);
    const dynamic = T - window - sink;
    for (let layer = 0; layer < this.shape.layers; layer++) {
      for (let h = 0; h < kvHeads; h++) {
        const loaded = Array.from(this.cache.loadedPositions(layer, h));
        const label = `${where} layer ${layer} kv head ${h}`;
        if (dynamic <= 0) {
          expect(loaded, label).toEqual(range(0, T));
          continue;
        }
        expect(loaded.slice(0, sink), label).toEqual(range(0, sink));
        expect(loaded.slice(loaded.length - window), label).toEqual(range(T - window, T));
        const chosen = loaded.slice(sink, loaded.length - window);
        const pageCount = Math.ceil(dynamic / pageSize);
        const pageTokens = (p: number) => range(sink + p * pageSize, sink + Math.min(dynamic, (p + 1) * pageSize));
        const chosenPages = [...new Set(chosen.map((t) => Math.floor((t - sink) / pageSize)))];
        expect(chosen, label).toEqual(chosenPages.flatMap(pageTokens));

        // The host PageBoxes over the stored keys: the same bits as the backend's boxes and bounds.
        const keys = new Float32Array(dynamic * headDim);
        for (let t = 0; t < dynamic; t++) keys.set(this.keys[layer][h][sink + t], t * headDim);
        const rowsF64 = groupRows(this.lastQ[layer], n, qHeads, kvHeads, h, headDim);
        const queries = new Float32Array(rowsF64.length * headDim);
        rowsF64.forEach((row, r) => queries.set(row, r * headDim));
        const bounds = pageBounds({ keys, queries, dim: headDim, pageSize });
        expect(bounds.length, label).toBe(pageCount);
        const best = range(0, pageCount).sort((a, b) => bounds[b] - bounds[a]).slice(0, pages).sort((a, b) => a - b);
        expect(chosenPages, label).toEqual(best);

        const memo = new Map<number, number>();
        const bound = (p: number) => {
          if (!memo.has(p)) memo.set(p, pageBound(rowsF64, pageTokens(p).map((t) => this.keys[layer][h][t])));
          return memo.get(p) as number;
        };
        expect(checkTopK(chosenPages, range(0, pageCount), bound, pages, SCORE_SLACK), label).toBeNull();
      }
    }
  }

  /** lo and hi of every Quest page of every (layer, kv head), in f32. */
  expectIndexBytes(): void {
    const { layers, kvHeads, headDim } = this.shape;
    const pageCount = Math.ceil(this.dynamic() / this.quest.pageSize);
    expect(this.cache.stats().bytes.index).toBe(layers * kvHeads * pageCount * headDim * 2 * 4);
  }
}

function range(from: number, to: number): number[] {
  return Array.from({ length: Math.max(0, to - from) }, (_, i) => from + i);
}

describe('quest on the backend: boxes extended call by call', () => {
  const cases: Array<{ name: string; shape: Shape; quest: Quest; store: Dtype; prompt: number }> = [
    { name: 'GQA, f32, pages of 5 across store pages of 8', shape: GQA, quest: { sink: 3, window: 6, pageSize: 5, pages: 3 }, store: 'f32', prompt: 61 },
    { name: 'GQA, f16, pages of 16', shape: GQA, quest: { sink: 2, window: 8, pageSize: 16, pages: 2 }, store: 'f16', prompt: 97 },
    { name: 'headDim 40, bf16, pages of 7', shape: ODD, quest: { sink: 1, window: 5, pageSize: 7, pages: 4 }, store: 'bf16', prompt: 80 },
    { name: 'headDim 40, f16, pages of 1', shape: ODD, quest: { sink: 2, window: 4, pageSize: 1, pages: 9 }, store: 'f16', prompt: 40 },
    { name: 'GQA, bf16, one page larger than the dynamic part', shape: GQA, quest: { sink: 4, window: 8, pageSize: 512, pages: 1 }, store: 'bf16', prompt: 70 },
    { name: 'headDim 40, f32, a prompt inside the static part', shape: ODD, quest: { sink: 4, window: 12, pageSize: 3, pages: 2 }, store: 'f32', prompt: 10 },
  ];
  for (const [index, c] of cases.entries()) {
    it(c.name, () => {
      const run = new QuestRun(c.shape, c.quest, c.store, new Random(70_000 + index));
      run.prefill(c.prompt);
      // Token by token: the last page fills up and new pages start, across many calls.
      for (let s = 0; s < 2 * c.quest.pageSize + 7 && s < 40; s++) {
        run.step();
        run.expectLoads(`step ${s}`);
      }
      run.expectIndexBytes();
      // Several tokens at once (one call of 3 queries inside the window; an append without queries).
      run.step(3);
      run.expectLoads('step of 3', 3);
      run.append(11);
      run.step();
      run.expectLoads('step after append');
      run.expectIndexBytes();
    });
  }

  it('a prompt boxed in one call spans many pages; the next calls extend its partial last page', () => {
    const run = new QuestRun({ layers: 1, qHeads: 32, kvHeads: 8, headDim: 128 }, { sink: 4, window: 32, pageSize: 16, pages: 8 }, 'f16',
      new Random(70_100), 64);
    run.prefill(3000);  // 2964 dynamic tokens: 185 pages, the last one partial
    for (let s = 0; s < 10; s++) {
      run.step();
      run.expectLoads(`step ${s}`);
    }
    run.expectIndexBytes();
  });

  it('a prompt boxed by several tasks at once: every task boxes its last page too', () => {
    // The CPU backend boxes 4096 tokens of whole Quest pages per task: pages of 256, 16 a task.
    // 4980 dynamic tokens are 20 pages (the last partial) in two tasks; all but one page loaded,
    // so a page whose box were missing or stale (the first task's last, page 15) would show.
    const run = new QuestRun(GQA, { sink: 4, window: 16, pageSize: 256, pages: 19 }, 'f32', new Random(70_200), 64);
    run.prefill(5000);
    for (let s = 0; s < 3; s++) {
      run.step();
      run.expectLoads(`step ${s}`);
    }
    run.expectIndexBytes();
  });
});

describe('quest on the backend: fork', () => {
  for (const store of ['f32', 'f16'] as const) {
    it(`fork then diverging appends: each side boxes only its own keys (${store})`, () => {
      const quest = { sink: 2, window: 4, pageSize: 6, pages: 2 };
      const parent = new QuestRun(GQA, quest, store, new Random(71_000));
      parent.prefill(45);  // 39 dynamic tokens: the last page is partial
      parent.step();
      parent.expectLoads('parent before the fork');
      const child = parent.fork(new Random(71_001));
      // The child's keys are large: leaking into the parent's boxes would lift their bounds.
      for (let s = 0; s < 14; s++) {
        child.step(1, 30);
        child.expectLoads(`child step ${s}`);
        parent.step();
        parent.expectLoads(`parent step ${s}`);
        child.expectIndexBytes();
        parent.expectIndexBytes();
      }
      // And the other way round: the parent's large keys stay out of the child's boxes.
      for (let s = 0; s < 8; s++) {
        parent.step(1, 30);
        parent.expectLoads(`parent large step ${s}`);
        child.step();
        child.expectLoads(`child after parent step ${s}`);
      }
    });
  }

  it('a fork of a fork, and a fork whose parent is disposed, keep their own boxes', () => {
    const quest = { sink: 1, window: 3, pageSize: 4, pages: 2 };
    const parent = new QuestRun(ODD, quest, 'f16', new Random(72_000));
    parent.prefill(30);
    const child = parent.fork(new Random(72_001));
    const grandchild = child.fork(new Random(72_002));
    child.step(1, 20);
    grandchild.step();
    parent.cache.dispose();
    for (let s = 0; s < 6; s++) {
      child.step();
      child.expectLoads(`child step ${s}`);
      grandchild.step(1, 20);
      grandchild.expectLoads(`grandchild step ${s}`);
    }
  });
});
