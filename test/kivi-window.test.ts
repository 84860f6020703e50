// Streaming and DuoAttention over a KIVI store (policy { select: streaming | duo, store: kivi }).
// Every token enters the KIVI layer as it would without a policy (the flush rules of
// test/reference/kivi.ts); the window policy then evicts one run of tokens per head, [sink, T -
// window), which the store skips as a hole. So each output must equal float64 attention over
// what a plain KIVI layer holds, restricted to the positions the selection reference keeps
// (test/reference/select.ts, the same trimming as over an f16 store); positions stay absolute;
// the bytes are the KIVI bytes minus the pages wholly inside the hole.
import { describe, expect, it } from 'vitest';

import { KVCache, type SelectSpec } from '../lib/index.js';
import { Random, relativeL2 } from './helpers/random.js';
import { type Tokens, randomTokens } from './helpers/tokens.js';
import { expectError } from './helpers/errors.js';
import { expectClose } from './helpers/outputs.js';
import { resealed } from './helpers/saved.js';
import { disposedAfterEach } from './helpers/lifetime.js';
import { type KiviConfig, KiviMirror, kiviHeadBytes, kiviOutliers, quantizedKeyTokens, quantizedValueTokens, ropeRows, type RopeSpec } from './reference/kivi.js';
import { type ReferenceSelectSpec, type SelectShape, SelectMirror } from './reference/select.js';

// As in kivi-cache.test.ts: the kernels dequantize exactly as the reference (f32 rounding only).
const TOLERANCE = 1e-4;
// 2-bit quantization moves an output far more than this: less would mean nothing was quantized.
const LOSSY = 1e-3;

const DEVICE = process.env.KVSLIM_TEST_DEVICE === 'cuda' ? 'cuda' : 'cpu';

const GQA: SelectShape = { layers: 2, qHeads: 8, kvHeads: 2, headDim: 64 };
const MHA: SelectShape = { layers: 2, qHeads: 4, kvHeads: 4, headDim: 32 };

const open = disposedAfterEach<KVCache>();

type Call = ['prefill' | 'step' | 'append', number];
const steps = (count: number, n = 1): Call[] => Array.from({ length: count }, () => ['step', n]);

interface Setup {
  shape: SelectShape;
  spec: ReferenceSelectSpec;
  kivi: KiviConfig;
  pageTokens?: number;
  rope?: RopeSpec;  // with store.preRope
}

/** The KIVI page of a cache: pageTokens rounded up to the group, at least 256 tokens. */
const kiviPageTokens = (setup: Setup) =>
  Math.ceil(Math.max(setup.pageTokens ?? 16, 256) / setup.kivi.group) * setup.kivi.group;

/** The run of positions a head's kept list skips ([begin, end), or null), from the reference. */
function holeOf(positions: number[]): [number, number] | null {
  if (positions.length > 0 && positions[0] > 0) return [0, positions[0]];  // sink 0
  for (let i = 0; i + 1 < positions.length; i++) {
    if (positions[i + 1] !== positions[i] + 1) return [positions[i] + 1, positions[i + 1]];
  }
  return null;
}

/** Bytes one head holds: a plain KIVI head's, less the full pages wholly inside the hole. */
function heldHeadBytes(setup: Setup, tokens: number, hole: [number, number] | null): { kv: number; residual: number } {
  const { headDim } = setup.shape;
  const { bits, group, residual } = setup.kivi;
  const bytes = kiviHeadBytes(tokens, headDim, setup.kivi);
  if (!hole) return bytes;
  const P = kiviPageTokens(setup);
  const outliers = kiviOutliers(headDim, setup.kivi);
  const keyGroupBytes = (headDim * group * bits) / 8 + 4 * headDim + 4 * outliers.key;
  const valueTokenBytes = (headDim * bits) / 8 + (4 * headDim) / group + 4 * outliers.value;
  const released = (quantized: number) => Math.max(0, Math.floor(Math.min(hole[1], quantized) / P) - Math.ceil(hole[0] / P));
  return {
    kv: bytes.kv - released(quantizedKeyTokens(tokens, residual)) * (P / group) * keyGroupBytes -
      released(quantizedValueTokens(tokens, residual)) * P * valueTokenBytes,
    residual: bytes.residual,
  };
}

