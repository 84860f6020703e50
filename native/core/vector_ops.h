// Host-memory vector math for the retrieval indexes and the loading policies. Indexes live in host
// memory on every backend (as in RetrievalAttention, where the GPU keeps only the exact part), so
// one implementation serves both: native/cpu provides it with the run-time SIMD level.
#pragma once
#include <cstdint>

namespace kvslim {

// The keys a vector kernel reads: f32, or f16 (an index over an f16 cache keeps its keys so; the
// kernels widen f16 exactly, so the scores are those of the same values in f32).
struct KeyData {
  const void* data;
  bool half;
  KeyData(const float* keys) : data(keys), half(false) {}     // NOLINT: implicit, keys are f32 unless said
  KeyData(const uint16_t* keys) : data(keys), half(true) {}   // NOLINT
};

class VectorOps {
 public:
  virtual ~VectorOps() = default;
  // out[i] = max over the `rows` query vectors of dot(query, key i), for `count` contiguous keys
  // ([count, dim]). One kv head's group of queries scores a key by its best member (GQA).
  virtual void maxDot(const float* queries, int32_t rows, int32_t dim, KeyData keys, int64_t count, float* out) const = 0;
  // out[r * count + i] = dot(query r, key i) for `rows` queries and `count` contiguous keys: every
  // pair (the exact kNN that builds the graph index), register-tiled over rows and keys.
  virtual void dotMatrix(const float* queries, int32_t rows, int32_t dim, KeyData keys, int64_t count, float* out) const = 0;
  // The same as maxDot for the keys base + ids[i] * dim (graph and list scans).
  virtual void maxDotGather(const float* queries, int32_t rows, int32_t dim, KeyData base, const uint32_t* ids,
                            int64_t count, float* out) const = 0;
  // out[i] = sum_t u[t] * rows[i * dim + t] in double, for `count` contiguous f32 rows (ActQKV's
  // block scores: double because its choices sit on top-k boundaries).
  virtual void dotsF64(const double* u, int32_t dim, const float* rows, int64_t count, double* out) const = 0;
  // Quest's upper bound of a page with per-channel key minima lo and maxima hi ([pages, dim] each):
  // out[p] = max over the query rows of sum_i max(q_i * lo_pi, q_i * hi_pi).
  virtual void boxBound(const float* queries, int32_t rows, int32_t dim, const float* lo, const float* hi, int64_t pages,
                        float* out) const = 0;
};

// The host implementation (native/cpu/vector_ops.cc).
const VectorOps& hostVectorOps();

}  // namespace kvslim
