// Prefill (flash-attention-2 style, f32 CUDA cores): block = (tile of query rows, kv head, key
// split). The block's pre-scaled queries stay in shared memory; keys and values pass through a
// shared tile of 32 tokens, widened to f32 once per block. Each warp owns ROWS rows and each lane
// one key of the tile: a lane computes its key's scores for the warp's rows (queries are
// broadcast reads), the warp runs the online softmax of each row with shuffles, and then every
// lane accumulates the output dimensions lane, lane + 32, ... of those rows from the
// probabilities and the value tile. The [n, T] score matrix never exists.
#include "../core/environment.h"
#include "attention_device.cuh"

namespace kvslim::cuda {

namespace {

constexpr int kPrefillWarps = 4;
constexpr int kPrefillThreads = 32 * kPrefillWarps;
constexpr int kTileKeys = 32;          // one key per lane
constexpr int kMinSplitTokens = 512;   // splits only while the row tiles alone leave multiprocessors idle

// Shapes by head size rounded up to PADDED_DIM. A lane accumulates ROWS x PADDED_DIM / 32 outputs,
// held at 64 registers by trading rows for dimensions; K/V are staged 64 dimensions at a time so
// a block needs at most ~49 KiB of shared memory: two blocks fit on the 100 KiB of sm_86/sm_89.
template <int PADDED_DIM>
struct PrefillTiling {
  static constexpr int kRowsPerWarp = PADDED_DIM <= 128 ? 16 : 2048 / PADDED_DIM;
  static constexpr int kRows = kPrefillWarps * kRowsPerWarp;
  static constexpr int kChunk = 64;
  static constexpr int kChunks = PADDED_DIM / kChunk;
  // 4 floats of padding per key row: the float4 reads of 8 consecutive lanes (one per key) land in
  // distinct banks.
  static constexpr int kTileStride = kChunk + 4;
  static constexpr int kOutputsPerLane = PADDED_DIM / 32;
  static constexpr size_t kSharedBytes =
      sizeof(float) * (size_t(kRows) * PADDED_DIM + size_t(kTileKeys) * kTileStride + size_t(kRows) * kTileKeys);
};

template <DType T, int CHUNK>
__device__ __forceinline__ void stageTile(float* tile, const void* const* pages, const HeadSpan& span,
                                          const AttentionKernelArgs& args, int firstKey, int keyEnd, int first) {
  stageRows<T, kTileKeys, CHUNK, kPrefillThreads>(tile, pages, span, args, firstKey, keyEnd, first);
}

// Two blocks per multiprocessor is what shared memory allows on sm_86/89 anyway; saying so lets
// ptxas keep the accumulators and running scores in registers instead of spilling to fit more.
template <DType T, int PADDED_DIM>
__global__ void __launch_bounds__(kPrefillThreads, 2) attentionPrefillKernel(const AttentionKernelArgs args) {
  using Tiling = PrefillTiling<PADDED_DIM>;
  constexpr int ROWS = Tiling::kRowsPerWarp;
  constexpr int CHUNK = Tiling::kChunk;
  constexpr int STRIDE = Tiling::kTileStride;
  constexpr int OUTPUTS = Tiling::kOutputsPerLane;
  extern __shared__ float4 sharedMemory[];  // float4: 16-byte alignment for the vector reads
  float* queries = reinterpret_cast<float*>(sharedMemory);       // [kRows][PADDED_DIM], scaled, zero-padded
  float* tile = queries + Tiling::kRows * PADDED_DIM;             // [kTileKeys][STRIDE]: a K or V chunk
  float* probabilities = tile + kTileKeys * STRIDE;               // [kRows][kTileKeys]

  // Causal rows further down attend more keys: the heaviest tiles are scheduled first.
  const int firstRow = (gridDim.x - 1 - blockIdx.x) * Tiling::kRows;
  const int head = blockIdx.y;
  const int split = blockIdx.z;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int dim = args.headDim;
  const HeadSpan span = args.heads[head];

  for (int i = threadIdx.x; i < Tiling::kRows * PADDED_DIM; i += kPrefillThreads) {
    const int r = i / PADDED_DIM;
    const int d = i - r * PADDED_DIM;
    const int row = firstRow + r;
    queries[i] = row < args.rowsPerHead && d < dim
                     ? args.q[static_cast<size_t>(queryIndex(args, head, row)) * dim + d] * args.scaleLog2e
                     : 0.0f;
  }
  // Rows are ordered by position, so the block's last row has its latest causal limit.
  const int blockRows = min(Tiling::kRows, args.rowsPerHead - firstRow);
  const KeyRange keys = splitKeys(args, span.tokens, split, lastKey(args, span.tokens, firstRow + blockRows - 1));

  const int warpRow = warp * ROWS;  // first row of this warp inside the block
  // Every key up to this one is visible to all rows of the warp (its first row has the earliest
  // limit); -1 when the warp holds padding rows, which then always take the masked path.
  const int warpFirstRow = firstRow + warpRow;
  const int warpOpenKeys = warpFirstRow + ROWS <= args.rowsPerHead ? lastKey(args, span.tokens, warpFirstRow) : -1;
  float runMax[ROWS], laneSum[ROWS], acc[ROWS][OUTPUTS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    runMax[r] = kNoScoreYet;
    laneSum[r] = 0.0f;  // this lane's keys only; the warp sum is taken once at the end
#pragma unroll
    for (int i = 0; i < OUTPUTS; ++i) acc[r][i] = 0.0f;
  }
  // Dot products run over dimensions rounded up to 4 (float4 reads); the padding holds zeros.
  const int paddedDim = (dim + 3) / 4 * 4;

  for (int tileBegin = keys.begin; tileBegin < keys.end; tileBegin += kTileKeys) {
    float scores[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) scores[r] = 0.0f;
    for (int first = 0; first < dim; first += CHUNK) {
      __syncthreads();  // everyone is done with the previous K or V chunk
      stageTile<T, CHUNK>(tile, args.keyPages, span, args, tileBegin, keys.end, first);
      __syncthreads();
      const int chunkDims = min(CHUNK, paddedDim - first);
      const float* keyRow = tile + lane * STRIDE;
      for (int d = 0; d < chunkDims; d += 4) {
        const float4 key = *reinterpret_cast<const float4*>(keyRow + d);
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
          const float4 query = *reinterpret_cast<const float4*>(queries + (warpRow + r) * PADDED_DIM + first + d);
          scores[r] = fmaf(query.x, key.x, scores[r]);
          scores[r] = fmaf(query.y, key.y, scores[r]);
          scores[r] = fmaf(query.z, key.z, scores[r]);
          scores[r] = fmaf(query.w, key.w, scores[r]);
        }
      }
    }

    // Only tiles on a causal diagonal or at the end of the range need per-row masks.
    const int key = tileBegin + lane;
    const bool open = tileBegin + kTileKeys <= keys.end && tileBegin + kTileKeys - 1 <= warpOpenKeys;
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      float score = scores[r];
      if (!open) {
        const int row = warpFirstRow + r;
        const int last = row < args.rowsPerHead ? lastKey(args, span.tokens, row) : -1;
        if (key >= keys.end || key > last) score = -INFINITY;
      }
      const float newMax = fmaxf(runMax[r], warpMax(score));
      const float alpha = exp2f(runMax[r] - newMax);
      const float probability = exp2f(score - newMax);
      runMax[r] = newMax;
      laneSum[r] = laneSum[r] * alpha + probability;
#pragma unroll
      for (int i = 0; i < OUTPUTS; ++i) acc[r][i] *= alpha;
      probabilities[(warpRow + r) * kTileKeys + lane] = probability;
    }

#pragma unroll
    for (int chunk = 0; chunk < Tiling::kChunks; ++chunk) {
      const int first = chunk * CHUNK;
      if (first >= dim) break;
      __syncthreads();  // K chunk consumed; probabilities written
      stageTile<T, CHUNK>(tile, args.valuePages, span, args, tileBegin, keys.end, first);
      __syncthreads();
      for (int j = 0; j < kTileKeys; j += 4) {
        float value[4][CHUNK / 32];
#pragma unroll
        for (int k = 0; k < 4; ++k)
#pragma unroll
          for (int c = 0; c < CHUNK / 32; ++c) value[k][c] = tile[(j + k) * STRIDE + c * 32 + lane];
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
          const float4 p = *reinterpret_cast<const float4*>(probabilities + (warpRow + r) * kTileKeys + j);
#pragma unroll
          for (int c = 0; c < CHUNK / 32; ++c) {
            float& out = acc[r][chunk * (CHUNK / 32) + c];
            out = fmaf(p.x, value[0][c], out);
            out = fmaf(p.y, value[1][c], out);
            out = fmaf(p.z, value[2][c], out);
            out = fmaf(p.w, value[3][c], out);
          }
        }
      }
    }
  }

  // Output i of a lane is dimension i * 32 + lane.
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const float total = warpSum(laneSum[r]);
    const int row = firstRow + warpRow + r;
    if (row >= args.rowsPerHead) continue;
    if (args.splits == 1) {
      const float inverse = total > 0.0f ? 1.0f / total : 0.0f;
      const int query = queryIndex(args, head, row);
      float* out = args.out + static_cast<size_t>(query) * dim;
#pragma unroll
      for (int i = 0; i < OUTPUTS; ++i)
        if (i * 32 + lane < dim) out[i * 32 + lane] = acc[r][i] * inverse;
      if (lane == 0 && args.lse != nullptr) args.lse[query] = rowLse(runMax[r], total);
    } else {
      const size_t partial = (static_cast<size_t>(head) * args.rowsPerHead + row) * args.splits + split;
#pragma unroll
      for (int i = 0; i < OUTPUTS; ++i)
        if (i * 32 + lane < dim) args.partialAcc[partial * dim + i * 32 + lane] = acc[r][i];
      if (lane == 0) {
        args.partialMax[partial] = runMax[r];
        args.partialSum[partial] = total;
      }
    }
  }
}

