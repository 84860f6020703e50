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
constexpr int64_t kChunkTokens = 2048;  // a multiple of every kernel table's prefillBlockKeys
// Above this many rows (a few decode row groups) the scores come from the register-tiled score
// loop over transposed key blocks: row groups of kMaxDecodeRows each streamed every key, strided
// by the other heads' rows (64 probes x 4 rows over 32K keys: 32 passes per kv head, 0.25 s).
constexpr int32_t kTiledRows = 2 * kMaxDecodeRows;
// Rows per score tile: a tile's scores over a chunk (kTileRows x kChunkTokens floats, 1 MiB) stay in L2.
constexpr int64_t kTileRows = 128;

// Each chunk of keys converted once to the prefill's transposed f32 blocks, then every tile of
// rows scored against it (ScoreTile), written to args.out through a per-worker buffer (a tile
// writes whole blocks of keys, past a row's end).
void attentionScoresTiled(const KernelTable& kernels, const ScoresArgs& args, int32_t allowed) {
  ThreadPool& pool = globalPool();
  const int32_t dim = args.headDim;
  const int32_t paddedDim = paddedDimOf(kernels, dim);
  const int32_t blockKeys = kernels.prefillBlockKeys;
  const int64_t tokens = args.head.tokens;
  const int64_t chunks = (tokens + kChunkTokens - 1) / kChunkTokens;
  const int32_t threads = int32_t(std::max<int64_t>(1, std::min<int64_t>(allowed, chunks)));
  // Scaled rows, zero-padded to whole register tiles and to paddedDim.
  const int64_t paddedRows = (int64_t(args.rows) + kernels.prefillRows - 1) / kernels.prefillRows * kernels.prefillRows;
  std::vector<float> q(size_t(paddedRows) * size_t(paddedDim), 0.0f);
  for (int32_t r = 0; r < args.rows; ++r)
    for (int32_t d = 0; d < dim; ++d) q[size_t(r) * size_t(paddedDim) + size_t(d)] = args.q[size_t(r) * size_t(dim) + size_t(d)] * args.scale;
  // Per worker, allocated here: a worker must not throw.
  const size_t keyFloats = size_t(kChunkTokens) * size_t(paddedDim), tileFloats = size_t(kTileRows) * size_t(kChunkTokens);
  std::vector<float> buffers(size_t(threads) * (keyFloats + tileFloats));
  const KeyBlocks layout{args.pageTokens, size_t(args.rowStride) * dtypeBytes(args.kvType), args.kvType, dim, paddedDim, blockKeys};
  pool.parallelFor(chunks, threads, [&](int64_t chunk, int32_t worker) {
    float* keys = buffers.data() + size_t(worker) * (keyFloats + tileFloats);
    float* tile = keys + keyFloats;
    const int64_t begin = chunk * kChunkTokens, count = std::min(kChunkTokens, tokens - begin);
    const int64_t padded = (count + blockKeys - 1) / blockKeys * blockKeys;
    // transposeKeys writes channels [0, dim) of keys [0, count): zero the buffer only when it has
    // padding (channels past dim, or lanes past a partial last block).
    if (paddedDim != dim || padded != count) std::fill(keys, keys + size_t(padded) * size_t(paddedDim), 0.0f);
    transposeKeys(kernels, layout, args.head, begin, count, 0, keys);
    for (int64_t first = 0; first < args.rows; first += kTileRows) {
      const int32_t rows = int32_t(std::min<int64_t>(kTileRows, args.rows - first));
      kernels.scoreTile(ScoreTile{q.data() + size_t(first) * size_t(paddedDim), rows, paddedDim, keys, count, tile, kChunkTokens});
      for (int32_t r = 0; r < rows; ++r) {
        std::copy(tile + size_t(r) * size_t(kChunkTokens), tile + size_t(r) * size_t(kChunkTokens) + size_t(count),
                  args.out + size_t(first + r) * size_t(tokens) + size_t(begin));
      }
    }
  });
}
}  // namespace

void attentionScores(const ScoresArgs& args) {
  const KernelTable& kernels = activeKernels();
  ThreadPool& pool = globalPool();
  const int32_t allowed = args.threads > 0 ? std::min(args.threads, pool.size()) : pool.size();
  if (args.rows > kTiledRows) {
    attentionScoresTiled(kernels, args, allowed);
    return;
  }
  const int32_t dim = args.headDim;
  std::vector<float> scaled(size_t(args.rows) * size_t(dim));
  for (size_t i = 0; i < scaled.size(); ++i) scaled[i] = args.q[i] * args.scale;
  const int64_t tokens = args.head.tokens;
  const int64_t rowGroups = (args.rows + kMaxDecodeRows - 1) / kMaxDecodeRows;
  const int64_t chunks = (tokens + kChunkTokens - 1) / kChunkTokens;
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
