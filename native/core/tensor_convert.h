// Converting user tensors (f32 / f16 / bf16) into stored element types, checking values on the way.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

#include "dtype.h"
#include "status.h"

namespace kvslim {

// A read-only view of user data: `data` holds `count` elements of `dtype`.
struct HostTensor {
  const void* data = nullptr;
  DType dtype = DType::F32;
  size_t count = 0;
};

static inline float loadElement(const void* data, DType dtype, size_t index) {
  switch (dtype) {
    case DType::F32: return static_cast<const float*>(data)[index];
    case DType::F16: return f16ToFloat(static_cast<const uint16_t*>(data)[index]);
    case DType::BF16: return bf16ToFloat(static_cast<const uint16_t*>(data)[index]);
  }
  return 0.0f;
}

static inline void storeElement(void* data, DType dtype, size_t index, float value) {
  switch (dtype) {
    case DType::F32: static_cast<float*>(data)[index] = value; break;
    case DType::F16: static_cast<uint16_t*>(data)[index] = floatToF16(value); break;
    case DType::BF16: static_cast<uint16_t*>(data)[index] = floatToBf16(value); break;
  }
}

// Converts `count` elements starting at `first` of src into dst (dst indices from 0).
// Fails with ERR_VALUE naming `what` at the first NaN or infinity.
Status convertChecked(const HostTensor& src, size_t first, size_t count, void* dst, DType dstType,
                      const char* what);

// Index of the first NaN or infinity, or -1. A bit test per element, so it runs at memory speed.
int64_t findNonFinite(const HostTensor& tensor);

// ERR_VALUE naming `what` when the tensor holds a NaN or infinity.
Status checkFinite(const HostTensor& tensor, const char* what);

// Checked f32 view of a query tensor: f32 input is used in place (no copy of a large prefill's
// queries), f16 / bf16 input is decoded into `storage`.
Status queryAsFloat32(const HostTensor& q, std::vector<float>* storage, const float** out);

// f16 bits to f32 (F16C where the CPU has it), for values already checked when they were stored.
void halvesToFloats(const uint16_t* in, float* out, size_t count);

// Decodes a whole tensor to f32, with the same value check.
Status toFloat32(const HostTensor& src, float* dst, const char* what);

}  // namespace kvslim
