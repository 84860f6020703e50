// Attention mass driver (AttentionMassArgs, core/attention_args.h): the rows of one kv head in
// tiles of up to kMassTileRows. The keys the rows see are converted once to the prefill's transposed
// f32 blocks, and a tile's scores come from the register-tiled score tile (over very many keys,
// from the SIMD score kernel on the pages, as attentionScores),
// each row's causal softmax from the SIMD softmaxRow, and the probabilities go into double column
// sums. Tiles are dealt round-robin to a number of slices fixed by the shape alone; a slice adds
// its tiles in order into its own accumulator and the slices are added in slice order, so the
// result is the same whatever the thread count and whichever thread ran which slice. Memory: a
// tile's rows x tokens floats per thread and at most kAccumulatorBudget doubles of slices.
// A single tile (a decode step's rows) takes sumFewRows instead: no f32 copy, parallel over keys.
#include <algorithm>
#include <cmath>
#include <vector>

#include "attention_plan.h"
#include "scratch.h"
#include "simd_level.h"
#include "thread_pool.h"

namespace kvslim::cpu {

namespace {

constexpr int64_t kMaxSlices = 64;
// Rows a tile scores against each transposed key block while the block is in L1: a tile streams
// every key the rows see, so 8-row tiles read a 32K head's f32 keys (16 MiB) 16 times for SnapKV's
// 128 rows. Fewer when the tile's probabilities would pass kTileProbsBudget floats (8 MiB).
constexpr int64_t kMassTileRows = 32;
constexpr int64_t kTileProbsBudget = int64_t(1) << 21;
// Doubles the slice accumulators hold together (32 MiB); a wider result gets fewer slices.
constexpr int64_t kAccumulatorBudget = int64_t(1) << 22;
// Floats of transposed keys a call may convert (256 MiB).
constexpr int64_t kTransposedBudget = int64_t(1) << 26;

// Scores (q pre-scaled) of `rows` rows against tokens [from, to) of one view: row r, token from + j
// at out + r * outStride + j.
void scoreView(const KernelTable& kernels, const AttentionMassArgs& args, const KVHeadView& view, const float* q,
               int32_t rows, int64_t from, int64_t to, float* out, int64_t outStride) {
  if (to <= from) return;
  ScoreRange range;
  range.q = q;
  range.rows = rows;
  range.headDim = args.headDim;
  range.kvType = args.kvType;
  range.keyPages = view.keyPages;
  range.pageTokens = args.pageTokens;
  range.rowStride = args.rowStride;
  range.rowBegin = view.firstRow + from;
  range.rowEnd = view.firstRow + to;
  range.out = out;
  range.outStride = outStride;
  range.prefetch = size_t(to - from) * size_t(args.headDim) * dtypeBytes(args.kvType) > kPrefetchScanBytes;
  kernels.scoreRange(range);
}

// Stride-1 pooling over [0, size) with padding kernel / 2: max ignores the padding, avg counts it
// as zeros (SnapKV; the CUDA backend pools in the same order).
double pooledAt(const double* votes, int64_t size, int64_t j, int32_t kernel, MassPooling pooling) {
  const int64_t half = kernel / 2;
  const int64_t begin = std::max<int64_t>(0, j - half), end = std::min(size, j + half + 1);
  if (pooling == MassPooling::Max) {
    double value = -INFINITY;
    for (int64_t t = begin; t < end; ++t) value = std::max(value, votes[t]);
    return value;
  }
  double value = 0.0;
  for (int64_t t = begin; t < end; ++t) value += votes[t];
  return value / double(kernel);
}

// args.out from the column sums: as they are, or (SnapKV) each member's votes pooled and averaged
// over the group.
void reduceMembers(const AttentionMassArgs& args, const std::vector<double>& total, int32_t group, bool perMember) {
  const int64_t columns = args.columns;
  if (!perMember) {
    std::copy(total.begin(), total.end(), args.out);
    return;
  }
  for (int32_t g = 0; g < group; ++g) {
    const double* votes = total.data() + size_t(g) * size_t(columns);
    for (int64_t j = 0; j < columns; ++j) args.out[j] += pooledAt(votes, columns, j, args.kernel, args.pooling) / group;
  }
}

// One tile of rows (a decode step: the kv head's group at one position), summed into total
// ([width]). Scores come straight from the pages in parallel over key chunks (converting every
// key to f32 for a few rows would cost more than the scores), then each row's softmax, then the
// column sums in parallel over key chunks with the rows added in order, as the tiled path's single
// slice adds them: the result does not depend on the thread count.
void sumFewRows(const KernelTable& kernels, const AttentionMassArgs& args, int32_t allowed, double* total) {
  constexpr int64_t kChunk = 4096;
  ThreadPool& pool = globalPool();
  const int32_t dim = args.headDim, group = args.group;
  const int32_t rows = args.n * group;
  const int64_t kept = args.kept.tokens, columns = args.columns;
  const int64_t firstSeen = args.tail.tokens - args.after - args.n + 1;
  const int64_t used = kept + args.tail.tokens - args.after;  // what the last row sees
  const bool perMember = args.pooling != MassPooling::None;
  std::vector<float> q(size_t(rows) * size_t(dim));
  for (size_t i = 0; i < q.size(); ++i) q[i] = args.q[i] * args.scale;
  std::vector<float> probs(size_t(rows) * size_t(used));
  const int64_t chunks = (used + kChunk - 1) / kChunk;
  pool.parallelFor(chunks, allowed, [&](int64_t c, int32_t) {
    const int64_t begin = c * kChunk, end = std::min(used, begin + kChunk);
    scoreView(kernels, args, args.kept, q.data(), rows, begin, std::min(end, kept), probs.data() + begin, used);
    const int64_t from = std::max(begin, kept);
    scoreView(kernels, args, args.tail, q.data(), rows, from - kept, end - kept, probs.data() + from, used);
  });
  pool.parallelFor(rows, allowed, [&](int64_t r, int32_t) {
    const int64_t visible = kept + firstSeen + r / group;
    kernels.softmaxRow(probs.data() + size_t(r) * size_t(used), visible, used);
  });
  const int64_t reported = std::min(used, columns);
  pool.parallelFor((reported + kChunk - 1) / kChunk, allowed, [&](int64_t c, int32_t) {
    const int64_t begin = c * kChunk, end = std::min(reported, begin + kChunk);
    for (int32_t r = 0; r < rows; ++r) {
      // Beyond a row's visible tokens its probabilities are 0 (softmaxRow): adding them changes nothing.
      const float* p = probs.data() + size_t(r) * size_t(used);
      double* into = total + (perMember ? size_t(r % group) * size_t(columns) : 0);
      for (int64_t t = begin; t < end; ++t) into[t] += double(p[t]);
    }
  });
}

}  // namespace

void attentionMass(const AttentionMassArgs& args) {
  const ScratchLease lease;
  const int64_t columns = args.columns;
  std::fill(args.out, args.out + columns, 0.0);
  if (args.n == 0 || columns == 0) return;
  const KernelTable& kernels = activeKernels();
  ThreadPool& pool = globalPool();
  const int32_t dim = args.headDim, group = args.group;
  const int64_t rows = int64_t(args.n) * group;
  const int64_t kept = args.kept.tokens, tail = args.tail.tokens, tokens = kept + tail;
  // Tail tokens query 0 sees; query i sees i more.
  const int64_t firstSeen = tail - args.after - args.n + 1;
  const bool perMember = args.pooling != MassPooling::None;
  const int64_t width = (perMember ? group : 1) * columns;
  const int32_t allowed = args.threads > 0 ? std::min(args.threads, pool.size()) : pool.size();
  std::vector<double> total(size_t(width), 0.0);
  if (rows <= kMaxDecodeRows) {
    sumFewRows(kernels, args, allowed, total.data());
    reduceMembers(args, total, group, perMember);
    return;
  }
  // Rows per tile by the shape alone (the slices, and so the sums' order, must not follow the threads).
  const int64_t tileRows = std::clamp<int64_t>(kTileProbsBudget / std::max<int64_t>(1, tokens), kMaxDecodeRows, kMassTileRows);
  const int64_t tiles = (rows + tileRows - 1) / tileRows;
  const int64_t slices = std::max<int64_t>(1, std::min({tiles, kMaxSlices, kAccumulatorBudget / width}));

  std::vector<double> sums(size_t(slices) * size_t(width), 0.0);
  const int32_t threads = int32_t(std::max<int64_t>(1, std::min<int64_t>(allowed, slices)));

  // The keys the rows see, once, as f32 transposed blocks (the prefill layout): each tile's scores
  // are then a register-tiled GEMM loop instead of dot products with horizontal sums. Beyond
  // kTransposedBudget floats the scores come straight from the pages.
  const int64_t tailUsed = tail - args.after;  // what the last row sees of the tail
  const int64_t used = kept + tailUsed;
  const int32_t blockKeys = kernels.prefillBlockKeys;
  const int32_t paddedDim = paddedDimOf(kernels, dim);
  const int64_t paddedTokens = (used + blockKeys - 1) / blockKeys * blockKeys;
  const bool transposed = paddedTokens * int64_t(paddedDim) <= kTransposedBudget;
  float* keys = nullptr;
  if (transposed) {
    // The prefill's key scratch (this thread's; the prefill that preceded this call is done with it).
    keys = scratchFloats(lease, ScratchSlot::Keys, size_t(paddedTokens) * size_t(paddedDim));
    std::fill(keys, keys + size_t(paddedTokens) * size_t(paddedDim), 0.0f);
    const KeyBlocks layout{args.pageTokens, size_t(args.rowStride) * dtypeBytes(args.kvType), args.kvType, dim, paddedDim, blockKeys};
    const int64_t chunk = int64_t(blockKeys) * 64;  // whole blocks: no two chunks write one block
    pool.parallelFor((used + chunk - 1) / chunk, allowed, [&](int64_t c, int32_t) {
      const int64_t begin = c * chunk, end = std::min(used, begin + chunk);
      if (begin < kept) transposeKeys(kernels, layout, args.kept, begin, std::min(end, kept) - begin, begin, keys);
      const int64_t from = std::max(begin, kept);
      if (from < end) transposeKeys(kernels, layout, args.tail, from - kept, end - from, from, keys);
    });
  }
  const int64_t stride = transposed ? paddedTokens : tokens;
  // Per thread, allocated here: a worker must not throw (std::bad_alloc reaches the caller from
  // here). The probabilities ([tileRows, stride] per worker) live in this thread's grow-only
  // scratch: fresh 2 MiB pages per call cost more than the scores (a 2K prompt's SnapKV choice
  // spent most of its time zeroing them).
  const int64_t paddedRows = (tileRows + kernels.prefillRows - 1) / kernels.prefillRows * kernels.prefillRows;
  std::vector<std::vector<float>> queries(static_cast<size_t>(threads), std::vector<float>(size_t(paddedRows) * size_t(paddedDim)));
  const size_t probsFloats = size_t(tileRows) * size_t(stride);
  float* probsBase = scratchFloats(lease, ScratchSlot::Values, size_t(threads) * probsFloats);

  pool.parallelFor(slices, threads, [&](int64_t slice, int32_t worker) {
    std::vector<float>& q = queries[size_t(worker)];
    float* probs = probsBase + size_t(worker) * probsFloats;
    double* sum = sums.data() + size_t(slice) * size_t(width);
    for (int64_t tile = slice; tile < tiles; tile += slices) {
      const int64_t first = tile * tileRows;
      const int32_t count = int32_t(std::min<int64_t>(tileRows, rows - first));
      const float* from = args.q + size_t(first) * size_t(dim);
      // Tail scores up to what the tile's last (latest) query sees.
      const int64_t tileSeen = firstSeen + (first + count - 1) / group;
      if (transposed) {
        std::fill(q.begin(), q.end(), 0.0f);
        for (int32_t r = 0; r < count; ++r)
          for (int32_t d = 0; d < dim; ++d) q[size_t(r) * size_t(paddedDim) + size_t(d)] = from[size_t(r) * size_t(dim) + size_t(d)] * args.scale;
        ScoreTile scores{q.data(), count, paddedDim, keys, kept + tileSeen, probs, stride};
        kernels.scoreTile(scores);
      } else {
        for (size_t i = 0; i < size_t(count) * size_t(dim); ++i) q[i] = from[i] * args.scale;
        scoreView(kernels, args, args.kept, q.data(), count, 0, kept, probs, stride);
        scoreView(kernels, args, args.tail, q.data(), count, 0, tileSeen, probs + kept, stride);
      }
      for (int32_t r = 0; r < count; ++r) {
        const int64_t row = first + r;
        const int64_t visible = kept + firstSeen + row / group;
        float* p = probs + size_t(r) * size_t(stride);
        double* into = sum + (perMember ? size_t(row % group) * size_t(columns) : 0);
        kernels.softmaxInto(p, visible, 1.0f, into, std::min(visible, columns));
      }
    }
  });

  // Slices in slice order.
  for (int64_t s = 0; s < slices; ++s) {
    const double* part = sums.data() + size_t(s) * size_t(width);
    for (int64_t t = 0; t < width; ++t) total[size_t(t)] += part[t];
  }
  reduceMembers(args, total, group, perMember);
}

void prefillMass(const AttentionArgs& args) {
  const RowLayout layout(args);
  std::vector<float> rows(size_t(layout.rowsPerHead) * size_t(args.headDim));
  for (int32_t h = 0; h < args.kvHeads; ++h) {
    for (int64_t row = 0; row < layout.rowsPerHead; ++row) {
      const float* from = args.q + layout.queryIndex(h, row) * args.headDim;
      std::copy(from, from + args.headDim, rows.begin() + row * args.headDim);
    }
    AttentionMassArgs mass;
    mass.q = rows.data();
    mass.n = args.n;
    mass.group = layout.group;
    mass.headDim = args.headDim;
    mass.kvType = args.kvType;
    mass.pageTokens = args.pageTokens;
    mass.rowStride = args.rowStride;
    mass.tail = args.heads[h];
    mass.scale = args.scale;
    mass.columns = args.heads[h].tokens;
    mass.out = args.mass + size_t(h) * size_t(args.massStride);
    mass.threads = args.threads;
    attentionMass(mass);
  }
}

}  // namespace kvslim::cpu
