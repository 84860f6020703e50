#include "kivi_ops.h"

#include <cmath>
#include <string>

#include "dtype.h"
#include "kivi_quant.h"

namespace kvslim {

namespace {

Status checkFormat(int32_t bits, int32_t group, int32_t channels) {
  if (bits != 2 && bits != 4 && bits != 8) {
    return Status(ErrorCode::Option, "bits must be 2, 4 or 8, but received " + std::to_string(bits));
  }
  if (group <= 0 || (group * bits) % 32 != 0 || group > (1 << 20)) {
    return Status(ErrorCode::Option, "group must be a positive multiple of " + std::to_string(32 / bits) +
                                         " (whole 32-bit words of " + std::to_string(bits) + "-bit codes), but received " +
                                         std::to_string(group));
  }
  if (channels <= 0) return Status(ErrorCode::Option, "channels must be a positive integer");
  return Status::ok();
}

Status checkShape(QuantAxis axis, int64_t tokens, int32_t channels, int32_t group) {
  if (axis == QuantAxis::Channel && tokens % group != 0) {
    return Status(ErrorCode::Shape, "x must hold a multiple of group (" + std::to_string(group) +
                                        ") tokens for axis 'channel', but holds " + std::to_string(tokens));
  }
  if (axis == QuantAxis::Token && channels % group != 0) {
    return Status(ErrorCode::Shape, "channels (" + std::to_string(channels) + ") must be a multiple of group (" +
                                        std::to_string(group) + ") for axis 'token'");
  }
  return Status::ok();
}

size_t groupCount(QuantAxis axis, int64_t tokens, int32_t channels, int32_t group) {
  return axis == QuantAxis::Channel ? size_t(tokens / group) * size_t(channels) : size_t(tokens) * size_t(channels / group);
}

}  // namespace

Status quantizeMatrix(const HostTensor& x, int32_t channels, QuantAxis axis, int32_t bits, int32_t group,
                      QuantizedMatrix* out) {
  KVSLIM_RETURN_IF_ERROR(checkFormat(bits, group, channels));
  if (x.count == 0 || x.count % size_t(channels) != 0) {
    return Status(ErrorCode::Shape, "x must hold tokens x channels = tokens x " + std::to_string(channels) +
                                        " elements with tokens >= 1, but holds " + std::to_string(x.count));
  }
  const int64_t tokens = int64_t(x.count / size_t(channels));
  KVSLIM_RETURN_IF_ERROR(checkShape(axis, tokens, channels, group));
  std::vector<float> values(x.count);
  KVSLIM_RETURN_IF_ERROR(toFloat32(x, values.data(), "x"));
  out->axis = axis;
  out->bits = bits;
  out->group = group;
  out->tokens = tokens;
  out->channels = channels;
  const size_t groups = groupCount(axis, tokens, channels, group);
  out->codes.assign(size_t(tokens) * size_t(channels) * size_t(bits) / 32, 0u);
  std::vector<uint16_t> scales(groups), mins(groups);
  bool ok = true;
  if (axis == QuantAxis::Channel) {
    const size_t wordsPerGroup = size_t(channels) * size_t(group) * size_t(bits) / 32;
    for (int64_t g = 0; ok && g < tokens / group; ++g) {
      ok = quantizeChannelGroups(values.data() + size_t(g) * size_t(group) * size_t(channels), size_t(channels), group,
                                 channels, bits, out->codes.data() + size_t(g) * wordsPerGroup,
                                 scales.data() + size_t(g) * size_t(channels), mins.data() + size_t(g) * size_t(channels));
    }
  } else {
    const size_t wordsPerToken = size_t(channels) * size_t(bits) / 32;
    const size_t groupsPerToken = size_t(channels / group);
    for (int64_t t = 0; ok && t < tokens; ++t) {
      ok = quantizeTokenGroups(values.data() + size_t(t) * size_t(channels), channels, group, bits,
                               out->codes.data() + size_t(t) * wordsPerToken, scales.data() + size_t(t) * groupsPerToken,
                               mins.data() + size_t(t) * groupsPerToken);
    }
  }
  if (!ok) return Status(ErrorCode::Value, "x spans a range beyond f16 (scales and mins are stored as f16)");
  out->scales.resize(groups);
  out->mins.resize(groups);
  for (size_t i = 0; i < groups; ++i) {
    out->scales[i] = f16ToFloat(scales[i]);
    out->mins[i] = f16ToFloat(mins[i]);
  }
  return Status::ok();
}

Status dequantizeMatrix(const QuantizedMatrix& q, std::vector<float>* out) {
  KVSLIM_RETURN_IF_ERROR(checkFormat(q.bits, q.group, q.channels));
  if (q.tokens <= 0) return Status(ErrorCode::Shape, "tokens must be a positive integer");
  KVSLIM_RETURN_IF_ERROR(checkShape(q.axis, q.tokens, q.channels, q.group));
  const size_t groups = groupCount(q.axis, q.tokens, q.channels, q.group);
  const size_t words = size_t(q.tokens) * size_t(q.channels) * size_t(q.bits) / 32;
  if (q.codes.size() != words) {
    return Status(ErrorCode::Shape, "codes must hold " + std::to_string(words) + " words, but holds " + std::to_string(q.codes.size()));
  }
  if (q.scales.size() != groups || q.mins.size() != groups) {
    return Status(ErrorCode::Shape, "scales and zeros must hold " + std::to_string(groups) + " values each");
  }
  // Scales and mins go back to f16 (what they are); a value that is not a finite f16 number is
  // refused (infinities survive the f16 round trip, and would dequantize to infinities and NaN).
  std::vector<uint16_t> scales(groups), mins(groups);
  for (size_t i = 0; i < groups; ++i) {
    scales[i] = floatToF16(q.scales[i]);
    mins[i] = floatToF16(q.mins[i]);
    if (!std::isfinite(q.scales[i]) || !std::isfinite(q.mins[i]) || f16ToFloat(scales[i]) != q.scales[i] ||
        f16ToFloat(mins[i]) != q.mins[i]) {
      return Status(ErrorCode::Value, "scales and zeros must be finite f16 values (as quantize() returns them)");
    }
  }
  out->assign(size_t(q.tokens) * size_t(q.channels), 0.0f);
  if (q.axis == QuantAxis::Channel) {
    const size_t wordsPerGroup = size_t(q.channels) * size_t(q.group) * size_t(q.bits) / 32;
    for (int64_t g = 0; g < q.tokens / q.group; ++g) {
      dequantizeChannelGroups(q.codes.data() + size_t(g) * wordsPerGroup, scales.data() + size_t(g) * size_t(q.channels),
                              mins.data() + size_t(g) * size_t(q.channels), q.group, q.channels, q.bits,
                              out->data() + size_t(g) * size_t(q.group) * size_t(q.channels), size_t(q.channels));
    }
  } else {
    const size_t wordsPerToken = size_t(q.channels) * size_t(q.bits) / 32;
    const size_t groupsPerToken = size_t(q.channels / q.group);
    for (int64_t t = 0; t < q.tokens; ++t) {
      dequantizeTokenGroups(q.codes.data() + size_t(t) * wordsPerToken, scales.data() + size_t(t) * groupsPerToken,
                            mins.data() + size_t(t) * groupsPerToken, q.channels, q.group, q.bits,
                            out->data() + size_t(t) * size_t(q.channels));
    }
  }
  return Status::ok();
}

}  // namespace kvslim
