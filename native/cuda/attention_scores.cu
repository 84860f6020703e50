// Raw attention scores of one kv head (selection policies: SnapKV votes, H2O heavy hitters):
// out[r * tokens + t] = scale * dot(q[r], key t), no mask and no softmax.
//
// Block = (range of kScoresBlockTokens keys, tile of query rows). The block's queries stay in
// shared memory; keys pass through a shared tile of 32 tokens, widened to f32, 64 dimensions at a
// time (as in prefill). Each warp owns ROWS rows and each lane one key of the tile, so a warp
// writes 32 consecutive scores of a row (coalesced) and query reads are broadcasts.
#include "attention_device.cuh"

namespace kvslim::cuda {

namespace {

constexpr int kScoresWarps = 4;
constexpr int kScoresThreads = 32 * kScoresWarps;
constexpr int kTileKeys = 32;                              // one key per lane
constexpr int kScoresBlockTokens = 4 * kTileKeys;          // keys one block walks, tile after tile
constexpr int kChunk = 64;                                 // dimensions of a staged key tile
constexpr int kTileStride = kChunk + 4;                    // padding: float4 reads of 8 lanes hit distinct banks

// Rows per warp by head size rounded up to PADDED_DIM: the block's queries take at most 32 KiB
// of shared memory, the key tile 8.5 KiB more (static shared memory, below 48 KiB).
template <int PADDED_DIM>
struct ScoresTiling {
  static constexpr int kRowsPerWarp = PADDED_DIM <= 256 ? 8 : 2048 / PADDED_DIM;
  static constexpr int kRows = kScoresWarps * kRowsPerWarp;
  static_assert(sizeof(float) * (kRows * PADDED_DIM + kTileKeys * kTileStride) <= 48 * 1024, "static shared memory limit");
};

template <DType T>
__device__ __forceinline__ void stageKeys(float* tile, const ScoresKernelArgs& args, int firstKey, int keyEnd, int first) {
  stageRows<T, kTileKeys, kChunk, kScoresThreads>(tile, args.keyPages, args.head, args, firstKey, keyEnd, first);
}

template <DType T, int PADDED_DIM>
__global__ void __launch_bounds__(kScoresThreads) attentionScoresKernel(const ScoresKernelArgs args) {
  using Tiling = ScoresTiling<PADDED_DIM>;
  constexpr int ROWS = Tiling::kRowsPerWarp;
  __shared__ __align__(16) float queries[Tiling::kRows * PADDED_DIM];  // unscaled, zero-padded
  __shared__ __align__(16) float tile[kTileKeys * kTileStride];

  const int tokens = args.head.tokens;
  const int firstKey = blockIdx.x * kScoresBlockTokens;  // below tokens <= 2^30: no overflow
  const int keyEnd = min(tokens, firstKey + kScoresBlockTokens);
  const int firstRow = blockIdx.y * Tiling::kRows;
  const int blockRows = min(Tiling::kRows, args.rows - firstRow);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int dim = args.headDim;

  for (int i = threadIdx.x; i < Tiling::kRows * PADDED_DIM; i += kScoresThreads) {
    const int r = i / PADDED_DIM;
    const int d = i - r * PADDED_DIM;
    queries[i] = r < blockRows && d < dim ? args.q[static_cast<size_t>(firstRow + r) * dim + d] : 0.0f;
  }

  const int warpRow = warp * ROWS;  // first row of this warp inside the block
  // A warp whose rows all lie past the last row only helps staging (warp-uniform branch).
  const bool active = warpRow < blockRows;
  // Dot products run over dimensions rounded up to 4 (float4 reads); the padding holds zeros.
  const int paddedDim = (dim + 3) / 4 * 4;

  for (int tileBegin = firstKey; tileBegin < keyEnd; tileBegin += kTileKeys) {
    float scores[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) scores[r] = 0.0f;
    for (int first = 0; first < dim; first += kChunk) {
      __syncthreads();  // queries staged; everyone is done with the previous key chunk
      stageKeys<T>(tile, args, tileBegin, keyEnd, first);
      __syncthreads();
      if (active) {
        const int chunkDims = min(kChunk, paddedDim - first);
        const float* keyRow = tile + lane * kTileStride;
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
    }
    const int key = tileBegin + lane;
    if (active && key < keyEnd) {
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        const int row = firstRow + warpRow + r;
        if (warpRow + r < blockRows) args.out[static_cast<size_t>(row) * tokens + key] = args.scale * scores[r];
      }
    }
  }
}

template <DType T, int PADDED_DIM>
cudaError_t launchScoresKernel(const ScoresKernelArgs& args, cudaStream_t stream) {
  const int rowTiles = (args.rows + ScoresTiling<PADDED_DIM>::kRows - 1) / ScoresTiling<PADDED_DIM>::kRows;
  const int keyBlocks = (args.head.tokens + kScoresBlockTokens - 1) / kScoresBlockTokens;
  if (rowTiles < 1 || rowTiles > 65535 || keyBlocks < 1) return cudaErrorInvalidValue;  // the backend checked
  const dim3 grid(keyBlocks, rowTiles);
  attentionScoresKernel<T, PADDED_DIM><<<grid, kScoresThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

template <DType T>
cudaError_t launchScoresShape(const ScoresKernelArgs& args, cudaStream_t stream) {
  if (args.headDim <= 64) return launchScoresKernel<T, 64>(args, stream);
  if (args.headDim <= 128) return launchScoresKernel<T, 128>(args, stream);
  if (args.headDim <= 256) return launchScoresKernel<T, 256>(args, stream);
  if (args.headDim <= 512) return launchScoresKernel<T, 512>(args, stream);
  return launchScoresKernel<T, 1024>(args, stream);
}

}  // namespace

int scoresRowsPerBlock(int headDim) {
  if (headDim <= 64) return ScoresTiling<64>::kRows;
  if (headDim <= 128) return ScoresTiling<128>::kRows;
  if (headDim <= 256) return ScoresTiling<256>::kRows;
  if (headDim <= 512) return ScoresTiling<512>::kRows;
  return ScoresTiling<1024>::kRows;
}

cudaError_t launchAttentionScores(const ScoresKernelArgs& args, cudaStream_t stream) {
  switch (args.kvType) {
    case DType::F16: return launchScoresShape<DType::F16>(args, stream);
    case DType::BF16: return launchScoresShape<DType::BF16>(args, stream);
    default: return launchScoresShape<DType::F32>(args, stream);
  }
}

}  // namespace kvslim::cuda
