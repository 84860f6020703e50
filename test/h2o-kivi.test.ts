// H2O over a KIVI store (policy { select: h2o, store: kivi }). Until a layer's first call with
// queries (prefill or step) its tokens stay in f16, and that call's H2O evicts exactly as over an
// f16 store (test/reference/select.ts); then the kept tokens move into the KIVI store in position
// order. From then on the same
// rule decides on the probabilities of the quantized attention. An evicted token is masked, and
// its row stays quantized until the layer is compacted (compactionDue below): the records of the
// tokens before a head's first eviction stay, every later kept row, as attention read it, is
// requantized by the flush rules.
// The reference follows each step in float64:
//   - SelectMirror keeps the positions and the scores, reading rows through storedRows;
//   - a KiviMirror per layer holds what the KIVI store holds, by KIVI index;
//   - indexPositions maps each KIVI index to its position.
// KVSLIM_KIVI_MASS_FLOATS (read at the first such call) splits multi-query calls into chunks.
import { describe, expect, it } from 'vitest';

import { KVCache } from '../lib/index.js';
import { Random } from './helpers/random.js';
import { type Tokens, randomTokens } from './helpers/tokens.js';
import { expectError } from './helpers/errors.js';
import { expectClose, expectIdentical } from './helpers/outputs.js';
import { MASK_SIZE_AT, resealed } from './helpers/saved.js';
import { disposedAfterEach } from './helpers/lifetime.js';
import { type KiviConfig, KiviMirror } from './reference/kivi.js';
import { type SelectShape, SelectMirror } from './reference/select.js';

// As in kivi-select.test.ts: the kernels dequantize as the reference does (f32 rounding only).
const TOLERANCE = 1e-4;
const DEVICE = process.env.KVSLIM_TEST_DEVICE === 'cuda' ? 'cuda' : 'cpu';

process.env.KVSLIM_KIVI_MASS_FLOATS = '4096';

const GQA: SelectShape = { layers: 2, qHeads: 8, kvHeads: 2, headDim: 64 };
const MHA: SelectShape = { layers: 1, qHeads: 4, kvHeads: 4, headDim: 32 };

type Op = ['prefill' | 'step' | 'append', number];
const steps = (count: number, n = 1): Op[] => Array.from({ length: count }, () => ['step', n]);

const open = disposedAfterEach<KVCache>();

interface H2O {
  kind: 'h2o';
  budget: number;
  recent: number;
}

/** One layer once in the KIVI store: what the store holds by KIVI index, and each index's position per kv head. */
interface Quantized {
  kivi: KiviMirror;
  positions: number[][];
  /** Tokens whose flush attention sees: the count before the call that is attending. */
  flushedAt: number;
}

/**
 * The rule: at most due = max(residual, budget / 8) evicted tokens per head, and from due / 2 at
 * the first multiple of due / 2 tokens past the layer's phase (layer x (due / 2) / layers), so
 * that the layers compact in turn.
 */
function compactionDue(evicted: number, tokens: number, n: number, layer: number, layers: number, config: KiviConfig, spec: H2O): boolean {
  const due = Math.max(config.residual, Math.floor(spec.budget / 8));
  const period = Math.max(1, Math.floor(due / 2));
  const phase = Math.floor((layer * period) / layers);
  const boundary = Math.floor((tokens + phase) / period) > Math.floor((tokens + phase - n) / period);
  return evicted >= due || (evicted >= period && boundary);
}

class Pair {
  readonly cache: KVCache;
  readonly select: SelectMirror;
  readonly layers: Array<Quantized | null>;
  /** Every token appended per layer, in order (the f32 values the engine received). */
  readonly history: Array<{ k: number[]; v: number[] }>;
  readonly random: Random;
  /** Compactions seen, and [tokens, layer] of each; the most evicted tokens a head held. */
  compactions = 0;
  readonly compacted: Array<[number, number]> = [];
  maxEvicted = 0;

