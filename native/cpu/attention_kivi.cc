// KIVI attention driver: the flash-decoding plan of attention_decode.cc over KIVI heads, for any
// number of query rows (rows beyond 8 per kv head become more row groups, each re-reading codes).
#include <algorithm>

#include "attention_plan.h"
#include "simd_level.h"
#include "thread_pool.h"

namespace kvslim::cpu {

void attentionKivi(const KiviAttentionArgs& args) {
  const KernelTable& kernels = activeKernels();
  const RowLayout layout(args.n, args.qHeads, args.kvHeads);
  const int32_t dim = args.format.headDim;
  const int64_t rowGroups = (layout.rowsPerHead + kMaxDecodeRows - 1) / kMaxDecodeRows;
  int64_t maxTokens = 0;
  for (int32_t h = 0; h < args.kvHeads; ++h) maxTokens = std::max(maxTokens, args.heads[h].tokens);
  // Splits start at multiples of 32 tokens: a kernel sub-block never straddles a key group.
  const DecodePlan plan = planDecode(maxTokens, args.kvHeads, rowGroups, args.threads, 32);
  const std::vector<float> scaled = scaledRows(layout, args.q, dim, args.scale);
  SplitPartials partials(layout, plan.splits, dim);
  const size_t scratchFloats = kiviScratchFloats(dim);
  std::vector<float> workerAcc(size_t(plan.threads) * (kMaxDecodeRows * size_t(dim) + scratchFloats));

  const int64_t tasks = int64_t(args.kvHeads) * rowGroups * plan.splits;
  globalPool().parallelFor(tasks, plan.threads, [&](int64_t task, int32_t worker) {
    const int64_t split = task % plan.splits;
    const int64_t group = (task / plan.splits) % rowGroups;
    const int32_t h = int32_t(task / (plan.splits * rowGroups));
    const KiviHeadView& head = args.heads[h];
    const int64_t firstRow = group * kMaxDecodeRows;
    const int32_t rows = int32_t(std::min<int64_t>(kMaxDecodeRows, layout.rowsPerHead - firstRow));
    int64_t last[kMaxDecodeRows];
    for (int32_t r = 0; r < rows; ++r) last[r] = layout.lastToken(args.causal, head.tokens, firstRow + r);
    float rowMax[kMaxDecodeRows], rowSum[kMaxDecodeRows];
    float* rowAcc = workerAcc.data() + size_t(worker) * (kMaxDecodeRows * size_t(dim) + scratchFloats);
    KiviRange range;
    range.q = scaled.data() + (size_t(h) * size_t(layout.rowsPerHead) + size_t(firstRow)) * size_t(dim);
    range.rows = rows;
    range.lastToken = last;
    range.format = args.format;
    range.head = &head;
    range.keyGroupsPerPage = args.keyGroupsPerPage;
    range.valueTokensPerPage = args.valueTokensPerPage;
    range.ringRows = args.residual;
    range.tokenBegin = std::min(split * plan.splitTokens, head.tokens);
    range.tokenEnd = std::min((split + 1) * plan.splitTokens, head.tokens);
    range.state = {rowMax, rowSum, rowAcc};
    range.scratch = rowAcc + kMaxDecodeRows * size_t(dim);
    kernels.kiviDecodeRange(range);
    for (int32_t r = 0; r < rows; ++r) {
      const size_t index = partials.index(layout, h, firstRow + r, split);
      partials.maxes[index] = rowMax[r];
      partials.sums[index] = rowSum[r];
      std::copy(rowAcc + r * dim, rowAcc + (r + 1) * dim, partials.accs.begin() + index * size_t(dim));
    }
  });
  mergeSplits(layout, partials, args.out, nullptr);
}

}  // namespace kvslim::cpu
