#include "tensor_convert.h"

#include <cmath>
#include <string>

namespace kvslim {

static Status nonFinite(const char* what, size_t index, float value) {
  return Status(ErrorCode::Value, std::string(what) + " must hold finite values, but element " +
                                      std::to_string(index) + " is " +
                                      (std::isnan(value) ? "NaN" : "infinite"));
}

Status convertChecked(const HostTensor& src, size_t first, size_t count, void* dst, DType dstType,
                      const char* what) {
  for (size_t i = 0; i < count; ++i) {
    float value = loadElement(src.data, src.dtype, first + i);
    if (!std::isfinite(value)) return nonFinite(what, first + i, value);
    // Storing 70000 as f16 would silently become Inf and poison every later softmax.
    if (dstType == DType::F16 && std::fabs(value) >= 65520.0f) {
      return Status(ErrorCode::Value, std::string(what) + " element " + std::to_string(first + i) +
                                          " is " + std::to_string(value) +
                                          ", outside the f16 store's range (|x| <= 65504)");
    }
    storeElement(dst, dstType, i, value);
  }
  return Status::ok();
}

template <typename Bits>
static int64_t firstWithExponentAllOnes(const Bits* data, size_t count, Bits exponentMask) {
  // Blocks of 4096 reduce branch-free (vectorizes); only a block that has a hit is searched.
  constexpr size_t kBlock = 4096;
  for (size_t begin = 0; begin < count; begin += kBlock) {
    const size_t end = begin + kBlock < count ? begin + kBlock : count;
    bool any = false;
    for (size_t i = begin; i < end; ++i) any |= (data[i] & exponentMask) == exponentMask;
    if (!any) continue;
    for (size_t i = begin; i < end; ++i)
      if ((data[i] & exponentMask) == exponentMask) return int64_t(i);
  }
  return -1;
}

int64_t findNonFinite(const HostTensor& tensor) {
  switch (tensor.dtype) {
    case DType::F32:
      return firstWithExponentAllOnes(static_cast<const uint32_t*>(tensor.data), tensor.count, uint32_t(0x7f800000u));
    case DType::F16:
      return firstWithExponentAllOnes(static_cast<const uint16_t*>(tensor.data), tensor.count, uint16_t(0x7c00u));
    case DType::BF16:
      return firstWithExponentAllOnes(static_cast<const uint16_t*>(tensor.data), tensor.count, uint16_t(0x7f80u));
  }
  return -1;
}

Status checkFinite(const HostTensor& tensor, const char* what) {
  const int64_t index = findNonFinite(tensor);
  if (index < 0) return Status::ok();
  return nonFinite(what, size_t(index), loadElement(tensor.data, tensor.dtype, size_t(index)));
}

Status toFloat32(const HostTensor& src, float* dst, const char* what) {
  return convertChecked(src, 0, src.count, dst, DType::F32, what);
}

}  // namespace kvslim