/** A cache, its selection reference (kept positions) and per layer its KIVI reference (stored values). */
class Pair {
  readonly cache: KVCache;
  readonly select: SelectMirror;
  readonly kivi: KiviMirror[];
  readonly random: Random;

  constructor(readonly setup: Setup, seed: number, from?: Pair) {
    this.random = new Random(seed);
    const { shape } = setup;
    if (from) {
      this.cache = from.cache.fork();
      this.select = from.select.fork();
      this.kivi = from.kivi.map((m) => m.fork());
    } else {
      this.cache = new KVCache({
        ...shape, device: DEVICE, pageTokens: setup.pageTokens ?? 16, ...(setup.rope ? { rope: setup.rope } : {}),
        policy: { select: setup.spec as SelectSpec, store: { kind: 'kivi', ...setup.kivi, ...(setup.rope ? { preRope: true } : {}) } },
      });
      this.select = new SelectMirror(shape, setup.spec);
      this.kivi = Array.from({ length: shape.layers }, () => new KiviMirror(shape, setup.kivi));
    }
    open.push(this.cache);
    this.#readStored(0);
  }

  /** Attention reads the KIVI reference's values (flushed before the call's own n tokens). */
  #readStored(n: number): void {
    const rope = this.setup.rope;
    const { kvHeads, headDim } = this.setup.shape;
    this.select.storedRows = (layer) => {
      const mirror = this.kivi[layer];
      const stored = mirror.stored(mirror.tokens - n);
      return rope ? { k: ropeRows(stored.k, kvHeads, headDim, rope), v: stored.v } : stored;
    };
  }

  fork(seed: number): Pair {
    return new Pair(this.setup, seed, this);
  }

  tokens(n: number): Tokens {
    return randomTokens(this.random, this.setup.shape, n);
  }

  call(kind: Call[0], layer: number, t: Tokens): Float32Array | null {
    this.kivi[layer].append(t.k, t.v);
    let actual: Float32Array | null = null;
    if (kind === 'append') {
      this.cache.append(layer, t.k, t.v);
      this.select.append(layer, t.k, t.v);
    } else {
      this.#readStored(t.n);
      actual = kind === 'prefill' ? this.cache.prefill(layer, t.q, t.k, t.v) : this.cache.step(layer, t.q, t.k, t.v);
      const expected = kind === 'prefill' ? this.select.prefill(layer, t.q, t.k, t.v) : this.select.step(layer, t.q, t.k, t.v);
      expectClose(actual, expected, `${kind} of ${t.n} on layer ${layer} at ${this.select.tokens(layer)} tokens`, TOLERANCE);
    }
    for (let h = 0; h < this.setup.shape.kvHeads; h++) {
      expect(Array.from(this.cache.positions(layer, h)), `layer ${layer} kv head ${h} positions`).toEqual(this.select.positions(layer, h));
    }
    expect(this.cache.tokens(layer)).toBe(this.select.tokens(layer));
    return actual;
  }

  /** attend() without appending: the stored state after the last flush. */
  attend(layer: number, q: Float32Array): Float32Array {
    this.#readStored(0);
    const actual = this.cache.attend(layer, q);
    expectClose(actual, this.select.attend(layer, q), `attend() of ${q.length / (this.setup.shape.qHeads * this.setup.shape.headDim)} queries`, TOLERANCE);
    return actual;
  }

  run(calls: Call[]): void {
    for (const [kind, n] of calls) {
      for (let layer = 0; layer < this.setup.shape.layers; layer++) this.call(kind, layer, this.tokens(n));
    }
  }

  /** stats(): kept tokens per head and bytes to the byte. */
  checkStats(): void {
    const stats = this.cache.stats();
    const { layers, kvHeads } = this.setup.shape;
    let kv = 0, residual = 0;
    for (let layer = 0; layer < layers; layer++) {
      const tokens = this.select.tokens(layer);
      let layerBytes = 0;
      const kept: number[] = [];
      for (let h = 0; h < kvHeads; h++) {
        const positions = this.select.positions(layer, h);
        kept.push(positions.length);
        const bytes = heldHeadBytes(this.setup, tokens, holeOf(positions));
        kv += bytes.kv;
        residual += bytes.residual;
        layerBytes += bytes.kv + bytes.residual;
      }
      expect(stats.layers[layer].tokensKept, `layer ${layer} tokensKept`).toEqual(kept);
      expect(stats.layers[layer].bytes, `layer ${layer} bytes`).toBe(layerBytes);
    }
    expect(stats.bytes.kv).toBe(kv);
    expect(stats.bytes.residual).toBe(residual);
    expect(stats.tokens.seen).toBe(this.select.tokens(0));
  }
}

