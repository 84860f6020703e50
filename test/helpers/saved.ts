// Editing saved caches past their checksum, for the load() corruption tests, and reading the
// policy state they carry.
import { expect } from 'vitest';

import { KVCache, KVSlimError } from '../../lib/index.js';

/**
 * The trailing checksum of KVSLIM01 saves: standard FNV-1a 64, as native/core/cache_serialize.cc
 * computes it, so that edits get past the checksum.
 */
export function fnv1a(bytes: Uint8Array): bigint {
  let hash = 14695981039346656037n;
  for (const byte of bytes) hash = BigInt.asUintN(64, (hash ^ BigInt(byte)) * 0x100000001b3n);
  return hash;
}

const MASK64 = (1n << 64n) - 1n;
const P1 = 0x9e3779b185ebca87n, P2 = 0xc2b2ae3d27d4eb4fn, P3 = 0x165667b19e3779f9n, P4 = 0x85ebca77c2b2ae63n, P5 = 0x27d4eb2f165667c5n;
const rotl = (x: bigint, r: bigint): bigint => ((x << r) | (x >> (64n - r))) & MASK64;
const mul = (a: bigint, b: bigint): bigint => (a * b) & MASK64;
const round = (acc: bigint, input: bigint): bigint => mul(rotl((acc + mul(input, P2)) & MASK64, 31n), P1);

/**
 * XXH64 with seed 0 (xxHash's 64-bit hash, written from its specification): the checksum of
 * saves with magic KVSLIM02, as native/core/xxhash64.h computes it.
 */
export function xxh64(bytes: Uint8Array): bigint {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const size = bytes.length;
  let p = 0;
  let hash: bigint;
  if (size >= 32) {
    let v1 = (P1 + P2) & MASK64, v2 = P2, v3 = 0n, v4 = (MASK64 + 1n - P1) & MASK64;
    for (; size - p >= 32; p += 32) {
      v1 = round(v1, view.getBigUint64(p, true));
      v2 = round(v2, view.getBigUint64(p + 8, true));
      v3 = round(v3, view.getBigUint64(p + 16, true));
      v4 = round(v4, view.getBigUint64(p + 24, true));
    }
    hash = (rotl(v1, 1n) + rotl(v2, 7n) + rotl(v3, 12n) + rotl(v4, 18n)) & MASK64;
    for (const v of [v1, v2, v3, v4]) hash = (mul(hash ^ round(0n, v), P1) + P4) & MASK64;
  } else {
    hash = P5;
  }
  hash = (hash + BigInt(size)) & MASK64;
  for (; size - p >= 8; p += 8) hash = (mul(rotl(hash ^ round(0n, view.getBigUint64(p, true)), 27n), P1) + P4) & MASK64;
  if (size - p >= 4) {
    hash = (mul(rotl(hash ^ mul(BigInt(view.getUint32(p, true)), P1), 23n), P2) + P3) & MASK64;
    p += 4;
  }
  for (; p < size; p++) hash = mul(rotl(hash ^ mul(BigInt(bytes[p]), P5), 11n), P1);
  hash = mul(hash ^ (hash >> 33n), P2);
  hash = mul(hash ^ (hash >> 29n), P3);
  return hash ^ (hash >> 32n);
}

/**
 * A copy of `saved` with `edit` applied and the checksum recomputed: damage the hash cannot see.
 * The checksum follows the (edited) magic: XXH64 for KVSLIM02, FNV-1a for KVSLIM01.
 */
export function resealed(saved: Buffer, edit: (view: DataView) => void): Buffer {
  const copy = Buffer.from(saved);
  edit(new DataView(copy.buffer, copy.byteOffset, copy.byteLength));
  const body = copy.subarray(0, copy.length - 8);
  const fnv = copy.subarray(0, 8).toString('latin1') === 'KVSLIM01';
  copy.writeBigUInt64LE(fnv ? fnv1a(body) : xxh64(body), copy.length - 8);
  return copy;
}

/** Header offset of the policy mask's size in format version 6 (cache_serialize.cc); the mask, the state's size and the state follow. */
export const MASK_SIZE_AT = 136;

/**
 * H2O's state in a saved cache: per layer and kv head (layer-major), the accumulated scores of the
 * kept slots (slot order) and of the tail (position order).
 */
export function savedH2OScores(saved: Buffer, layers: number, kvHeads: number): Array<{ kept: number[]; tail: number[] }> {
  let at = MASK_SIZE_AT + 8 + Number(saved.readBigUInt64LE(MASK_SIZE_AT)) + 8;
  const take = (): number[] => {
    const count = Number(saved.readBigUInt64LE(at));
    at += 8;
    const scores = Array.from({ length: count }, (_, i) => saved.readDoubleLE(at + 8 * i));
    at += 8 * count;
    return scores;
  };
  return Array.from({ length: layers * kvHeads }, () => ({ kept: take(), tail: take() }));
}

/**
 * Loads one damaged save: a refusal must be a KVSlimError ERR_CORRUPT; a cache that loads is handed
 * to `use` (which must see finite outputs or a KVSlimError) and disposed. `label` names the damage
 * in failures.
 */
export function loadDamaged(damaged: Buffer, label: string, use: (cache: KVCache) => void): 'refused' | 'loaded' {
  let cache: KVCache;
  try {
    cache = KVCache.load(damaged, { device: 'cpu' });
  } catch (error) {
    expect(error, label).toBeInstanceOf(KVSlimError);
    expect((error as KVSlimError).code, `${label}: ${(error as Error).message}`).toBe('ERR_CORRUPT');
    return 'refused';
  }
  try {
    use(cache);
  } catch (error) {
    expect(error, label).toBeInstanceOf(KVSlimError);
  } finally {
    cache.dispose();
  }
  return 'loaded';
}

/**
 * Every byte of saved[from, to) changed in turn (one bit flipped, the checksum resealed) and
 * loaded by loadDamaged. Counts both outcomes.
 */
export function loadEveryDamagedByte(saved: Buffer, from: number, to: number, use: (cache: KVCache) => void): { refused: number; loaded: number } {
  const counts = { refused: 0, loaded: 0 };
  for (let at = from; at < to; at++) {
    const damaged = resealed(saved, (view) => view.setUint8(at, view.getUint8(at) ^ (at % 2 === 0 ? 0x80 : 0x01)));
    counts[loadDamaged(damaged, `byte ${at}`, use)]++;
  }
  return counts;
}
