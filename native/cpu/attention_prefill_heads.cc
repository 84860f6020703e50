// Prefill head by head: one kv head's keys and values converted to f32 at once, then each tile of
// its query rows runs the prefill kernel over all of the keys it sees. While a head's keys stay
// in the caches its tiles share them (attentionPrefill's chunks interleave every head's).
//
// With AttentionArgs::mass (H2O's heavy-hitter scores over a prompt) the mass comes from the same
// QK^T pass. A separate mass pass (attentionMass) recomputes every score after the prefill: a
// second QK^T, about half of the prefill's FLOPs. Here each tile keeps its unnormalised
// probabilities exp2(s - running max) and the running max after every key block. Once the tile's
// rows are done, their final max and sum turn those into probabilities (massTile), added into
// double column sums. That happens inside the slice's next tile: its kernel's register tiles sum
// their rows of each slab block (prefetched) just before overwriting them (PrefillTile::pending),
// so the slab, out of L2 past 4K-8K keys, is read from memory once per tile instead of read for the
// sums and again for the next capture's stores. A slice's tiles come in increasing length, so the next tile covers every
// block of the previous one.
// - The output is attentionPrefill's bit for bit: the same kernel over the same key blocks in the
//   same order, and rows never interact in it.
// - Deterministic mass: a kv head's row tiles are dealt (back and forth) to a number of slices
//   fixed by the shape; a slice adds its tiles in order into its own accumulator, and the slices are added
//   in slice order, whatever the thread count.
// - An older segment (AttentionArgs::olderHeads: a policy's kept tokens, seen by every row) is
//   joined in front of the head's keys, so kept and tail tokens are one softmax (and one mass,
//   kept columns first) instead of two calls merged by log-sum-exp and a second pass for the mass.
// - Queries and outputs are staged head-major on 2 MiB pages (StagedRows) when they fit
//   kStagingBudget. A tile's rows are 2 KiB pieces of q and out ([n, qHeads, dim]) 16 KiB apart at
//   32 q heads: on the caller's 4 KiB pages, read and written tile by tile between the kernel's
//   passes (which evict the page tables from the caches), they took 15% of a one-thread 4K-token
//   prefill in page walks. Staged, in one pass in position order each way: one thread 10-14%
//   faster at 4K tokens, two threads 3-5% at 1K-4K and 6-8% at 8K, the same at 512 (paired,
//   alternating calls in one process).
// - Memory: one kv head's keys and values as f32 (prefillHeadsFits); with the mass, per thread, one
//   tile's probabilities (tile rows x tokens floats, block by block so a block's rows are adjacent;
//   the tile shrinks to stay within kProbsBudget); the staged rows, twice the size of q at most.
#include <algorithm>
#include <cmath>
#include <vector>

#include "../core/environment.h"
#include "attention_plan.h"
#include "huge_memory.h"
#include "scratch.h"
#include "simd_level.h"
#include "thread_pool.h"

