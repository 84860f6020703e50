// The contract between core (which knows where tokens live) and the backends (which do the math).
#pragma once
#include <cstdint>

#include "dtype.h"

namespace kvslim {

// The tokens one kv head can attend to, stored as pages of `pageTokens` rows each.
// Token t lives in page t / pageTokens at row t % pageTokens; a row holds headDim elements and
// consecutive rows are `rowStride` elements apart. A paged cache uses rowStride = headDim; the
// stateless op views a contiguous [T, kvHeads, headDim] tensor as one page per head with
// rowStride = kvHeads * headDim, so both run the same kernels without a copy.
struct KVHeadView {
  const void* const* keyPages = nullptr;    // [ceil(tokens / pageTokens)] backend pointers
  const void* const* valuePages = nullptr;
  int64_t tokens = 0;
};

// Attention of n query rows per query head over the tokens of each kv head.
// Causal alignment (DESIGN.md): query i of n attends a head's tokens [0, tokens - n + i];
// without `causal` every query attends all of them.
struct AttentionArgs {
  const float* q = nullptr;  // [n, qHeads, headDim], host memory, unscaled
  float* out = nullptr;      // [n, qHeads, headDim], host memory
  int32_t n = 0;
  int32_t qHeads = 0;
  int32_t kvHeads = 0;
  int32_t headDim = 0;
  DType kvType = DType::F32;
  int64_t pageTokens = 0;
  int64_t rowStride = 0;
  const KVHeadView* heads = nullptr;  // [kvHeads]
  bool causal = true;
  float scale = 1.0f;
  int32_t threads = 0;  // 0 = every worker of the pool
};

}  // namespace kvslim
