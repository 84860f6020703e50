#include "kivi_quant.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <vector>

#include "dtype.h"

namespace kvslim {

namespace {

struct GroupParams {
  uint16_t scale, min;  // f16, stored
  float scaleValue, minValue;
};

// s = (max - min) / (2^bits - 1) and min, both rounded to f16. A constant group (or one whose
// scale underflows f16) gets s = 1: codes are 0 and x^ = min, never 0/0. A zero minimum is stored
// as +0 (lo + 0 turns -0 into +0), so the bits do not depend on which zero a scan met first;
// either zero dequantizes every code to the same value.
bool groupParams(float lo, float hi, int32_t bits, GroupParams* out) {
  const float levels = float((1u << bits) - 1u);
  out->scale = floatToF16((hi - lo) / levels);
  out->min = floatToF16(lo + 0.0f);
  if ((out->scale & 0x7fffu) == 0) out->scale = floatToF16(1.0f);
  out->scaleValue = f16ToFloat(out->scale);
  out->minValue = f16ToFloat(out->min);
  return std::isfinite(out->scaleValue) && std::isfinite(out->minValue);
}

// round((x - min) / s) (halves away from zero), clamped to [0, maxCode]: the truncation plus the
// exact fraction t - trunc(t), written without branches (the same codes as roundf) so that the
// loops over channels below vectorize.
inline uint32_t encode(float x, float minValue, float scaleValue, float maxCode) {
  float t = (x - minValue) / scaleValue;
  t = t > 0.0f ? t : 0.0f;  // also NaN -> 0
  t = t < maxCode ? t : maxCode;
  const int32_t whole = int32_t(t);
  return uint32_t(whole) + (t - float(whole) >= 0.5f ? 1u : 0u);
}

}  // namespace

bool quantizeChannelGroups(const float* x, size_t rowStride, int32_t tokens, int32_t channels, int32_t bits,
                           uint32_t* codes, uint16_t* scales, uint16_t* mins, const uint8_t* skip) {
  const float maxCode = float((1u << bits) - 1u);
  const int32_t perWord = 32 / bits;
  const int32_t words = tokens / perWord;
  // Per channel: min and max (a token-outer walk, each channel in token order as a scan of that
  // channel), then its scale and min, then the codes a word of tokens at a time.
  std::vector<float> lo(x, x + channels), hi(x, x + channels), minValue(static_cast<size_t>(channels)), scaleValue(static_cast<size_t>(channels));
  if (skip == nullptr) {
    for (int32_t t = 1; t < tokens; ++t) {
      const float* row = x + size_t(t) * rowStride;
      for (int32_t c = 0; c < channels; ++c) {
        lo[size_t(c)] = row[c] < lo[size_t(c)] ? row[c] : lo[size_t(c)];
        hi[size_t(c)] = row[c] > hi[size_t(c)] ? row[c] : hi[size_t(c)];
      }
    }
  } else {
    for (int32_t c = 0; c < channels; ++c) {
      float low = x[c], high = x[c];
      bool any = false;
      for (int32_t t = 0; t < tokens; ++t) {
        if (skip[size_t(t) * size_t(channels) + size_t(c)]) continue;
        const float value = x[size_t(t) * rowStride + size_t(c)];
        if (!any) low = high = value;
        any = true;
        low = value < low ? value : low;
        high = value > high ? value : high;
      }
      for (int32_t t = 1; !any && t < tokens; ++t) {  // every entry skipped
        const float value = x[size_t(t) * rowStride + size_t(c)];
        low = value < low ? value : low;
        high = value > high ? value : high;
      }
      lo[size_t(c)] = low;
      hi[size_t(c)] = high;
    }
  }
  for (int32_t c = 0; c < channels; ++c) {
    GroupParams p;
    if (!groupParams(lo[size_t(c)], hi[size_t(c)], bits, &p)) return false;
    scales[c] = p.scale;
    mins[c] = p.min;
    minValue[size_t(c)] = p.minValue;
    scaleValue[size_t(c)] = p.scaleValue;
  }
  std::vector<uint32_t> word(static_cast<size_t>(channels));
  for (int32_t w = 0; w < words; ++w) {
    std::fill(word.begin(), word.end(), 0u);
    for (int32_t i = 0; i < perWord; ++i) {
      const float* row = x + size_t(w * perWord + i) * rowStride;
      const int32_t shift = i * bits;
      for (int32_t c = 0; c < channels; ++c) {
        word[size_t(c)] |= encode(row[c], minValue[size_t(c)], scaleValue[size_t(c)], maxCode) << shift;
      }
    }
    for (int32_t c = 0; c < channels; ++c) codes[size_t(c) * size_t(words) + size_t(w)] = word[size_t(c)];
  }
  return true;
}

bool quantizeTokenGroups(const float* row, int32_t channels, int32_t group, int32_t bits, uint32_t* codes,
                         uint16_t* scales, uint16_t* mins, const uint8_t* skip) {
  const float maxCode = float((1u << bits) - 1u);
  const int32_t perWord = 32 / bits;
  constexpr int32_t kLanes = 8;  // min / max in lanes of channels (a store's group is a multiple of 16)
  uint32_t code[64];
  for (int32_t g = 0; g < channels / group; ++g) {
    const float* x = row + size_t(g) * size_t(group);
    const uint8_t* skipped = skip == nullptr ? nullptr : skip + size_t(g) * size_t(group);
    float lo = x[0], hi = x[0];
    bool any = false;
    for (int32_t c = 0; skipped != nullptr && c < group; ++c) {
      if (skipped[c]) continue;
      if (!any) lo = hi = x[c];
      any = true;
      lo = x[c] < lo ? x[c] : lo;
      hi = x[c] > hi ? x[c] : hi;
    }
    if (!any && group % kLanes != 0) {  // the quantize() tool's small groups
      for (int32_t c = 1; c < group; ++c) {
        lo = x[c] < lo ? x[c] : lo;
        hi = x[c] > hi ? x[c] : hi;
      }
    } else if (!any) {  // no skip, or every channel skipped: every channel
      float low[kLanes], high[kLanes];
      for (int32_t j = 0; j < kLanes; ++j) low[j] = high[j] = x[j];
      for (int32_t c = kLanes; c < group; c += kLanes) {
        for (int32_t j = 0; j < kLanes; ++j) {
          low[j] = x[c + j] < low[j] ? x[c + j] : low[j];
          high[j] = x[c + j] > high[j] ? x[c + j] : high[j];
        }
      }
      lo = low[0];
      hi = high[0];
      for (int32_t j = 1; j < kLanes; ++j) {
        lo = low[j] < lo ? low[j] : lo;
        hi = high[j] > hi ? high[j] : hi;
      }
    }
    GroupParams p;
    if (!groupParams(lo, hi, bits, &p)) return false;
    scales[g] = p.scale;
    mins[g] = p.min;
    uint32_t* out = codes + size_t(g) * size_t(group / perWord);
    for (int32_t start = 0; start < group; start += 64) {
      const int32_t count = std::min(64, group - start);
      for (int32_t c = 0; c < count; ++c) code[c] = encode(x[start + c], p.minValue, p.scaleValue, maxCode);
      for (int32_t w = 0; w < count / perWord; ++w) {
        uint32_t word = 0;
        for (int32_t i = 0; i < perWord; ++i) word |= code[w * perWord + i] << (i * bits);
        out[start / perWord + w] = word;
      }
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
    // A word at a time: its codes in order, lowest bits first.
    for (int32_t w = 0; w * perWord < tokens; ++w) {
      uint32_t word = in[w];
      const int32_t first = w * perWord, end = std::min(tokens, first + perWord);
      for (int32_t t = first; t < end; ++t, word >>= bits) x[size_t(t) * rowStride + size_t(c)] = float(word & mask) * s + m;
    }
  }
}

void dequantizeTokenGroups(const uint32_t* codes, const uint16_t* scales, const uint16_t* mins, int32_t channels,
                           int32_t group, int32_t bits, float* row) {
  const uint32_t mask = (1u << bits) - 1u;
  const int32_t perWord = 32 / bits;
  // A word at a time, lowest bits first; each group's scale and min converted once.
  int32_t groupIndex = -1, groupEnd = 0;
  float s = 0.0f, m = 0.0f;
  for (int32_t w = 0; w * perWord < channels; ++w) {
    uint32_t word = codes[w];
    const int32_t first = w * perWord, end = std::min(channels, first + perWord);
    for (int32_t c = first; c < end; ++c, word >>= bits) {
      if (c == groupEnd) {
        ++groupIndex;
        groupEnd += group;
        s = f16ToFloat(scales[groupIndex]);
        m = f16ToFloat(mins[groupIndex]);
      }
      row[c] = float(word & mask) * s + m;
    }
  }
}

void selectOutliers(const float* x, int32_t n, int32_t count, uint16_t* indices) {
  std::vector<int32_t> order(static_cast<size_t>(n));
  std::iota(order.begin(), order.end(), 0);
  const auto larger = [x](int32_t a, int32_t b) {
    const float ma = std::fabs(x[a]), mb = std::fabs(x[b]);
    return ma > mb || (ma == mb && a < b);
  };
  std::partial_sort(order.begin(), order.begin() + count, order.end(), larger);
  std::sort(order.begin(), order.begin() + count);
  for (int32_t i = 0; i < count; ++i) indices[i] = uint16_t(order[size_t(i)]);
}

namespace {

// delta = f16(x - x^) for every outlier; false when one overflows f16.
bool outlierDeltas(const float* x, const float* xHat, const uint16_t* indices, int32_t count, uint16_t* deltas) {
  for (int32_t i = 0; i < count; ++i) {
    const float delta = x[indices[i]] - xHat[indices[i]];
    deltas[i] = floatToF16(delta);
    if (!std::isfinite(f16ToFloat(deltas[i]))) return false;
  }
  return true;
}

}  // namespace

bool quantizeKeyGroupRecord(const float* keys, const KiviFormat& format, uint8_t* record) {
  const int32_t dim = format.headDim, group = format.group, count = format.keyOutliers;
  auto* codes = reinterpret_cast<uint32_t*>(record);
  auto* scales = reinterpret_cast<uint16_t*>(record + format.keyGroupCodeBytes());
  if (count == 0) return quantizeChannelGroups(keys, size_t(dim), group, dim, format.bits, codes, scales, scales + dim);
  const int32_t n = group * dim;
  std::vector<uint16_t> indices(static_cast<size_t>(count)), deltas(static_cast<size_t>(count));
  selectOutliers(keys, n, count, indices.data());
  std::vector<uint8_t> skip(static_cast<size_t>(n), 0);
  for (uint16_t i : indices) skip[i] = 1;
  if (!quantizeChannelGroups(keys, size_t(dim), group, dim, format.bits, codes, scales, scales + dim, skip.data())) {
    return false;
  }
  std::vector<float> xHat(static_cast<size_t>(n));
  dequantizeChannelGroups(codes, scales, scales + dim, group, dim, format.bits, xHat.data(), size_t(dim));
  if (!outlierDeltas(keys, xHat.data(), indices.data(), count, deltas.data())) return false;
  std::memcpy(record + format.keyOutlierOffset(), indices.data(), size_t(count) * 2);
  std::memcpy(record + format.keyOutlierOffset() + size_t(count) * 2, deltas.data(), size_t(count) * 2);
  return true;
}

bool quantizeValueTokenRecord(const float* row, const KiviFormat& format, uint8_t* record) {
  const int32_t dim = format.headDim, count = format.valueOutliers;
  auto* codes = reinterpret_cast<uint32_t*>(record);
  auto* scales = reinterpret_cast<uint16_t*>(record + format.valueCodeBytes());
  uint16_t* mins = scales + format.channelGroups();
  if (count == 0) return quantizeTokenGroups(row, dim, format.group, format.bits, codes, scales, mins);
  std::vector<uint16_t> indices(static_cast<size_t>(count)), deltas(static_cast<size_t>(count));
  selectOutliers(row, dim, count, indices.data());
  std::vector<uint8_t> skip(static_cast<size_t>(dim), 0);
  for (uint16_t i : indices) skip[i] = 1;
  if (!quantizeTokenGroups(row, dim, format.group, format.bits, codes, scales, mins, skip.data())) return false;
  std::vector<float> xHat(static_cast<size_t>(dim));
  dequantizeTokenGroups(codes, scales, mins, dim, format.group, format.bits, xHat.data());
  if (!outlierDeltas(row, xHat.data(), indices.data(), count, deltas.data())) return false;
  std::memcpy(record + format.valueOutlierOffset(), indices.data(), size_t(count) * 2);
  std::memcpy(record + format.valueOutlierOffset() + size_t(count) * 2, deltas.data(), size_t(count) * 2);
  return true;
}

void dequantizeKeyGroupRecord(const uint8_t* record, const KiviFormat& format, float* keys) {
  const int32_t dim = format.headDim;
  const auto* scales = reinterpret_cast<const uint16_t*>(record + format.keyGroupCodeBytes());
  dequantizeChannelGroups(reinterpret_cast<const uint32_t*>(record), scales, scales + dim, format.group, dim, format.bits,
                          keys, size_t(dim));
  const auto* indices = reinterpret_cast<const uint16_t*>(record + format.keyOutlierOffset());
  for (int32_t i = 0; i < format.keyOutliers; ++i) keys[indices[i]] += f16ToFloat(indices[format.keyOutliers + i]);
}

void dequantizeValueTokenRecord(const uint8_t* record, const KiviFormat& format, float* row) {
  const auto* scales = reinterpret_cast<const uint16_t*>(record + format.valueCodeBytes());
  dequantizeTokenGroups(reinterpret_cast<const uint32_t*>(record), scales, scales + format.channelGroups(), format.headDim,
                        format.group, format.bits, row);
  const auto* indices = reinterpret_cast<const uint16_t*>(record + format.valueOutlierOffset());
  for (int32_t i = 0; i < format.valueOutliers; ++i) row[indices[i]] += f16ToFloat(indices[format.valueOutliers + i]);
}

}  // namespace kvslim
