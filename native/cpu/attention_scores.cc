// Scores driver: rows of one kv head x token chunks, in parallel (selection policies read them),
// and the flat retrieval's top keys from them.
#include <algorithm>
#include <new>
#include <vector>

#include "../core/index/key_index.h"
#include "attention_plan.h"
#include "scratch.h"
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

Status topKeys(const TopKeysArgs& args) {
  const ScratchLease lease;
  std::vector<uint32_t> best;
  for (int32_t h = 0; h < args.kvHeads; ++h) {
    const int64_t tokens = args.heads[h].tokens;
    int64_t* out = args.out + size_t(h) * size_t(args.k);
    if (tokens == 0) {
      std::fill(out, out + args.k, int64_t(-1));
      continue;
    }
    // On per-thread scratch: a fresh multi-MiB buffer per head and step costs page faults.
    float* scores = nullptr;
    try {
      scores = scratchFloats(lease, ScratchSlot::Keys, size_t(args.rows) * size_t(tokens));
    } catch (const std::bad_alloc&) {
      return Status(ErrorCode::OutOfMemory, "out of host memory for the flat scan's scores");
    }
    ScoresArgs scan;
    scan.q = args.q + size_t(h) * size_t(args.rows) * size_t(args.headDim);
    scan.rows = args.rows;
    scan.headDim = args.headDim;
    scan.kvType = args.kvType;
    scan.pageTokens = args.pageTokens;
    scan.rowStride = args.rowStride;
    scan.head = args.heads[h];
    scan.scale = 1.0f;
    scan.out = scores;
    scan.threads = args.threads;
    attentionScores(scan);
    // A key scores by its best query row.
    for (int32_t r = 1; r < args.rows; ++r) {
      const float* row = scores + size_t(r) * size_t(tokens);
      for (int64_t t = 0; t < tokens; ++t) scores[t] = std::max(scores[t], row[t]);
    }
    topKAscending(scores, tokens, args.k, &best, out);  // higher score first, ties to the lower token
  }
  return Status::ok();
}

}  // namespace kvslim::cpu
