// core/vector_ops.h on the host: the active SIMD table's vector kernels (vector_kernels.inl).
#include "../core/vector_ops.h"

#include "simd_level.h"

namespace kvslim {
namespace {

class HostVectorOps final : public VectorOps {
 public:
  void maxDot(const float* queries, int32_t rows, int32_t dim, KeyData keys, int64_t count, float* out) const override {
    const cpu::KernelTable& table = cpu::activeKernels();
    if (keys.half) table.maxDotHalf(queries, rows, dim, static_cast<const uint16_t*>(keys.data), count, out);
    else table.maxDot(queries, rows, dim, static_cast<const float*>(keys.data), count, out);
  }
  void dotMatrix(const float* queries, int32_t rows, int32_t dim, KeyData keys, int64_t count, float* out) const override {
    const cpu::KernelTable& table = cpu::activeKernels();
    if (keys.half) table.dotMatrixHalf(queries, rows, dim, static_cast<const uint16_t*>(keys.data), count, out);
    else table.dotMatrix(queries, rows, dim, static_cast<const float*>(keys.data), count, out);
  }
  void maxDotGather(const float* queries, int32_t rows, int32_t dim, KeyData base, const uint32_t* ids, int64_t count,
                    float* out) const override {
    const cpu::KernelTable& table = cpu::activeKernels();
    if (base.half) table.maxDotGatherHalf(queries, rows, dim, static_cast<const uint16_t*>(base.data), ids, count, out);
    else table.maxDotGather(queries, rows, dim, static_cast<const float*>(base.data), ids, count, out);
  }
  void dotsF64(const double* u, int32_t dim, const float* rows, int64_t count, double* out) const override {
    cpu::activeKernels().dotsF64(u, dim, rows, DType::F32, count, out);
  }
  void boxBound(const float* queries, int32_t rows, int32_t dim, const float* lo, const float* hi, int64_t pages,
                float* out) const override {
    cpu::activeKernels().boxBound(queries, rows, dim, lo, hi, pages, out);
  }
};

}  // namespace

const VectorOps& hostVectorOps() {
  static const HostVectorOps ops;
  return ops;
}

}  // namespace kvslim
