// KIVI attention (methods/kivi.md) straight from the packed codes of core/kivi_format.h, as
// flash-decoding: grid = row block x kv head x key split (row blocks first, heaviest first, as in
// prefill, so that prefill-sized n fits the grid). A block streams its key range once for all the
// rows of its kv head (GQA) and leaves one softmax partial per row; launchMergeSplits combines the
// splits, exactly as for the f32/f16 decode kernel (attention_decode.cu), whose structure this
// mirrors.
//
// Inside a block, groups of TPT threads each own a contiguous part of the block's key range and
// walk it in tiles of 16 tokens, keeping a private online softmax that is merged once, at the end,
// through shared memory (no block-wide barrier while streaming). A lane owns DIMS channels:
//  - Keys, channels lane, lane + TPT, ...: quantized keys pack along tokens, so one 32-bit word of
//    a channel holds 16 / 8 / 4 consecutive tokens (2 / 4 / 8 bits); lanes read consecutive
//    channels of a group record. The key group's per-channel scale is folded into the query once
//    per group (q~ = q * s, held in registers) and its min into a per-lane bias (q . m), so a score
//    is bias + q~ . codes: dequantized keys never exist, and each unpacked code serves every row.
//  - Values, channels lane * DIMS ...: value codes pack along channels, so a lane reads its codes in
//    a word or two per token and dequantizes them once (code * scale + min of the channel group)
//    for every row.
// Codes become floats with the 2^23 trick (integer ops and an add instead of an integer-to-float
// conversion, which issues at a fraction of the FMA rate). Tokens past the quantized parts come from the f16 key residual and the
// f16 value ring.
// H2O over KIVI: tokens flagged in KiviHeadSpan::evicted are masked like a hole's, and when
// KiviKernelArgs::scores is set every row's masked scores are written there for its mass
// (captured_mass.cu), so the mass costs no second pass over the codes.
#include "attention_device.cuh"
#include "kivi_kernels.cuh"

