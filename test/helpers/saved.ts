// Editing saved caches past their checksum, for the load() corruption tests.

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