  constructor(
    readonly shape: SelectShape,
    readonly spec: H2O,
    readonly config: KiviConfig,
    seed: number,
    from?: Pair,
  ) {
    this.random = new Random(seed);
    if (from) {
      this.cache = from.cache.fork();
      this.select = from.select.fork();
      this.layers = from.layers.map((q) => q && { kivi: q.kivi.fork(), positions: q.positions.map((p) => [...p]), flushedAt: q.flushedAt });
      this.history = from.history.map((h) => ({ k: [...h.k], v: [...h.v] }));
    } else {
      this.cache = new KVCache({ ...shape, device: DEVICE, pageTokens: 16, policy: { select: spec, store: { kind: 'kivi', ...config } } });
      this.select = new SelectMirror(shape, spec);
      this.layers = Array.from({ length: shape.layers }, () => null);
      this.history = Array.from({ length: shape.layers }, () => ({ k: [], v: [] }));
    }
    open.push(this.cache);
    this.select.storedRows = (layer) => this.#stored(layer);
  }

  fork(seed: number): Pair {
    return new Pair(this.shape, this.spec, this.config, seed, this);
  }

  tokens(n: number): Tokens {
    return randomTokens(this.random, this.shape, n);
  }

  /** One call on one layer: its output, kept positions, token count and bytes against the reference. */
  call(kind: Op[0], layer: number, t: Tokens): Float32Array | null {
    const { kvHeads } = this.shape;
    const quantized = this.layers[layer];
    const first = this.select.tokens(layer);
    this.history[layer].k.push(...t.k);
    this.history[layer].v.push(...t.v);
    if (quantized) {
      // The call's tokens enter the residual, then attend in f16 (flushed only after).
      quantized.flushedAt = quantized.kivi.tokens;
      quantized.kivi.append(t.k, t.v);
      for (let h = 0; h < kvHeads; h++) for (let i = 0; i < t.n; i++) quantized.positions[h].push(first + i);
    }
    let actual: Float32Array | null = null;
    if (kind === 'append') {
      this.cache.append(layer, t.k, t.v);
      this.select.append(layer, t.k, t.v);
    } else {
      actual = kind === 'prefill' ? this.cache.prefill(layer, t.q, t.k, t.v) : this.cache.step(layer, t.q, t.k, t.v);
      const expected = kind === 'prefill' ? this.select.prefill(layer, t.q, t.k, t.v) : this.select.step(layer, t.q, t.k, t.v);
      expectClose(actual, expected, `${kind} of ${t.n} on layer ${layer}`, TOLERANCE);
    }
    if (quantized) {
      quantized.flushedAt = quantized.kivi.tokens;
      this.#compactIfDue(layer, quantized, t.n);
    } else if (kind !== 'append') {
      this.#move(layer);
    }
    for (let h = 0; h < kvHeads; h++) {
      expect(Array.from(this.cache.positions(layer, h)), `layer ${layer} kv head ${h} positions`).toEqual(this.select.positions(layer, h));
    }
    expect(this.cache.tokens(layer)).toBe(this.select.tokens(layer));
    this.#checkBytes(layer);
    return actual;
  }

  run(ops: Op[]): void {
    for (const [kind, n] of ops) {
      for (let layer = 0; layer < this.shape.layers; layer++) this.call(kind, layer, this.tokens(n));
    }
  }