namespace kvslim::cuda {

namespace {

constexpr int kKiviThreads = 128;
// Tokens per tile. Key groups are multiples of 16 tokens and start at multiples of 16, and so do
// the split ranges and the lanes' parts of them: a tile never straddles a key group or the end of
// the quantized keys, and a code word never straddles a tile.
constexpr int kTileTokens = 16;
constexpr int kMinSplitTokens = 256;  // shorter splits cost more in partials and merging than they win
// Blocks per multiprocessor the key splits aim at, as in decode: more warps hide the latency of
// the loads and of the shuffle reductions.
constexpr int kBlocksPerMultiprocessor = 8;
// Per-thread register budget: the folded queries and the accumulators of all rows, each.
constexpr int kMaxRowDims = 64;

__host__ __device__ constexpr int kiviMaxRows(int dims) { return kMaxRowDims / dims; }
// Tokens scored together (their shuffles interleave): about 32 code or f16 values per lane.
__host__ __device__ constexpr int kiviUnroll(int dims) { return dims <= 8 ? 4 : dims <= 16 ? 2 : 1; }
// Channels a lane owns by head size; TPT x DIMS covers the head dimension.
__host__ __device__ constexpr int kiviDims(int headDim) { return headDim <= 256 ? 8 : headDim <= 512 ? 16 : 32; }

// The f32 whose bits are 2^23 + code, minus 2^23: exact for any code below 2^23.
__device__ __forceinline__ float codeToFloat(unsigned code) { return __uint_as_float(0x4b000000u | code) - 8388608.0f; }

// Records are 4-byte aligned (every record size is a multiple of 4 and the backend checks pages).
__device__ __forceinline__ unsigned loadWord(const void* address) { return __ldg(static_cast<const unsigned*>(address)); }

__device__ __forceinline__ float loadF16(const unsigned short* address) { return f16BitsToFloat(__ldg(address)); }

// Key group g of a head: page g / keyGroupsPerPage (its page table entry: past the released run,
// if any), record g % keyGroupsPerPage.
__device__ __forceinline__ const unsigned char* keyGroupRecord(const KiviKernelArgs& kivi, const KiviHeadSpan& span,
                                                               int keyGroup) {
  const unsigned page = static_cast<unsigned>(keyGroup) / static_cast<unsigned>(kivi.keyGroupsPerPage);
  const unsigned slot = static_cast<unsigned>(keyGroup) - page * static_cast<unsigned>(kivi.keyGroupsPerPage);
  const unsigned entry = page >= static_cast<unsigned>(span.releasedFirst) ? page - span.releasedKeyPages : page;
  return static_cast<const unsigned char*>(kivi.attention.keyPages[span.firstKeyPage + entry]) +
         static_cast<size_t>(slot) * kivi.keyGroupBytes;
}

// Value token t of a head: page t / valueTokensPerPage, record t % valueTokensPerPage.
__device__ __forceinline__ const unsigned char* valueTokenRecord(const KiviKernelArgs& kivi, const KiviHeadSpan& span,
                                                                 int token) {
  const unsigned page = static_cast<unsigned>(token) / static_cast<unsigned>(kivi.valueTokensPerPage);
  const unsigned slot = static_cast<unsigned>(token) - page * static_cast<unsigned>(kivi.valueTokensPerPage);
  const unsigned entry = page >= static_cast<unsigned>(span.releasedFirst) ? page - span.releasedValuePages : page;
  return static_cast<const unsigned char*>(kivi.attention.valuePages[span.firstValuePage + entry]) +
         static_cast<size_t>(slot) * kivi.valueTokenBytes;
}

// A window policy's hole (core/kivi_format.h): masked tokens whose records may be released.
__device__ __forceinline__ bool inHole(const KiviHeadSpan& span, int token) {
  return token >= span.holeBegin && token < span.holeEnd;
}

// Tokens attention skips: a window policy's hole, or (H2O) a token H2O flagged (its records stay).
template <bool H2O>
__device__ __forceinline__ bool masksToken(const KiviHeadSpan& span, int token) {
  if constexpr (H2O) {
    if (token < span.evictedTokens && __ldg(span.evicted + token) != 0) return true;
  }
  return inHole(span, token);
}

// H2O: the kernels that read the eviction flags and capture scores are compiled apart, so that
// plain KIVI decode keeps its registers (the capture costs the 255-register kernels spills).
template <int BITS, int TPT, int DIMS, int ROWS, bool H2O>
__global__ void __launch_bounds__(kKiviThreads) kiviAttentionKernel(const KiviKernelArgs kivi) {
  const AttentionKernelArgs& args = kivi.attention;
  constexpr int kCodesPerWord = 32 / BITS;
  constexpr unsigned kCodeMask = (1u << BITS) - 1u;
  constexpr int kGroups = kKiviThreads / TPT;
  constexpr int kUnroll = kiviUnroll(DIMS);
  constexpr int kPaddedDim = TPT * DIMS;
  // A lane's value channels in one value record: whole words, or part of one word (then at a
  // bit offset that depends on the lane).
  constexpr int kValueBits = DIMS * BITS;
  constexpr int kValueWords = kValueBits >= 32 ? kValueBits / 32 : 1;
  constexpr int kResidualWords = DIMS / 2;  // f16 pairs of a ring row
  constexpr int kRawWords = kValueWords > kResidualWords ? kValueWords : kResidualWords;
  // Value groups are multiples of 16 channels: a lane's channels span one scale per 16.
  constexpr int kRuns = (DIMS + 15) / 16;
  static_assert(TPT <= 32 && 32 % TPT == 0, "a token group lives inside one warp");
  static_assert(kTileTokens % kCodesPerWord == 0 && kCodesPerWord % kUnroll == 0, "code words align with tiles and steps");
  static_assert(DIMS % 16 == 0 || 16 % DIMS == 0, "a lane's value channels sit in whole value groups");
  static_assert(sizeof(float) * kGroups * ROWS * (kPaddedDim + 2) <= 48 * 1024, "static shared memory limit");
  __shared__ float groupMax[kGroups][ROWS];
  __shared__ float groupSum[kGroups][ROWS];
  // While keys stream: the block's scaled queries [ROWS][kPaddedDim]. After the barrier that
  // ends streaming: every group's accumulators [kGroups][ROWS][kPaddedDim].
  __shared__ __align__(16) float shared[kGroups * ROWS * kPaddedDim];
  __shared__ float rowMax[ROWS];
  __shared__ float rowSum[ROWS];

  // Causal rows further down attend more keys: the heaviest row blocks are scheduled first.
  const int firstRow = (gridDim.x - 1 - blockIdx.x) * ROWS;
  const int head = blockIdx.y;
  const int split = blockIdx.z;
  const int group = threadIdx.x / TPT;
  const int lane = threadIdx.x % TPT;
  const int dim = args.headDim;
  const KiviHeadSpan span = kivi.heads[head];
  float* queries = shared;

  int last[ROWS];
  int blockLast = -1;
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const int row = firstRow + r;
    last[r] = row < args.rowsPerHead ? lastKey(args, span.tokens, row) : -1;
    blockLast = max(blockLast, last[r]);
  }
  for (int i = threadIdx.x; i < ROWS * kPaddedDim; i += kKiviThreads) {
    const int r = i / kPaddedDim;
    const int d = i - r * kPaddedDim;
    const int row = firstRow + r;
    queries[i] = row < args.rowsPerHead && d < dim
                     ? args.q[static_cast<size_t>(queryIndex(args, head, row)) * dim + d] * args.scaleLog2e
                     : 0.0f;
  }
  __syncthreads();

