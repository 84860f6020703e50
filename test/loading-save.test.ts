// save() / KVCache.load() of caches with a loading policy. Quest and the flat scan choose from the
// keys alone and save as format version 5; ivf, graph and actqkv also save their state (format
// version 8: the graph's links as its training queries shaped them, the ivf's centroids and lists,
// ActQKV's query statistics, probe, entropy history and block representatives), so a loaded cache
// loads the same tokens and gives bit-identical outputs at every later call. Damaged state with a
// valid checksum gives ERR_CORRUPT or a cache that still works, never a crash.
import { describe, expect, it } from 'vitest';

import { KVCache, type KVCacheOptions, type SelectSpec } from '../lib/index.js';
import { Random } from './helpers/random.js';
import { type Heads, randomTokens } from './helpers/tokens.js';
import { expectError } from './helpers/errors.js';
import { expectIdentical } from './helpers/outputs.js';
import { loadEveryDamagedByte, resealed } from './helpers/saved.js';
import { disposedAfterEach, held } from './helpers/lifetime.js';
import { dot, groupRows } from './reference/loading.js';

const GQA: Heads & { layers: number } = { layers: 2, qHeads: 8, kvHeads: 2, headDim: 32 };
// Header of versions 5 and 8 (cache_serialize.cc): the loading policy's fields end here; version 8's
// u64 state size follows, then the state.
const STATE_SIZE_AT = 192;
const STATE_AT = STATE_SIZE_AT + 8;

const open = disposedAfterEach<KVCache>();
// `npm run test:gpu` (KVSLIM_TEST_DEVICE=cuda) runs the exactness checks on caches living on the GPU.
const DEVICE = process.env.KVSLIM_TEST_DEVICE === 'cuda' ? 'cuda' : 'cpu';

const cacheOf = (select: SelectSpec, extra: Partial<KVCacheOptions> = {}): KVCache =>
  held(open, new KVCache({ ...GQA, device: DEVICE, pageTokens: 4, ...extra, policy: { ...extra.policy, select } }));
const load = (bytes: Buffer): KVCache => held(open, KVCache.load(bytes, { device: DEVICE }));

type Op = ['prefill' | 'step' | 'append' | 'attend', number];
const steps = (count: number): Op[] => Array.from({ length: count }, () => ['step', 1]);

/** The same call on every layer of every cache; outputs and loaded tokens must be identical. */
function drive(caches: KVCache[], random: Random, ops: Op[], shape = GQA): void {
  for (const [kind, n] of ops) {
    for (let layer = 0; layer < shape.layers; layer++) {
      const t = randomTokens(random, shape, n);
      const outputs = caches.map((cache) => {
        if (kind === 'append') {
          cache.append(layer, t.k, t.v);
          return null;
        }
        if (kind === 'attend') return cache.attend(layer, t.q.subarray(0, shape.qHeads * shape.headDim));
        return kind === 'prefill' ? cache.prefill(layer, t.q, t.k, t.v) : cache.step(layer, t.q, t.k, t.v);
      });
      const what = `${kind}(${n}) on layer ${layer}`;
      for (let i = 1; i < caches.length; i++) {
        if (outputs[0] !== null) expectIdentical(outputs[i]!, outputs[0], `${what}, cache ${i}`);
        expect(caches[i].tokens(layer), what).toBe(caches[0].tokens(layer));
        for (let h = 0; h < shape.kvHeads; h++) {
          expect(Array.from(caches[i].loadedPositions(layer, h)), `${what}: loaded tokens of head ${h}, cache ${i}`)
            .toEqual(Array.from(caches[0].loadedPositions(layer, h)));
        }
      }
    }
  }
}

