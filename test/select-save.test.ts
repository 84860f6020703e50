// save() / KVCache.load() of caches with an eviction policy (format version 6): a loaded cache
// keeps exactly the tokens, positions and policy state of the one saved, so every later call
// gives bit-identical outputs and positions on both (SnapKV saved before its prefill still selects
// at it; H2O carries its accumulated scores; a KIVI layer keeps its codes). Damaged bytes give
// ERR_CORRUPT, never a crash.
import { describe, expect, it } from 'vitest';

import { KVCache, type KVCacheOptions, type SelectSpec } from '../lib/index.js';
import { Random } from './helpers/random.js';
import { type Heads, randomTokens } from './helpers/tokens.js';
import { expectError } from './helpers/errors.js';
import { expectIdentical } from './helpers/outputs.js';
import { MASK_SIZE_AT, loadEveryDamagedByte, resealed } from './helpers/saved.js';
import { disposedAfterEach, held } from './helpers/lifetime.js';

const GQA: Heads & { layers: number } = { layers: 2, qHeads: 8, kvHeads: 2, headDim: 32 };

const open = disposedAfterEach<KVCache>();

function cacheOf(select: SelectSpec, extra: Partial<KVCacheOptions> = {}): KVCache {
  const cache = new KVCache({ ...GQA, device: 'cpu', pageTokens: 4, policy: { select }, ...extra });
  open.push(cache);
  return cache;
}

const load = (bytes: Buffer): KVCache => held(open, KVCache.load(bytes, { device: 'cpu' }));

type Op = ['prefill' | 'step' | 'append', number];

/** The same call on every layer of every cache (fresh tokens per layer); outputs must be identical. */
function drive(caches: KVCache[], random: Random, ops: Op[]): void {
  for (const [kind, n] of ops) {
    for (let layer = 0; layer < GQA.layers; layer++) {
      const t = randomTokens(random, GQA, n);
      const outputs = caches.map((cache) => {
        if (kind === 'append') {
          cache.append(layer, t.k, t.v);
          return null;
        }
        return kind === 'prefill' ? cache.prefill(layer, t.q, t.k, t.v) : cache.step(layer, t.q, t.k, t.v);
      });
      for (let i = 1; i < caches.length; i++) {
        if (outputs[0] !== null) expectIdentical(outputs[i]!, outputs[0], `${kind}(${n}) on layer ${layer}, cache ${i}`);
      }
      expectSameState(caches[0], caches.slice(1), `after ${kind}(${n}) on layer ${layer}`);
    }
  }
}

function expectSameState(original: KVCache, others: KVCache[], what: string): void {
  for (const other of others) {
    for (let layer = 0; layer < GQA.layers; layer++) {
      expect(other.tokens(layer), `${what}: tokens(${layer})`).toBe(original.tokens(layer));
      for (let h = 0; h < GQA.kvHeads; h++) {
        expect(Array.from(other.positions(layer, h)), `${what}: positions(${layer}, ${h})`).toEqual(Array.from(original.positions(layer, h)));
      }
    }
    const a = original.stats(), b = other.stats();
    expect(b.bytes.kv, what).toBe(a.bytes.kv);
    expect(b.bytes.residual, what).toBe(a.bytes.residual);
    expect(b.layers.map((l) => l.tokensKept), what).toEqual(a.layers.map((l) => l.tokensKept));
  }
}

const steps = (count: number): Op[] => Array.from({ length: count }, () => ['step', 1]);