namespace kvslim::cpu {

namespace {
constexpr int64_t kMaxSlices = 64;
constexpr int64_t kAccumulatorBudget = int64_t(1) << 22;  // doubles of slice accumulators per kv head (32 MiB)
constexpr int64_t kProbsBudget = int64_t(1) << 22;        // floats of one thread's tile probabilities (16 MiB)
constexpr int64_t kHeadBudget = int64_t(1) << 26;         // floats of one head's f32 keys and values (256 MiB)
constexpr int64_t kTilesPerThread = 8;                    // fewest tiles per thread per head for the larger tile
constexpr int64_t kStagingBudget = int64_t(1) << 25;      // floats of staged queries, and of outputs (128 MiB each)
constexpr int64_t kStagingPositions = 64;                 // positions per staging task

// Tokens of a kv head's joined keys: its older segment's (AttentionArgs::olderHeads), then its own.
int64_t olderTokensOf(const AttentionArgs& args, int32_t h) { return args.olderHeads != nullptr ? args.olderHeads[h].tokens : 0; }

int64_t paddedTokensOf(const KernelTable& kernels, const AttentionArgs& args) {
  int64_t maxTokens = 0;
  for (int32_t h = 0; h < args.kvHeads; ++h) maxTokens = std::max(maxTokens, olderTokensOf(args, h) + args.heads[h].tokens);
  const int32_t blockKeys = kernels.prefillBlockKeys;
  return std::max<int64_t>(blockKeys, (maxTokens + blockKeys - 1) / blockKeys * blockKeys);
}

// One worker's buffers, allocated before the tasks run (a worker must not throw).
struct TileBuffers {
  std::vector<float> q;         // [tile rows rounded up to register rows, paddedDim], scaled (unstaged only)
  std::vector<float> acc;       // [tile rows, paddedDim]
  std::vector<float> maxes, sums;
  std::vector<int64_t> last;    // each row's last key
  std::vector<float> scratch;   // the kernel's [prefillRows, blockKeys]
  // With the mass only:
  HugeArray<float> probs;       // [blocks, tile rows rounded up, blockKeys]
  std::vector<float> blockMax;  // [blocks, tile rows rounded up]
  // The previous tile's final maxes, sums and last keys while its mass is pending.
  std::vector<float> doneMax, doneSum;
  std::vector<int64_t> doneLast;
};

// Every head's query rows, scaled, and their outputs, head-major on 2 MiB pages (ScratchSlot
// Queries and Accumulators, kept for the thread's next call); empty (q == nullptr) over
// kStagingBudget.
struct StagedRows {
  float* q = nullptr;    // [kvHeads, paddedRows, paddedDim]: zero past dim and past rowsPerHead
  float* out = nullptr;  // [kvHeads, rowsPerHead, dim]
  int64_t paddedRows = 0;
  float* qOf(int32_t h, int64_t row, int32_t paddedDim) const {
    return q + (size_t(h) * size_t(paddedRows) + size_t(row)) * size_t(paddedDim);
  }
};

// Runs body(p) for every position p, in tasks of kStagingPositions positions.
template <class Body>
void forEachPosition(int64_t positions, int32_t threads, const Body& body) {
  globalPool().parallelFor((positions + kStagingPositions - 1) / kStagingPositions, threads, [&](int64_t task, int32_t) {
    const int64_t end = std::min(positions, (task + 1) * kStagingPositions);
    for (int64_t p = task * kStagingPositions; p < end; ++p) body(p);
  });
}

StagedRows stageRows(const ScratchLease& lease, const AttentionArgs& args, const RowLayout& layout, int32_t paddedDim,
                     int64_t paddedRows, float factor, int32_t threads) {
  StagedRows staged;
  const int32_t dim = args.headDim;
  // KVSLIM_PREFILL_STAGING_FLOATS (read once) replaces the budget: tests compare 0 (unstaged).
  static const int64_t budget = environmentInteger("KVSLIM_PREFILL_STAGING_FLOATS", kStagingBudget, 0);
  if (int64_t(args.kvHeads) * paddedRows * paddedDim > budget) return staged;
  staged.paddedRows = paddedRows;
  staged.q = scratchFloats(lease, ScratchSlot::Queries, size_t(args.kvHeads) * size_t(paddedRows) * size_t(paddedDim));
  staged.out = scratchFloats(lease, ScratchSlot::Accumulators, size_t(args.kvHeads) * size_t(layout.rowsPerHead) * size_t(dim));
  forEachPosition(args.n, threads, [&](int64_t p) {
    for (int32_t qh = 0; qh < args.qHeads; ++qh) {
      const float* src = args.q + (size_t(p) * size_t(args.qHeads) + size_t(qh)) * size_t(dim);
      float* dst = staged.qOf(qh / layout.group, p * layout.group + qh % layout.group, paddedDim);
      for (int32_t d = 0; d < dim; ++d) dst[d] = src[d] * factor;
      std::fill(dst + dim, dst + paddedDim, 0.0f);
    }
  });
  // A register tile reads whole groups of rows: the rows past a head's last are zeros.
  for (int32_t h = 0; h < args.kvHeads; ++h) {
    std::fill(staged.qOf(h, layout.rowsPerHead, paddedDim), staged.qOf(h, paddedRows, paddedDim), 0.0f);
  }
  return staged;
}

// args.out from the staged outputs, in position order.
void unstageOutputs(const AttentionArgs& args, const RowLayout& layout, const StagedRows& staged, int32_t threads) {
  const size_t dim = size_t(args.headDim);
  forEachPosition(args.n, threads, [&](int64_t p) {
    for (int32_t qh = 0; qh < args.qHeads; ++qh) {
      const int64_t row = p * layout.group + qh % layout.group;
      const float* src = staged.out + (size_t(qh / layout.group) * size_t(layout.rowsPerHead) + size_t(row)) * dim;
      std::copy(src, src + dim, args.out + (size_t(p) * size_t(args.qHeads) + size_t(qh)) * dim);
    }
  });
}

}  // namespace

bool prefillHeadsFits(const AttentionArgs& args) {
  // KVSLIM_PREFILL_HEAD_FLOATS (read once) replaces the budget: tests send every prefill through
  // the chunked driver with a small one.
  static const int64_t budget = environmentInteger("KVSLIM_PREFILL_HEAD_FLOATS", kHeadBudget, 0);
  const KernelTable& kernels = activeKernels();
  return paddedTokensOf(kernels, args) * paddedDimOf(kernels, args.headDim) * 2 <= budget;
}

void attentionPrefillHeads(const AttentionArgs& args) {
  const ScratchLease lease;
  const KernelTable& kernels = activeKernels();
  ThreadPool& pool = globalPool();
  const int32_t allowed = args.threads > 0 ? std::min(args.threads, pool.size()) : pool.size();
  const RowLayout layout(args);
  const int32_t dim = args.headDim;
  const int32_t paddedDim = paddedDimOf(kernels, dim);
  const int32_t registerRows = kernels.prefillRows;
  const int32_t blockKeys = kernels.prefillBlockKeys;
  const int64_t paddedTokens = paddedTokensOf(kernels, args);
  const int64_t blocks = paddedTokens / blockKeys;
  const bool withMass = args.mass != nullptr;
  // Tiles of kMaxPrefillRows rows stream each head's f32 keys and values (out of L2 past a few
  // thousand tokens) half as often as tiles of kPrefillTileRows: 4K-32K prompts prefill 3-6%
  // faster (paired, 2 threads), H2O's too. The smaller tile where the larger would leave too few
  // tiles to balance the threads.
  int32_t tileRows = (layout.rowsPerHead + kMaxPrefillRows - 1) / kMaxPrefillRows >= kTilesPerThread * allowed ? kMaxPrefillRows
                                                                                                             : kPrefillTileRows;
  while (withMass && tileRows > registerRows && int64_t(tileRows) * paddedTokens > kProbsBudget) tileRows -= registerRows;
  const int32_t paddedTileRows = (tileRows + registerRows - 1) / registerRows * registerRows;
  const int64_t tiles = (layout.rowsPerHead + tileRows - 1) / tileRows;
  // Without the mass a task is a tile, the longest first (causal work grows with the row index);
  // with it a task is a slice of tiles.
  const int64_t slices = withMass ? std::max<int64_t>(1, std::min({tiles, kMaxSlices, kAccumulatorBudget / paddedTokens})) : 0;
  const int64_t tasks = withMass ? slices : tiles;
  const int32_t threads = int32_t(std::max<int64_t>(1, std::min<int64_t>(allowed, tasks)));

  const float factor = args.scale * kLog2e;
  const int64_t paddedRows = (layout.rowsPerHead + registerRows - 1) / registerRows * registerRows;
  const StagedRows staged = stageRows(lease, args, layout, paddedDim, paddedRows, factor, allowed);

  std::vector<TileBuffers> buffers(static_cast<size_t>(threads));
  for (TileBuffers& b : buffers) {
    if (staged.q == nullptr) b.q.assign(size_t(paddedTileRows) * size_t(paddedDim), 0.0f);
    b.acc.resize(size_t(tileRows) * size_t(paddedDim));
    b.maxes.resize(size_t(tileRows));
    b.sums.resize(size_t(tileRows));
    b.last.resize(size_t(tileRows));
    b.scratch.resize(size_t(registerRows) * size_t(blockKeys));
    if (!withMass) continue;
    b.probs.reserve(size_t(paddedTileRows) * size_t(paddedTokens));
    b.blockMax.resize(size_t(paddedTileRows) * size_t(blocks));
    b.doneMax.resize(size_t(tileRows));
    b.doneSum.resize(size_t(tileRows));
    b.doneLast.resize(size_t(tileRows));
  }
  float* keys = scratchFloats(lease, ScratchSlot::Keys, size_t(paddedTokens) * size_t(paddedDim));
  float* values = scratchFloats(lease, ScratchSlot::Values, size_t(paddedTokens) * size_t(paddedDim));
  const size_t columnFloats = size_t(slices) * size_t(paddedTokens);
  HugeArray<double> columnSums;
  columnSums.reserve(columnFloats);

  for (int32_t h = 0; h < args.kvHeads; ++h) {
    const KVHeadView& head = args.heads[h];
    const int64_t tokens = head.tokens;
    // An older segment (kept tokens, seen by every row) comes first in the joined keys.
    const int64_t older = olderTokensOf(args, h);
    const int64_t joined = older + tokens;
    const int64_t chunk = int64_t(blockKeys) * 64;  // whole blocks: no two chunks write one block
    pool.parallelFor((joined + chunk - 1) / chunk, allowed, [&](int64_t c, int32_t) {
      const int64_t begin = c * chunk;
      convertChunk(kernels, args, head, begin, std::min(chunk, joined - begin), paddedDim, blockKeys,
                   keys + size_t(begin) * size_t(paddedDim), values + size_t(begin) * size_t(paddedDim),
                   args.olderHeads != nullptr ? &args.olderHeads[h] : nullptr);
    });
    std::fill(columnSums.data(), columnSums.data() + columnFloats, 0.0);

    pool.parallelFor(tasks, threads, [&](int64_t task, int32_t worker) {
      TileBuffers& b = buffers[size_t(worker)];
      double* into = withMass ? columnSums.data() + size_t(task) * size_t(paddedTokens) : nullptr;
      // A slice takes one tile of every round of `slices` tiles, from either end in turn, so the
      // slices' causal work is about even.
      const int64_t rounds = withMass ? (tiles + slices - 1) / slices : 1;
      // The previous tile's mass, summed block by block inside the next tile's kernel (PrefillTile::pending).
      MassTile pendingMass{};
      bool pending = false;
      for (int64_t round = 0; round < rounds; ++round) {
        const int64_t t = !withMass ? tiles - 1 - task : round * slices + (round % 2 == 0 ? task : slices - 1 - task);
        if (t >= tiles) continue;
        const int64_t firstRow = t * tileRows;
        const int32_t rows = int32_t(std::min<int64_t>(tileRows, layout.rowsPerHead - firstRow));
        int64_t lastOfTile = -1;
        for (int32_t r = 0; r < rows; ++r) {
          b.last[size_t(r)] = older + lastToken(args, tokens, layout.position(firstRow + r));
          lastOfTile = std::max(lastOfTile, b.last[size_t(r)]);
        }
        if (staged.q == nullptr) {
          for (int32_t r = 0; r < rows; ++r) {
            const float* src = args.q + layout.queryIndex(h, firstRow + r) * dim;
            float* dst = b.q.data() + size_t(r) * size_t(paddedDim);
            for (int32_t d = 0; d < dim; ++d) dst[d] = src[d] * factor;
          }
          // Rows past the last tile row of a head are read by the register tile: zeros.
          std::fill(b.q.begin() + size_t(rows) * size_t(paddedDim), b.q.end(), 0.0f);
        }
        std::fill(b.maxes.begin(), b.maxes.end(), kNoScoreYet);
        std::fill(b.sums.begin(), b.sums.end(), 0.0f);
        std::fill(b.acc.begin(), b.acc.end(), 0.0f);
        const int64_t keyEnd = std::min(joined, lastOfTile + 1);
        if (keyEnd > 0) {
          PrefillTile tile;
          tile.q = staged.q != nullptr ? staged.qOf(h, firstRow, paddedDim) : b.q.data();
          tile.rows = rows;
          tile.lastToken = b.last.data();
          tile.paddedDim = paddedDim;
          tile.keysTransposed = keys;
          tile.values = values;
          tile.keyBegin = 0;
          tile.keyEnd = keyEnd;
          tile.state = {b.maxes.data(), b.sums.data(), b.acc.data()};
          tile.scratch = b.scratch.data();
          if (withMass) {
            tile.probs = b.probs.data();
            tile.probsBlockStride = int64_t(paddedTileRows) * blockKeys;
            tile.blockMax = b.blockMax.data();
            tile.blockMaxStride = paddedTileRows;
            if (pending) tile.pending = &pendingMass;
          }
          kernels.prefillTile(tile);
          pending = false;
        }
        for (int32_t r = 0; r < rows; ++r) {
          const float* acc = b.acc.data() + size_t(r) * size_t(paddedDim);
          if (staged.out != nullptr) {
            const int64_t index = layout.queryIndex(h, firstRow + r);
            finishRowTo(staged.out + (size_t(h) * size_t(layout.rowsPerHead) + size_t(firstRow + r)) * size_t(dim),
                        args.lse != nullptr ? args.lse + index : nullptr, dim, b.maxes[size_t(r)], b.sums[size_t(r)], acc);
          } else {
            finishRow(args, layout, h, firstRow + r, b.maxes[size_t(r)], b.sums[size_t(r)], acc);
          }
          if (!(b.sums[size_t(r)] > 0.0f)) b.last[size_t(r)] = -1;  // saw no key: adds nothing
        }
        if (!withMass) continue;
        if (pending) kernels.massTile(pendingMass);  // this tile saw no key: no kernel took it
        std::swap(b.maxes, b.doneMax);
        std::swap(b.sums, b.doneSum);
        std::swap(b.last, b.doneLast);
        pendingMass = {b.probs.data(), int64_t(paddedTileRows) * blockKeys, b.blockMax.data(), paddedTileRows,
                       b.doneMax.data(), b.doneSum.data(), b.doneLast.data(), rows, into};
        pending = true;
      }
      if (pending) kernels.massTile(pendingMass);
    });

    if (!withMass) continue;
    double* mass = args.mass + size_t(h) * size_t(args.massStride);
    std::fill(mass, mass + joined, 0.0);
    for (int64_t s = 0; s < slices; ++s) {
      const double* part = columnSums.data() + size_t(s) * size_t(paddedTokens);
      for (int64_t j = 0; j < joined; ++j) mass[j] += part[j];
    }
  }
  if (staged.out != nullptr) unstageOutputs(args, layout, staged, allowed);
}

}  // namespace kvslim::cpu