describe('save() / load() with a loading policy: the loaded cache goes on exactly as the saved one', () => {
  const cases: Array<[string, SelectSpec, Partial<KVCacheOptions>, number, Op[], Op[]]> = [
    ['flat (version 5)', { kind: 'retrieval', index: 'flat', topK: 6, sink: 1, window: 4 }, {}, 5,
      [['prefill', 40], ...steps(3)], [...steps(4), ['attend', 1]]],
    ['quest (version 5)', { kind: 'quest', pages: 3, pageSize: 4, sink: 2, window: 6 }, {}, 5,
      [['append', 30], ...steps(3)], [...steps(4), ['prefill', 5]]],
    ['ivf, incremental lists after its first centroids', { kind: 'retrieval', index: 'ivf', topK: 6, sink: 1, window: 4, lists: 6, probes: 2 }, {}, 8,
      [['append', 30], ...steps(2), ['append', 25], ...steps(3)], [...steps(6), ['append', 9], ...steps(2)]],
    ['graph trained on prefill queries, bf16 store', { kind: 'retrieval', index: 'graph', topK: 8, sink: 2, window: 6, degree: 6, neighbors: 5 },
      { policy: { store: { kind: 'bf16' } } }, 8, [['append', 50], ['prefill', 30], ...steps(4)], [...steps(8), ['prefill', 6], ...steps(2)]],
    ['graph from keys alone, f16 store', { kind: 'retrieval', index: 'graph', topK: 5, sink: 1, window: 5, degree: 4 }, {}, 8,
      [['append', 60], ...steps(3)], [...steps(5), ['append', 7], ['attend', 1]]],
    ['actqkv, statistics past warm-up, f16 representatives', { kind: 'actqkv', blocks: 2, blockSize: 4, reprTopK: 2, sink: 1, window: 4, queryWindow: 4 },
      {}, 8, [['prefill', 24], ...steps(10)], [...steps(9), ['prefill', 5], ['append', 3], ...steps(3)]],
    ['actqkv, entropy history full (the budget follows the entropies), f32 store', { kind: 'actqkv', blocks: 3, blockSize: 2, sink: 1, window: 3, queryWindow: 3 },
      { policy: { store: { kind: 'f32' } } }, 8, [['prefill', 20], ...steps(101)], steps(6)],
  ];
  for (const [label, select, extra, version, before, after] of cases) {
    it(label, () => {
      const original = cacheOf(select, extra);
      const random = new Random(label.length * 11 + 3);
      drive([original], random, before);
      const saved = original.save();
      expect(saved.readUInt32LE(8), 'format version').toBe(version);
      const loaded = load(saved);
      expect(loaded.policy.select).toEqual(original.policy.select);
      // Quest's page bounds follow from the keys: a version 5 cache builds them at its first decode call.
      if (version === 8) expect(loaded.stats().bytes.index, 'index bytes').toBe(original.stats().bytes.index);
      expect(load(loaded.save()).save().equals(saved), 'save(load(save())) is the same bytes').toBe(true);
      // A fork of the loaded cache too: forks share the loaded indexes copy-on-write.
      const fork = loaded.fork();
      open.push(fork);
      drive([original, loaded, fork], random, after);
      expect(loaded.save().equals(original.save())).toBe(true);
    });
  }

  it('the saved graph enters at its busiest hub: the key that is the best key of the most training (prefill) query rows', () => {
    const select: SelectSpec = { kind: 'retrieval', index: 'graph', topK: 4, sink: 1, window: 3, neighbors: 5 };
    const cache = cacheOf(select, { policy: { store: { kind: 'f32' } } });
    const random = new Random(29);
    const prompt = 60;
    const tokens = Array.from({ length: GQA.layers }, () => randomTokens(random, GQA, prompt));
    tokens.forEach((t, layer) => cache.prefill(layer, t.q, t.k, t.v));
    const saved = cache.save();
    // Retrieval state: u64 count + i64 extent per (layer, kv head), then per head u8 present, i64
    // size, u64 bytes and the graph structure (i32 degree, u32 entry, ...).
    let at = STATE_AT + 8 + 8 * GQA.layers * GQA.kvHeads;
    const { qHeads, kvHeads, headDim } = GQA;
    for (let layer = 0; layer < GQA.layers; layer++) {
      for (let h = 0; h < kvHeads; h++) {
        expect(saved[at], `layer ${layer} head ${h}: present`).toBe(1);
        const keys = Number(saved.readBigInt64LE(at + 1));
        expect(keys).toBe(prompt - 1 - 3);
        const entry = saved.readUInt32LE(at + 17 + 4);
        // Float64 reference: every query row of the group (fewer than trainQueries) votes for its best key (ties: the lower id).
        const { q, k } = tokens[layer];
        const votes = new Array<number>(keys).fill(0);
        for (const query of groupRows(q, prompt, qHeads, kvHeads, h, headDim)) {
          let best = 0, bestScore = -Infinity;
          for (let id = 0; id < keys; id++) {
            const score = dot(query, k.subarray(((1 + id) * kvHeads + h) * headDim, ((1 + id) * kvHeads + h + 1) * headDim));
            if (score > bestScore) bestScore = score, best = id;
          }
          votes[best]++;
        }
        const busiest = votes.indexOf(Math.max(...votes));
        expect(entry, `layer ${layer} head ${h}: entry (votes ${votes[entry]} vs ${votes[busiest]})`).toBe(busiest);
        at += 1 + 8 + 8 + Number(saved.readBigUInt64LE(at + 9));
      }
    }
  });

  it('a version 5 save of a graph cache (no state) still loads, and indexes again from its keys', () => {
    const select: SelectSpec = { kind: 'retrieval', index: 'graph', topK: 5, sink: 1, window: 5, degree: 4 };
    const original = cacheOf(select);
    const random = new Random(17);
    drive([original], random, [['append', 40], ...steps(2)]);
    const saved = original.save();
    const stateBytes = Number(saved.readBigUInt64LE(STATE_SIZE_AT));
    // Version 5: the same bytes without the state's size and the state.
    const v5 = Buffer.concat([saved.subarray(0, STATE_SIZE_AT), saved.subarray(STATE_AT + stateBytes)]);
    const loaded = load(resealed(v5, (view) => view.setUint32(8, 5, true)));
    expect(loaded.tokens(0)).toBe(original.tokens(0));
    const t = randomTokens(random, GQA, 1);
    expect(loaded.step(0, t.q, t.k, t.v).every(Number.isFinite)).toBe(true);
    expect(loaded.loadedPositions(0, 0).length).toBeGreaterThan(0);
  });
});