describe('save() / load() with an eviction policy: the loaded cache goes on exactly as the saved one', () => {
  const cases: Array<[string, SelectSpec, Partial<KVCacheOptions>, Op[], Op[]]> = [
    ['streaming', { kind: 'streaming', sink: 2, window: 12 }, {}, [['prefill', 30], ...steps(5)], [['prefill', 7], ...steps(6)]],
    ['streaming, cache positions (rope)', { kind: 'streaming', sink: 3, window: 10, positions: 'cache' },
      { rope: { theta: 10000, style: 'half' } }, [['append', 20], ...steps(4)], [...steps(5), ['prefill', 3]]],
    ['snapkv after its selection', { kind: 'snapkv', budget: 24, window: 4, kernel: 3, pooling: 'avg' }, {},
      [['prefill', 60], ...steps(3)], [...steps(4), ['prefill', 9], ['append', 2], ...steps(2)]],
    ['snapkv saved before its prefill still selects at it', { kind: 'snapkv', budget: 20, window: 4 }, {},
      [['append', 40]], [['prefill', 12], ...steps(3)]],
    ['pyramidkv, f32 store', { kind: 'pyramidkv', budget: 24, window: 4, beta: 4 }, { policy: { store: { kind: 'f32' } } },
      [['prefill', 80], ...steps(2)], steps(4)],
    ['h2o carries its scores, bf16 store', { kind: 'h2o', budget: 16, recent: 6 }, { policy: { store: { kind: 'bf16' } } },
      [['prefill', 30], ...steps(6)], [...steps(8), ['prefill', 5], ['append', 3], ...steps(3)]],
    ['duo', { kind: 'duo', heads: Uint8Array.from([1, 0, 0, 1]), sink: 2, window: 8 }, {}, [['prefill', 40], ...steps(3)], [...steps(5), ['prefill', 4]]],
  ];
  for (const [label, select, extra, before, after] of cases) {
    it(label, () => {
      const options = { ...extra, policy: { ...extra.policy, select } };
      const original = cacheOf(select, options);
      const random = new Random(label.length * 7 + 1);
      drive([original], random, before);
      const saved = original.save();
      expect(saved.readUInt32LE(8), 'format version').toBe(6);
      const loaded = load(saved);
      expect(loaded.policy.select).toEqual(original.policy.select);
      expectSameState(original, [loaded], 'at load');
      // A fork of the original taken at the same moment is the control: loaded == fork at every call.
      drive([original, loaded], random, after);
      // Saving the loaded cache gives the same bytes as saving the original.
      expect(loaded.save().equals(original.save())).toBe(true);
    });
  }

  it('a streaming cache that has seen 2^39 tokens saves what it holds (save reserved for every token seen)', () => {
    const select: SelectSpec = { kind: 'streaming', sink: 2, window: 12 };
    const random = new Random(17);
    const original = cacheOf(select);
    drive([original], random, [['prefill', 1237]]);
    // Both layers' token counts (i64, consecutive) set to 2^39 + 1237 (load takes up to 2^40): a
    // valid state (sinks at 0 and 1, the window at the end), as after a very long stream.
    const pattern = Buffer.alloc(16);
    pattern.writeBigInt64LE(1237n, 0);
    pattern.writeBigInt64LE(1237n, 8);
    const at = original.save().indexOf(pattern);
    expect(at).toBeGreaterThan(0);
    const seen = 2 ** 39 + 1237;
    const long = load(resealed(original.save(), (view) => {
      view.setBigInt64(at, BigInt(seen), true);
      view.setBigInt64(at + 8, BigInt(seen), true);
    }));
    expect(long.tokens(0)).toBe(seen);
    expect(Array.from(long.positions(1, 1))).toEqual([0, 1, ...Array.from({ length: 12 }, (_, i) => seen - 12 + i)]);
    drive([long], random, steps(2));
    const again = load(long.save());
    expectSameState(long, [again], 'saved after 2^39 tokens');
    expect(again.save().length).toBe(original.save().length);
  });

  it('snapkv over a KIVI store: a quantized layer keeps its codes, an f16 layer still selects later', () => {
    const select: SelectSpec = { kind: 'snapkv', budget: 40, window: 4 };
    const original = cacheOf(select, { pageTokens: 16, policy: { select, store: { kind: 'kivi', bits: 2, group: 32, residual: 32 } } });
    const random = new Random(5);
    // Layer 0: prefilled (selected, quantized); layer 1: only appended (still f16).
    const t0 = randomTokens(random, GQA, 100), t1 = randomTokens(random, GQA, 60);
    original.prefill(0, t0.q, t0.k, t0.v);
    original.append(1, t1.k, t1.v);
    const loaded = load(original.save());
    expectSameState(original, [loaded], 'at load');
    expect(loaded.positions(0, 0)).toHaveLength(40);
    expect(loaded.positions(1, 0)).toHaveLength(60);
    drive([original, loaded], random, [['prefill', 8], ...steps(40)]);
    expect(loaded.positions(1, 1)).toHaveLength(40 + 40);
  });
});

