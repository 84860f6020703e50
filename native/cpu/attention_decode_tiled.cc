// Decode driver for more query rows per kv head than the decode driver takes (17 to
// kMaxTiledDecodeRows: a speculative step's draft tokens, a small chunk of a prompt). The decode
// kernel would read every key once per group of 8 rows, and the prefill drivers convert every
// head whole to f32 first, which at a long cache costs 8x the one-row step (32K tokens, 5 queries:
// 56 ms against 6.8). Here flash-decoding's key splits (planDecode, SplitPartials)
// are walked a slice at a time: the slice's keys and values become f32 in the worker's L2-sized
// buffers (convertChunk), and the prefill kernel's register tiles run every row of the head
// against them. Each key is read from memory once, for all rows. An older segment (a policy's
// kept tokens, a loading policy's gathered ones; AttentionArgs::olderHeads) is walked in front of
// each head's keys, in the same softmax. The kernel prefetches the next slice's rows while it
// computes (PrefillTile::aheadLines): converting a slice waited on memory for about half of the
// time of a 5-query step over 64K tokens.
#include <algorithm>
#include <vector>

#include "attention_plan.h"
#include "simd_level.h"
#include "thread_pool.h"

namespace kvslim::cpu {

namespace {
constexpr int64_t kSliceKeys = 256;  // f32 keys + values of a slice at headDim 128: 256 KiB, in L2

// One worker's buffers, allocated before the tasks run (a worker must not throw).
struct SliceBuffers {
  std::vector<float> keys, values;  // the slice as convertChunk lays it out
  std::vector<float> maxes, sums;   // [rows]
  std::vector<float> acc;           // [rows, paddedDim]
  std::vector<int64_t> last;        // [rows], in the slice's key numbering
  std::vector<float> scratch;       // the kernel's [prefillRows, blockKeys]
  std::vector<const void*> ahead;   // the cache lines of the next slice's key and value rows
};

// The cache lines of tokens [first, first + count) of the walk (older's tokens, then head's), key
// and value rows, into lines; returns how many.
int64_t sliceLines(const AttentionArgs& args, const KVHeadView& head, const KVHeadView* older, int64_t first, int64_t count,
                   const void** lines) {
  const size_t rowBytes = size_t(args.rowStride) * dtypeBytes(args.kvType);
  const size_t usedBytes = size_t(args.headDim) * dtypeBytes(args.kvType);
  int64_t n = 0;
  const auto add = [&](const void* row) {
    const uintptr_t begin = reinterpret_cast<uintptr_t>(row) & ~uintptr_t(63);
    const uintptr_t end = reinterpret_cast<uintptr_t>(row) + usedBytes;
    for (uintptr_t line = begin; line < end; line += 64) lines[n++] = reinterpret_cast<const void*>(line);
  };
  const int64_t olderTokens = older != nullptr ? older->tokens : 0;
  for (int64_t i = first; i < first + count; ++i) {
    const bool inOlder = i < olderTokens;
    const KVHeadView& view = inOlder ? *older : head;
    const int64_t pageTokens = inOlder ? args.olderPageTokens : args.pageTokens;
    const int64_t token = view.firstRow + (inOlder ? i : i - olderTokens);
    add(pageRow(view.keyPages, pageTokens, rowBytes, token));
    add(pageRow(view.valuePages, pageTokens, rowBytes, token));
  }
  return n;
}
}  // namespace

bool decodesTiled(const AttentionArgs& args) {
  const int64_t rows = int64_t(args.n) * (args.qHeads / args.kvHeads);
  return rows > kMaxDecodeDriverRows && rows <= kMaxTiledDecodeRows && args.mass == nullptr &&
         (args.olderHeads == nullptr || args.olderQ == args.q);
}

void attentionDecodeTiled(const AttentionArgs& args) {
  const KernelTable& kernels = activeKernels();
  const RowLayout layout(args);
  const int32_t dim = args.headDim;
  const int32_t paddedDim = paddedDimOf(kernels, dim);
  const int32_t registerRows = kernels.prefillRows;
  const int32_t blockKeys = kernels.prefillBlockKeys;
  const int32_t rows = int32_t(layout.rowsPerHead);
  const int32_t paddedRows = (rows + registerRows - 1) / registerRows * registerRows;
  // A head's walk: its older segment's tokens, then its own.
  const auto olderOf = [&](int32_t h) { return args.olderHeads != nullptr ? args.olderHeads[h].tokens : int64_t(0); };
  int64_t maxTokens = 0;
  for (int32_t h = 0; h < args.kvHeads; ++h) maxTokens = std::max(maxTokens, olderOf(h) + args.heads[h].tokens);
  // Splits of whole slices, so only a split's last slice is short.
  const DecodePlan plan = planDecode(maxTokens, args.kvHeads, 1, args.threads, kSliceKeys);

  // Each head's rows scaled (scale * log2 e, as every driver), padded to whole register tiles.
  const float factor = args.scale * kLog2e;
  std::vector<float> queries(size_t(args.kvHeads) * size_t(paddedRows) * size_t(paddedDim), 0.0f);
  for (int32_t h = 0; h < args.kvHeads; ++h) {
    for (int32_t r = 0; r < rows; ++r) {
      const float* src = args.q + layout.queryIndex(h, r) * dim;
      float* dst = queries.data() + (size_t(h) * size_t(paddedRows) + size_t(r)) * size_t(paddedDim);
      for (int32_t d = 0; d < dim; ++d) dst[d] = src[d] * factor;
    }
  }
  std::vector<SliceBuffers> buffers(size_t(plan.threads));
  for (SliceBuffers& b : buffers) {
    b.keys.resize(size_t(kSliceKeys) * size_t(paddedDim));
    b.values.resize(size_t(kSliceKeys) * size_t(paddedDim));
    b.maxes.resize(size_t(rows));
    b.sums.resize(size_t(rows));
    b.acc.resize(size_t(rows) * size_t(paddedDim));
    b.last.resize(size_t(rows));
    b.scratch.resize(size_t(registerRows) * size_t(blockKeys));
    // Two rows (key, value) a token, each at most ceil(bytes / 64) + 1 lines.
    b.ahead.resize(size_t(kSliceKeys) * 2 * ((size_t(dim) * dtypeBytes(args.kvType) + 63) / 64 + 1));
  }
  SplitPartials partials(layout, plan.splits, dim, rows);

  const int64_t tasks = int64_t(args.kvHeads) * plan.splits;
  globalPool().parallelFor(tasks, plan.threads, [&](int64_t task, int32_t worker) {
    SliceBuffers& b = buffers[size_t(worker)];
    const int32_t h = int32_t(task / plan.splits);
    const int64_t split = task % plan.splits;
    const KVHeadView& head = args.heads[h];
    const int64_t older = olderOf(h);
    const int64_t walk = older + head.tokens;
    const int64_t begin = std::min(split * plan.splitTokens, walk);
    const int64_t end = std::min(begin + plan.splitTokens, walk);
    std::fill(b.maxes.begin(), b.maxes.end(), kNoScoreYet);
    std::fill(b.sums.begin(), b.sums.end(), 0.0f);
    std::fill(b.acc.begin(), b.acc.end(), 0.0f);
    int64_t lastOfAll = -1;
    for (int32_t r = 0; r < rows; ++r) lastOfAll = std::max(lastOfAll, older + layout.lastToken(args.causal, head.tokens, r));
    const KVHeadView* olderView = args.olderHeads != nullptr ? &args.olderHeads[h] : nullptr;
    const int64_t walkEnd = std::min(end, lastOfAll + 1);
    for (int64_t slice = begin; slice < walkEnd; slice += kSliceKeys) {
      const int64_t count = std::min(kSliceKeys, end - slice);
      convertChunk(kernels, args, head, slice, count, paddedDim, blockKeys, b.keys.data(), b.values.data(), olderView);
      const int64_t next = slice + kSliceKeys;
      const int64_t aheadCount =
          next < walkEnd ? sliceLines(args, head, olderView, next, std::min(kSliceKeys, walkEnd - next), b.ahead.data()) : 0;
      for (int32_t r = 0; r < rows; ++r) b.last[size_t(r)] = older + layout.lastToken(args.causal, head.tokens, r) - slice;
      // Tiles of up to kPrefillTileRows rows share the converted slice from L2.
      for (int32_t first = 0; first < rows; first += kPrefillTileRows) {
        const int32_t tileRows = std::min(kPrefillTileRows, rows - first);
        PrefillTile tile;
        tile.q = queries.data() + (size_t(h) * size_t(paddedRows) + size_t(first)) * size_t(paddedDim);
        tile.rows = tileRows;
        tile.lastToken = b.last.data() + first;
        tile.paddedDim = paddedDim;
        tile.keysTransposed = b.keys.data();
        tile.values = b.values.data();
        tile.keyBegin = 0;
        tile.keyEnd = std::min<int64_t>(count, std::max<int64_t>(0, *std::max_element(tile.lastToken, tile.lastToken + tileRows) + 1));
        tile.state = {b.maxes.data() + first, b.sums.data() + first, b.acc.data() + size_t(first) * size_t(paddedDim)};
        tile.scratch = b.scratch.data();
        if (first == 0) {  // the first tile prefetches for all
          tile.aheadLines = b.ahead.data();
          tile.aheadCount = aheadCount;
        }
        if (tile.keyEnd > 0) kernels.prefillTile(tile);
      }
    }
    partials.finish(h, 0, rows, split, {b.maxes.data(), b.sums.data(), b.acc.data()}, args.out, args.lse, paddedDim);
  });
}

}  // namespace kvslim::cpu
