// Scores driver: rows of one kv head x token chunks, in parallel (selection policies read them).
#include <algorithm>
#include <vector>

#include "attention_plan.h"
#include "simd_level.h"
#include "thread_pool.h"

namespace kvslim::cpu {

namespace {
constexpr int64_t kChunkTokens = 2048;
}

void attentionScores(const ScoresArgs& args) {
  const KernelTable& kernels = activeKernels();
  ThreadPool& pool = globalPool();
  const int32_t dim = args.headDim;
  std::vector<float> scaled(size_t(args.rows) * size_t(dim));
  for (size_t i = 0; i < scaled.size(); ++i) scaled[i] = args.q[i] * args.scale;
  const int64_t tokens = args.head.tokens;
  const int64_t rowGroups = (args.rows + kMaxDecodeRows - 1) / kMaxDecodeRows;
  const int64_t chunks = (tokens + kChunkTokens - 1) / kChunkTokens;
  const int32_t allowed = args.threads > 0 ? std::min(args.threads, pool.size()) : pool.size();
  const int32_t threads = int32_t(std::max<int64_t>(1, std::min<int64_t>(allowed, rowGroups * chunks)));
  pool.parallelFor(rowGroups * chunks, threads, [&](int64_t task, int32_t) {
    const int64_t group = task / chunks, chunk = task % chunks;
    ScoreRange range;
    range.q = scaled.data() + size_t(group) * kMaxDecodeRows * size_t(dim);
    range.rows = int32_t(std::min<int64_t>(kMaxDecodeRows, args.rows - group * kMaxDecodeRows));
    range.headDim = dim;
    range.kvType = args.kvType;
    range.keyPages = args.head.keyPages;
    range.pageTokens = args.pageTokens;
    range.rowStride = args.rowStride;
    range.rowBegin = args.head.firstRow + chunk * kChunkTokens;
    range.rowEnd = args.head.firstRow + std::min(tokens, (chunk + 1) * kChunkTokens);
    range.out = args.out + size_t(group) * kMaxDecodeRows * size_t(tokens) + size_t(chunk * kChunkTokens);
    range.outStride = tokens;
    range.prefetch = size_t(tokens) * size_t(dim) * dtypeBytes(args.kvType) > kPrefetchScanBytes;
    kernels.scoreRange(range);
  });
}

}  // namespace kvslim::cpu
