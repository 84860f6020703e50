// Decode driver (flash-decoding): work = kv head x row group x key split; each task writes a
// partial softmax state, and the splits of a row are merged with the log-sum-exp rule.
#include <algorithm>
#include <cmath>
#include <memory>

#include "attention_plan.h"
#include "prefetch.h"
#include "simd_level.h"
#include "thread_pool.h"

namespace kvslim::cpu {

namespace {
constexpr int64_t kMinSplitTokens = 1024;  // below this a split's merge costs more than it saves
constexpr int64_t kTasksPerThread = 8;     // enough tasks to even out uneven heads
constexpr int64_t kPrefetchSeamTokens = 32;  // the rest's first keys prefetched at a seam (a kernel block)
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

// The same rounding as prefill's scaling: decoding token by token must give what one prefill gives.
void scaleRows(const RowLayout& layout, const float* q, int32_t dim, float scale, int32_t h, int64_t firstRow, int32_t rows,
               float* dst) {
  const float factor = scale * kLog2e;
  for (int32_t r = 0; r < rows; ++r) {
    const float* src = q + layout.queryIndex(h, firstRow + r) * dim;
    for (int32_t d = 0; d < dim; ++d) dst[size_t(r) * size_t(dim) + size_t(d)] = src[d] * factor;
  }
}

SplitPartials::SplitPartials(const RowLayout& layout, int64_t splits, int32_t dim, int64_t groupRows)
    : layout_(layout),
      splits_(splits),
      dim_(dim),
      groupRows_(groupRows),
      groupsPerHead_((layout.rowsPerHead + groupRows - 1) / groupRows) {
  if (splits_ == 1) return;
  const size_t entries = size_t(layout.kvHeads) * size_t(layout.rowsPerHead) * size_t(splits);
  maxes_ = uninitialisedFloats(entries);
  sums_ = uninitialisedFloats(entries);
  accs_ = uninitialisedFloats(entries * size_t(dim));
  const size_t groups = size_t(layout.kvHeads) * size_t(groupsPerHead_);
  arrived_.reset(new std::atomic<int64_t>[groups]);
  for (size_t g = 0; g < groups; ++g) arrived_[g].store(0, std::memory_order_relaxed);
}

void SplitPartials::finish(int32_t h, int64_t firstRow, int32_t rows, int64_t split, const SoftmaxState& state, float* out,
                           float* lse, int32_t accStride) {
  const size_t stride = size_t(accStride > 0 ? accStride : dim_);
  if (splits_ == 1) {
    for (int32_t r = 0; r < rows; ++r) {
      const int64_t at = layout_.queryIndex(h, firstRow + r);
      finishRowTo(out + at * dim_, lse != nullptr ? lse + at : nullptr, dim_, state.max[r], state.sum[r],
                  state.acc + size_t(r) * stride);
    }
    return;
  }
  for (int32_t r = 0; r < rows; ++r) {
    const size_t at = index(h, firstRow + r, split);
    maxes_[at] = state.max[r];
    sums_[at] = state.sum[r];
    std::copy(state.acc + size_t(r) * stride, state.acc + size_t(r) * stride + size_t(dim_), accs_.get() + at * size_t(dim_));
  }
  // acq_rel: the last arrival sees every other split's stores (each arrival released its own).
  const size_t group = size_t(h) * size_t(groupsPerHead_) + size_t(firstRow / groupRows_);
  if (arrived_[group].fetch_add(1, std::memory_order_acq_rel) != splits_ - 1) return;
  for (int32_t r = 0; r < rows; ++r) mergeRow(h, firstRow + r, out, lse);
}

void SplitPartials::mergeRow(int32_t h, int64_t row, float* out, float* lse) const {
  const size_t first = index(h, row, 0);
  float globalMax = maxes_[first];
  for (int64_t s = 1; s < splits_; ++s) globalMax = std::max(globalMax, maxes_[first + s]);
  float* o = out + layout_.queryIndex(h, row) * dim_;
  float total = 0.0f;
  std::fill(o, o + dim_, 0.0f);
  for (int64_t s = 0; s < splits_; ++s) {
    const float weight = std::exp2(maxes_[first + s] - globalMax);
    total += sums_[first + s] * weight;
    const float* acc = accs_.get() + (first + s) * size_t(dim_);
    for (int32_t d = 0; d < dim_; ++d) o[d] += acc[d] * weight;
  }
  const float inverse = total > 0.0f ? 1.0f / total : 0.0f;
  for (int32_t d = 0; d < dim_; ++d) o[d] *= inverse;
  if (lse != nullptr) lse[layout_.queryIndex(h, row)] = total > 0.0f ? globalMax + std::log2(total) : -INFINITY;
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
      kernels.softmaxInto(scores, visible, kLn2, sums, visible);
    }
  });
}

