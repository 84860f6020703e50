// H2O's attention mass from an attention call's own log-sum-exp (AttentionArgs::mass on CUDA):
// mass[h, t] = sum over head h's query rows of 2^(q.k_t - lse[row]), the probability the call's
// softmax gave token t. A second pass over q.k, but no score matrix: each block owns 64 keys of one
// kv head, stages them 64 dimensions at a time as the prefill stages its tiles, and streams the
// query rows that see them in tiles of 4 warps x ROWS rows. A lane scores its two keys against its
// warp's rows and adds each probability to a double; the four warps' sums are added in warp order,
// so every column sums in an order that depends on the shape alone, without atomics.
#include "../core/environment.h"
#include "attention_device.cuh"

namespace kvslim::cuda {

namespace {

constexpr int kMassWarps = 4;
constexpr int kMassThreads = 32 * kMassWarps;
constexpr int kKeysPerLane = 2;
constexpr int kMassKeys = 32 * kKeysPerLane;  // keys one block owns
constexpr int kChunk = 64;                    // dimensions of a staged key tile
constexpr int kTileStride = kChunk + 4;

// Rows per warp by head size rounded up to PADDED_DIM, as the scores kernel: a row tile's queries
// take at most 32 KiB of shared memory, the key tile 17 KiB more (dynamic, opted in above 48 KiB).
template <int PADDED_DIM>
struct MassTiling {
  static constexpr int kRowsPerWarp = PADDED_DIM <= 256 ? 8 : 2048 / PADDED_DIM;
  static constexpr int kRows = kMassWarps * kRowsPerWarp;
  static constexpr size_t kSharedBytes = sizeof(float) * (size_t(kRows) * PADDED_DIM + size_t(kMassKeys) * kTileStride);
  // The warps' final sums reuse the query tile.
  static_assert(sizeof(float) * kRows * PADDED_DIM >= sizeof(double) * kMassWarps * kMassKeys, "room for the warp sums");
};

template <DType T, int PADDED_DIM>
__global__ void __launch_bounds__(kMassThreads) lseMassKernel(const AttentionKernelArgs args, double* mass, long long massStride) {
  using Tiling = MassTiling<PADDED_DIM>;
  constexpr int ROWS = Tiling::kRowsPerWarp;
  extern __shared__ float4 sharedMemory[];
  float* queries = reinterpret_cast<float*>(sharedMemory);  // [kRows][PADDED_DIM], scaled, zero-padded
  float* tile = queries + Tiling::kRows * PADDED_DIM;        // [kMassKeys][kTileStride]

  const int head = blockIdx.y;
  const HeadSpan span = args.heads[head];
  const int firstKey = blockIdx.x * kMassKeys;  // below massStride <= 2^31
  const int keyEnd = min(span.tokens, firstKey + kMassKeys);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int warpRow = warp * ROWS;
  const int dim = args.headDim;
  const int paddedDim = (dim + 3) / 4 * 4;  // float4 reads; the padding holds zeros
  double total[kKeysPerLane] = {};

  if (firstKey < keyEnd) {  // block-uniform
    // Rows are ordered by position: the first that sees firstKey, and every later one, may.
    const long long openedAt = args.causal ? static_cast<long long>(firstKey) - (span.tokens - args.n) : 0;
    const int startRow = openedAt > 0 ? static_cast<int>(min(openedAt * args.group, static_cast<long long>(args.rowsPerHead))) : 0;
    for (int rowBase = startRow; rowBase < args.rowsPerHead; rowBase += Tiling::kRows) {
      const int blockRows = min(Tiling::kRows, args.rowsPerHead - rowBase);
      __syncthreads();  // everyone is done with the previous row tile
      for (int i = threadIdx.x; i < Tiling::kRows * PADDED_DIM; i += kMassThreads) {
        const int r = i / PADDED_DIM;
        const int d = i - r * PADDED_DIM;
        queries[i] = r < blockRows && d < dim
                         ? args.q[static_cast<size_t>(queryIndex(args, head, rowBase + r)) * dim + d] * args.scaleLog2e
                         : 0.0f;
      }
      const bool active = warpRow < blockRows;  // warp-uniform; an idle warp still stages
      float scores[ROWS][kKeysPerLane];
#pragma unroll
      for (int r = 0; r < ROWS; ++r)
#pragma unroll
        for (int k = 0; k < kKeysPerLane; ++k) scores[r][k] = 0.0f;
      for (int first = 0; first < dim; first += kChunk) {
        __syncthreads();  // queries staged; everyone is done with the previous key chunk
        stageRows<T, kMassKeys, kChunk, kMassThreads>(tile, args.keyPages, span, args, firstKey, keyEnd, first);
        __syncthreads();
        if (active) {
          const int chunkDims = min(kChunk, paddedDim - first);
          for (int d = 0; d < chunkDims; d += 4) {
            float4 key[kKeysPerLane];
#pragma unroll
            for (int k = 0; k < kKeysPerLane; ++k) key[k] = *reinterpret_cast<const float4*>(tile + (lane + 32 * k) * kTileStride + d);
#pragma unroll
            for (int r = 0; r < ROWS; ++r) {
              const float4 query = *reinterpret_cast<const float4*>(queries + (warpRow + r) * PADDED_DIM + first + d);
#pragma unroll
              for (int k = 0; k < kKeysPerLane; ++k) {
                scores[r][k] = fmaf(query.x, key[k].x, scores[r][k]);
                scores[r][k] = fmaf(query.y, key[k].y, scores[r][k]);
                scores[r][k] = fmaf(query.z, key[k].z, scores[r][k]);
                scores[r][k] = fmaf(query.w, key[k].w, scores[r][k]);
              }
            }
          }
        }
      }
      if (active) {
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
          if (warpRow + r >= blockRows) continue;
          const int row = rowBase + warpRow + r;
          const int last = lastKey(args, span.tokens, row);
          const float lse = args.lse[queryIndex(args, head, row)];
#pragma unroll
          for (int k = 0; k < kKeysPerLane; ++k) {
            const int key = firstKey + lane + 32 * k;
            // A row that sees no key (lse -inf) sees none of these either.
            if (key < keyEnd && key <= last) total[k] += static_cast<double>(exp2f(scores[r][k] - lse));
          }
        }
      }
    }
  }