  /** Rows by position as the KIVI store holds them (positions it does not hold: zeros, never read). */
  #stored(layer: number): { k: Float64Array; v: Float64Array } | undefined {
    const quantized = this.layers[layer];
    if (!quantized) return undefined;
    const { kvHeads, headDim } = this.shape;
    const width = kvHeads * headDim;
    const held = quantized.kivi.stored(quantized.flushedAt);
    const T = this.select.tokens(layer);
    const k = new Float64Array(T * width), v = new Float64Array(T * width);
    for (let h = 0; h < kvHeads; h++) {
      quantized.positions[h].forEach((position, index) => {
        const from = index * width + h * headDim, to = position * width + h * headDim;
        k.set(held.k.subarray(from, from + headDim), to);
        v.set(held.v.subarray(from, from + headDim), to);
      });
    }
    return { k, v };
  }

  /** The first call with queries moves the kept tokens, in position order, into the KIVI store. */
  #move(layer: number): void {
    const { kvHeads, headDim } = this.shape;
    const width = kvHeads * headDim;
    const positions = Array.from({ length: kvHeads }, (_, h) => this.select.positions(layer, h));
    const { k, v } = this.history[layer];
    const count = positions[0].length;
    const keys = new Float32Array(count * width), values = new Float32Array(count * width);
    for (let h = 0; h < kvHeads; h++) {
      positions[h].forEach((position, index) => {
        for (let d = 0; d < headDim; d++) {
          keys[index * width + h * headDim + d] = k[position * width + h * headDim + d];
          values[index * width + h * headDim + d] = v[position * width + h * headDim + d];
        }
      });
    }
    const kivi = new KiviMirror(this.shape, this.config);
    kivi.append(keys, values);
    this.layers[layer] = { kivi, positions, flushedAt: kivi.tokens };
  }

  /** When compactionDue, the kept rows as read are requantized. */
  #compactIfDue(layer: number, quantized: Quantized, n: number): void {
    const { kvHeads, headDim } = this.shape;
    const width = kvHeads * headDim;
    const kept = Array.from({ length: kvHeads }, (_, h) => new Set(this.select.positions(layer, h)));
    const evicted = quantized.positions.map((positions, h) => positions.filter((p) => !kept[h].has(p)).length);
    expect(new Set(evicted).size, 'every kv head evicts as many tokens').toBe(1);
    this.maxEvicted = Math.max(this.maxEvicted, evicted[0]);
    if (!compactionDue(evicted[0], this.select.tokens(layer), n, layer, this.shape.layers, this.config, this.spec)) return;
    const held = quantized.kivi.stored();
    const survivors = quantized.positions.map((positions, h) => positions.flatMap((p, index) => (kept[h].has(p) ? [index] : [])));
    const count = survivors[0].length;
    const keys = new Float32Array(count * width), values = new Float32Array(count * width);
    for (let h = 0; h < kvHeads; h++) {
      survivors[h].forEach((index, i) => {
        keys.set(held.k.subarray(index * width + h * headDim, index * width + (h + 1) * headDim), i * width + h * headDim);
        values.set(held.v.subarray(index * width + h * headDim, index * width + (h + 1) * headDim), i * width + h * headDim);
      });
    }
    const kivi = new KiviMirror(this.shape, this.config);
    kivi.append(keys, values);
    // Tokens before a head's first eviction keep their records.
    kivi.adoptQuantized(quantized.kivi, survivors.map((indexes) => {
      let first = 0;
      while (first < indexes.length && indexes[first] === first) first++;
      return first;
    }));
    this.layers[layer] = {
      kivi,
      positions: survivors.map((indexes, h) => indexes.map((index) => quantized.positions[h][index])),
      flushedAt: kivi.tokens,
    };
    this.compactions++;
    this.compacted.push([this.select.tokens(layer), layer]);
  }

  /** A quantized layer's bytes: every held token's (evicted ones until the compaction). */
  #checkBytes(layer: number): void {
    const quantized = this.layers[layer];
    if (!quantized) return;
    const stats = this.cache.stats();
    const bytes = quantized.kivi.bytes();
    expect(stats.layers[layer].bytes, `layer ${layer} bytes`).toBeCloseTo(bytes.kv + bytes.residual, 6);
    const kept = Array.from({ length: this.shape.kvHeads }, (_, h) => this.select.positions(layer, h).length);
    expect(stats.layers[layer].tokensKept).toEqual(kept);
  }
}

