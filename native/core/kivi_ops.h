// Stateless KIVI quantize / dequantize of one [tokens, channels] matrix, for tools and tests.
// Layouts match the store's (kivi_format.h) with codes, scales and mins in separate arrays.
#pragma once
#include <cstdint>
#include <vector>

#include "status.h"
#include "tensor_convert.h"

namespace kvslim {

enum class QuantAxis { Channel = 0, Token = 1 };  // keys: groups along tokens; values: along channels

struct QuantizedMatrix {
  QuantAxis axis = QuantAxis::Channel;
  int32_t bits = 2;
  int32_t group = 32;
  int64_t tokens = 0;
  int32_t channels = 0;
  // Channel axis: codes [tokens/group, channels, group*bits/32], scales/mins [tokens/group, channels].
  // Token axis: codes [tokens, channels*bits/32], scales/mins [tokens, channels/group].
  std::vector<uint32_t> codes;
  std::vector<float> scales;  // f16 values
  std::vector<float> mins;
};

// Checks bits (2, 4, 8), group (group * bits % 32 == 0), shapes and values (ERR_VALUE for NaN,
// infinity, or a range beyond f16).
Status quantizeMatrix(const HostTensor& x, int32_t channels, QuantAxis axis, int32_t bits, int32_t group,
                      QuantizedMatrix* out);

// x^ = code * scale + min, [tokens, channels]. Checks the arrays' sizes against the shape.
Status dequantizeMatrix(const QuantizedMatrix& q, std::vector<float>* out);

}  // namespace kvslim
