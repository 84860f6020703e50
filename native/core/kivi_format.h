// KIVI packed layouts (methods/kivi.md) and the contract between the KIVI store (core) and the
// backends' attention over it. Keys are quantized per channel in groups of `group` tokens; values
// per token in groups of `group` channels; scale and min are f16; codes pack least significant
// first, 32 / bits codes per 32-bit word.
//
// Dense-and-sparse (KVQuant's per-vector outliers, policy.store.outliers = fraction f, default 0 =
// off). Per key group record (group tokens x headDim channels, flat index i = t * headDim + c), the
// keyOutliers = round(f * group * headDim) entries of largest |x| (ties: the lower flat index) are
// outliers; per value token record, the valueOutliers = round(f * headDim) channels of largest |x|
// (ties: the lower channel). min/max (hence scale and min) of every quantization group are computed
// without the record's outliers; a group whose values are all outliers keeps the normal rule over
// all of them. Every entry, outlier or not, still gets its (clamped) code; each outlier also stores
// its index and delta = f16(x - x^) with x^ = code * s + m in fp32, so x^ + delta is its value up to
// f16 rounding of the delta. Outliers are stored in increasing index order after the scales and
// mins (4 bytes each); the count is fixed per record, so records keep a fixed size. Attention adds
// the corrections: score_t += q_c * delta for each key outlier (t, c), out_c += p_t * delta for each
// value outlier c of token t. With f = 0 the records and everything else are exactly as before.
//
// Pre-RoPE keys (KVQuant, policy.store.preRope): the store holds keys before the model's rotary
// embedding (token t of a layer at absolute position t), quantized per channel like any keys, so
// outlier channels stay put; records are unchanged. Attention rotates each key by its position
// after dequantization (x^ + delta for outliers, or the f16 residual row) and before the dot with
// the (post-RoPE) query. The flag and the rope travel in KiviAttentionArgs.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

#include "rope.h"
#include "status.h"

namespace kvslim {

struct KiviFormat {
  int32_t bits = 2;     // 2, 4 or 8
  int32_t group = 32;   // tokens per key group, channels per value group; a multiple of 16
  int32_t headDim = 0;  // a multiple of group
  int32_t keyOutliers = 0;    // outliers per key group record (dense-and-sparse; 0 = off)
  int32_t valueOutliers = 0;  // outliers per value token record

  int32_t codesPerWord() const { return 32 / bits; }
  int32_t channelGroups() const { return headDim / group; }

  // One key group record: G tokens of one kv head.
  //   uint32 codes[headDim][group * bits / 32]  (channel c, token t: word t / codesPerWord,
  //                                               bits (t % codesPerWord) * bits)
  //   f16 scale[headDim] | f16 min[headDim]
  //   uint16 outlierIndex[keyOutliers] (t * headDim + c, increasing) | f16 outlierDelta[keyOutliers]
  size_t keyGroupWordsPerChannel() const { return size_t(group) * size_t(bits) / 32; }
  size_t keyGroupCodeBytes() const { return size_t(headDim) * keyGroupWordsPerChannel() * 4; }
  size_t keyOutlierOffset() const { return keyGroupCodeBytes() + 4 * size_t(headDim); }
  size_t keyGroupBytes() const { return keyOutlierOffset() + 4 * size_t(keyOutliers); }

