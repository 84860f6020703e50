// Deterministic test data for the bench. Every value is a multiple of 1/128 in [-2, 2): an integer
// of at most 8 significant bits over a power of two, so it is exact in f32, f16 and bf16. The three
// stores then hold the very same numbers, one plain-JS reference serves them all, and the
// correctness check measures the kernel rather than the rounding of the store format.

/**
 * `count` grid values from a seeded xorshift32 stream (two values per draw).
 * Mean ~0, standard deviation ~1.15: with headDim 128 and scale 1/sqrt(128) the attention scores
 * spread over about ±4, a softmax neither flat nor one-hot.
 */
export function gridValues(count: number, seed: number): Float32Array {
  const out = new Float32Array(count);
  let state = seed | 0 || 0x9e3779b9;
  for (let i = 0; i < count; i += 2) {
    state ^= state << 13;
    state ^= state >>> 17;
    state ^= state << 5;
    out[i] = ((state & 511) - 256) / 128;
    if (i + 1 < count) out[i + 1] = (((state >>> 16) & 511) - 256) / 128;
  }
  return out;
}