  // This group's contiguous part of the block's keys, in whole tiles (keys.begin is a multiple of
  // the tile: splits are planned in tiles). Every group loops perGroup / kTileTokens times so
  // that the lanes of a warp stay converged for their shuffles. Ranges count walked tokens: walk
  // index w is token w below span.skipBegin and w + skipLength from there (both multiples of 32,
  // so a tile maps to 16 consecutive tokens).
  const int skipEnd = span.skipBegin + span.skipLength;
  const int walkLast = blockLast >= skipEnd ? blockLast - span.skipLength : min(blockLast, span.skipBegin - 1);
  const KeyRange keys = splitKeys(args, span.tokens - span.skipLength, split, walkLast);
  const int perGroup = ((keys.end - keys.begin + kGroups - 1) / kGroups + kTileTokens - 1) / kTileTokens * kTileTokens;
  const int begin = min(keys.end, keys.begin + group * perGroup);
  const int end = min(keys.end, begin + perGroup);

  // Value channels of this lane and the value groups of their runs of 16.
  const int valueChannel = lane * DIMS;
  const unsigned valueFirstBit = static_cast<unsigned>(valueChannel) * BITS;
  const int channelGroups = dim / kivi.quantGroup;
  int valueGroup[kRuns];
#pragma unroll
  for (int k = 0; k < kRuns; ++k) valueGroup[k] = (valueChannel + 16 * k) / kivi.quantGroup;

  float runMax[ROWS], runSum[ROWS], acc[ROWS][DIMS];
  float folded[ROWS][DIMS], bias[ROWS];  // q~ and this lane's part of q . m for the current key group
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    runMax[r] = kNoScoreYet;
    runSum[r] = 0.0f;
    bias[r] = 0.0f;
#pragma unroll
    for (int s = 0; s < DIMS; ++s) {
      acc[r][s] = 0.0f;
      folded[r][s] = 0.0f;
    }
  }
  int foldedGroup = -2;  // key group folded into q~; -1: the residual (q~ = q, no bias)
  const unsigned char* keyRecord = nullptr;

  for (int offset = 0; offset < perGroup; offset += kTileTokens) {
    const int base = begin + offset;  // walk index
    if (__all_sync(0xffffffffu, base >= end)) break;  // the whole warp is done
    const int tokenBase = base < span.skipBegin ? base : base + span.skipLength;
    // A tile wholly in the hole reads nothing (its page may be released); a tile partly in it lies
    // in a held page and is masked token by token.
    const bool tileInHole = tokenBase >= span.holeBegin && tokenBase + kTileTokens <= span.holeEnd;
    const bool live = base < end && !tileInHole;
    const bool quantizedKeys = live && tokenBase < span.quantizedKeys;
    const int keyGroup = quantizedKeys ? tokenBase / kivi.quantGroup : -1;
    if (live && keyGroup != foldedGroup) {
      foldedGroup = keyGroup;
      if (quantizedKeys) {
        keyRecord = keyGroupRecord(kivi, span, keyGroup);
        const unsigned short* scales = reinterpret_cast<const unsigned short*>(keyRecord + kivi.keyCodeBytes);
        const unsigned short* mins = scales + dim;
#pragma unroll
        for (int r = 0; r < ROWS; ++r) bias[r] = 0.0f;
#pragma unroll
        for (int s = 0; s < DIMS; ++s) {
          const int channel = s * TPT + lane;
          const float scale = channel < dim ? loadF16(scales + channel) : 0.0f;
          const float minimum = channel < dim ? loadF16(mins + channel) : 0.0f;
#pragma unroll
          for (int r = 0; r < ROWS; ++r) {
            const float query = queries[r * kPaddedDim + channel];
            folded[r][s] = query * scale;
            bias[r] = fmaf(query, minimum, bias[r]);
          }
        }
      } else {
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
          bias[r] = 0.0f;
#pragma unroll
          for (int s = 0; s < DIMS; ++s) folded[r][s] = queries[r * kPaddedDim + s * TPT + lane];
        }
      }
    }
    // First code word of this tile in each channel's run of the group record.
    const int tileWord = quantizedKeys ? (tokenBase - keyGroup * kivi.quantGroup) / kCodesPerWord : 0;
    unsigned keyWords[DIMS];
#pragma unroll
    for (int s = 0; s < DIMS; ++s) keyWords[s] = 0u;

