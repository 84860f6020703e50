// load() of saves damaged past their checksum by random multi-byte edits: header fields set to
// other valid-looking values (0, -1, 1, large, a bit flipped), so that each field is valid alone
// but the save no longer agrees with itself. A refusal must be ERR_CORRUPT; a cache that loads
// must then work, for enough steps to flush its KIVI residual, evict and rebuild its indexes,
// throwing nothing but KVSlimError and giving finite outputs. (A residual changed this way once
// loaded, and the next step killed the process with std::length_error.)
import { describe, expect, it } from 'vitest';

import { KVCache, type PolicySpec } from '../lib/index.js';
import { Random } from './helpers/random.js';
import { loadDamaged, resealed } from './helpers/saved.js';

const SHAPE = { layers: 2, qHeads: 4, kvHeads: 2, headDim: 32 };
const ROPE = { theta: 10000, style: 'half' as const };

const cases: Array<[string, PolicySpec, boolean]> = [
  ['f16', { store: { kind: 'f16' } }, false],
  ['KIVI-2', { store: { kind: 'kivi', bits: 2, residual: 32 } }, false],
  ['KIVI-4 with outliers', { store: { kind: 'kivi', bits: 4, residual: 32, outliers: 0.02 } }, false],
  ['KIVI-2 pre-RoPE', { store: { kind: 'kivi', bits: 2, residual: 32, preRope: true } }, true],
  ['streaming over KIVI', { select: { kind: 'streaming', sink: 4, window: 40 }, store: { kind: 'kivi', bits: 2, residual: 32 } }, false],
  ['h2o', { select: { kind: 'h2o', budget: 48, recent: 8 } }, false],
  ['h2o over KIVI', { select: { kind: 'h2o', budget: 64, recent: 16 }, store: { kind: 'kivi', bits: 2, residual: 32 } }, false],
  ['snapkv', { select: { kind: 'snapkv', budget: 48 } }, false],
  ['duo', { select: { kind: 'duo', heads: [[true, false], [false, true]], sink: 4, window: 16 } }, false],
  ['graph retrieval', { select: { kind: 'retrieval', index: 'graph', topK: 16, sink: 4, window: 16 } }, false],
  ['actqkv', { select: { kind: 'actqkv', sink: 4, window: 16 } }, false],
];

const PROMPT = 150;
const TRIALS = 80;
const STEPS = 40;  // past a residual of 32: the loaded cache flushes, evicts and compacts

function savedCache(random: Random, policy: PolicySpec, rope: boolean): Buffer {
  const cache = new KVCache({ ...SHAPE, device: 'cpu', policy, ...(rope ? { rope: ROPE } : {}) });
  try {
    const { qHeads, kvHeads, headDim } = SHAPE;
    for (let layer = 0; layer < SHAPE.layers; layer++) {
      const k = random.tensor(PROMPT * kvHeads * headDim);
      cache.prefill(layer, random.tensor(PROMPT * qHeads * headDim), k, random.tensor(PROMPT * kvHeads * headDim));
      for (let s = 0; s < 5; s++) cache.step(layer, random.tensor(qHeads * headDim), random.tensor(kvHeads * headDim), random.tensor(kvHeads * headDim));
    }
    return cache.save();
  } finally {
    cache.dispose();
  }
}

// 1-3 edits, most in the header and policy state (the first 600 bytes), each a bit flip, a byte,
// or an i32 / i64 set to a boundary value.
function damage(random: Random, view: DataView): void {
  const body = view.byteLength - 8;
  for (let e = 1 + random.integer(3); e > 0; e--) {
    const at = random.integer(random.uniform() < 0.6 ? Math.min(600, body) : body);
    switch (random.integer(4)) {
      case 0: view.setUint8(at, view.getUint8(at) ^ (1 << random.integer(8))); break;
      case 1: view.setUint8(at, random.integer(256)); break;
      case 2: if (at + 8 <= body) view.setBigInt64(at, [0n, -1n, 1n << 40n, 7n, -(1n << 62n), BigInt(random.integer(1000))][random.integer(6)], true); break;
      default: if (at + 4 <= body) view.setInt32(at, [0, -1, 1, 2 ** 31 - 1, 3, 65536][random.integer(6)], true);
    }
  }
}

function use(random: Random, cache: KVCache): void {
  const { qHeads, kvHeads, headDim } = SHAPE;
  for (let layer = 0; layer < SHAPE.layers; layer++) {
    expect(cache.attend(layer, random.tensor(qHeads * headDim)).every(Number.isFinite)).toBe(true);
    for (let s = 0; s < STEPS; s++) {
      const out = cache.step(layer, random.tensor(qHeads * headDim), random.tensor(kvHeads * headDim), random.tensor(kvHeads * headDim));
      expect(out.every(Number.isFinite)).toBe(true);
    }
    cache.positions(layer, 0);
  }
  cache.stats();
  const fork = cache.fork();
  fork.step(0, random.tensor(qHeads * headDim), random.tensor(kvHeads * headDim), random.tensor(kvHeads * headDim));
  fork.dispose();
  KVCache.load(cache.save(), { device: 'cpu' }).dispose();
}

describe('load() of saves with random edits behind a valid checksum', () => {
  for (const [name, policy, rope] of cases) {
    it(`${name}: refused with ERR_CORRUPT, or loads and works`, () => {
      const random = new Random(name.length * 7919 + 17);
      const saved = savedCache(random, policy, rope);
      const counts = { refused: 0, loaded: 0 };
      for (let trial = 0; trial < TRIALS; trial++) {
        counts[loadDamaged(resealed(saved, (view) => damage(random, view)), `trial ${trial}`, (cache) => use(random, cache))]++;
      }
      // Both outcomes occur: the edits reach fields that load() checks and bytes it cannot judge.
      expect(counts.refused).toBeGreaterThan(0);
      expect(counts.loaded).toBeGreaterThan(0);
    });
  }
});
