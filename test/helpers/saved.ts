// Editing saved caches past their checksum, for the load() corruption tests, and reading the
// policy state they carry.

/**
 * The save format's trailing checksum: standard FNV-1a 64, as native/core/cache_serialize.cc
 * computes it, so that edits get past the checksum.
 */
export function fnv1a(bytes: Uint8Array): bigint {
  let hash = 14695981039346656037n;
  for (const byte of bytes) hash = BigInt.asUintN(64, (hash ^ BigInt(byte)) * 0x100000001b3n);
  return hash;
}

/** A copy of `saved` with `edit` applied and the checksum recomputed: damage the hash cannot see. */
export function resealed(saved: Buffer, edit: (view: DataView) => void): Buffer {
  const copy = Buffer.from(saved);
  edit(new DataView(copy.buffer, copy.byteOffset, copy.byteLength));
  copy.writeBigUInt64LE(fnv1a(copy.subarray(0, copy.length - 8)), copy.length - 8);
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