describe('load() of a damaged eviction-policy cache: ERR_CORRUPT', () => {
  // Header offsets of version 6 (cache_serialize.cc): kind at 80, mask size at MASK_SIZE_AT, then
  // the mask, the state size, the state, the token counts and the layers.
  const KIND_AT = 80;

  function savedOf(select: SelectSpec, ops: Op[]): Buffer {
    const cache = cacheOf(select);
    drive([cache], new Random(77), ops);
    return cache.save();
  }

  it('truncated or flipped bytes', () => {
    const saved = savedOf({ kind: 'h2o', budget: 12, recent: 4 }, [['prefill', 20], ...steps(2)]);
    for (let length = 0; length < saved.length; length += 61) expectError(() => load(saved.subarray(0, length)), 'ERR_CORRUPT');
    // Past the fixed header fields (checked first), only the checksum can tell.
    for (let at = KIND_AT; at < saved.length; at += 97) {
      const flipped = Buffer.from(saved);
      flipped[at] ^= 0x10;
      expectError(() => load(flipped), 'ERR_CORRUPT', /checksum/);
    }
  });

  it('fields that pass the checksum but not the checks', () => {
    const streaming = savedOf({ kind: 'streaming', sink: 2, window: 6 }, [['prefill', 20]]);
    expect(streaming.readInt32LE(KIND_AT)).toBe(1);
    expectError(() => load(resealed(streaming, (v) => v.setInt32(KIND_AT, 7, true))), 'ERR_CORRUPT', /eviction policy kind/);
    expectError(() => load(resealed(streaming, (v) => v.setBigUint64(MASK_SIZE_AT, 4n, true))), 'ERR_CORRUPT', /mask/);
    // Layer 0, head 0: the two sinks' positions [0, 1]; a repeated one, or one inside the tail.
    const sinksAt = MASK_SIZE_AT + 8 + 8 + 8 * GQA.layers + 16 + 16;
    expect([streaming.readBigInt64LE(sinksAt), streaming.readBigInt64LE(sinksAt + 8)]).toEqual([0n, 1n]);
    expectError(() => load(resealed(streaming, (v) => v.setBigInt64(sinksAt, 1n, true))), 'ERR_CORRUPT', /positions/);
    expectError(() => load(resealed(streaming, (v) => v.setBigInt64(sinksAt, 19n, true))), 'ERR_CORRUPT', /positions/);
    // Swapped is fine: kept slots need not be in position order (H2O overwrites slots).
    const swapped = load(resealed(streaming, (v) => {
      v.setBigInt64(sinksAt, 1n, true);
      v.setBigInt64(sinksAt + 8, 0n, true);
    }));
    expect(Array.from(swapped.positions(0, 0)).slice(0, 2)).toEqual([0, 1]);
    // A stored key made NaN (f16 0x7e00).
    expectError(() => load(resealed(streaming, (v) => v.setUint16(sinksAt + 16, 0x7e00, true))), 'ERR_CORRUPT', /not finite/);

    const duo = savedOf({ kind: 'duo', heads: [[1, 0], [0, 1]], sink: 2, window: 6 }, [['prefill', 12]]);
    expectError(() => load(resealed(duo, (v) => v.setUint8(MASK_SIZE_AT + 8, 2))), 'ERR_CORRUPT', /mask/);

    const snap = savedOf({ kind: 'snapkv', budget: 12, window: 4 }, [['prefill', 30]]);
    const snapState = MASK_SIZE_AT + 8 + 8;  // one byte per layer
    expect(snap.readBigUInt64LE(MASK_SIZE_AT + 8)).toBe(BigInt(GQA.layers));
    expectError(() => load(resealed(snap, (v) => v.setUint8(snapState, 2))), 'ERR_CORRUPT', /snapkv/);

    const h2o = savedOf({ kind: 'h2o', budget: 12, recent: 4 }, [['prefill', 20]]);
    const firstScore = MASK_SIZE_AT + 8 + 8 + 8;  // after the state size and the first head's kept count
    expectError(() => load(resealed(h2o, (v) => v.setFloat64(firstScore, -1, true))), 'ERR_CORRUPT', /h2o score/);
    expectError(() => load(resealed(h2o, (v) => v.setBigUint64(firstScore - 8, 99n, true))), 'ERR_CORRUPT', /h2o/);
  });

  // Every byte past the fixed header fields changed (the checksum resealed): the policy fields,
  // state, counts, positions and rows of a small cache. ERR_CORRUPT or a cache that works.
  const SMALL = { layers: 2, qHeads: 4, kvHeads: 2, headDim: 16 };
  const small: Array<[string, SelectSpec, Partial<KVCacheOptions>]> = [
    ['streaming', { kind: 'streaming', sink: 2, window: 5 }, {}],
    ['snapkv', { kind: 'snapkv', budget: 8, window: 3 }, {}],
    ['h2o', { kind: 'h2o', budget: 8, recent: 3 }, {}],
    ['h2o over KIVI-2', { kind: 'h2o', budget: 8, recent: 3 }, { policy: { store: { kind: 'kivi', bits: 2, group: 16, residual: 16 } } }],
    ['duo over KIVI-4', { kind: 'duo', heads: [[1, 0], [0, 1]], sink: 2, window: 5 }, { policy: { store: { kind: 'kivi', bits: 4, group: 16, residual: 16 } } }],
  ];
  for (const [name, select, extra] of small) {
    it(`${name}: every byte changed`, () => {
      const cache = held(open, new KVCache({ ...SMALL, device: 'cpu', pageTokens: 4, ...extra, policy: { ...extra.policy, select } }));
      const random = new Random(31);
      for (let layer = 0; layer < SMALL.layers; layer++) {
        const t = randomTokens(random, SMALL, 14);
        cache.prefill(layer, t.q, t.k, t.v);
        const s = randomTokens(random, SMALL, 1);
        cache.step(layer, s.q, s.k, s.v);
      }
      const saved = cache.save();
      const t = randomTokens(random, SMALL, 1);
      const { refused, loaded } = loadEveryDamagedByte(saved, KIND_AT, saved.length - 8, (loadedCache) => {
        for (let layer = 0; layer < SMALL.layers; layer++) expect(loadedCache.step(layer, t.q, t.k, t.v).every(Number.isFinite)).toBe(true);
      });
      expect(refused, 'some damage is refused').toBeGreaterThan(0);
      expect(loaded, 'some damage loads (a changed key or score)').toBeGreaterThan(0);
    });
  }
});
