// Plain-JS encoders and decoders of the 16-bit float formats kvslim takes and stores
// (Node 20 has no Float16Array). Encoders take a float32 value (a JS number is first rounded to
// float32) and round to nearest, ties to even, as IEEE 754 and the engine do.

const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);

/** The 32 bits of Math.fround(x). */
function float32Bits(x: number): number {
  f32[0] = x;
  return u32[0];
}

/** Rounds a non-negative integer-valued-plus-fraction to an integer, ties to even. */
function roundHalfEven(x: number): number {
  const whole = Math.floor(x);
  const fraction = x - whole;
  if (fraction > 0.5 || (fraction === 0.5 && whole % 2 === 1)) return whole + 1;
  return whole;
}

// ---- IEEE binary16: 1 sign bit, 5 exponent bits (bias 15), 10 mantissa bits ----------------

/** float32 -> binary16 bits: round to nearest even, gradual underflow, overflow to Inf. */
export function f32ToF16Bits(x: number): number {
  const bits = float32Bits(x);
  const sign = (bits >>> 16) & 0x8000;
  const exponent = (bits >>> 23) & 0xff;
  const mantissa = bits & 0x7fffff;
  if (exponent === 0xff) return sign | 0x7c00 | (mantissa !== 0 ? 0x200 : 0); // Inf or NaN
  const magnitude = Math.abs(Math.fround(x));
  if (magnitude < 2 ** -14) {
    // Subnormal half: a multiple of 2^-24 (exact in float64); may round up to the smallest normal.
    return sign | roundHalfEven(magnitude * 2 ** 24);
  }
  const unbiased = exponent - 127;
  if (unbiased > 15) return sign | 0x7c00;
  // Keep the top 10 of 23 mantissa bits; the dropped 13 bits decide the rounding. A carry out of
  // the mantissa correctly bumps the exponent (and 65520 and above become Inf, 0x7c00).
  let half = ((unbiased + 15) << 10) | (mantissa >>> 13);
  const dropped = mantissa & 0x1fff;
  if (dropped > 0x1000 || (dropped === 0x1000 && (half & 1) === 1)) half += 1;
  return sign | half;
}

/** binary16 bits -> value. */
export function f16BitsToNumber(bits: number): number {
  const sign = bits & 0x8000 ? -1 : 1;
  const exponent = (bits >>> 10) & 0x1f;
  const mantissa = bits & 0x3ff;
  if (exponent === 0) return sign * mantissa * 2 ** -24;
  if (exponent === 0x1f) return mantissa === 0 ? sign * Infinity : NaN;
  return sign * (1 + mantissa / 1024) * 2 ** (exponent - 15);
}

// ---- bfloat16: the top 16 bits of a float32 -------------------------------------------------

/** float32 -> bfloat16 bits: round to nearest even; NaN stays NaN. */
export function f32ToBf16Bits(x: number): number {
  const bits = float32Bits(x);
  if ((bits & 0x7fffffff) > 0x7f800000) return ((bits >>> 16) | 0x40) & 0xffff;
  let upper = bits >>> 16;
  const lower = bits & 0xffff;
  if (lower > 0x8000 || (lower === 0x8000 && (upper & 1) === 1)) upper += 1;
  return upper & 0xffff;
}

/** bfloat16 bits -> value. */
export function bf16BitsToNumber(bits: number): number {
  u32[0] = (bits & 0xffff) << 16;
  return f32[0];
}

// ---- Whole tensors ----------------------------------------------------------------------------

export type HalfDtype = 'f16' | 'bf16';
export type Dtype = 'f32' | HalfDtype;

/** Encodes a float32 tensor as f16 or bf16 bits. */
export function encodeHalf(x: ArrayLike<number>, dtype: HalfDtype): Uint16Array {
  const encode = dtype === 'f16' ? f32ToF16Bits : f32ToBf16Bits;
  const out = new Uint16Array(x.length);
  for (let i = 0; i < x.length; i++) out[i] = encode(x[i]);
  return out;
}

/** Decodes f16 or bf16 bits. */
export function decodeHalf(bits: Uint16Array, dtype: HalfDtype): Float64Array {
  const decode = dtype === 'f16' ? f16BitsToNumber : bf16BitsToNumber;
  const out = new Float64Array(bits.length);
  for (let i = 0; i < bits.length; i++) out[i] = decode(bits[i]);
  return out;
}

/** The values a tensor holds once stored as `dtype` (f32: unchanged). */
export function roundTo(x: ArrayLike<number>, dtype: Dtype): Float64Array {
  if (dtype === 'f32') return Float64Array.from(x, (value) => Math.fround(value));
  return decodeHalf(encodeHalf(x, dtype), dtype);
}