void attentionDecode(const AttentionArgs& args) {
  const KernelTable& kernels = activeKernels();
  const RowLayout layout(args);
  const int32_t dim = args.headDim;
  const int64_t rowGroups = (layout.rowsPerHead + kMaxDecodeRows - 1) / kMaxDecodeRows;
  // An older segment (AttentionArgs::olderHeads) comes first in each head's walk: older tokens,
  // then the rest. Splits cover the walk; a split across the seam runs the kernel on each side and
  // merges the two states itself, the rest's first keys prefetched while the older side computes
  // (a split of its own would start cold: a task's first keys arrive at memory latency).
  const bool withOlder = args.olderHeads != nullptr;
  int64_t maxTokens = 0, maxOlder = 0, maxWalk = 0;
  for (int32_t h = 0; h < args.kvHeads; ++h) {
    const int64_t older = withOlder ? args.olderHeads[h].tokens : 0;
    maxTokens = std::max(maxTokens, args.heads[h].tokens);
    maxOlder = std::max(maxOlder, older);
    maxWalk = std::max(maxWalk, older + args.heads[h].tokens);
  }
  const DecodePlan plan = planDecode(maxWalk, args.kvHeads, rowGroups, args.threads, 1);
  const int64_t splits = plan.splits;
  const bool olderQueries = withOlder && args.olderQ != args.q;
  SplitPartials partials(layout, splits, dim, kMaxDecodeRows);
  // Per worker: the kernel's rows, and a second set for the far side of a seam (the kernel zeroes
  // its rows); then the task's scaled queries, and the older segment's when they differ.
  const size_t rowsFloats = kMaxDecodeRows * size_t(dim);
  const size_t workerFloats = (olderQueries ? 4 : 3) * rowsFloats;
  const Floats workerAcc = uninitialisedFloats(size_t(plan.threads) * workerFloats);
  // With the mass (H2O's decode steps), every row's scores are kept: older tokens, then the rest.
  const int64_t width = maxOlder + maxTokens;
  // Not zeroed: softmaxRow reads only what the kernel wrote (each row's visible tokens).
  std::unique_ptr<float[]> captured(args.mass != nullptr ? new float[size_t(args.kvHeads) * size_t(layout.rowsPerHead) * size_t(width)] : nullptr);
  const size_t rowBytes = size_t(dim) * dtypeBytes(args.kvType);
  const bool toL1 = streamPrefetchToL1();  // the kernels' choice (kernel_table.h)

  const int64_t tasks = int64_t(args.kvHeads) * rowGroups * splits;
  globalPool().parallelFor(tasks, plan.threads, [&](int64_t task, int32_t worker) {
    const int64_t split = task % splits;
    const int64_t group = (task / splits) % rowGroups;
    const int32_t h = int32_t(task / (splits * rowGroups));
    const int64_t firstRow = group * kMaxDecodeRows;
    const int32_t rows = int32_t(std::min<int64_t>(kMaxDecodeRows, layout.rowsPerHead - firstRow));
    const int64_t olderTokens = withOlder ? args.olderHeads[h].tokens : 0;
    const int64_t walk = olderTokens + args.heads[h].tokens;
    const int64_t begin = std::min(split * plan.splitTokens, walk), end = std::min(begin + plan.splitTokens, walk);
    float rowMax[2][kMaxDecodeRows], rowSum[2][kMaxDecodeRows];
    float* rowAcc = workerAcc.get() + size_t(worker) * workerFloats;
    float* queries = rowAcc + 2 * rowsFloats;
    scaleRows(layout, args.q, dim, args.scale, h, firstRow, rows, queries);
    float* olderRowQueries = olderQueries ? queries + rowsFloats : queries;
    if (olderQueries) scaleRows(layout, args.olderQ, dim, args.scale, h, firstRow, rows, olderRowQueries);
    // Tokens [from, to) of one segment into state `side`.
    const auto run = [&](bool older, int64_t from, int64_t to, int side) {
      const KVHeadView& head = older ? args.olderHeads[h] : args.heads[h];
      int64_t last[kMaxDecodeRows];
      // Pages are walked in rows: a head's token t is row firstRow + t. Every query sees all of
      // the older segment.
      for (int32_t r = 0; r < rows; ++r) {
        last[r] = head.firstRow + (older ? head.tokens - 1 : layout.lastToken(args.causal, head.tokens, firstRow + r));
      }
      DecodeRange range;
      range.q = older ? olderRowQueries : queries;
      range.rows = rows;
      range.lastToken = last;
      range.headDim = dim;
      range.kvType = args.kvType;
      range.keyPages = head.keyPages;
      range.valuePages = head.valuePages;
      range.pageTokens = older ? args.olderPageTokens : args.pageTokens;
      range.rowStride = args.rowStride;
      range.tokenBegin = head.firstRow + from;
      range.tokenEnd = head.firstRow + to;
      range.state = {rowMax[side], rowSum[side], rowAcc + size_t(side) * rowsFloats};
      if (captured) {
        range.scoresOut = captured.get() + (size_t(h) * size_t(layout.rowsPerHead) + size_t(firstRow)) * size_t(width) +
                          size_t((older ? 0 : olderTokens) + from);
        range.scoresStride = width;
      }
      kernels.decodeRange(range);
    };
    // A split past the head's walk still runs (empty) on the rest, so its state is initialised.
    const bool olderSide = begin < olderTokens, restSide = end > olderTokens || begin >= walk;
    const int64_t restFrom = std::max(begin, olderTokens) - olderTokens, restTo = std::max(end, olderTokens) - olderTokens;
    if (olderSide && restSide) {
      // The rest's first keys and values, requested before the older side computes.
      const KVHeadView& rest = args.heads[h];
      for (int64_t t = restFrom; t < std::min(restTo, restFrom + kPrefetchSeamTokens); ++t) {
        const int64_t at = rest.firstRow + t;
        const size_t offset = size_t(at % args.pageTokens) * size_t(args.rowStride) * dtypeBytes(args.kvType);
        const auto* key = static_cast<const uint8_t*>(rest.keyPages[at / args.pageTokens]) + offset;
        const auto* value = static_cast<const uint8_t*>(rest.valuePages[at / args.pageTokens]) + offset;
        for (size_t line = 0; line < rowBytes; line += 64) {
          prefetchStream(key + line, toL1);
          prefetchStream(value + line, toL1);
        }
      }
    }
    if (olderSide) run(true, begin, std::min(end, olderTokens), 0);
    if (restSide) run(false, restFrom, restTo, olderSide ? 1 : 0);
    if (olderSide && restSide) {
      // The two sides merged by log-sum-exp (an empty side's max is kNoScoreYet: weight 0).
      float* acc = rowAcc;
      const float* other = rowAcc + rowsFloats;
      for (int32_t r = 0; r < rows; ++r) {
        const float high = std::max(rowMax[0][r], rowMax[1][r]);
        const float a = std::exp2(rowMax[0][r] - high), b = std::exp2(rowMax[1][r] - high);
        rowMax[0][r] = high;
        rowSum[0][r] = rowSum[0][r] * a + rowSum[1][r] * b;
        for (int32_t d = 0; d < dim; ++d) acc[size_t(r) * dim + d] = acc[size_t(r) * dim + d] * a + other[size_t(r) * dim + d] * b;
      }
    }
    partials.finish(h, firstRow, rows, split, {rowMax[0], rowSum[0], rowAcc}, args.out, args.lse);
  });
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