    // Not unrolled, like decode's token steps: unrolling the tile keeps every step's loads in
    // registers at once and costs occupancy, which hides their latency better.
#pragma unroll 1
    for (int sub = 0; sub < kTileTokens; sub += kUnroll) {
      const int first = base + sub;  // walk index; tokens from firstToken
      const int firstToken = tokenBase + sub;
      if (__all_sync(0xffffffffu, first >= end)) break;  // the rest of the tile is past every group's keys

      // Value loads of the step first, so that they are in flight while the keys are scored.
      unsigned valueRaw[kUnroll][kRawWords];
      unsigned short valueScale[kUnroll][kRuns], valueMin[kUnroll][kRuns];
      int valueKind[kUnroll];  // 0: no token, 1: codes, 2: f16 ring row
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int token = firstToken + u;
#pragma unroll
        for (int w = 0; w < kRawWords; ++w) valueRaw[u][w] = 0u;
#pragma unroll
        for (int k = 0; k < kRuns; ++k) valueScale[u][k] = valueMin[u][k] = 0;
        valueKind[u] = first + u >= end || masksToken<H2O>(span, token) ? 0 : token < span.quantizedValues ? 1 : 2;
        if (valueKind[u] == 1) {
          const unsigned char* record = valueTokenRecord(kivi, span, token);
          const unsigned char* codes = record + (valueFirstBit / 32) * 4;
#pragma unroll
          for (int w = 0; w < kValueWords; ++w) {
            const int channel = kValueBits >= 32 ? valueChannel + w * kCodesPerWord : valueChannel;
            if (channel < dim) valueRaw[u][w] = loadWord(codes + 4 * w);
          }
          const unsigned short* scales = reinterpret_cast<const unsigned short*>(record + kivi.valueCodeBytes);
#pragma unroll
          for (int k = 0; k < kRuns; ++k) {
            if (valueChannel + 16 * k < dim) {
              valueScale[u][k] = __ldg(scales + valueGroup[k]);
              valueMin[u][k] = __ldg(scales + channelGroups + valueGroup[k]);
            }
          }
        } else if (valueKind[u] == 2) {
          int ringRow = span.valueRingStart + (token - span.quantizedValues);
          if (ringRow >= kivi.residual) ringRow -= kivi.residual;
          const unsigned short* row = span.valueResidual + static_cast<size_t>(ringRow) * dim + valueChannel;
#pragma unroll
          for (int w = 0; w < kResidualWords; ++w)
            if (valueChannel + 2 * w < dim) valueRaw[u][w] = loadWord(row + 2 * w);
        }
      }