  // One value token record:
  //   uint32 codes[headDim * bits / 32]  (channel c: word c / codesPerWord, bits (c % codesPerWord) * bits)
  //   f16 scale[headDim / group] | f16 min[headDim / group]
  //   uint16 outlierChannel[valueOutliers] (increasing) | f16 outlierDelta[valueOutliers]
  size_t valueCodeWords() const { return size_t(headDim) * size_t(bits) / 32; }
  size_t valueCodeBytes() const { return valueCodeWords() * 4; }
  size_t valueOutlierOffset() const { return valueCodeBytes() + 4 * size_t(channelGroups()); }
  size_t valueTokenBytes() const { return valueOutlierOffset() + 4 * size_t(valueOutliers); }
};

// What one kv head holds, in backend memory. Token order: keys [0, quantizedKeys) are in key
// group records, the rest in keyResidual; values [0, quantizedValues) are value records, the
// rest in the valueResidual ring. quantizedKeys and quantizedValues differ (methods/kivi.md).
struct KiviHeadView {
  const void* const* keyPages = nullptr;    // each page: keyGroupsPerPage key group records
  int64_t quantizedKeys = 0;                // a multiple of group
  const uint16_t* keyResidual = nullptr;    // f16 [residual, headDim]: token quantizedKeys + i at row i
  const void* const* valuePages = nullptr;  // each page: valueTokensPerPage value token records
  int64_t quantizedValues = 0;
  const uint16_t* valueResidual = nullptr;  // f16 ring [residual, headDim]: token quantizedValues + i
  int64_t valueRingStart = 0;               //   at row (valueRingStart + i) % residual
  int64_t tokens = 0;
  // Tokens [holeBegin, holeEnd) were evicted by a window policy (streaming, duo): attention skips
  // them. Kernels jump over the hole's 32-aligned inside (kiviSkip) and mask the rest of it token
  // by token, so they never read a page wholly inside the hole: such pages may be released, and
  // their entries leave the page tables (so a long stream's tables stay as short as its pages):
  // pages [releasedFirst, releasedFirst + releasedKeyPages) of the keys (likewise the values) are
  // gone, and page p after them sits at entry p - releasedKeyPages.
  int64_t holeBegin = 0, holeEnd = 0;
  int64_t releasedFirst = 0, releasedKeyPages = 0, releasedValuePages = 0;
  // Tokens H2O evicted after the layer was quantized (host memory, one flag per token of
  // [0, evictedTokens); null when none): attention masks them. Their records stay until the
  // cache compacts the layer (KVCache::compactKivi), so kernels may read them.
  const uint8_t* evicted = nullptr;
  int64_t evictedTokens = 0;
  bool isEvicted(int64_t t) const { return t < evictedTokens && evicted[t] != 0; }
  // Page p of the keys / values (p must not be a released page).
  const void* keyPage(int64_t p) const { return keyPages[p >= releasedFirst ? p - releasedKeyPages : p]; }
  const void* valuePage(int64_t p) const { return valuePages[p >= releasedFirst ? p - releasedValuePages : p]; }
  bool valuePageHeld(int64_t p) const { return p < releasedFirst || p >= releasedFirst + releasedValuePages; }
  bool keyPageHeld(int64_t p) const { return p < releasedFirst || p >= releasedFirst + releasedKeyPages; }
};

// The part of a head's hole that attention walks past: [begin, begin + length), both multiples of
// 32 tokens, so CPU blocks (32 tokens) and CUDA tiles (16) never straddle it. Kernels walk
// tokens - length tokens: walk index w is token w below begin and token w + length above it.
struct KiviSkip {
  int64_t begin = 0, length = 0;
  int64_t token(int64_t walk) const { return walk < begin ? walk : walk + length; }
};
inline KiviSkip kiviSkip(const KiviHeadView& head) {
  const int64_t begin = (head.holeBegin + 31) / 32 * 32, end = head.holeEnd / 32 * 32;
  return end > begin ? KiviSkip{begin, end - begin} : KiviSkip{};
}

// Attention of n query rows per query head over KIVI heads; same causal rule and query layout
// as AttentionArgs (attention_args.h).
struct KiviAttentionArgs {
  const float* q = nullptr;  // [n, qHeads, headDim], host memory, unscaled
  float* out = nullptr;      // [n, qHeads, headDim], host memory
  int32_t n = 0;
  int32_t qHeads = 0;
  int32_t kvHeads = 0;
  KiviFormat format;
  int64_t residual = 0;      // rows of keyResidual and of the value ring
  int64_t keyGroupsPerPage = 0;
  int64_t valueTokensPerPage = 0;
  const KiviHeadView* heads = nullptr;  // [kvHeads]
  bool causal = true;
  float scale = 1.0f;
  int32_t threads = 0;
  bool preRope = false;  // keys are pre-RoPE: rotate key t by position t (rope) before the dot
  RopeConfig rope;       // theta > 0 when preRope
  // Optional (H2O; backends with fusesKiviMass() only): as AttentionArgs::mass, the probability
  // each token of kv head h gets, summed over the head's n x group rows, at mass[h * massStride + t].
  double* mass = nullptr;
  int64_t massStride = 0;
};

// The H2O fields of KiviAttentionArgs (mass, per-token eviction), checked by every backend
// (`fuses`: whether it computes them): the mass needs causal attention and heads without a hole.
inline Status checkKiviMass(const KiviAttentionArgs& args, bool fuses) {
  bool evicting = false;
  for (int32_t h = 0; h < args.kvHeads; ++h) evicting = evicting || args.heads[h].evictedTokens > 0;
  if (args.mass == nullptr && !evicting) return Status::ok();
  if (!fuses) return Status(ErrorCode::Internal, "this backend does not evict single KIVI tokens or sum their attention mass");
  for (int32_t h = 0; h < args.kvHeads; ++h) {
    const KiviHeadView& head = args.heads[h];
    if (head.evictedTokens < 0 || head.evictedTokens > head.tokens || (head.evictedTokens > 0 && head.evicted == nullptr)) {
      return Status(ErrorCode::Internal, "the eviction flags of KIVI kv head " + std::to_string(h) + " do not fit its tokens");
    }
    if (args.mass != nullptr && (head.holeEnd > head.holeBegin || args.massStride < head.tokens || !args.causal)) {
      return Status(ErrorCode::Internal, "the KIVI attention mass needs causal attention, heads without a hole and a stride of "
                                         "at least the tokens of kv head " + std::to_string(h));
    }
  }
  return Status::ok();
}

}  // namespace kvslim
