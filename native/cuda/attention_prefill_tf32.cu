// Prefill on the tensor cores (launchAttentionPrefillTf32): what attentionPrefillKernel
// (attention_prefill.cu) computes, with S = Q.K^T and O += P.V as m16n8k8 TF32 MMAs. A block is the
// same work unit as there (64 query rows of one kv head and one key split, the same partials), so
// planAttentionPrefill and the split merge serve both. Each of four warps owns 16 rows; keys and
// values pass through shared tiles of 32 tokens with every dimension.
//
// Accuracy (tf32_mma.cuh): queries and probabilities are split in two TF32 parts, f16/bf16 K and V
// enter as they are, so S and O keep f32 accuracy (f32 K/V stay on the f32 kernel).
// P goes from S's accumulators into P.V's A operand without a shuffle: within each 8-key step, A's
// column t holds key 2t and column t + 4 key 2t + 1, and the value rows are read in that order.
#include "attention_device.cuh"
#include "tf32_mma.cuh"

namespace kvslim::cuda {

namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kRows = 16 * kWarps;         // as attention_prefill.cu's tiling for heads up to 128
constexpr int kTileKeys = 32;
constexpr int kKeySteps = kTileKeys / 8;   // S's 8-key column tiles, P.V's k steps

// A pitch of PADDED_DIM + 4 words puts the fragment reads of a warp in distinct banks: Q and K
// rows g at 4g + t, V rows 2t and 2t + 1 at 8t + g and 8t + 4 + g.
template <int PADDED_DIM>
struct Tf32PrefillTiling {
  static constexpr int kPitch = PADDED_DIM + 4;
  static constexpr int kDimSteps = PADDED_DIM / 8;
  static constexpr size_t kSharedBytes = sizeof(float) * (size_t(kRows) + 2 * size_t(kTileKeys)) * kPitch;
};

template <DType T, int PADDED_DIM>
__global__ void __launch_bounds__(kThreads) attentionPrefillTf32Kernel(const AttentionKernelArgs args) {
  using Tiling = Tf32PrefillTiling<PADDED_DIM>;
  constexpr int kPitch = Tiling::kPitch;
  constexpr int kDimSteps = Tiling::kDimSteps;
  extern __shared__ float4 sharedMemory[];
  float* queries = reinterpret_cast<float*>(sharedMemory);  // [kRows][kPitch], scaled, zero-padded
  float* keyTile = queries + kRows * kPitch;                // [kTileKeys][kPitch]
  float* valueTile = keyTile + kTileKeys * kPitch;          // [kTileKeys][kPitch]

  // Causal rows further down attend more keys: the heaviest tiles are scheduled first.
  const int firstRow = (gridDim.x - 1 - blockIdx.x) * kRows;
  const int head = blockIdx.y;
  const int split = blockIdx.z;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int dim = args.headDim;
  const HeadSpan span = args.heads[head];

  for (int i = threadIdx.x; i < kRows * PADDED_DIM; i += kThreads) {
    const int r = i / PADDED_DIM;
    const int d = i - r * PADDED_DIM;
    const int row = firstRow + r;
    queries[r * kPitch + d] = row < args.rowsPerHead && d < dim
                                  ? args.q[static_cast<size_t>(queryIndex(args, head, row)) * dim + d] * args.scaleLog2e
                                  : 0.0f;
  }
  // Rows are ordered by position, so the block's last row has its latest causal limit.
  const int blockRows = min(kRows, args.rowsPerHead - firstRow);
  const KeyRange keys = splitKeys(args, span.tokens, split, lastKey(args, span.tokens, firstRow + blockRows - 1));

  // Every key up to warpOpenKeys is visible to all 16 rows of the warp (-1 when it holds padding
  // rows, which then always take the masked path). This lane's rows: g and g + 8 of the warp.
  const int warpFirstRow = firstRow + warp * 16;
  const int warpOpenKeys = warpFirstRow + 16 <= args.rowsPerHead ? lastKey(args, span.tokens, warpFirstRow) : -1;
  int rowLast[2];
  float runMax[2], laneSum[2];  // laneSum: this lane's keys only; the row sum is taken at the end
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = warpFirstRow + g + 8 * half;
    rowLast[half] = row < args.rowsPerHead ? lastKey(args, span.tokens, row) : -1;
    runMax[half] = kNoScoreYet;
    laneSum[half] = 0.0f;
  }
  // Output tile ds: rows (g, g + 8) x dimensions 8 ds + 2t, 8 ds + 2t + 1.
  float acc[kDimSteps][4];
#pragma unroll
  for (int ds = 0; ds < kDimSteps; ++ds)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[ds][i] = 0.0f;

