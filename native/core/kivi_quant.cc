#include "kivi_quant.h"

#include <cmath>

#include "dtype.h"

namespace kvslim {

namespace {

struct GroupParams {
  uint16_t scale, min;  // f16, stored
  float scaleValue, minValue;
};

// s = (max - min) / (2^bits - 1) and min, both rounded to f16. A constant group (or one whose
// scale underflows f16) gets s = 1: codes are 0 and x^ = min, never 0/0.
bool groupParams(float lo, float hi, int32_t bits, GroupParams* out) {
  const float levels = float((1u << bits) - 1u);
  out->scale = floatToF16((hi - lo) / levels);
  out->min = floatToF16(lo);
  if ((out->scale & 0x7fffu) == 0) out->scale = floatToF16(1.0f);
  out->scaleValue = f16ToFloat(out->scale);
  out->minValue = f16ToFloat(out->min);
  return std::isfinite(out->scaleValue) && std::isfinite(out->minValue);
}

inline uint32_t encode(float x, const GroupParams& p, uint32_t maxCode) {
  const float t = std::round((x - p.minValue) / p.scaleValue);
  return t <= 0.0f ? 0u : (t >= float(maxCode) ? maxCode : uint32_t(t));
}

}  // namespace

bool quantizeChannelGroups(const float* x, size_t rowStride, int32_t tokens, int32_t channels, int32_t bits,
                           uint32_t* codes, uint16_t* scales, uint16_t* mins) {
  const uint32_t maxCode = (1u << bits) - 1u;
  const int32_t perWord = 32 / bits;
  const int32_t words = tokens / perWord;
  for (int32_t c = 0; c < channels; ++c) {
    float lo = x[c], hi = x[c];
    for (int32_t t = 1; t < tokens; ++t) {
      const float value = x[size_t(t) * rowStride + size_t(c)];
      lo = value < lo ? value : lo;
      hi = value > hi ? value : hi;
    }
    GroupParams p;
    if (!groupParams(lo, hi, bits, &p)) return false;
    scales[c] = p.scale;
    mins[c] = p.min;
    uint32_t* out = codes + size_t(c) * size_t(words);
    for (int32_t w = 0; w < words; ++w) {
      uint32_t word = 0;
      for (int32_t i = 0; i < perWord; ++i) {
        const float value = x[size_t(w * perWord + i) * rowStride + size_t(c)];
        word |= encode(value, p, maxCode) << (i * bits);
      }
      out[w] = word;
    }
  }
  return true;
}

bool quantizeTokenGroups(const float* row, int32_t channels, int32_t group, int32_t bits, uint32_t* codes,
                         uint16_t* scales, uint16_t* mins) {
  const uint32_t maxCode = (1u << bits) - 1u;
  const int32_t perWord = 32 / bits;
  for (int32_t g = 0; g < channels / group; ++g) {
    const float* x = row + size_t(g) * size_t(group);
    float lo = x[0], hi = x[0];
    for (int32_t c = 1; c < group; ++c) {
      lo = x[c] < lo ? x[c] : lo;
      hi = x[c] > hi ? x[c] : hi;
    }
    GroupParams p;
    if (!groupParams(lo, hi, bits, &p)) return false;
    scales[g] = p.scale;
    mins[g] = p.min;
    uint32_t* out = codes + size_t(g) * size_t(group / perWord);
    for (int32_t w = 0; w < group / perWord; ++w) {
      uint32_t word = 0;
      for (int32_t i = 0; i < perWord; ++i) word |= encode(x[w * perWord + i], p, maxCode) << (i * bits);
      out[w] = word;
    }
  }
  return true;
}

void dequantizeChannelGroups(const uint32_t* codes, const uint16_t* scales, const uint16_t* mins, int32_t tokens,
                             int32_t channels, int32_t bits, float* x, size_t rowStride) {
  const uint32_t mask = (1u << bits) - 1u;
  const int32_t perWord = 32 / bits;
  const int32_t words = tokens / perWord;
  for (int32_t c = 0; c < channels; ++c) {
    const float s = f16ToFloat(scales[c]), m = f16ToFloat(mins[c]);
    const uint32_t* in = codes + size_t(c) * size_t(words);
    for (int32_t t = 0; t < tokens; ++t) {
      const uint32_t code = (in[t / perWord] >> ((t % perWord) * bits)) & mask;
      x[size_t(t) * rowStride + size_t(c)] = float(code) * s + m;
    }
  }
}

void dequantizeTokenGroups(const uint32_t* codes, const uint16_t* scales, const uint16_t* mins, int32_t channels,
                           int32_t group, int32_t bits, float* row) {
  const uint32_t mask = (1u << bits) - 1u;
  const int32_t perWord = 32 / bits;
  for (int32_t c = 0; c < channels; ++c) {
    const uint32_t code = (codes[c / perWord] >> ((c % perWord) * bits)) & mask;
    row[c] = float(code) * f16ToFloat(scales[c / group]) + f16ToFloat(mins[c / group]);
  }
}

}  // namespace kvslim