      // This lane's part of each score: bias + q~ . codes (or q . k for residual keys).
      float scores[kUnroll][ROWS];
      if (quantizedKeys) {
        if (sub % kCodesPerWord == 0) {
#pragma unroll
          for (int s = 0; s < DIMS; ++s) {
            const int channel = s * TPT + lane;
            if (channel < dim) {
              const size_t word = static_cast<size_t>(channel) * kivi.keyWordsPerChannel + tileWord + sub / kCodesPerWord;
              keyWords[s] = loadWord(keyRecord + word * 4);
            }
          }
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
          for (int r = 0; r < ROWS; ++r) scores[u][r] = bias[r];
#pragma unroll
          for (int s = 0; s < DIMS; ++s) {
            const float code = codeToFloat((keyWords[s] >> (((sub % kCodesPerWord) + u) * BITS)) & kCodeMask);
#pragma unroll
            for (int r = 0; r < ROWS; ++r) scores[u][r] = fmaf(folded[r][s], code, scores[u][r]);
          }
        }
      } else {
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int token = firstToken + u;
          const unsigned short* row = first + u < end && !inHole(span, token)
                                          ? span.keyResidual + static_cast<size_t>(token - span.quantizedKeys) * dim
                                          : nullptr;
#pragma unroll
          for (int r = 0; r < ROWS; ++r) scores[u][r] = 0.0f;
#pragma unroll
          for (int s = 0; s < DIMS; ++s) {
            const int channel = s * TPT + lane;
            const float key = row != nullptr && channel < dim ? loadF16(row + channel) : 0.0f;
#pragma unroll
            for (int r = 0; r < ROWS; ++r) scores[u][r] = fmaf(folded[r][s], key, scores[u][r]);
          }
        }
      }
      // Channels are split over the TPT lanes of a group: xor offsets below TPT stay inside it.
#pragma unroll
      for (int shuffle = TPT / 2; shuffle > 0; shuffle /= 2)
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
#pragma unroll
          for (int r = 0; r < ROWS; ++r) scores[u][r] += __shfl_xor_sync(0xffffffffu, scores[u][r], shuffle);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int token = firstToken + u;
        const bool masked = valueKind[u] == 0;  // past the range, in the hole or flagged
#pragma unroll
        for (int r = 0; r < ROWS; ++r)
          if (masked || token > last[r]) scores[u][r] = -INFINITY;
      }
      if (H2O && kivi.scores != nullptr && lane == 0) {
        // H2O's mass: each row's scores of the tokens it sees (no hole here: walk index = token).
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int token = firstToken + u;
          if (first + u >= end) continue;
#pragma unroll
          for (int r = 0; r < ROWS; ++r) {
            if (firstRow + r < args.rowsPerHead && token <= last[r]) {
              kivi.scores[(static_cast<size_t>(head) * args.rowsPerHead + firstRow + r) * kivi.scoresWidth + token] = scores[u][r];
            }
          }
        }
      }

      // Online softmax over the step's tokens, then their values.
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        float stepMax = runMax[r];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) stepMax = fmaxf(stepMax, scores[u][r]);
        const float alpha = exp2f(runMax[r] - stepMax);
        runMax[r] = stepMax;
        runSum[r] *= alpha;
#pragma unroll
        for (int s = 0; s < DIMS; ++s) acc[r][s] *= alpha;
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) scores[u][r] = exp2f(scores[u][r] - stepMax);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        float value[DIMS];
#pragma unroll
        for (int s = 0; s < DIMS; ++s) {
          if (valueKind[u] == 1) {
            const unsigned code = kValueBits >= 32
                                      ? valueRaw[u][s / kCodesPerWord] >> ((s % kCodesPerWord) * BITS)
                                      : valueRaw[u][0] >> (valueFirstBit % 32 + s * BITS);
            value[s] = fmaf(codeToFloat(code & kCodeMask), f16BitsToFloat(valueScale[u][s / 16]),
                            f16BitsToFloat(valueMin[u][s / 16]));
          } else {
            // f16 ring row (the low half of a word is the earlier channel), or zeros: no token.
            value[s] = f16BitsToFloat((valueRaw[u][s / 2] >> (16 * (s % 2))) & 0xffffu);
          }
        }
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
          runSum[r] += scores[u][r];
#pragma unroll
          for (int s = 0; s < DIMS; ++s) acc[r][s] = fmaf(scores[u][r], value[s], acc[r][s]);
        }
      }
    }
  }

  // Merge the groups: rescale each to the block max, then sum them per (row, dimension).
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      groupMax[group][r] = runMax[r];
      groupSum[group][r] = runSum[r];
    }
  }
  __syncthreads();  // also: no thread reads the queries any more, their memory becomes groupAcc
  float (*groupAcc)[ROWS][kPaddedDim] = reinterpret_cast<float (*)[ROWS][kPaddedDim]>(shared);
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    float blockMax = groupMax[0][r];
#pragma unroll
    for (int g = 1; g < kGroups; ++g) blockMax = fmaxf(blockMax, groupMax[g][r]);
    const float weight = exp2f(runMax[r] - blockMax);
