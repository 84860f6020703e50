// Shared set-up of the CPU attention drivers: which query rows read which kv head, and where
// each row's causal window ends.
#pragma once
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

#include "../core/attention_args.h"
#include "../core/block_scores_args.h"
#include "../core/kivi_format.h"
#include "kernel_table.h"

namespace kvslim::cpu {

constexpr float kLog2e = 1.4426950408889634f;

// Rows of kv head h are ordered (position i, group member g): row = i * group + g reads query
// head h * group + g at position i.
struct RowLayout {
  int32_t n;
  int32_t qHeads;
  int32_t kvHeads;
  int32_t group;        // qHeads / kvHeads
  int64_t rowsPerHead;  // n * group

  RowLayout(int32_t n, int32_t qHeads, int32_t kvHeads)
      : n(n), qHeads(qHeads), kvHeads(kvHeads), group(qHeads / kvHeads), rowsPerHead(int64_t(n) * (qHeads / kvHeads)) {}
  explicit RowLayout(const AttentionArgs& args) : RowLayout(args.n, args.qHeads, args.kvHeads) {}
  int32_t position(int64_t row) const { return int32_t(row / group); }
  int32_t queryHead(int32_t kvHead, int64_t row) const { return kvHead * group + int32_t(row % group); }
  // Index of the row's query vector in q / out ([n, qHeads, headDim]), in units of headDim.
  int64_t queryIndex(int32_t kvHead, int64_t row) const { return int64_t(position(row)) * qHeads + queryHead(kvHead, row); }
  int64_t queryIndex(const AttentionArgs&, int32_t kvHead, int64_t row) const { return queryIndex(kvHead, row); }
  // Last key a row may attend in a head holding `tokens` keys.
  int64_t lastToken(bool causal, int64_t tokens, int64_t row) const {
    return causal ? tokens - n + position(row) : tokens - 1;
  }
};

// Last key a query at `position` may attend in a head holding `tokens` keys.
inline int64_t lastToken(const AttentionArgs& args, int64_t tokens, int32_t position) {
  return args.causal ? tokens - args.n + position : tokens - 1;
}

// Floats a driver writes in full before reading any, so not zeroed: a decode step's buffers are
// small, but zeroing them (std::vector) took a tenth of a one-token call.
using Floats = std::unique_ptr<float[]>;
inline Floats uninitialisedFloats(size_t count) { return Floats(new float[count]); }

// Flash-decoding partial states of every (kv head, row, split), in the base-2 log domain, and
// their merge. The task that finishes the last split of a row group merges that group's rows into
// the output (with one split a task writes its rows' outputs directly): no serial pass over every
// row follows the parallel one, and the partial states are read on the core that wrote the last.
class SplitPartials {
 public:
  // Tasks cover rows [g * groupRows, (g + 1) * groupRows) of a kv head, every split of each.
  SplitPartials(const RowLayout& layout, int64_t splits, int32_t dim, int64_t groupRows);
  // Split `split` of rows [firstRow, firstRow + rows) of kv head h is done: its softmax state
  // (acc rows accStride apart, dim by default). Once every split of the group is in, the rows'
  // outputs go to out ([n, qHeads, dim]) and, when lse is set ([n, qHeads]), log2 of each row's
  // softmax denominator (-inf when the row saw no key). Safe to call from concurrent tasks.
  void finish(int32_t h, int64_t firstRow, int32_t rows, int64_t split, const SoftmaxState& state, float* out, float* lse,
              int32_t accStride = 0);

 private:
  size_t index(int32_t h, int64_t row, int64_t split) const {
    return (size_t(h) * size_t(layout_.rowsPerHead) + size_t(row)) * size_t(splits_) + size_t(split);
  }
  void mergeRow(int32_t h, int64_t row, float* out, float* lse) const;

