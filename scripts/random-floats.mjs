// Uniform floats in [-1, 1) from a xorshift32 stream: the GPU timing scripts' keys, values and
// queries (timing only; the tests check what the kernels compute).
export function randomFloats(count, seed) {
  const out = new Float32Array(count);
  let s = seed >>> 0 || 1;
  for (let i = 0; i < count; i++) {
    s ^= s << 13; s >>>= 0; s ^= s >>> 17; s ^= s << 5; s >>>= 0;
    out[i] = (s / 4294967296 - 0.5) * 2;
  }
  return out;
}