const STREAMING_CALLS: Call[] = [['prefill', 300], ...steps(24), ['step', 3], ['prefill', 420], ...steps(20), ['append', 90], ...steps(6)];

describe('streaming and duo over a KIVI store: a hole per head, skipped by attention', () => {
  const cases: Array<[string, Setup, Call[]]> = [
    ['GQA streaming, 2 bits, G 32, R 32, window below R', { shape: GQA, spec: { kind: 'streaming', sink: 4, window: 24 }, kivi: { bits: 2, group: 32, residual: 32 } },
      STREAMING_CALLS],
    ['GQA streaming, 4 bits, R 128, window above R', { shape: GQA, spec: { kind: 'streaming', sink: 4, window: 200 }, kivi: { bits: 4, group: 32, residual: 128 } },
      [['prefill', 260], ...steps(30), ['prefill', 700], ...steps(40)]],
    ['MHA streaming, 8 bits, G 16, 272-token pages (not a multiple of 32), odd sink', {
      shape: MHA, spec: { kind: 'streaming', sink: 5, window: 45 }, kivi: { bits: 8, group: 16, residual: 16 }, pageTokens: 272,
    }, STREAMING_CALLS],
    ['MHA duo, half the heads streaming, 2 bits', {
      shape: MHA, spec: { kind: 'duo', heads: [[true, false, false, true], [false, true, true, false]], sink: 8, window: 40 },
      kivi: { bits: 2, group: 16, residual: 32 },
    }, STREAMING_CALLS],
    ['GQA duo, one retrieval head per layer, 4 bits', {
      shape: GQA, spec: { kind: 'duo', heads: [[true, false], [false, true]], sink: 16, window: 64 }, kivi: { bits: 4, group: 32, residual: 64 },
    }, [['prefill', 600], ...steps(30), ['step', 5], ...steps(10)]],
    ['GQA streaming with outliers (dense-and-sparse)', {
      shape: GQA, spec: { kind: 'streaming', sink: 4, window: 48 }, kivi: { bits: 2, group: 32, residual: 32, outliers: 0.02 },
    }, [['prefill', 400], ...steps(40)]],
    ['GQA streaming over pre-RoPE keys', {
      shape: GQA, spec: { kind: 'streaming', sink: 4, window: 40 }, kivi: { bits: 2, group: 32, residual: 32 }, rope: { theta: 10000, style: 'half' },
    }, [['prefill', 330], ...steps(30), ['prefill', 280], ...steps(5)]],
    ['MHA streaming without sinks (sink 0), G 48 (d=96), 288-token pages', {
      shape: { layers: 1, qHeads: 4, kvHeads: 2, headDim: 96 }, spec: { kind: 'streaming', sink: 0, window: 70 }, kivi: { bits: 4, group: 48, residual: 96 },
    }, [['prefill', 500], ...steps(12), ['prefill', 333], ...steps(6)]],
    ['a prompt inside the window keeps every token', { shape: GQA, spec: { kind: 'streaming', sink: 4, window: 512 }, kivi: { bits: 2, group: 32, residual: 32 } },
      [['prefill', 200], ...steps(20)]],
  ];
  for (const [label, setup, calls] of cases) {
    // The CUDA backend refuses KIVI outliers and pre-RoPE keys (ERR_BACKEND_UNAVAILABLE; kivi-cache.test.ts).
    it.skipIf(DEVICE === 'cuda' && (setup.kivi.outliers !== undefined || setup.rope !== undefined))(label, () => {
      const pair = new Pair(setup, 11 + label.length);
      pair.run(calls);
      pair.checkStats();
    });
  }

  it('quantizes: the outputs differ from the same kept tokens in f16', () => {
    const setup: Setup = { shape: GQA, spec: { kind: 'streaming', sink: 4, window: 64 }, kivi: { bits: 2, group: 32, residual: 32 } };
    const pair = new Pair(setup, 5);
    pair.run([['prefill', 500], ...steps(4)]);
    const exact = new SelectMirror(GQA, setup.spec);
    const random = new Random(5);
    for (const n of [500, 1, 1, 1, 1, 1]) {
      for (let layer = 0; layer < GQA.layers; layer++) {
        const t = randomTokens(random, GQA, n);
        (n === 500 ? exact.prefill(layer, t.q, t.k, t.v) : exact.step(layer, t.q, t.k, t.v));
      }
    }
    const t = pair.tokens(1);
    const actual = pair.call('step', 0, t)!;
    expect(relativeL2(actual, exact.step(0, t.q, t.k, t.v))).toBeGreaterThan(LOSSY);
  });

  it('a long stream holds a bounded number of pages: memory stops growing with the tokens', () => {
    const setup: Setup = { shape: MHA, spec: { kind: 'streaming', sink: 4, window: 100 }, kivi: { bits: 2, group: 16, residual: 32 } };
    const pair = new Pair(setup, 9);
    pair.run([['prefill', 512], ...steps(8)]);
    const early = pair.cache.stats();
    pair.run([['prefill', 2048], ...steps(8)]);
    pair.checkStats();
    const late = pair.cache.stats();
    // Sink page + at most the pages the window and the residual touch, whatever the stream length.
    expect(late.bytes.total).toBeLessThan(1.5 * early.bytes.total);
    expect(late.bytes.allocated).toBeLessThan(1.5 * early.bytes.allocated);
    // The page tables too: released pages leave them (bytes.meta counts their entries).
    expect(late.bytes.meta).toBeLessThan(1.5 * early.bytes.meta);
    const plain = new KVCache({ ...MHA, device: DEVICE, pageTokens: 16, policy: { store: { kind: 'kivi', bits: 2, group: 16, residual: 32 } } });
    open.push(plain);
    const random = new Random(1);
    for (let layer = 0; layer < MHA.layers; layer++) {
      const t = randomTokens(random, MHA, pair.select.tokens(layer));
      plain.prefill(layer, t.q, t.k, t.v);
    }
    expect(late.bytes.kv).toBeLessThan(0.3 * plain.stats().bytes.kv);
  });

  it('fork shares the quantized pages and both sides evolve like caches that never forked', () => {
    const setup: Setup = { shape: GQA, spec: { kind: 'duo', heads: [[false, true], [false, false]], sink: 4, window: 40 }, kivi: { bits: 4, group: 32, residual: 32 } };
    const parent = new Pair(setup, 21);
    parent.run([['prefill', 700], ...steps(3)]);
    const child = parent.fork(22);
    expect(child.cache.stats().bytes.shared).toBeGreaterThan(0);
    child.run([...steps(40), ['prefill', 300], ...steps(5)]);
    parent.run([...steps(25), ['step', 2]]);
    parent.checkStats();
    child.checkStats();
  });

  it('save and load keep the holes: the loaded cache continues exactly as the original', () => {
    const setup: Setup = { shape: MHA, spec: { kind: 'duo', heads: [[true, false, false, true], [false, true, true, false]], sink: 4, window: 30 }, kivi: { bits: 2, group: 16, residual: 16 } };
    const pair = new Pair(setup, 31);
    pair.run([['prefill', 900], ...steps(5)]);
    const saved = pair.cache.save();
    const loaded = KVCache.load(saved, { device: DEVICE });
    open.push(loaded);
    expect(loaded.stats().bytes).toEqual(pair.cache.stats().bytes);
    for (let layer = 0; layer < MHA.layers; layer++) {
      for (let h = 0; h < MHA.kvHeads; h++) expect(loaded.positions(layer, h)).toEqual(pair.cache.positions(layer, h));
    }
    for (const n of [1, 1, 40, 1]) {
      for (let layer = 0; layer < MHA.layers; layer++) {
        const t = pair.tokens(n);
        const expected = pair.call(n === 1 ? 'step' : 'prefill', layer, t)!;
        const actual = n === 1 ? loaded.step(layer, t.q, t.k, t.v) : loaded.prefill(layer, t.q, t.k, t.v);
        expect(actual).toEqual(expected);
      }
    }
    expect(loaded.stats().bytes).toEqual(pair.cache.stats().bytes);
    // The saved pre-RoPE flag travels (version 7).
    const rope: Setup = { shape: GQA, spec: { kind: 'streaming', sink: 4, window: 40 }, kivi: { bits: 2, group: 32, residual: 32 }, rope: { theta: 10000, style: 'adjacent' } };
    if (DEVICE === 'cpu') {
      const rotated = new Pair(rope, 3);
      rotated.run([['prefill', 400], ...steps(2)]);
      const again = KVCache.load(rotated.cache.save(), { device: 'cpu' });
      open.push(again);
      expect(again.policy.store).toMatchObject({ kind: 'kivi', preRope: true });
      const t = rotated.tokens(1);
      expect(again.step(0, t.q, t.k, t.v)).toEqual(rotated.call('step', 0, t));
    }
  });

  it('load rejects a hole the policy could not have made', () => {
    const setup: Setup = { shape: MHA, spec: { kind: 'duo', heads: [[true, false, true, false], [false, true, false, true]], sink: 4, window: 30 }, kivi: { bits: 2, group: 16, residual: 16 } };
    const pair = new Pair(setup, 41);
    pair.run([['prefill', 600], ...steps(2)]);
    const saved = pair.cache.save();
    // Find layer 0's first head payload: the head images start after the header and policy; the
    // hole of head 1 (streaming) is [4, T - 30). Locate it by its exact bytes.
    const T = pair.select.tokens(0);
    const pattern = Buffer.alloc(16);
    pattern.writeBigInt64LE(4n, 0);
    pattern.writeBigInt64LE(BigInt(T - 30), 8);
    const at = saved.indexOf(pattern);
    expect(at).toBeGreaterThan(0);
    const edits: Array<[string, (view: DataView) => void]> = [
      ['a hole past the window', (view) => view.setBigInt64(at + 8, BigInt(T - 10), true)],
      ['a hole not starting at the sink', (view) => view.setBigInt64(at, 8n, true)],
      ['a hole past the tokens', (view) => view.setBigInt64(at + 8, BigInt(T + 100), true)],
      ['a reversed hole', (view) => { view.setBigInt64(at, 300n, true); view.setBigInt64(at + 8, 200n, true); }],
      ['a reversed hole starting at the sink', (view) => view.setBigInt64(at + 8, 2n, true)],
    ];
    for (const [what, edit] of edits) {
      const error = expectError(() => KVCache.load(resealed(saved, edit), { device: DEVICE }), 'ERR_CORRUPT');
      expect(error.message, what).toMatch(/hole/);
    }
    // A layer payload starts with its token count, its KIVI tokens and the tokens moved into KIVI
    // (T, T, 0 here). A token count above the KIVI tokens would put tokens before a window layer's KIVI part.
    const counts = Buffer.alloc(24);
    counts.writeBigInt64LE(BigInt(T), 0);
    counts.writeBigInt64LE(BigInt(T), 8);
    const countsAt = saved.indexOf(counts);
    expect(countsAt).toBeGreaterThan(0);
    const before = resealed(saved, (view) => view.setBigInt64(countsAt, BigInt(T + 5), true));
    expectError(() => KVCache.load(before, { device: DEVICE }), 'ERR_CORRUPT', /moved tokens/);
    // The header's residual (at 56), changed to another valid one: the heads' quantized counts no longer match it.
    const residual = expectError(() => KVCache.load(resealed(saved, (view) => view.setBigInt64(56, 64n, true)), { device: DEVICE }), 'ERR_CORRUPT');
    expect(residual.message).toMatch(/quantized token counts/);
  });

  it('attend() with more queries than the window keeps in order: ERR_SHAPE, and the cache is unchanged', () => {
    const setup: Setup = { shape: GQA, spec: { kind: 'streaming', sink: 4, window: 40 }, kivi: { bits: 2, group: 32, residual: 32 } };
    const pair = new Pair(setup, 51);
    pair.run([['prefill', 300], ...steps(2)]);
    const before = pair.cache.stats().bytes;
    const q = pair.tokens(41).q;
    expectError(() => pair.cache.attend(0, q), 'ERR_SHAPE', /keeps only the last 40 tokens/);
    expect(pair.cache.stats().bytes).toEqual(before);
    // 40 queries are the window itself: attend() equals the reference's.
    pair.attend(0, pair.tokens(40).q);
    pair.attend(1, pair.tokens(1).q);
    pair.run(steps(2));
  });

  it('load rejects a window policy over KIVI in a version 6 file (which predates holes)', () => {
    // A dense streaming cache (version 6) whose store kind is flipped to KIVI.
    const dense = new KVCache({ layers: 1, qHeads: 2, kvHeads: 1, headDim: 32, device: DEVICE, policy: { select: { kind: 'streaming', sink: 4, window: 16 } } });
    open.push(dense);
    const random = new Random(3);
    const t = randomTokens(random, { qHeads: 2, kvHeads: 1, headDim: 32 }, 10);
    dense.append(0, t.k, t.v);
    const denseSaved = dense.save();
    expect(denseSaved.readUInt32LE(8)).toBe(6);
    expect(denseSaved.readInt32LE(44)).toBe(0);  // storeKind: dense
    expectError(() => KVCache.load(resealed(denseSaved, (view) => view.setInt32(44, 1, true)), { device: DEVICE }), 'ERR_CORRUPT', /version 7/);
    // A KIVI streaming cache (version 7) rewritten as version 6: no preRope field, no holes.
    const kivi = new KVCache({
      layers: 1, qHeads: 2, kvHeads: 1, headDim: 32, device: DEVICE,
      policy: { select: { kind: 'streaming', sink: 4, window: 16 }, store: { kind: 'kivi', bits: 2, group: 32, residual: 32 } },
    });
    open.push(kivi);
    kivi.append(0, t.k, t.v);
    const saved = kivi.save();
    expect(saved.readUInt32LE(8)).toBe(7);
    // Header 64 bytes, then outliers f64, theta f32, style i32, preRope i32 (at 80), kind i32, sink i64 (at 88), ...
    expect(saved.readBigInt64LE(88)).toBe(4n);
    // ... window, budget, kernel, pooling, beta, recent, cachePositions, maskBytes, stateBytes,
    // tokens[1] (at 156), kiviTokens, moved, quantizedKeys, quantizedValues, hole (at 196).
    expect(saved.readBigInt64LE(156)).toBe(10n);
    expect([saved.readBigInt64LE(196), saved.readBigInt64LE(204)]).toEqual([0n, 0n]);
    const v6 = Buffer.concat([saved.subarray(0, 80), saved.subarray(84, 196), saved.subarray(212)]);
    v6.writeUInt32LE(6, 8);
    expectError(() => KVCache.load(resealed(v6, () => {}), { device: DEVICE }), 'ERR_CORRUPT', /version 7/);
    // The untouched file loads.
    const loaded = KVCache.load(saved, { device: DEVICE });
    open.push(loaded);
    expect(loaded.tokens(0)).toBe(10);
  });

  it('refuses the combinations it cannot hold', () => {
    const base = { layers: 1, qHeads: 4, kvHeads: 2, headDim: 32, rope: { theta: 10000 } };
    const make = (policy: object) => () => new KVCache({ ...base, policy } as never);
    expectError(make({ select: { kind: 'h2o', budget: 64, recent: 16 }, store: { kind: 'kivi', bits: 2, preRope: true } }), 'ERR_OPTION', /preRope/);
    expectError(make({ select: { kind: 'quest', pages: 4 }, store: { kind: 'kivi', bits: 2 } }), 'ERR_OPTION', /kivi/);
    expectError(make({ select: { kind: 'streaming', window: 64, positions: 'cache' }, store: { kind: 'kivi', bits: 2 } }), 'ERR_OPTION', /positions/);
    expectError(make({ select: { kind: 'snapkv', budget: 64 }, store: { kind: 'kivi', bits: 2, preRope: true } }), 'ERR_OPTION', /preRope/);
    const ok = make({ select: { kind: 'streaming', window: 64 }, store: { kind: 'kivi', bits: 2, preRope: true } })();
    expect(ok.policy.select.kind).toBe('streaming');
    ok.dispose();
  });
});
