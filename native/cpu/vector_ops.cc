// core/vector_ops.h on the host: the active SIMD table's vector kernels (vector_kernels.inl).
#include "../core/vector_ops.h"

#include "simd_level.h"

namespace kvslim {
namespace {

class HostVectorOps final : public VectorOps {
 public:
  void maxDot(const float* queries, int32_t rows, int32_t dim, const float* keys, int64_t count,
              float* out) const override {
    cpu::activeKernels().maxDot(queries, rows, dim, keys, count, out);
  }
  void dotMatrix(const float* queries, int32_t rows, int32_t dim, const float* keys, int64_t count,
                 float* out) const override {
    cpu::activeKernels().dotMatrix(queries, rows, dim, keys, count, out);
  }
  void maxDotGather(const float* queries, int32_t rows, int32_t dim, const float* base, const uint32_t* ids,
                    int64_t count, float* out) const override {
    cpu::activeKernels().maxDotGather(queries, rows, dim, base, ids, count, out);
  }
  void maxDotHalf(const float* queries, int32_t rows, int32_t dim, const uint16_t* keys, int64_t count,
                  float* out) const override {
    cpu::activeKernels().maxDotHalf(queries, rows, dim, keys, count, out);
  }
  void dotMatrixHalf(const float* queries, int32_t rows, int32_t dim, const uint16_t* keys, int64_t count,
                     float* out) const override {
    cpu::activeKernels().dotMatrixHalf(queries, rows, dim, keys, count, out);
  }
  void maxDotGatherHalf(const float* queries, int32_t rows, int32_t dim, const uint16_t* base, const uint32_t* ids,
                        int64_t count, float* out) const override {
    cpu::activeKernels().maxDotGatherHalf(queries, rows, dim, base, ids, count, out);
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