#pragma unroll
    for (int s = 0; s < DIMS; ++s) groupAcc[group][r][valueChannel + s] = acc[r][s] * weight;
    if (threadIdx.x == r) {
      float total = 0.0f;
#pragma unroll
      for (int g = 0; g < kGroups; ++g) total += groupSum[g][r] * exp2f(groupMax[g][r] - blockMax);
      rowMax[r] = blockMax;
      rowSum[r] = total;
    }
  }
  __syncthreads();

  for (int i = threadIdx.x; i < ROWS * dim; i += kKiviThreads) {
    const int r = i / dim;
    const int d = i - r * dim;
    const int row = firstRow + r;
    if (row >= args.rowsPerHead) break;  // rows only grow with i
    float value = 0.0f;
#pragma unroll
    for (int g = 0; g < kGroups; ++g) value += groupAcc[g][r][d];
    if (args.splits == 1) {
      const float inverse = rowSum[r] > 0.0f ? 1.0f / rowSum[r] : 0.0f;
      args.out[static_cast<size_t>(queryIndex(args, head, row)) * dim + d] = value * inverse;
    } else {
      const size_t partial = (static_cast<size_t>(head) * args.rowsPerHead + row) * args.splits + split;
      args.partialAcc[partial * dim + d] = value;
      if (d == 0) {
        args.partialMax[partial] = rowMax[r];
        args.partialSum[partial] = rowSum[r];
      }
    }
  }
}

// Rows per block on the host side, matching the kernel launchKiviShape picks.
int kiviRowsPerBlock(const AttentionKernelArgs& args) {
  const int maxRows = kiviMaxRows(kiviDims(args.headDim));
  int rows = 1;
  while (rows < args.rowsPerHead && rows < maxRows) rows *= 2;
  return rows;
}

// Smallest compiled row count that holds `rows` (rows never exceeds kiviMaxRows).
template <int BITS, int TPT, int DIMS, int ROWS = 1>
cudaError_t launchKiviRows(const KiviKernelArgs& args, int rows, cudaStream_t stream) {
  if constexpr (ROWS < kiviMaxRows(DIMS)) {
    if (rows > ROWS) return launchKiviRows<BITS, TPT, DIMS, ROWS * 2>(args, rows, stream);
  }
  const dim3 grid((args.attention.rowsPerHead + ROWS - 1) / ROWS, args.attention.kvHeads, args.attention.splits);
  if (args.h2o) {
    kiviAttentionKernel<BITS, TPT, DIMS, ROWS, true><<<grid, kKiviThreads, 0, stream>>>(args);
  } else {
    kiviAttentionKernel<BITS, TPT, DIMS, ROWS, false><<<grid, kKiviThreads, 0, stream>>>(args);
  }
  return cudaGetLastError();
}

// Lanes per token and channels per lane by head size, as in decode: short heads leave several
// token groups per warp.
template <int BITS>
cudaError_t launchKiviShape(const KiviKernelArgs& args, cudaStream_t stream) {
  const int rows = kiviRowsPerBlock(args.attention);
  const int dim = args.attention.headDim;
  static_assert(kiviDims(64) == 8 && kiviDims(512) == 16 && kiviDims(1024) == 32, "shapes below match kiviDims");
  if (dim <= 64) return launchKiviRows<BITS, 8, 8>(args, rows, stream);
  if (dim <= 128) return launchKiviRows<BITS, 16, 8>(args, rows, stream);
  if (dim <= 256) return launchKiviRows<BITS, 32, 8>(args, rows, stream);
  if (dim <= 512) return launchKiviRows<BITS, 32, 16>(args, rows, stream);
  return launchKiviRows<BITS, 32, 32>(args, rows, stream);
}

}  // namespace

SplitPlan planKiviAttention(const KiviKernelArgs& args, int multiprocessors) {
  const int rows = kiviRowsPerBlock(args.attention);
  const long long rowBlocks = (args.attention.rowsPerHead + rows - 1) / rows;
  return planKeySplits(args.attention.maxTokens, rowBlocks * args.attention.kvHeads, multiprocessors, kMinSplitTokens,
                       kTileTokens, kBlocksPerMultiprocessor);
}

cudaError_t launchKiviAttention(const KiviKernelArgs& args, cudaStream_t stream) {
  switch (args.bits) {
    case 2: return launchKiviShape<2>(args, stream);
    case 4: return launchKiviShape<4>(args, stream);
    case 8: return launchKiviShape<8>(args, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace kvslim::cuda