  const float* queryNear = queries + (warp * 16 + g) * kPitch + t;
  const float* queryFar = queryNear + 8 * kPitch;
  for (int tileBegin = keys.begin; tileBegin < keys.end; tileBegin += kTileKeys) {
    __syncthreads();  // queries staged; everyone is done with the previous K and V tiles
    stageRows<T, kTileKeys, PADDED_DIM, kThreads>(keyTile, args.keyPages, span, args, tileBegin, keys.end, 0);
    stageRows<T, kTileKeys, PADDED_DIM, kThreads>(valueTile, args.valuePages, span, args, tileBegin, keys.end, 0);
    __syncthreads();

    // S[c]: rows (g, g + 8) x keys tileBegin + 8c + 2t, + 1.
    float scores[kKeySteps][4];
#pragma unroll
    for (int c = 0; c < kKeySteps; ++c)
#pragma unroll
      for (int i = 0; i < 4; ++i) scores[c][i] = 0.0f;
#pragma unroll 4
    for (int ds = 0; ds < kDimSteps; ++ds) {
      const Tf32Pair q0 = splitTf32(queryNear[8 * ds]), q1 = splitTf32(queryFar[8 * ds]);
      const Tf32Pair q2 = splitTf32(queryNear[8 * ds + 4]), q3 = splitTf32(queryFar[8 * ds + 4]);
      const unsigned high[4] = {q0.hi, q1.hi, q2.hi, q3.hi};
      const unsigned low[4] = {q0.lo, q1.lo, q2.lo, q3.lo};
#pragma unroll
      for (int c = 0; c < kKeySteps; ++c) {
        const float* key = keyTile + (8 * c + g) * kPitch + 8 * ds + t;
        const unsigned b0 = __float_as_uint(key[0]), b1 = __float_as_uint(key[4]);
        mmaTf32(scores[c], high, b0, b1);
        mmaTf32(scores[c], low, b0, b1);
      }
    }

    // Only tiles on a causal diagonal or at the end of the range need per-row masks.
    const bool open = tileBegin + kTileKeys <= keys.end && tileBegin + kTileKeys - 1 <= warpOpenKeys;
    if (!open) {
#pragma unroll
      for (int c = 0; c < kKeySteps; ++c)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int key = tileBegin + 8 * c + 2 * t + (i & 1);
          if (key >= keys.end || key > rowLast[i >> 1]) scores[c][i] = -INFINITY;
        }
    }
    // Online softmax of rows g (elements 0, 1) and g + 8 (elements 2, 3): a row's 32 scores lie
    // in the four lanes of group g.
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float tileMax = -INFINITY;
#pragma unroll
      for (int c = 0; c < kKeySteps; ++c) tileMax = fmaxf(tileMax, fmaxf(scores[c][2 * half], scores[c][2 * half + 1]));
      tileMax = fmaxf(tileMax, __shfl_xor_sync(0xffffffffu, tileMax, 1));
      tileMax = fmaxf(tileMax, __shfl_xor_sync(0xffffffffu, tileMax, 2));
      const float newMax = fmaxf(runMax[half], tileMax);
      const float alpha = exp2f(runMax[half] - newMax);
      runMax[half] = newMax;
      float sum = 0.0f;
#pragma unroll
      for (int c = 0; c < kKeySteps; ++c)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const float probability = exp2f(scores[c][2 * half + j] - newMax);
          scores[c][2 * half + j] = probability;
          sum += probability;
        }
      laneSum[half] = laneSum[half] * alpha + sum;
#pragma unroll
      for (int ds = 0; ds < kDimSteps; ++ds) {
        acc[ds][2 * half] *= alpha;
        acc[ds][2 * half + 1] *= alpha;
      }
    }

    // O += P.V, one 8-key step per S column tile; A = (g, key 2t), (g + 8, key 2t), (g, key 2t + 1), (g + 8, key 2t + 1).
