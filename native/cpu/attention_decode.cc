// Decode driver (flash-decoding): work = kv head x row group x key split; each task writes a
// partial softmax state, and the splits of a row are merged with the log-sum-exp rule.
#include <algorithm>
#include <cmath>

#include "attention_plan.h"
#include "simd_level.h"
#include "thread_pool.h"

namespace kvslim::cpu {

namespace {
constexpr int64_t kMinSplitTokens = 1024;  // below this a split's merge costs more than it saves
constexpr int64_t kTasksPerThread = 8;     // enough tasks to even out uneven heads
constexpr int64_t kTokensPerThread = 4096;  // below this many token-heads per thread, waking one costs more
}  // namespace

void attentionDecode(const AttentionArgs& args) {
  const KernelTable& kernels = activeKernels();
  ThreadPool& pool = globalPool();
  const RowLayout layout(args);
  const int32_t dim = args.headDim;
  const int64_t rowGroups = (layout.rowsPerHead + kMaxDecodeRows - 1) / kMaxDecodeRows;
  int64_t maxTokens = 0;
  for (int32_t h = 0; h < args.kvHeads; ++h) maxTokens = std::max(maxTokens, args.heads[h].tokens);
  const int64_t work = maxTokens * args.kvHeads * rowGroups;
  const int32_t allowed = args.threads > 0 ? std::min(args.threads, pool.size()) : pool.size();
  const int32_t threads = int32_t(std::max<int64_t>(1, std::min<int64_t>(allowed, work / kTokensPerThread)));
  const int64_t wanted = (kTasksPerThread * threads + args.kvHeads * rowGroups - 1) / (args.kvHeads * rowGroups);
  const int64_t splits = std::max<int64_t>(1, std::min(wanted, (maxTokens + kMinSplitTokens - 1) / kMinSplitTokens));
  const int64_t splitTokens = (maxTokens + splits - 1) / splits;

  // Queries scaled once by scale * log2(e) so the kernels use exp2 (the same rounding as prefill:
  // decoding token by token must give what one prefill gives).
  const float factor = args.scale * kLog2e;
  std::vector<float> scaled(size_t(args.kvHeads) * size_t(layout.rowsPerHead) * size_t(dim));
  for (int32_t h = 0; h < args.kvHeads; ++h) {
    for (int64_t row = 0; row < layout.rowsPerHead; ++row) {
      const float* src = args.q + layout.queryIndex(args, h, row) * dim;
      float* dst = scaled.data() + (size_t(h) * size_t(layout.rowsPerHead) + size_t(row)) * size_t(dim);
      for (int32_t d = 0; d < dim; ++d) dst[d] = src[d] * factor;
    }
  }

  // Partial states: [kvHeads, rowsPerHead, splits] x (max, sum, acc[dim]).
  const size_t partials = size_t(args.kvHeads) * size_t(layout.rowsPerHead) * size_t(splits);
  std::vector<float> maxes(partials), sums(partials), accs(partials * size_t(dim));
  std::vector<float> workerAcc(size_t(threads) * kMaxDecodeRows * size_t(dim));

  const int64_t tasks = int64_t(args.kvHeads) * rowGroups * splits;
  pool.parallelFor(tasks, threads, [&](int64_t task, int32_t worker) {
    const int64_t split = task % splits;
    const int64_t group = (task / splits) % rowGroups;
    const int32_t h = int32_t(task / (splits * rowGroups));
    const KVHeadView& head = args.heads[h];
    const int64_t firstRow = group * kMaxDecodeRows;
    const int32_t rows = int32_t(std::min<int64_t>(kMaxDecodeRows, layout.rowsPerHead - firstRow));
    int64_t last[kMaxDecodeRows];
    for (int32_t r = 0; r < rows; ++r) last[r] = lastToken(args, head.tokens, layout.position(firstRow + r));
    // Partials of one row group and split are stored row after row: index (h, row, split).
    float rowMax[kMaxDecodeRows], rowSum[kMaxDecodeRows];
    float* rowAcc = workerAcc.data() + size_t(worker) * kMaxDecodeRows * size_t(dim);
    DecodeRange range;
    range.q = scaled.data() + (size_t(h) * size_t(layout.rowsPerHead) + size_t(firstRow)) * size_t(dim);
    range.rows = rows;
    range.lastToken = last;
    range.headDim = dim;
    range.kvType = args.kvType;
    range.keyPages = head.keyPages;
    range.valuePages = head.valuePages;
    range.pageTokens = args.pageTokens;
    range.rowStride = args.rowStride;
    range.tokenBegin = std::min(split * splitTokens, head.tokens);
    range.tokenEnd = std::min((split + 1) * splitTokens, head.tokens);
    range.state = {rowMax, rowSum, rowAcc};
    kernels.decodeRange(range);
    for (int32_t r = 0; r < rows; ++r) {
      const size_t index = (size_t(h) * size_t(layout.rowsPerHead) + size_t(firstRow + r)) * size_t(splits) + size_t(split);
      maxes[index] = rowMax[r];
      sums[index] = rowSum[r];
      std::copy(rowAcc + r * dim, rowAcc + (r + 1) * dim, accs.begin() + index * size_t(dim));
    }
  });

  // Log-sum-exp merge of the splits of every row.
  for (int32_t h = 0; h < args.kvHeads; ++h) {
    for (int64_t row = 0; row < layout.rowsPerHead; ++row) {
      const size_t first = (size_t(h) * size_t(layout.rowsPerHead) + size_t(row)) * size_t(splits);
      float globalMax = maxes[first];
      for (int64_t s = 1; s < splits; ++s) globalMax = std::max(globalMax, maxes[first + s]);
      float* out = args.out + layout.queryIndex(args, h, row) * dim;
      std::fill(out, out + dim, 0.0f);
      float total = 0.0f;
      for (int64_t s = 0; s < splits; ++s) {
        const float weight = std::exp2(maxes[first + s] - globalMax);
        total += sums[first + s] * weight;
        const float* acc = accs.data() + (first + s) * size_t(dim);
        for (int32_t d = 0; d < dim; ++d) out[d] += acc[d] * weight;
      }
      const float inverse = total > 0.0f ? 1.0f / total : 0.0f;
      for (int32_t d = 0; d < dim; ++d) out[d] *= inverse;
    }
  }
}

}  // namespace kvslim::cpu
