// KIVI attention driver: the flash-decoding plan of attention_decode.cc over KIVI heads, for any
// number of query rows (rows beyond 8 per kv head become more row groups, each re-reading codes).
// With the mass (H2O over KIVI), every row's masked scores are captured and normalised after the
// merge, as the dense decode driver does.
#include <algorithm>
#include <cmath>
#include <vector>

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
  // Splits cover the walked tokens: a window policy's hole is skipped, not split.
  for (int32_t h = 0; h < args.kvHeads; ++h) maxTokens = std::max(maxTokens, args.heads[h].tokens - kiviSkip(args.heads[h]).length);
  // Splits start at multiples of 32 tokens: a kernel sub-block never straddles a key group.
  const DecodePlan plan = planDecode(maxTokens, args.kvHeads, rowGroups, args.threads, 32);
  SplitPartials partials(layout, plan.splits, dim, kMaxDecodeRows);
  // Per worker: the kernel's rows, the task's scaled queries, the kernel's scratch.
  const size_t rowsFloats = kMaxDecodeRows * size_t(dim);
  const size_t workerFloats = 2 * rowsFloats + kiviScratchFloats(dim);
  const Floats workerAcc = uninitialisedFloats(size_t(plan.threads) * workerFloats);
  // Not zeroed: massFromScores reads only what the kernel wrote (each row's visible tokens).
  const int64_t width = maxTokens;
  const Floats captured = args.mass != nullptr ? uninitialisedFloats(size_t(args.kvHeads) * size_t(layout.rowsPerHead) * size_t(width))
                                               : Floats();
  // Pre-RoPE keys: per pair i, theta^(-2i/headDim) (as rotateRow computes it), and cos, sin of
  // j times it for the 32 tokens of a sub-block.
  std::vector<double> ropeFrequencies, workerRopeState;
  std::vector<float> ropeWithin, workerRope;
  if (args.preRope) {
    const int32_t pairs = dim / 2;
    ropeFrequencies.resize(size_t(pairs));
    ropeWithin.resize(2 * size_t(pairs) * 32);
    for (int32_t i = 0; i < pairs; ++i) {
      const double frequency = std::pow(double(args.rope.theta), -2.0 * i / dim);
      ropeFrequencies[size_t(i)] = frequency;
      for (int32_t j = 0; j < 32; ++j) {
        ropeWithin[size_t(i) * 32 + size_t(j)] = float(std::cos(j * frequency));
        ropeWithin[(size_t(pairs) + size_t(i)) * 32 + size_t(j)] = float(std::sin(j * frequency));
      }
    }
    workerRope.resize(size_t(plan.threads) * kiviRopeScratchFloats(dim));
    workerRopeState.resize(size_t(plan.threads) * 4 * size_t(pairs));
  }

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
    float* rowAcc = workerAcc.get() + size_t(worker) * workerFloats;
    float* queries = rowAcc + rowsFloats;
    scaleRows(layout, args.q, dim, args.scale, h, firstRow, rows, queries);
    KiviRange range;
    range.q = queries;
    range.rows = rows;
    range.lastToken = last;
    range.format = args.format;
    range.head = &head;
    range.keyGroupsPerPage = args.keyGroupsPerPage;
    range.valueTokensPerPage = args.valueTokensPerPage;
    range.ringRows = args.residual;
    const KiviSkip skip = kiviSkip(head);
    const int64_t walkTokens = head.tokens - skip.length;
    range.tokenBegin = skip.token(std::min(split * plan.splitTokens, walkTokens));
    range.tokenEnd = skip.token(std::min((split + 1) * plan.splitTokens, walkTokens));
    range.state = {rowMax, rowSum, rowAcc};
    range.scratch = queries + rowsFloats;
    if (args.preRope) {
      range.ropeFrequencies = ropeFrequencies.data();
      range.ropeWithin = ropeWithin.data();
      range.ropeStyle = args.rope.style;
      range.ropeScratch = workerRope.data() + size_t(worker) * kiviRopeScratchFloats(dim);
      range.ropeState = workerRopeState.data() + size_t(worker) * 4 * size_t(dim / 2);
    }
    if (captured) {
      range.scoresOut = captured.get() + (size_t(h) * size_t(layout.rowsPerHead) + size_t(firstRow)) * size_t(width) +
                        size_t(range.tokenBegin);
      range.scoresStride = width;
    }
    kernels.kiviDecodeRange(range);
    partials.finish(h, firstRow, rows, split, {rowMax, rowSum, rowAcc}, args.out, nullptr);
  });
  if (captured) {
    std::vector<int64_t> tokens;
    for (int32_t h = 0; h < args.kvHeads; ++h) tokens.push_back(args.heads[h].tokens);
    massFromScores(layout, args.causal, nullptr, tokens.data(), args.mass, args.massStride, captured.get(), width, plan.threads);
  }
}

}  // namespace kvslim::cpu