#pragma unroll
    for (int c = 0; c < kKeySteps; ++c) {
      const Tf32Pair p0 = splitTf32(scores[c][0]), p1 = splitTf32(scores[c][2]);
      const Tf32Pair p2 = splitTf32(scores[c][1]), p3 = splitTf32(scores[c][3]);
      const unsigned high[4] = {p0.hi, p1.hi, p2.hi, p3.hi};
      const unsigned low[4] = {p0.lo, p1.lo, p2.lo, p3.lo};
      const float* evenValue = valueTile + (8 * c + 2 * t) * kPitch + g;  // key 2t of the step
      const float* oddValue = evenValue + kPitch;                         // key 2t + 1
#pragma unroll
      for (int ds = 0; ds < kDimSteps; ++ds) {
        const unsigned b0 = __float_as_uint(evenValue[8 * ds]), b1 = __float_as_uint(oddValue[8 * ds]);
        mmaTf32(acc[ds], high, b0, b1);
        mmaTf32(acc[ds], low, b0, b1);
      }
    }
  }

#pragma unroll
  for (int half = 0; half < 2; ++half) {
    // The four lanes of the row's group, added in lane order (xor 1, then xor 2).
    float total = laneSum[half];
    total += __shfl_xor_sync(0xffffffffu, total, 1);
    total += __shfl_xor_sync(0xffffffffu, total, 2);
    const int row = warpFirstRow + g + 8 * half;
    if (row >= args.rowsPerHead) continue;
    if (args.splits == 1) {
      const float inverse = total > 0.0f ? 1.0f / total : 0.0f;
      const int query = queryIndex(args, head, row);
      float* out = args.out + static_cast<size_t>(query) * dim;
#pragma unroll
      for (int ds = 0; ds < kDimSteps; ++ds)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int d = 8 * ds + 2 * t + j;
          if (d < dim) out[d] = acc[ds][2 * half + j] * inverse;
        }
      if (t == 0 && args.lse != nullptr) args.lse[query] = rowLse(runMax[half], total);
    } else {
      const size_t partial = (static_cast<size_t>(head) * args.rowsPerHead + row) * args.splits + split;
#pragma unroll
      for (int ds = 0; ds < kDimSteps; ++ds)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int d = 8 * ds + 2 * t + j;
          if (d < dim) args.partialAcc[partial * dim + d] = acc[ds][2 * half + j];
        }
      if (t == 0) {
        args.partialMax[partial] = runMax[half];
        args.partialSum[partial] = total;
      }
    }
  }
}

template <DType T, int PADDED_DIM>
cudaError_t launchTf32Kernel(const AttentionKernelArgs& args, cudaStream_t stream) {
  const int rowTiles = (args.rowsPerHead + kRows - 1) / kRows;
  const dim3 grid(rowTiles, args.kvHeads, args.splits);
  return launchWithShared<attentionPrefillTf32Kernel<T, PADDED_DIM>>(grid, kThreads, Tf32PrefillTiling<PADDED_DIM>::kSharedBytes,
                                                                     stream, args);
}

template <DType T>
cudaError_t launchTf32Shape(const AttentionKernelArgs& args, cudaStream_t stream) {
  if (args.headDim <= 64) return launchTf32Kernel<T, 64>(args, stream);
  return launchTf32Kernel<T, 128>(args, stream);
}

}  // namespace

bool attentionPrefillTf32Fits(const AttentionKernelArgs& args) {
  static const bool present = tensorCoresPresent(Tf32PrefillTiling<128>::kSharedBytes);
  // The rows per block must be attention_prefill.cu's, whose plan (splits, partials) this kernel follows.
  return (args.kvType == DType::F16 || args.kvType == DType::BF16) && args.headDim <= 128 &&
         prefillRowsPerBlock(args.headDim) == kRows && present;
}

cudaError_t launchAttentionPrefillTf32(const AttentionKernelArgs& args, cudaStream_t stream) {
  if (!attentionPrefillTf32Fits(args)) return cudaErrorInvalidValue;
  return args.kvType == DType::F16 ? launchTf32Shape<DType::F16>(args, stream) : launchTf32Shape<DType::BF16>(args, stream);
}

}  // namespace kvslim::cuda
