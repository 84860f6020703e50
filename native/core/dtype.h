// Element types of stored keys/values and their scalar conversions.
// The helpers are `static inline` on purpose: SIMD translation units include this header with
// wider -m flags, and internal linkage keeps the linker from merging an AVX-512 copy into
// code that must run on any x86-64.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>

namespace kvslim {

enum class DType : int32_t { F32 = 0, F16 = 1, BF16 = 2 };

static inline size_t dtypeBytes(DType t) { return t == DType::F32 ? 4 : 2; }

static inline float bitsToFloat(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

static inline uint32_t floatToBits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

static inline float bf16ToFloat(uint16_t h) { return bitsToFloat(uint32_t(h) << 16); }

// Round to nearest even; NaN stays NaN (quiet bit forced so truncation cannot make it Inf).
static inline uint16_t floatToBf16(float f) {
  uint32_t u = floatToBits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

static inline float f16ToFloat(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exponent = (h >> 10) & 0x1fu;
  uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0) {
    if (mantissa == 0) return bitsToFloat(sign);
    // Subnormal half: value = mantissa * 2^-24.
    float value = float(mantissa) * 5.9604644775390625e-8f;
    return sign ? -value : value;
  }
  if (exponent == 31) return bitsToFloat(sign | 0x7f800000u | (mantissa << 13));
  return bitsToFloat(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

// IEEE binary16 with round-to-nearest-even, overflow to Inf, gradual underflow.
static inline uint16_t floatToF16(float f) {
  uint32_t u = floatToBits(f);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t absBits = u & 0x7fffffffu;
  if (absBits > 0x7f800000u) return uint16_t(sign | 0x7e00u);       // NaN
  if (absBits >= 0x477ff000u) return uint16_t(sign | 0x7c00u);      // rounds to >= 65520: Inf
  if (absBits < 0x38800000u) {                                      // below 2^-14: subnormal
    if (absBits < 0x33000000u) return uint16_t(sign);               // below half of 2^-24
    uint32_t mantissa = (absBits & 0x7fffffu) | 0x800000u;
    int shift = 126 - int(absBits >> 23);                           // 14..24
    uint32_t halfMantissa = mantissa >> shift;
    uint32_t remainder = mantissa & ((1u << shift) - 1u);
    uint32_t halfway = 1u << (shift - 1);
    if (remainder > halfway || (remainder == halfway && (halfMantissa & 1u))) halfMantissa++;
    return uint16_t(sign | halfMantissa);
  }
  uint32_t rounded = absBits + 0xfffu + ((absBits >> 13) & 1u);
  return uint16_t(sign | ((rounded - 0x38000000u) >> 13));
}

}  // namespace kvslim
