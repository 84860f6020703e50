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
// A head's tokens may start `firstRow` rows into its first page (a window whose oldest tokens were
// evicted): token t is row firstRow + t of the page list.
struct KVHeadView {
  const void* const* keyPages = nullptr;    // [ceil((firstRow + tokens) / pageTokens)] backend pointers
  const void* const* valuePages = nullptr;
  int64_t tokens = 0;
  int64_t firstRow = 0;
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
  // Optional [n, qHeads]: log2 of each row's softmax denominator with scores in log2 units
  // (q.k * scale * log2(e)); -inf for a row that sees no key. Lets core merge the outputs of
  // several calls over disjoint token sets (log-sum-exp).
  float* lse = nullptr;
};

// Raw scores q.k * scale of the query rows of one kv head against all its tokens (selection
// policies turn them into attention probabilities).
struct ScoresArgs {
  const float* q = nullptr;  // [rows, headDim], host memory, unscaled
  int32_t rows = 0;
  int32_t headDim = 0;
  DType kvType = DType::F32;
  int64_t pageTokens = 0;
  int64_t rowStride = 0;
  KVHeadView head;
  float scale = 1.0f;
  float* out = nullptr;      // [rows, head.tokens], host memory
  int32_t threads = 0;
};

}  // namespace kvslim
