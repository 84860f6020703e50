// Stateless attention over contiguous q, k, v (the `attention()` of the public API).
#pragma once
#include <cstdint>

#include "backend.h"
#include "tensor_convert.h"

namespace kvslim {

struct AttentionOp {
  HostTensor q;  // [n, qHeads, headDim]
  HostTensor k;  // [T, kvHeads, headDim]
  HostTensor v;  // [T, kvHeads, headDim], same dtype as k
  int32_t qHeads = 0, kvHeads = 0, headDim = 0;
  bool causal = false;
  float scale = 0.0f;  // 0 = 1 / sqrt(headDim)
  int32_t threads = 0;
};

// out must hold n * qHeads * headDim floats (outCount says how many it holds).
Status runAttention(Backend& backend, const AttentionOp& op, float* out, size_t outCount);

// Raw scores q.k * scale (no mask, no softmax) of the query heads of one kv head (`kvHead` >= 0)
// or of all of them (-1): out is [n, heads, T] with heads = qHeads / kvHeads or qHeads.
struct ScoresOp {
  HostTensor q;  // [n, qHeads, headDim]
  HostTensor k;  // [T, kvHeads, headDim]
  int32_t qHeads = 0, kvHeads = 0, headDim = 0;
  int32_t kvHead = -1;
  float scale = 0.0f;  // 0 = 1 / sqrt(headDim)
  int32_t threads = 0;
};
Status runScores(Backend& backend, const ScoresOp& op, float* out, size_t outCount);

}  // namespace kvslim