  RowLayout layout_;
  int64_t splits_;
  int32_t dim_;
  int64_t groupRows_;
  int64_t groupsPerHead_;
  Floats maxes_, sums_, accs_;  // [kvHeads, rowsPerHead, splits] x (1, 1, dim); only with several splits
  std::unique_ptr<std::atomic<int64_t>[]> arrived_;  // splits stored so far, per (kv head, row group)
};

// Rows [firstRow, firstRow + rows) of kv head h of q, scaled by scale * log2(e) (the kernels use
// exp2) into dst ([rows, dim]).
void scaleRows(const RowLayout& layout, const float* q, int32_t dim, float scale, int32_t h, int64_t firstRow, int32_t rows,
               float* dst);
// headDim rounded up to whole vectors: the row length of the f32 query, key and value copies.
inline int32_t paddedDimOf(const KernelTable& kernels, int32_t dim) {
  return (dim + kernels.vectorWidth - 1) / kernels.vectorWidth * kernels.vectorWidth;
}

// Row `token` (firstRow included) of a view's pages of pageTokens rows, rowBytes apart.
inline const uint8_t* pageRow(const void* const* pages, int64_t pageTokens, size_t rowBytes, int64_t token) {
  return static_cast<const uint8_t*>(pages[token / pageTokens]) + size_t(token % pageTokens) * rowBytes;
}

// Where a paged head's key rows are, and the transposed f32 block layout the prefill and score
// tiles read (blocks of [paddedDim, blockKeys]).
struct KeyBlocks {
  int64_t pageTokens;
  size_t rowBytes;  // bytes from one token's row to the next in a page
  DType type;
  int32_t dim, paddedDim, blockKeys;
};
// Keys [first, first + count) of `head` into keysTransposed as key indices at, at + 1, ...
// (the padding is the caller's: zero it once).
void transposeKeys(const KernelTable& kernels, const KeyBlocks& layout, const KVHeadView& head, int64_t first, int64_t count,
                   int64_t at, float* keysTransposed);

// The prefill's f32 copy of keys [first, first + count) of `head`: keys as transposed blocks
// (transposeKeys at 0), values as rows of paddedDim, padding zeroed. With `older` (an older
// segment in pages of args.olderPageTokens rows), the indices run over older's tokens, then head's.
void convertChunk(const KernelTable& kernels, const AttentionArgs& args, const KVHeadView& head, int64_t first,
                  int64_t count, int32_t paddedDim, int32_t blockKeys, float* keysTransposed, float* values,
                  const KVHeadView* older = nullptr);
// Writes a finished row's output (acc / sum) and, when asked, its lse (log2 units).
void finishRowTo(float* out, float* lse, int32_t dim, float max, float sum, const float* acc);
// The same at the row's place in args.out and args.lse.
void finishRow(const AttentionArgs& args, const RowLayout& layout, int32_t kvHead, int64_t row, float max, float sum,
               const float* acc);

// Flash-decoding task shape: threads to wake and key splits per (kv head, row group).
struct DecodePlan {
  int32_t threads;
  int64_t splits;
  int64_t splitTokens;
};
DecodePlan planDecode(int64_t maxTokens, int32_t kvHeads, int64_t rowGroups, int32_t threadsAllowed, int64_t granule);

// Up to kMaxDecodeDriverRows rows per kv head: groups of kMaxDecodeRows each read the keys (at 16
// rows, two reads still beat the tiled driver below: 1.1 against 1.7 ms over 2K tokens).
constexpr int64_t kMaxDecodeDriverRows = 16;
void attentionDecode(const AttentionArgs& args);
// A few more rows (attention_decode_tiled.cc): keys read once for all of a head's rows, a slice
// at a time as f32, through the prefill kernel. For rows per kv head in (kMaxDecodeDriverRows,
// kMaxTiledDecodeRows], without the mass; an older segment only with the same queries (decodesTiled).
constexpr int64_t kMaxTiledDecodeRows = 256;
bool decodesTiled(const AttentionArgs& args);
void attentionDecodeTiled(const AttentionArgs& args);
void attentionKivi(const KiviAttentionArgs& args);   // decode-style over KIVI codes, any n
void attentionScores(const ScoresArgs& args);       // q.k * scale of rows of one head   // few rows per kv head: reads pages directly
Status topKeys(const TopKeysArgs& args);            // every head's best score per token over its rows, top k
// A mass (AttentionArgs::mass, KiviAttentionArgs::mass) from the scores a driver captured: row
// r of kv head h at captured[(h * rowsPerHead + r) * width], older tokens (older[h], or none)
// first, then the head's tokens[h]. Each row's softmax over what it sees, summed per token over
// the rows in row order, so the result does not depend on how the keys were split.
void massFromScores(const RowLayout& layout, bool causal, const int64_t* older, const int64_t* tokens, double* mass,
                    int64_t massStride, float* captured, int64_t width, int32_t threads);
void attentionMass(const AttentionMassArgs& args);  // per-token softmax mass of a kv head's query rows (selection)
void prefillMass(const AttentionArgs& args);        // args.mass by attentionMass, head by head (a second QK^T pass)
// Quest (page_bounds.cc), for checked args: boxes extended from key pages; each head's top pages
// by the boxBound kernel's bounds.
Status pageBoxes(const PageBoxesArgs& args);
Status topPages(const TopPagesArgs& args);
void attentionPrefill(const AttentionArgs& args);  // many rows: converts key chunks, tiles rows
// Many rows, one kv head at a time over all its keys, plus args.mass from the same QK^T pass when
// set; needs prefillHeadsFits (one head's keys and values as f32 within budget).
void attentionPrefillHeads(const AttentionArgs& args);
bool prefillHeadsFits(const AttentionArgs& args);
// ActQKV (block_scores.cc), for checked args: block scores and entropies; each head's top blocks.
Status blockScores(const BlockScoresArgs& args);
Status topBlocks(const TopBlocksArgs& args);

}  // namespace kvslim::cpu