describe('load() of damaged loading-policy state (a valid checksum): ERR_CORRUPT or a working cache, never a crash', () => {
  // A small shape keeps every-byte damage quick (ActQKV's query state is [queryWindow, qHeads x headDim] per layer).
  const SMALL: Heads & { layers: number } = { layers: 2, qHeads: 4, kvHeads: 2, headDim: 8 };
  function savedOf(select: SelectSpec, ops: Op[]): Buffer {
    const cache = new KVCache({ ...SMALL, device: 'cpu', pageTokens: 8, policy: { select } });
    open.push(cache);
    drive([cache], new Random(23), ops, SMALL);
    return cache.save();
  }
  const graph = () => savedOf({ kind: 'retrieval', index: 'graph', topK: 4, sink: 1, window: 3, degree: 4, neighbors: 3 }, [['append', 20], ['prefill', 10], ...steps(2)]);
  const ivf = () => savedOf({ kind: 'retrieval', index: 'ivf', topK: 4, sink: 1, window: 3, lists: 3 }, [['append', 24], ...steps(2)]);
  const actqkv = () => savedOf({ kind: 'actqkv', blocks: 2, blockSize: 4, reprTopK: 2, sink: 1, window: 3, queryWindow: 2 }, [['prefill', 20], ...steps(3)]);

  it('named damage: extents, links, lists, the query ring, candidates, a truncated state', () => {
    const g = graph();
    // Retrieval state: u64 count + i64 extent per (layer, kv head), then per head u8 present, i64 size, u64 bytes, structure.
    expectError(() => load(resealed(g, (view) => view.setBigInt64(STATE_AT + 8, 10n ** 9n, true))), 'ERR_CORRUPT', /index extent/);
    const head0 = STATE_AT + 8 + 8 * SMALL.layers * SMALL.kvHeads;
    const structure = head0 + 1 + 8 + 8;
    // Graph structure: i32 degree, u32 entry, u64 n, u32 out-degrees [n], u64 n * degree, u32 links.
    const n = Number(g.readBigInt64LE(head0 + 1));
    const linksAt = structure + 4 + 4 + 8 + 4 * n + 8;
    expectError(() => load(resealed(g, (view) => view.setUint32(linksAt, n, true))), 'ERR_CORRUPT', /link is out of range/);
    expectError(() => load(resealed(g, (view) => view.setUint32(structure + 4, n, true))), 'ERR_CORRUPT', /entry is out of range/);
    expectError(() => load(resealed(g, (view) => view.setInt32(structure, 5, true))), 'ERR_CORRUPT', /degree/);

    const v = ivf();
    const ivfHead = STATE_AT + 8 + 8 * SMALL.layers * SMALL.kvHeads;
    const ivfStructure = ivfHead + 1 + 8 + 8;
    // Ivf structure: i32 requested, i32 lists, u64 lists * dim, centroids, u64 n, u32 list of each key.
    const lists = v.readInt32LE(ivfStructure + 4);
    const listOfAt = ivfStructure + 8 + 8 + 4 * lists * SMALL.headDim + 8;
    expectError(() => load(resealed(v, (view) => view.setUint32(listOfAt, lists, true))), 'ERR_CORRUPT', /key list is out of range/);
    expectError(() => load(resealed(v, (view) => view.setFloat32(ivfStructure + 16, NaN, true))), 'ERR_CORRUPT', /centroid is not finite/);

    const a = actqkv();
    // ActQKV state: the extents, then layer 0's ring (u64 size + floats), then its i64 count.
    const ringAt = STATE_AT + 8 + 8 * SMALL.layers * SMALL.kvHeads;
    const countAt = ringAt + 8 + 4 * Number(a.readBigUInt64LE(ringAt));
    expectError(() => load(resealed(a, (view) => view.setBigInt64(countAt, 3n, true))), 'ERR_CORRUPT', /query state is inconsistent/);
    expectError(() => load(resealed(a, (view) => view.setFloat32(ringAt + 8, Infinity, true))), 'ERR_CORRUPT', /not finite/);
    // The state's size beyond the buffer, or shorter than the state.
    expectError(() => load(resealed(a, (view) => view.setBigUint64(STATE_SIZE_AT, 1n << 40n, true))), 'ERR_CORRUPT', /state is truncated/);
    expectError(() => load(resealed(a, (view) => view.setBigUint64(STATE_SIZE_AT, view.getBigUint64(STATE_SIZE_AT, true) - 8n, true))), 'ERR_CORRUPT');
  });

  it('named damage: a retrieval head without its index, a graph parent past the keys, an ivf of another requested list count, an extent below the sinks, ActQKV candidates past the extent and a step layer past the layers', () => {
    const g = graph();
    const stateBytes = (saved: Buffer) => Number(saved.readBigUInt64LE(STATE_SIZE_AT));
    // Head 0 of the graph state (u8 present, i64 size, u64 bytes, structure) saved as absent
    // while its extent still reaches past the sinks: its tokens would have no index to search.
    const head0 = STATE_AT + 8 + 8 * SMALL.layers * SMALL.kvHeads;
    expect(Number(g.readBigInt64LE(STATE_AT + 8))).toBeGreaterThan(1);
    const removed = 8 + 8 + Number(g.readBigUInt64LE(head0 + 1 + 8));
    const absent = Buffer.concat([g.subarray(0, head0), Buffer.from([0]), g.subarray(head0 + 1 + removed)]);
    expectError(() => load(resealed(absent, (view) => view.setBigUint64(STATE_SIZE_AT, BigInt(stateBytes(g) - removed), true))),
      'ERR_CORRUPT', /a retrieval head lacks its index/);

    // The graph structure ends with the parents (u32 per key): one past the keys is out of range.
    const structureEnd = head0 + 1 + 8 + 8 + Number(g.readBigUInt64LE(head0 + 1 + 8));
    const keys = Number(g.readBigInt64LE(head0 + 1));
    expectError(() => load(resealed(g, (view) => view.setUint32(structureEnd - 4, keys, true))), 'ERR_CORRUPT', /parent is out of range/);

    const v = ivf();
    // The ivf structure starts with the requested list count (3), which must be the policy's.
    const ivfStructure = head0 + 1 + 8 + 8;
    expect(v.readInt32LE(ivfStructure)).toBe(3);
    expectError(() => load(resealed(v, (view) => view.setInt32(ivfStructure, 2, true))), 'ERR_CORRUPT', /requested list count/);

    const a = actqkv();
    // An extent below the sinks (sink 1) is out of range, as one past the dynamic part is.
    expectError(() => load(resealed(a, (view) => view.setBigInt64(STATE_AT + 8, 0n, true))), 'ERR_CORRUPT', /an index extent is out of range/);
    // The state ends with the last head's candidate positions (u64 count, i64 each), the i32 step layer and the i64 budget.
    const end = STATE_AT + stateBytes(a) - 12;
    expect([1, 2].some((m) => a.readBigUInt64LE(end - 8 * m - 8) === BigInt(m)), 'candidate positions before the step layer').toBe(true);
    const extent = a.readBigInt64LE(STATE_AT + 8 * (SMALL.layers * SMALL.kvHeads));  // the last head's
    expectError(() => load(resealed(a, (view) => view.setBigInt64(end - 8, extent, true))), 'ERR_CORRUPT', /candidate positions are out of range/);
    expectError(() => load(resealed(a, (view) => view.setInt32(end, SMALL.layers, true))), 'ERR_CORRUPT', /step layer is out of range/);
    expectError(() => load(resealed(a, (view) => view.setInt32(end, -1, true))), 'ERR_CORRUPT', /step layer is out of range/);
  });

  // Every byte of the state, changed (its checksum resealed): a refusal must be ERR_CORRUPT, and a
  // cache that loads must work (finite outputs, or a KVSlimError).
  for (const [name, make] of [['graph', graph], ['ivf', ivf], ['actqkv', actqkv]] as const) {
    it(`${name}: every state byte changed`, () => {
      const saved = make();
      const stateBytes = Number(saved.readBigUInt64LE(STATE_SIZE_AT));
      const t = randomTokens(new Random(5), SMALL, 1);
      const { refused } = loadEveryDamagedByte(saved, STATE_AT, STATE_AT + stateBytes, (cache) => {
        for (let layer = 0; layer < SMALL.layers; layer++) expect(cache.step(layer, t.q, t.k, t.v).every(Number.isFinite)).toBe(true);
      });
      expect(refused, 'some damage is refused').toBeGreaterThan(0);
    });
  }
});