  __syncthreads();  // the query tile is free
  double* sums = reinterpret_cast<double*>(sharedMemory);  // [kMassWarps][kMassKeys]
#pragma unroll
  for (int k = 0; k < kKeysPerLane; ++k) sums[warp * kMassKeys + lane + 32 * k] = total[k];
  __syncthreads();
  const long long column = static_cast<long long>(firstKey) + threadIdx.x;
  if (threadIdx.x < kMassKeys && column < massStride) {
    double sum = sums[threadIdx.x];
#pragma unroll
    for (int w = 1; w < kMassWarps; ++w) sum += sums[w * kMassKeys + threadIdx.x];
    mass[static_cast<size_t>(head) * static_cast<size_t>(massStride) + static_cast<size_t>(column)] = sum;
  }
}

template <DType T, int PADDED_DIM>
cudaError_t launchMassKernel(const AttentionKernelArgs& args, double* mass, long long massStride, cudaStream_t stream) {
  dim3 grid;
  if (!massGrid(massStride, kMassKeys, args.kvHeads, &grid)) return cudaErrorInvalidValue;
  return launchWithShared<lseMassKernel<T, PADDED_DIM>>(grid, kMassThreads, MassTiling<PADDED_DIM>::kSharedBytes, stream, args,
                                                        mass, massStride);
}

template <DType T>
cudaError_t launchMassShape(const AttentionKernelArgs& args, double* mass, long long massStride, cudaStream_t stream) {
  if (args.headDim <= 64) return launchMassKernel<T, 64>(args, mass, massStride, stream);
  if (args.headDim <= 128) return launchMassKernel<T, 128>(args, mass, massStride, stream);
  if (args.headDim <= 256) return launchMassKernel<T, 256>(args, mass, massStride, stream);
  if (args.headDim <= 512) return launchMassKernel<T, 512>(args, mass, massStride, stream);
  return launchMassKernel<T, 1024>(args, mass, massStride, stream);
}

}  // namespace

cudaError_t launchLseMass(const AttentionKernelArgs& args, double* mass, long long massStride, cudaStream_t stream) {
  if (massStride <= 0) return cudaSuccess;  // no token: no column
  // The tensor-core kernel (lse_mass_tf32.cu) only when asked: no GPU has run it yet.
  static const bool tf32 = environmentInteger("KVSLIM_CUDA_TF32_MASS", 0, 0) == 1;
  if (tf32 && lseMassTf32Fits(args)) return launchLseMassTf32(args, mass, massStride, stream);
  switch (args.kvType) {
    case DType::F16: return launchMassShape<DType::F16>(args, mass, massStride, stream);
    case DType::BF16: return launchMassShape<DType::BF16>(args, mass, massStride, stream);
    default: return launchMassShape<DType::F32>(args, mass, massStride, stream);
  }
}

}  // namespace kvslim::cuda