template <DType T, int PADDED_DIM>
cudaError_t launchPrefillKernel(const AttentionKernelArgs& args, cudaStream_t stream) {
  const int rowTiles = (args.rowsPerHead + PrefillTiling<PADDED_DIM>::kRows - 1) / PrefillTiling<PADDED_DIM>::kRows;
  const dim3 grid(rowTiles, args.kvHeads, args.splits);
  return launchWithShared<attentionPrefillKernel<T, PADDED_DIM>>(grid, kPrefillThreads, PrefillTiling<PADDED_DIM>::kSharedBytes,
                                                                 stream, args);
}

template <DType T>
cudaError_t launchPrefillShape(const AttentionKernelArgs& args, cudaStream_t stream) {
  if (args.headDim <= 64) return launchPrefillKernel<T, 64>(args, stream);
  if (args.headDim <= 128) return launchPrefillKernel<T, 128>(args, stream);
  if (args.headDim <= 256) return launchPrefillKernel<T, 256>(args, stream);
  if (args.headDim <= 512) return launchPrefillKernel<T, 512>(args, stream);
  return launchPrefillKernel<T, 1024>(args, stream);
}

}  // namespace

// Must match the PADDED_DIM launchPrefillShape picks.
int prefillRowsPerBlock(int headDim) {
  if (headDim <= 64) return PrefillTiling<64>::kRows;
  if (headDim <= 128) return PrefillTiling<128>::kRows;
  if (headDim <= 256) return PrefillTiling<256>::kRows;
  if (headDim <= 512) return PrefillTiling<512>::kRows;
  return PrefillTiling<1024>::kRows;
}

SplitPlan planAttentionPrefill(const AttentionKernelArgs& args, int multiprocessors) {
  const int rows = prefillRowsPerBlock(args.headDim);
  const long long rowTiles = (args.rowsPerHead + rows - 1) / rows;
  return planKeySplits(args.maxTokens, rowTiles * args.kvHeads, multiprocessors, kMinSplitTokens, kTileKeys);
}

cudaError_t launchAttentionPrefill(const AttentionKernelArgs& args, cudaStream_t stream) {
  // The tensor-core kernel (attention_prefill_tf32.cu) only when asked: no GPU has run it yet.
  static const bool tf32 = environmentInteger("KVSLIM_CUDA_TF32_PREFILL", 0, 0) == 1;
  if (tf32 && attentionPrefillTf32Fits(args)) return launchAttentionPrefillTf32(args, stream);
  switch (args.kvType) {
    case DType::F16: return launchPrefillShape<DType::F16>(args, stream);
    case DType::BF16: return launchPrefillShape<DType::BF16>(args, stream);
    default: return launchPrefillShape<DType::F32>(args, stream);
  }
}

}  // namespace kvslim::cuda