describe('h2o over a KIVI store: heavy hitters chosen on the quantized attention', () => {
  const cases: Array<[string, SelectShape, H2O, KiviConfig, Op[]]> = [
    ['GQA, 2 bits, R 32: a prompt, then steps through several compactions', GQA, { kind: 'h2o', budget: 48, recent: 16 },
      { bits: 2, group: 32, residual: 32 }, [['prefill', 120], ...steps(75)]],
    ['MHA, 4 bits, G 16, R 16: appends, a prompt, steps, a second prompt (chunked mass), steps', MHA, { kind: 'h2o', budget: 24, recent: 8 },
      { bits: 4, group: 16, residual: 16 }, [['append', 30], ['prefill', 40], ...steps(20), ['prefill', 37], ...steps(12), ['append', 5], ...steps(6)]],
    ['GQA, 8 bits, recent 1, steps of 3 tokens', GQA, { kind: 'h2o', budget: 40, recent: 1 }, { bits: 8, group: 32, residual: 32 },
      [['prefill', 70], ...steps(30, 3)]],
    ['GQA, 2 bits, an appended context (score 0): every decision comes from the quantized decode steps', GQA,
      { kind: 'h2o', budget: 40, recent: 8 }, { bits: 2, group: 32, residual: 32 }, [['append', 100], ...steps(90)]],
    ['GQA, 4 bits, R 16, budget 200: compacted at budget / 8 = 25 evictions per head', GQA, { kind: 'h2o', budget: 200, recent: 40 },
      { bits: 4, group: 16, residual: 16 }, [['prefill', 280], ...steps(60)]],
    ['16q/2kv (8 rows per kv head), d48, 4 bits, G 16: a one-token prompt, then steps past the budget', { layers: 1, qHeads: 16, kvHeads: 2, headDim: 48 },
      { kind: 'h2o', budget: 30, recent: 6 }, { bits: 4, group: 16, residual: 16 }, [['prefill', 1], ...steps(70)]],
    ['GQA, 2 bits, a budget above R (kept tokens span several key groups)', GQA, { kind: 'h2o', budget: 150, recent: 40 },
      { bits: 2, group: 32, residual: 32 }, [['prefill', 260], ...steps(70)]],
    ['GQA, 4 bits, dense-and-sparse outliers: compactions requantize the rows read with their outlier corrections', GQA,
      { kind: 'h2o', budget: 64, recent: 16 }, { bits: 4, group: 32, residual: 32, outliers: 0.02 }, [['prefill', 150], ...steps(60)]],
  ];
  for (const [label, shape, spec, config, ops] of cases) {
    it(label, () => {
      const pair = new Pair(shape, spec, config, 5 + label.length);
      pair.run(ops);
      expect(pair.compactions, 'the layers were compacted').toBeGreaterThan(0);
    });
  }

  it('keeps budget tokens per kv head, holds at most due evicted ones, and the layers compact in turn', () => {
    const spec: H2O = { kind: 'h2o', budget: 64, recent: 16 };
    const config: KiviConfig = { bits: 2, group: 32, residual: 32 };
    const shape: SelectShape = { ...GQA, layers: 4 };
    const pair = new Pair(shape, spec, config, 21);
    pair.run([['prefill', 200], ...steps(60)]);
    for (let layer = 0; layer < shape.layers; layer++) {
      for (let h = 0; h < shape.kvHeads; h++) expect(pair.cache.positions(layer, h)).toHaveLength(spec.budget);
    }
    // due = 32, period 16: a compaction once 16 are flagged, at phases 0, 4, 8, 12 tokens apart.
    expect(pair.maxEvicted).toBeLessThanOrEqual(32);
    expect(pair.compactions).toBeGreaterThanOrEqual(2 * shape.layers);
    const atOnce = new Map<number, number>();
    for (const [tokens] of pair.compacted) atOnce.set(tokens, (atOnce.get(tokens) ?? 0) + 1);
    expect(Math.max(...atOnce.values()), 'layers compacting at the same token').toBe(1);
    const stats = pair.cache.stats();
    expect(stats.bytes.kv + stats.bytes.residual).toBeLessThan(stats.bytes.fullF16 / 3);
  });

  it('attend() reads the kept tokens and changes nothing', () => {
    const pair = new Pair(GQA, { kind: 'h2o', budget: 48, recent: 16 }, { bits: 2, group: 32, residual: 32 }, 27);
    pair.run([['prefill', 150], ...steps(20)]);
    const before = Array.from({ length: GQA.kvHeads }, (_, h) => Array.from(pair.cache.positions(1, h)));
    const bytes = pair.cache.stats().layers[1].bytes;
    const t = pair.tokens(3);
    const q = t.q.subarray(0, GQA.qHeads * GQA.headDim);
    expectClose(pair.cache.attend(1, q), pair.select.attend(1, q), 'attend on layer 1', TOLERANCE);
    for (let h = 0; h < GQA.kvHeads; h++) expect(Array.from(pair.cache.positions(1, h))).toEqual(before[h]);
    expect(pair.cache.stats().layers[1].bytes).toBe(bytes);
    pair.run(steps(20));  // and the layer goes on as the reference (attend() added no mass)
  });

  it('fork after the move shares the quantized pages; parent and child go on independently', () => {
    const pair = new Pair(GQA, { kind: 'h2o', budget: 48, recent: 16 }, { bits: 2, group: 32, residual: 32 }, 31);
    pair.run([['prefill', 150], ...steps(10)]);
    const child = pair.fork(32);
    expect(child.cache.stats().bytes.shared).toBeGreaterThan(0);
    child.run(steps(40));
    pair.run([...steps(5), ['step', 2], ...steps(30)]);
  });

  it('save/load carries the scores and the pending evictions: the loaded cache goes on bit for bit', () => {
    const pair = new Pair(GQA, { kind: 'h2o', budget: 48, recent: 16 }, { bits: 2, group: 32, residual: 32 }, 41);
    pair.run([['prefill', 130], ...steps(30)]);
    expect(pair.compactions, 'saved after compactions, with flags pending').toBeGreaterThan(0);
    const loaded = KVCache.load(pair.cache.save(), { device: DEVICE });
    open.push(loaded);
    for (let step = 0; step < 40; step++) {
      for (let layer = 0; layer < GQA.layers; layer++) {
        const t = pair.tokens(1);
        const out = loaded.step(layer, t.q, t.k, t.v);
        expectIdentical(out, pair.call('step', layer, t)!, `step ${step} layer ${layer}`);
        for (let h = 0; h < GQA.kvHeads; h++) expect(loaded.positions(layer, h)).toEqual(pair.cache.positions(layer, h));
      }
    }
    expect(pair.compactions).toBeGreaterThan(GQA.layers);
  });

  /** An MHA h2o cache over KIVI-4 (budget 24, recent 8) after a prefill of 40 and three steps, and its save. */
  function savedH2OKivi(seed: number) {
    const spec: H2O = { kind: 'h2o', budget: 24, recent: 8 };
    const cache = new KVCache({ ...MHA, device: DEVICE, policy: { select: spec, store: { kind: 'kivi', bits: 4, group: 16, residual: 16 } } });
    open.push(cache);
    const random = new Random(seed);
    const t = randomTokens(random, MHA, 40);
    cache.prefill(0, t.q, t.k, t.v);
    for (let i = 0; i < 3; i++) {
      const s = randomTokens(random, MHA, 1);
      cache.step(0, s.q, s.k, s.v);
    }
    return { spec, cache, saved: cache.save() };
  }

  it('load refuses an eviction flag out of order or inside the recent window, and a negative score', () => {
    const { spec, cache, saved } = savedH2OKivi(51);
    // The state: per kv head u64 tokens, f64 scores, u64 flagged, u64 indexes. Head 0 of layer 0 first.
    const stateAt = MASK_SIZE_AT + 8 + Number(saved.readBigUInt64LE(MASK_SIZE_AT)) + 8;
    const tokens = Number(saved.readBigUInt64LE(stateAt));
    expect(tokens).toBe(spec.budget + 3);  // the prefill moved 24; three steps, three flagged
    const flaggedAt = stateAt + 8 + 8 * tokens;
    expect(saved.readBigUInt64LE(flaggedAt)).toBe(3n);
    const load = (bytes: Buffer) => () => KVCache.load(bytes, { device: DEVICE });
    expectError(load(resealed(saved, (v) => v.setBigUint64(flaggedAt + 8, BigInt(tokens - 1), true))), 'ERR_CORRUPT', /flag/);
    expectError(load(resealed(saved, (v) => v.setBigUint64(flaggedAt + 16, v.getBigUint64(flaggedAt + 8, true), true))), 'ERR_CORRUPT', /flag/);
    expectError(load(resealed(saved, (v) => v.setBigUint64(flaggedAt, 1n, true))), 'ERR_CORRUPT');
    expectError(load(resealed(saved, (v) => v.setFloat64(stateAt + 8, -1, true))), 'ERR_CORRUPT', /score/);
    const loaded = KVCache.load(saved, { device: DEVICE });
    open.push(loaded);
    expect(Array.from(loaded.positions(0, 1))).toEqual(Array.from(cache.positions(0, 1)));
  });

  /** The h2o KIVI state of layer 0 (MHA, 1 layer): per kv head its scores and flagged indexes; and a writer back. */
  function h2oKiviCase() {
    const { spec, cache, saved } = savedH2OKivi(71);
    const sizeAt = MASK_SIZE_AT + 8 + Number(saved.readBigUInt64LE(MASK_SIZE_AT));
    const stateAt = sizeAt + 8;
    const stateBytes = Number(saved.readBigUInt64LE(sizeAt));
    let at = stateAt;
    const heads: Array<{ scores: Buffer; flags: bigint[] }> = [];
    for (let h = 0; h < MHA.kvHeads; h++) {
      const tokens = Number(saved.readBigUInt64LE(at));
      const scores = saved.subarray(at, at + 8 + 8 * tokens);
      at += 8 + 8 * tokens;
      const count = Number(saved.readBigUInt64LE(at));
      at += 8;
      const flags = Array.from({ length: count }, (_, i) => saved.readBigUInt64LE(at + 8 * i));
      at += 8 * count;
      heads.push({ scores, flags });
    }
    expect(at).toBe(stateAt + stateBytes);
    const rebuilt = (edited: Array<{ scores: Buffer; flags: bigint[] }>): Buffer => {
      const parts: Buffer[] = [];
      for (const head of edited) {
        parts.push(head.scores);
        const flags = Buffer.alloc(8 + 8 * head.flags.length);
        flags.writeBigUInt64LE(BigInt(head.flags.length), 0);
        head.flags.forEach((f, i) => flags.writeBigUInt64LE(f, 8 + 8 * i));
        parts.push(flags);
      }
      const state = Buffer.concat(parts);
      const size = Buffer.alloc(8);
      size.writeBigUInt64LE(BigInt(state.length), 0);
      const body = Buffer.concat([saved.subarray(0, sizeAt), size, state, saved.subarray(stateAt + stateBytes)]);
      return resealed(body, () => {});
    };
    return { cache, saved, heads, rebuilt, tokens: cache.tokens(0), spec };
  }

  it('a KIVI layer whose heads keep more heavy hitters than the budget (one flag fewer in every head) is refused', () => {
    const { saved, heads, rebuilt, tokens, spec } = h2oKiviCase();
    expect(heads.map((h) => h.flags.length)).toEqual([3, 3, 3, 3]);
    // Unedited, the rebuilt bytes load (the rebuild itself is faithful).
    expect(rebuilt(heads).equals(saved)).toBe(true);
    // decided = tokens - recent = 19; 2 flags leave 17 heavy hitters > budget - recent = 16.
    expect(tokens - spec.recent - 2).toBeGreaterThan(spec.budget - spec.recent);
    const fewer = rebuilt(heads.map((h) => ({ scores: h.scores, flags: h.flags.slice(1) })));
    expectError(() => KVCache.load(fewer, { device: DEVICE }), 'ERR_CORRUPT', /heavy hitters/);
  });

  it('a KIVI layer whose kv heads flag unequally (one extra valid flag in one head) is refused', () => {
    const { heads, rebuilt, tokens, spec } = h2oKiviCase();
    const decided = tokens - spec.recent;
    const flags = heads[1].flags.map(Number);
    const extra = Array.from({ length: decided }, (_, i) => i).find((i) => !flags.includes(i))!;
    const more = [...flags, extra].sort((a, b) => a - b).map(BigInt);
    const edited = heads.map((h, i) => (i === 1 ? { scores: h.scores, flags: more } : h));
    expectError(() => KVCache.load(rebuilt(edited), { device: DEVICE }), 'ERR_CORRUPT', /unequally/);
  });
});
