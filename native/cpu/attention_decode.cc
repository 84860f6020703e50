// Decode driver (flash-decoding): work = kv head x row group x key split; each task writes a
// partial softmax state, and the splits of a row are merged with the log-sum-exp rule.
#include <algorithm>
#include <cmath>
#include <memory>

#include "attention_plan.h"
#include "simd_level.h"
#include "thread_pool.h"

namespace kvslim::cpu {

namespace {
constexpr int64_t kMinSplitTokens = 1024;  // below this a split's merge costs more than it saves
constexpr int64_t kTasksPerThread = 8;     // enough tasks to even out uneven heads
// Below this many token-heads per thread, waking one costs more than it saves. 4096 kept caches
// under 512 tokens (8 kv heads) on one thread; two run a 256-token one cold in 0.085 ms, not 0.14.
constexpr int64_t kTokensPerThread = 256;
}  // namespace

DecodePlan planDecode(int64_t maxTokens, int32_t kvHeads, int64_t rowGroups, int32_t threadsAllowed, int64_t granule) {
  ThreadPool& pool = globalPool();
  const int64_t work = maxTokens * kvHeads * rowGroups;
  const int32_t allowed = threadsAllowed > 0 ? std::min(threadsAllowed, pool.size()) : pool.size();
  DecodePlan plan;
  plan.threads = int32_t(std::max<int64_t>(1, std::min<int64_t>(allowed, work / kTokensPerThread)));
  const int64_t wanted = (kTasksPerThread * plan.threads + kvHeads * rowGroups - 1) / (kvHeads * rowGroups);
  const int64_t splits = std::max<int64_t>(1, std::min(wanted, (maxTokens + kMinSplitTokens - 1) / kMinSplitTokens));
  plan.splitTokens = std::max<int64_t>(granule, ((maxTokens + splits - 1) / splits + granule - 1) / granule * granule);
  plan.splits = std::max<int64_t>(1, (maxTokens + plan.splitTokens - 1) / plan.splitTokens);
  return plan;
}

// Queries scaled once by scale * log2(e) so the kernels use exp2 (the same rounding as prefill:
// decoding token by token must give what one prefill gives).
Floats scaledRows(const RowLayout& layout, const float* q, int32_t dim, float scale) {
  const float factor = scale * kLog2e;
  Floats scaled = uninitialisedFloats(size_t(layout.kvHeads) * size_t(layout.rowsPerHead) * size_t(dim));
  for (int32_t h = 0; h < layout.kvHeads; ++h) {
    for (int64_t row = 0; row < layout.rowsPerHead; ++row) {
      const float* src = q + layout.queryIndex(h, row) * dim;
      float* dst = scaled.get() + (size_t(h) * size_t(layout.rowsPerHead) + size_t(row)) * size_t(dim);
      for (int32_t d = 0; d < dim; ++d) dst[d] = src[d] * factor;
    }
  }
  return scaled;
}

void mergeSplits(const RowLayout& layout, const SplitPartials& partials, float* out, float* lse) {
  const int32_t dim = partials.dim;
  for (int32_t h = 0; h < layout.kvHeads; ++h) {
    for (int64_t row = 0; row < layout.rowsPerHead; ++row) {
      const size_t first = partials.index(layout, h, row, 0);
      float globalMax = partials.maxes[first];
      for (int64_t s = 1; s < partials.splits; ++s) globalMax = std::max(globalMax, partials.maxes[first + s]);
      float* o = out + layout.queryIndex(h, row) * dim;
      float total = 0.0f;
      if (partials.splits == 1) {
        // What the loop below computes for one split (weight exp2(0) = 1), without its exp2.
        total = partials.sums[first];
        std::copy(partials.accs.get() + first * size_t(dim), partials.accs.get() + (first + 1) * size_t(dim), o);
      } else {
        std::fill(o, o + dim, 0.0f);
        for (int64_t s = 0; s < partials.splits; ++s) {
          const float weight = std::exp2(partials.maxes[first + s] - globalMax);
          total += partials.sums[first + s] * weight;
          const float* acc = partials.accs.get() + (first + s) * size_t(dim);
          for (int32_t d = 0; d < dim; ++d) o[d] += acc[d] * weight;
        }
      }
      const float inverse = total > 0.0f ? 1.0f / total : 0.0f;
      for (int32_t d = 0; d < dim; ++d) o[d] *= inverse;
      if (lse != nullptr) lse[layout.queryIndex(h, row)] = total > 0.0f ? globalMax + std::log2(total) : -INFINITY;
    }
  }
}

void massFromScores(const RowLayout& layout, bool causal, const int64_t* older, const int64_t* tokens, double* mass,
                    int64_t massStride, float* captured, int64_t width, int32_t threads) {
  const KernelTable& kernels = activeKernels();
  constexpr float kLn2 = 0.6931471805599453f;  // softmaxRow takes natural-log units
  globalPool().parallelFor(layout.kvHeads, threads, [&](int64_t task, int32_t) {
    const int32_t h = int32_t(task);
    const int64_t before = older != nullptr ? older[h] : 0;
    const int64_t total = before + tokens[h];
    double* sums = mass + size_t(h) * size_t(massStride);
    std::fill(sums, sums + total, 0.0);
    for (int64_t row = 0; row < layout.rowsPerHead; ++row) {
      float* scores = captured + (size_t(h) * size_t(layout.rowsPerHead) + size_t(row)) * size_t(width);
      const int64_t visible = std::max<int64_t>(0, before + layout.lastToken(causal, tokens[h], row) + 1);
      for (int64_t t = 0; t < visible; ++t) scores[t] *= kLn2;
      kernels.softmaxRow(scores, visible, total);
      for (int64_t t = 0; t < total; ++t) sums[t] += double(scores[t]);
    }
  });
}

void attentionDecode(const AttentionArgs& args) {
  const KernelTable& kernels = activeKernels();
  const RowLayout layout(args);
  const int32_t dim = args.headDim;
  const int64_t rowGroups = (layout.rowsPerHead + kMaxDecodeRows - 1) / kMaxDecodeRows;
  // An older segment (AttentionArgs::olderHeads) is split like the rest; its splits come first.
  const bool withOlder = args.olderHeads != nullptr;
  int64_t maxTokens = 0, maxOlder = 0;
  for (int32_t h = 0; h < args.kvHeads; ++h) {
    maxTokens = std::max(maxTokens, args.heads[h].tokens);
    if (withOlder) maxOlder = std::max(maxOlder, args.olderHeads[h].tokens);
  }
  const DecodePlan plan = planDecode(maxTokens + maxOlder, args.kvHeads, rowGroups, args.threads, 1);
  const int64_t olderSplits = (maxOlder + plan.splitTokens - 1) / plan.splitTokens;
  const int64_t splits = olderSplits + std::max<int64_t>(1, (maxTokens + plan.splitTokens - 1) / plan.splitTokens);
  const Floats scaled = scaledRows(layout, args.q, dim, args.scale);
  const Floats olderScaled = withOlder && args.olderQ != args.q ? scaledRows(layout, args.olderQ, dim, args.scale) : Floats();
  SplitPartials partials(layout, splits, dim);
  const Floats workerAcc = uninitialisedFloats(size_t(plan.threads) * kMaxDecodeRows * size_t(dim));  // the kernel zeroes its rows
  // With the mass (H2O's decode steps), every row's scores are kept: older tokens, then the rest.
  const int64_t width = maxOlder + maxTokens;
  // Not zeroed: softmaxRow reads only what the kernel wrote (each row's visible tokens).
  std::unique_ptr<float[]> captured(args.mass != nullptr ? new float[size_t(args.kvHeads) * size_t(layout.rowsPerHead) * size_t(width)] : nullptr);

  const int64_t tasks = int64_t(args.kvHeads) * rowGroups * splits;
  globalPool().parallelFor(tasks, plan.threads, [&](int64_t task, int32_t worker) {
    const int64_t split = task % splits;
    const int64_t group = (task / splits) % rowGroups;
    const int32_t h = int32_t(task / (splits * rowGroups));
    const bool older = split < olderSplits;
    const KVHeadView& head = older ? args.olderHeads[h] : args.heads[h];
    const int64_t part = older ? split : split - olderSplits;
    const int64_t firstRow = group * kMaxDecodeRows;
    const int32_t rows = int32_t(std::min<int64_t>(kMaxDecodeRows, layout.rowsPerHead - firstRow));
    int64_t last[kMaxDecodeRows];
    // Pages are walked in rows: a head's token t is row firstRow + t. Every query sees all of
    // the older segment.
    for (int32_t r = 0; r < rows; ++r) {
      last[r] = head.firstRow + (older ? head.tokens - 1 : layout.lastToken(args.causal, head.tokens, firstRow + r));
    }
    float rowMax[kMaxDecodeRows], rowSum[kMaxDecodeRows];
    float* rowAcc = workerAcc.get() + size_t(worker) * kMaxDecodeRows * size_t(dim);
    DecodeRange range;
    const float* queries = older && olderScaled ? olderScaled.get() : scaled.get();
    range.q = queries + (size_t(h) * size_t(layout.rowsPerHead) + size_t(firstRow)) * size_t(dim);
    range.rows = rows;
    range.lastToken = last;
    range.headDim = dim;
    range.kvType = args.kvType;
    range.keyPages = head.keyPages;
    range.valuePages = head.valuePages;
    range.pageTokens = older ? args.olderPageTokens : args.pageTokens;
    range.rowStride = args.rowStride;
    const int64_t begin = std::min(part * plan.splitTokens, head.tokens);
    range.tokenBegin = head.firstRow + begin;
    range.tokenEnd = head.firstRow + std::min(begin + plan.splitTokens, head.tokens);
    range.state = {rowMax, rowSum, rowAcc};
    if (captured) {
      const int64_t before = older || !withOlder ? 0 : args.olderHeads[h].tokens;
      range.scoresOut = captured.get() + (size_t(h) * size_t(layout.rowsPerHead) + size_t(firstRow)) * size_t(width) +
                        size_t(before + begin);
      range.scoresStride = width;
    }
    kernels.decodeRange(range);
    partials.store(layout, h, firstRow, rows, split, {rowMax, rowSum, rowAcc});
  });
  mergeSplits(layout, partials, args.out, args.lse);
  if (captured) {
    std::vector<int64_t> older, tokens;
    for (int32_t h = 0; h < args.kvHeads; ++h) {
      tokens.push_back(args.heads[h].tokens);
      if (withOlder) older.push_back(args.olderHeads[h].tokens);
    }
    massFromScores(layout, args.causal, withOlder ? older.data() : nullptr, tokens.data(), args.mass, args.massStride,
                   captured.get(), width, plan.threads);
  }
}

}  // namespace kvslim::cpu
