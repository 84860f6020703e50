// Prefill driver for heads too long for attention_prefill_heads.cc (prefillHeadsFits): keys arrive
// in chunks converted once to f32 (transposed per block for the register-tiled score kernel);
// every (kv head, row tile) task then continues its online softmax over the chunk. Memory stays at
// a chunk of every head whatever the length. The full [n, T] score matrix never exists.
#include <algorithm>
#include <cmath>
#include <vector>

#include "attention_plan.h"
#include "scratch.h"
#include "simd_level.h"
#include "thread_pool.h"

namespace kvslim::cpu {

namespace {
constexpr int64_t kChunkKeys = 2048;  // f32 K+V of a chunk: kvHeads x 2 MiB at headDim 128
}  // namespace

void convertChunk(const KernelTable& kernels, const AttentionArgs& args, const KVHeadView& head, int64_t first,
                  int64_t count, int32_t paddedDim, int32_t blockKeys, float* keysTransposed, float* values,
                  const KVHeadView* older) {
  const int32_t dim = args.headDim;
  const size_t rowBytes = size_t(args.rowStride) * dtypeBytes(args.kvType);
  const int64_t blocks = (count + blockKeys - 1) / blockKeys;
  const int64_t padded = blocks * blockKeys;
  // Only the padding is zeroed (what the conversion leaves unwritten): channels past dim, and the
  // keys past count in the last block. Zeroing all of it doubled the stores of a decode slice.
  const size_t blockFloats = size_t(paddedDim) * size_t(blockKeys);
  if (paddedDim > dim) {
    for (int64_t b = 0; b < blocks; ++b) {
      std::fill(keysTransposed + size_t(b) * blockFloats + size_t(dim) * size_t(blockKeys), keysTransposed + size_t(b + 1) * blockFloats, 0.0f);
    }
  }
  if (padded > count) {
    float* last = keysTransposed + size_t(blocks - 1) * blockFloats;
    for (int32_t d = 0; d < dim; ++d) {
      std::fill(last + size_t(d) * size_t(blockKeys) + size_t(count % blockKeys), last + size_t(d + 1) * size_t(blockKeys), 0.0f);
    }
  }
  std::fill(values + size_t(count) * size_t(paddedDim), values + size_t(padded) * size_t(paddedDim), 0.0f);
  // Tokens [from, from + n) of `view` (pages of pageTokens rows) as chunk indices at, at + 1, ...
  const auto segment = [&](const KVHeadView& view, int64_t pageTokens, int64_t from, int64_t n, int64_t at) {
    for (int64_t j = 0; j < n; ++j) {
      const int64_t token = view.firstRow + from + j;
      const void* value = pageRow(view.valuePages, pageTokens, rowBytes, token);
      float* row = values + size_t(at + j) * size_t(paddedDim);
      kernels.toFloat32(value, args.kvType, row, dim);
      std::fill(row + dim, row + paddedDim, 0.0f);
    }
    const KeyBlocks layout{pageTokens, rowBytes, args.kvType, dim, paddedDim, blockKeys};
    transposeKeys(kernels, layout, view, from, n, at, keysTransposed);
  };
  // With an older segment, joined index i is its token i below its count, then `head`'s.
  const int64_t olderTokens = older != nullptr ? older->tokens : 0;
  if (first < olderTokens) segment(*older, args.olderPageTokens, first, std::min(count, olderTokens - first), 0);
  if (first + count > olderTokens) {
    const int64_t at = std::max<int64_t>(0, olderTokens - first);
    segment(head, args.pageTokens, first + at - olderTokens, count - at, at);
  }
}

void finishRowTo(float* out, float* lse, int32_t dim, float max, float sum, const float* acc) {
  const float inverse = sum > 0.0f ? 1.0f / sum : 0.0f;
  for (int32_t d = 0; d < dim; ++d) out[d] = acc[d] * inverse;
  if (lse != nullptr) *lse = sum > 0.0f ? max + std::log2(sum) : -INFINITY;
}

void finishRow(const AttentionArgs& args, const RowLayout& layout, int32_t kvHead, int64_t row, float max, float sum,
               const float* acc) {
  const int64_t index = layout.queryIndex(kvHead, row);
  finishRowTo(args.out + index * args.headDim, args.lse != nullptr ? args.lse + index : nullptr, args.headDim, max, sum, acc);
}

void transposeKeys(const KernelTable& kernels, const KeyBlocks& layout, const KVHeadView& head, int64_t first, int64_t count,
                   int64_t at, float* keysTransposed) {
  float keyRow[1024];  // headDim <= 1024
  const auto rowOf = [&](int64_t j) {
    const int64_t token = head.firstRow + first + j;
    return static_cast<const void*>(pageRow(head.keyPages, layout.pageTokens, layout.rowBytes, token));
  };
  // Whole blocks through the register transpose; a partial first or last block key by key (the
  // lanes outside [at, at + count) belong to the caller).
  int64_t j = 0;
  while (j < count) {
    const int64_t index = at + j;
    if (index % layout.blockKeys == 0 && count - j >= layout.blockKeys) {
      const void* rows[64];  // blockKeys <= 32
      for (int32_t i = 0; i < layout.blockKeys; ++i) rows[i] = rowOf(j + i);
      kernels.transposeKeyBlock(rows, layout.type, layout.dim,
                                keysTransposed + size_t(index / layout.blockKeys) * size_t(layout.paddedDim) * size_t(layout.blockKeys));
      j += layout.blockKeys;
      continue;
    }
    kernels.toFloat32(rowOf(j), layout.type, keyRow, layout.dim);
    float* block = keysTransposed + size_t(index / layout.blockKeys) * size_t(layout.paddedDim) * size_t(layout.blockKeys);
    const size_t lane = size_t(index % layout.blockKeys);
    for (int32_t d = 0; d < layout.dim; ++d) block[size_t(d) * size_t(layout.blockKeys) + lane] = keyRow[d];
    ++j;
  }
}

void attentionPrefill(const AttentionArgs& args) {
  const ScratchLease lease;
  const KernelTable& kernels = activeKernels();
  ThreadPool& pool = globalPool();
  const int32_t threads = args.threads > 0 ? std::min(args.threads, pool.size()) : pool.size();
  const RowLayout layout(args);
  const int32_t dim = args.headDim;
  const int32_t paddedDim = paddedDimOf(kernels, dim);
  const int32_t registerRows = kernels.prefillRows;
  const int32_t tileRows = kPrefillTileRows;
  const int32_t blockKeys = kernels.prefillBlockKeys;
  const int64_t tilesPerHead = (layout.rowsPerHead + tileRows - 1) / tileRows;
  // Rows padded to whole tiles so a register tile may read all of its query rows.
  const int64_t paddedRows = tilesPerHead * tileRows;

  const size_t stateFloats = size_t(args.kvHeads) * size_t(paddedRows) * size_t(paddedDim);
  float* queries = scratchFloats(lease, ScratchSlot::Queries, stateFloats);
  float* accs = scratchFloats(lease, ScratchSlot::Accumulators, stateFloats);
  std::vector<float> maxes(size_t(args.kvHeads) * size_t(paddedRows), kNoScoreYet);
  std::vector<float> sums(maxes.size(), 0.0f);
  std::vector<int64_t> last(maxes.size(), -1);
  int64_t maxTokens = 0;
  for (int32_t h = 0; h < args.kvHeads; ++h) maxTokens = std::max(maxTokens, args.heads[h].tokens);
  pool.parallelFor(args.kvHeads, threads, [&](int64_t h, int32_t) {
    const size_t headFloats = size_t(paddedRows) * size_t(paddedDim);
    float* headQueries = queries + size_t(h) * headFloats;
    std::fill(accs + size_t(h) * headFloats, accs + (size_t(h) + 1) * headFloats, 0.0f);
    // Only the padding needs zeros: the rows are overwritten here.
    std::fill(headQueries + size_t(layout.rowsPerHead) * size_t(paddedDim), headQueries + headFloats, 0.0f);
    const float factor = args.scale * kLog2e;
    for (int64_t row = 0; row < layout.rowsPerHead; ++row) {
      const float* src = args.q + layout.queryIndex(args, int32_t(h), row) * dim;
      float* dst = headQueries + size_t(row) * size_t(paddedDim);
      for (int32_t d = 0; d < dim; ++d) dst[d] = src[d] * factor;
      std::fill(dst + dim, dst + paddedDim, 0.0f);
      last[size_t(h) * size_t(paddedRows) + size_t(row)] = lastToken(args, args.heads[h].tokens, layout.position(row));
    }
  });

  const int64_t chunkKeys = std::min<int64_t>(kChunkKeys, (maxTokens + blockKeys - 1) / blockKeys * blockKeys);
  const size_t chunkFloats = size_t(chunkKeys) * size_t(paddedDim);
  float* keyChunk = scratchFloats(lease, ScratchSlot::Keys, size_t(args.kvHeads) * chunkFloats);
  float* valueChunk = scratchFloats(lease, ScratchSlot::Values, size_t(args.kvHeads) * chunkFloats);
  std::vector<float> scratch(size_t(threads) * size_t(registerRows) * size_t(blockKeys));

  for (int64_t chunkBegin = 0; chunkBegin < maxTokens; chunkBegin += chunkKeys) {
    pool.parallelFor(args.kvHeads, threads, [&](int64_t h, int32_t) {
      const KVHeadView& head = args.heads[h];
      const int64_t count = std::max<int64_t>(0, std::min(chunkKeys, head.tokens - chunkBegin));
      convertChunk(kernels, args, head, chunkBegin, count, paddedDim, blockKeys, keyChunk + size_t(h) * chunkFloats,
                   valueChunk + size_t(h) * chunkFloats);
    });
    pool.parallelFor(int64_t(args.kvHeads) * tilesPerHead, threads, [&](int64_t task, int32_t worker) {
      // Causal work grows with the row index: hand out the longest tiles first so no thread is
      // left alone with a long one at the end.
      const int32_t h = int32_t(task % args.kvHeads);
      const int64_t firstRow = (tilesPerHead - 1 - task / args.kvHeads) * tileRows;
      const size_t rowIndex = size_t(h) * size_t(paddedRows) + size_t(firstRow);
      const int32_t rows = int32_t(std::min<int64_t>(tileRows, layout.rowsPerHead - firstRow));
      int64_t lastInChunk[kPrefillTileRows];
      int64_t lastOfTile = -1;
      for (int32_t r = 0; r < rows; ++r) {
        lastInChunk[r] = last[rowIndex + size_t(r)] - chunkBegin;
        lastOfTile = std::max(lastOfTile, lastInChunk[r]);
      }
      const int64_t chunkTokens = std::min(chunkKeys, args.heads[h].tokens - chunkBegin);
      const int64_t keyEnd = std::min(chunkTokens, lastOfTile + 1);
      if (keyEnd <= 0) return;
      PrefillTile tile;
      tile.q = queries + rowIndex * size_t(paddedDim);
      tile.rows = rows;
      tile.lastToken = lastInChunk;
      tile.paddedDim = paddedDim;
      tile.keysTransposed = keyChunk + size_t(h) * chunkFloats;
      tile.values = valueChunk + size_t(h) * chunkFloats;
      tile.keyBegin = 0;
      tile.keyEnd = keyEnd;
      tile.state = {maxes.data() + rowIndex, sums.data() + rowIndex, accs + rowIndex * size_t(paddedDim)};
      tile.scratch = scratch.data() + size_t(worker) * size_t(registerRows) * size_t(blockKeys);
      kernels.prefillTile(tile);
    });
  }

  pool.parallelFor(args.kvHeads, threads, [&](int64_t h, int32_t) {
    for (int64_t row = 0; row < layout.rowsPerHead; ++row) {
      const size_t index = size_t(h) * size_t(paddedRows) + size_t(row);
      finishRow(args, layout, int32_t(h), row, maxes[index], sums[index], accs + index * size_t(paddedDim));
    }
  });
}

}  // namespace kvslim::cpu
