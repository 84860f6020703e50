// One dispatch table of CPU kernels per instruction set (ggml style): chosen once at start-up
// from CPUID, overridable with KVSLIM_SIMD. The drivers (attention_decode.cc, ...) split work
// across threads and call only through this table.
#pragma once
#include <cstddef>
#include <cstdint>

#include "../core/dtype.h"
#include "../core/kivi_format.h"

namespace kvslim::cpu {

// Online-softmax state of `rows` query rows over a range of keys, in base-2 log domain:
// scores are q.k with q pre-multiplied by scale * log2(e), so exp becomes exp2.
struct SoftmaxState {
  float* max;    // [rows]
  float* sum;    // [rows]
  float* acc;    // [rows, headDim]: sum of 2^(s - max) * v
};

// Up to kMaxDecodeRows query rows (of one kv head) over keys [tokenBegin, tokenEnd) read
// straight from pages in their stored dtype.
constexpr int kMaxDecodeRows = 8;
struct DecodeRange {
  const float* q;            // [rows, headDim], scaled
  int32_t rows;
  const int64_t* lastToken;  // [rows]: row r attends keys <= lastToken[r]
  int32_t headDim;
  DType kvType;
  const void* const* keyPages;
  const void* const* valuePages;
  int64_t pageTokens;
  int64_t rowStride;         // elements between consecutive tokens of a page
  int64_t tokenBegin, tokenEnd;
  SoftmaxState state;        // initialised by the kernel
  // Optional (the attention mass): row r's scores (log2 units, masked ones -inf) of tokens
  // [tokenBegin, min(tokenEnd, last row's end)) at scoresOut[r * scoresStride + token - tokenBegin].
  float* scoresOut = nullptr;
  int64_t scoresStride = 0;
};

// The start of every running max (kernels and the drivers that initialise prefill state): finite,
// so 2^(kNoScoreYet - m) is 0, never NaN.
constexpr float kNoScoreYet = -1e30f;

// Column sums of one finished prefill tile's probabilities (attention mass), in PrefillTile's
// layout: for every row r and key j <= lastToken[r] (none for a row without keys: lastToken -1),
// out[j] += sum over r of p(r, j) * exp2(blockMax(j / blockKeys, r) - finalMax[r]) / finalSum[r],
// which turns a block's unnormalised probabilities into final ones. The tile's sum is f32 (as the
// probabilities are), the columns double.
struct MassTile {
  const float* probs;
  int64_t blockStride;       // floats from one block's slab to the next
  const float* blockMax;
  int64_t rowsPadded;        // floats from one block's maxes to the next
  const float* finalMax;     // [rows]
  const float* finalSum;     // [rows]
  const int64_t* lastToken;  // [rows]
  int32_t rows;
  double* out;               // [max lastToken + 1]
};

// Up to kMaxPrefillRows rows against f32 key blocks prepared by the driver: keys transposed per
// block ([paddedDim, blockKeys]) and values row-major ([keys, paddedDim]), both zero-padded.
// kPrefillTileRows is the tile the drivers take unless they have a reason to take more.
constexpr int32_t kMaxPrefillRows = 128;
constexpr int32_t kPrefillTileRows = 64;
struct PrefillTile {
  const float* q;            // [rows rounded up to prefillRows, paddedDim], scaled, zero-padded
  int32_t rows;
  const int64_t* lastToken;  // [rows], in the chunk's key numbering
  int32_t paddedDim;
  const float* keysTransposed;  // block b at keysTransposed + b * paddedDim * blockKeys
  const float* values;          // [chunkKeys, paddedDim]
  int64_t keyBegin, keyEnd;     // a whole number of blocks, keyBegin % blockKeys == 0
  SoftmaxState state;           // continued (the driver initialises it once)
  float* scratch;               // [prefillRows, blockKeys]
  // Optional (attention mass): every computed block's unnormalised probabilities exp2(s - max),
  // block b's slab at probs + b * probsBlockStride with row r at r * blockKeys (probsBlockStride
  // >= rows rounded up to prefillRows, x blockKeys), and each row's running max after block b at
  // blockMax[b * blockMaxStride + r]. A block after every row of a register tile ends is skipped.
  float* probs = nullptr;
  int64_t probsBlockStride = 0;
  float* blockMax = nullptr;
  int64_t blockMaxStride = 0;
  // Optional with probs: the previous tile's mass over the same slab (MassTile).
  // Each of its blocks is summed just before this tile overwrites that block, so the slab is read
  // from memory once per tile and the capture's stores then hit the cache; its blocks past this
  // tile's keys are summed after them.
  const MassTile* pending = nullptr;
  // Optional: cache lines the caller reads next (the tiled decode driver's next slice of pages),
  // prefetched into L2 a share per register tile, so their reads overlap this tile's math.
  const void* const* aheadLines = nullptr;
  int64_t aheadCount = 0;
};

// Scores of `rows` query rows against keys [0, keyEnd) converted to transposed blocks as for
// prefill: out[r * outStride + j]. The register tile of the prefill kernel without its softmax:
// a GEMM-shaped loop (no horizontal sums) for long score rows (attention mass at prefill).
struct ScoreTile {
  const float* q;               // [rows rounded up to prefillRows, paddedDim], scaled, zero-padded
  int32_t rows;
  int32_t paddedDim;
  const float* keysTransposed;  // block b at keysTransposed + b * paddedDim * blockKeys
  int64_t keyEnd;
  float* out;                   // rows of outStride floats, outStride >= keyEnd rounded up to blockKeys
  int64_t outStride;
};

// Up to kMaxDecodeRows rows of one kv head over KIVI tokens [tokenBegin, tokenEnd), read straight
// from codes (methods/kivi.md): q is scaled per key group by the channel scales, values are
// accumulated from codes with the token's scale, and the token mins are summed per channel group.
struct KiviRange {
  const float* q;            // [rows, headDim], scaled by scale * log2(e)
  int32_t rows;
  const int64_t* lastToken;  // [rows]
  KiviFormat format;
  const KiviHeadView* head;
  int64_t keyGroupsPerPage, valueTokensPerPage, ringRows;
  int64_t tokenBegin, tokenEnd;  // tokenBegin % 32 == 0; the head's kiviSkip inside is jumped over
  SoftmaxState state;            // acc: [rows, headDim]; initialised by the kernel
  float* scratch;                // kiviScratchFloats(headDim) floats
  // Pre-RoPE keys (kivi_format.h): nullptr when keys are post-RoPE (the fast path). Otherwise
  // theta^(-2i/headDim) per pair i [headDim / 2]; key t turns pair i by t * theta^(-2i/headDim).
  const double* ropeFrequencies = nullptr;
  const float* ropeWithin = nullptr;   // [2, headDim / 2, 32]: cos, then sin, of j * frequency_i, j < 32
  RopeStyle ropeStyle = RopeStyle::Adjacent;
  float* ropeScratch = nullptr;        // kiviRopeScratchFloats(headDim) floats
  double* ropeState = nullptr;         // [4, headDim / 2] doubles: angle state of the kernel
  // Optional (KiviAttentionArgs::mass): each row's masked log2 scores of the walked tokens, row r
  // token t at scoresOut[r * scoresStride + t - tokenBegin] (no hole: every token is walked).
  float* scoresOut = nullptr;
  int64_t scoresStride = 0;
};
// Pre-RoPE scratch: keys of a sub-block [headDim, 32].
inline size_t kiviRopeScratchFloats(int32_t headDim) { return size_t(headDim) * 32; }
// q~ of a key group per row, and a block's value scales and mins.
inline size_t kiviScratchFloats(int32_t headDim) { return size_t(kMaxDecodeRows) * size_t(headDim) + 64 * size_t(headDim) / 16; }

// Scores q.k of up to kMaxDecodeRows rows against key rows [rowBegin, rowEnd) of a page list.
struct ScoreRange {
  const float* q;        // [rows, headDim], scaled
  int32_t rows;
  int32_t headDim;
  DType kvType;
  const void* const* keyPages;
  int64_t pageTokens;
  int64_t rowStride;
  int64_t rowBegin, rowEnd;  // page rows (a head's token t is row firstRow + t)
  float* out;                // out[r * outStride + (row - rowBegin)]
  int64_t outStride;
  // Prefetch key rows ahead: set when the keys the caller scans will not sit in the caches (a
  // scan bigger than kPrefetchScanBytes); cached keys gain nothing and pay the instructions.
  bool prefetch = false;
};
constexpr size_t kPrefetchScanBytes = size_t(1) << 20;

struct KernelTable {
  const char* name;
  int32_t vectorWidth;        // floats per register
  int32_t prefillRows;        // rows per register tile of the prefill kernel
  int32_t prefillBlockKeys;   // keys per prefill block (2 registers)
  void (*decodeRange)(const DecodeRange& range);
  void (*prefillTile)(const PrefillTile& tile);
  void (*massTile)(const MassTile& tile);
  // dst[i] = src[i] as f32 for i < count (prefill converts stored key/value rows once per chunk).
  void (*toFloat32)(const void* src, DType type, float* dst, int32_t count);
  // The 2 * vectorWidth keys at rows (stored dtype) as one transposed prefill key block:
  // channel d of key j at out[d * 2 * vectorWidth + j], d < dim.
  void (*transposeKeyBlock)(const void* const* rows, DType type, int32_t dim, float* out);
  // Sum of `count` floats (bandwidth probe: a pure streaming read).
  float (*streamSum)(const float* data, size_t count);
  // Runs `iterations` rounds of independent FMA chains; returns FLOPs done (FMA peak probe).
  double (*fmaBurn)(int64_t iterations, float seed);
  void (*kiviDecodeRange)(const KiviRange& range);
  void (*scoreRange)(const ScoreRange& range);
  void (*scoreTile)(const ScoreTile& tile);
  // Host vector kernels of the retrieval indexes (core/vector_ops.h, vector_kernels.inl).
  void (*maxDot)(const float* queries, int32_t rows, int32_t dim, const float* keys, int64_t count, float* out);
  void (*dotMatrix)(const float* queries, int32_t rows, int32_t dim, const float* keys, int64_t count, float* out);
  void (*maxDotGather)(const float* queries, int32_t rows, int32_t dim, const float* base, const uint32_t* ids,
                       int64_t count, float* out);
  // The same three over f16 keys.
  void (*maxDotHalf)(const float* queries, int32_t rows, int32_t dim, const uint16_t* keys, int64_t count, float* out);
  void (*dotMatrixHalf)(const float* queries, int32_t rows, int32_t dim, const uint16_t* keys, int64_t count, float* out);
  void (*maxDotGatherHalf)(const float* queries, int32_t rows, int32_t dim, const uint16_t* base, const uint32_t* ids,
                           int64_t count, float* out);
  void (*dotsF64)(const double* u, int32_t dim, const void* rows, DType type, int64_t count, double* out);
  void (*boxBound)(const float* queries, int32_t rows, int32_t dim, const float* lo, const float* hi, int64_t pages,
                   float* out);
  void (*softmaxRow)(float* row, int64_t visible, int64_t total);
  // An attention mass's row: row[0, visible) times `unit` (1, or ln 2 for scores in log2 units),
  // softmaxRow over them in place, then the first `count` probabilities (count <= visible) added
  // to sums in double.
  void (*softmaxInto)(float* row, int64_t visible, float unit, double* sums, int64_t count);
};

// Where the kernels' software prefetches of streamed KV (decode, tiled decode, KIVI decode, score
// scans) put the lines: into L1 (prefetcht0) when true, else L2 (prefetcht1). L1 on AMD: on a
// Zen 5 EPYC VM the T1 prefetches (which fill only L2 there) left a 64K-token f16 decode 10-17%
// slower than T0, on one thread and two. L2 elsewhere: the hint the kernels were tuned with on
// Intel Xeon VMs (Granite Rapids class), where T0 has not been measured. KVSLIM_PREFETCH=l1|l2
// overrides (simd_level.cc).
bool streamPrefetchToL1();

const KernelTable* scalarKernels();
const KernelTable* avx2Kernels();    // nullptr when not built for this architecture
const KernelTable* avx512Kernels();  // nullptr when not built for this architecture

}  // namespace kvslim::cpu
