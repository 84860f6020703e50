// H2O's attention mass on the tensor cores (launchLseMassTf32): what lseMassKernel computes
// (lse_mass.cu), with the q.k products of m16n8k8 TF32 MMAs instead of FMAs. A block owns 64 keys
// of one kv head, staged once with every dimension; each of its four warps owns 16 of them (the
// MMA's rows) and keeps their fragments in registers, while the query rows that see the keys stream
// through shared memory 32 at a time (four 8-row MMA columns).
//
// Exact enough to choose the same tokens (tf32_mma.cuh): each scaled query is split into two TF32
// parts, q.k = hi.k + lo.k in two MMAs, f16/bf16 keys enter as they are (f32 keys, which would need
// a third MMA, stay on lse_mass.cu's kernel).
// Each probability goes into a double per (lane, key); the four lanes that hold a key's rows are
// added in lane order, so every column sums in an order fixed by the shape, without atomics.
#include "attention_device.cuh"
#include "tf32_mma.cuh"

namespace kvslim::cuda {

namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kKeys = 16 * kWarps;  // keys one block owns: one MMA row tile per warp
constexpr int kRowTiles = 4;        // 8-row MMA column tiles a warp runs per staged row tile
constexpr int kRows = 8 * kRowTiles;

// Shared memory: the block's keys (f32, which is TF32 for f16/bf16), the row tile's split queries,
// and the rows' lse and last visible key. A pitch of PADDED_DIM + 4 words puts the eight fragment
// rows a warp reads at once in distinct banks (4 x group + lane-in-group).
template <int PADDED_DIM>
struct Tf32Tiling {
  static constexpr int kPitch = PADDED_DIM + 4;
  static constexpr int kSteps = PADDED_DIM / 8;  // MMA k steps over a head
  static constexpr size_t kSharedBytes =
      sizeof(float) * (size_t(kKeys) * kPitch + 2 * size_t(kRows) * kPitch + size_t(kRows)) + sizeof(int) * kRows;
};

template <DType T, int PADDED_DIM>
__global__ void __launch_bounds__(kThreads) lseMassTf32Kernel(const AttentionKernelArgs args, double* mass, long long massStride) {
  using Tiling = Tf32Tiling<PADDED_DIM>;
  constexpr int kPitch = Tiling::kPitch;
  extern __shared__ float4 sharedMemory[];
  float* keys = reinterpret_cast<float*>(sharedMemory);                             // [kKeys][kPitch]
  unsigned* queryHigh = reinterpret_cast<unsigned*>(keys + kKeys * kPitch);         // [kRows][kPitch]
  unsigned* queryLow = queryHigh + kRows * kPitch;                                  // [kRows][kPitch]
  float* rowLse = reinterpret_cast<float*>(queryLow + kRows * kPitch);              // [kRows]
  int* rowLast = reinterpret_cast<int*>(rowLse + kRows);                            // [kRows]

  const int head = blockIdx.y;
  const HeadSpan span = args.heads[head];
  const int firstKey = blockIdx.x * kKeys;  // below massStride <= 2^31
  const int keyEnd = min(span.tokens, firstKey + kKeys);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int dim = args.headDim;
  // This lane's probabilities of keys warpKey + g and warpKey + g + 8, over its rows.
  const int warpKey = warp * 16;
  double total[2] = {0.0, 0.0};

  if (firstKey < keyEnd) {  // block-uniform
    stageRows<T, kKeys, PADDED_DIM, kThreads>(keys, args.keyPages, span, args, firstKey, keyEnd, 0);
    __syncthreads();
    unsigned keyFragments[Tiling::kSteps][4];
#pragma unroll
    for (int s = 0; s < Tiling::kSteps; ++s) {
      const float* near = keys + (warpKey + g) * kPitch + 8 * s + t;
      const float* far = near + 8 * kPitch;
      keyFragments[s][0] = __float_as_uint(near[0]);
      keyFragments[s][1] = __float_as_uint(far[0]);
      keyFragments[s][2] = __float_as_uint(near[4]);
      keyFragments[s][3] = __float_as_uint(far[4]);
    }
    // Rows are ordered by position: the first that sees firstKey, and every later one, may.
    const long long openedAt = args.causal ? static_cast<long long>(firstKey) - (span.tokens - args.n) : 0;
    const int startRow = openedAt > 0 ? static_cast<int>(min(openedAt * args.group, static_cast<long long>(args.rowsPerHead))) : 0;
    for (int rowBase = startRow; rowBase < args.rowsPerHead; rowBase += kRows) {
      const int blockRows = min(kRows, args.rowsPerHead - rowBase);
      __syncthreads();  // everyone is done with the previous row tile
      for (int i = threadIdx.x; i < kRows * PADDED_DIM; i += kThreads) {
        const int r = i / PADDED_DIM;
        const int d = i - r * PADDED_DIM;
        const float q = r < blockRows && d < dim
                            ? args.q[static_cast<size_t>(queryIndex(args, head, rowBase + r)) * dim + d] * args.scaleLog2e
                            : 0.0f;
        const Tf32Pair split = splitTf32(q);
        queryHigh[r * kPitch + d] = split.hi;
        queryLow[r * kPitch + d] = split.lo;
      }
      if (threadIdx.x < kRows) {
        const int r = threadIdx.x;
        // A row past the tile sees no key; so does one whose lse is -inf.
        rowLast[r] = r < blockRows ? lastKey(args, span.tokens, rowBase + r) : -1;
        rowLse[r] = r < blockRows ? args.lse[queryIndex(args, head, rowBase + r)] : 0.0f;
      }
      __syncthreads();
      float scores[kRowTiles][4];
#pragma unroll
      for (int c = 0; c < kRowTiles; ++c) {
#pragma unroll
        for (int i = 0; i < 4; ++i) scores[c][i] = 0.0f;
      }
#pragma unroll
      for (int s = 0; s < Tiling::kSteps; ++s) {
#pragma unroll
        for (int c = 0; c < kRowTiles; ++c) {
          const int at = (8 * c + g) * kPitch + 8 * s + t;
          mmaTf32(scores[c], keyFragments[s], queryHigh[at], queryHigh[at + 4]);
          mmaTf32(scores[c], keyFragments[s], queryLow[at], queryLow[at + 4]);
        }
      }
#pragma unroll
      for (int c = 0; c < kRowTiles; ++c) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int r = 8 * c + 2 * t + (i & 1);
          const int key = firstKey + warpKey + g + 8 * (i >> 1);
          if (key < keyEnd && key <= rowLast[r]) total[i >> 1] += static_cast<double>(exp2f(scores[c][i] - rowLse[r]));
        }
      }
    }
  }

  // The four lanes of a key's group, added in lane order (xor 1, then xor 2: the same tree for every key).
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    total[half] += __shfl_xor_sync(0xffffffffu, total[half], 1);
    total[half] += __shfl_xor_sync(0xffffffffu, total[half], 2);
  }
  if (t == 0) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const long long column = static_cast<long long>(firstKey) + warpKey + g + 8 * half;
      if (column < massStride) mass[static_cast<size_t>(head) * static_cast<size_t>(massStride) + static_cast<size_t>(column)] = total[half];
    }
  }
}

template <DType T, int PADDED_DIM>
cudaError_t launchTf32Kernel(const AttentionKernelArgs& args, double* mass, long long massStride, cudaStream_t stream) {
  dim3 grid;
  if (!massGrid(massStride, kKeys, args.kvHeads, &grid)) return cudaErrorInvalidValue;
  return launchWithShared<lseMassTf32Kernel<T, PADDED_DIM>>(grid, kThreads, Tf32Tiling<PADDED_DIM>::kSharedBytes, stream, args,
                                                            mass, massStride);
}

template <DType T>
cudaError_t launchTf32Shape(const AttentionKernelArgs& args, double* mass, long long massStride, cudaStream_t stream) {
  if (args.headDim <= 64) return launchTf32Kernel<T, 64>(args, mass, massStride, stream);
  return launchTf32Kernel<T, 128>(args, mass, massStride, stream);
}

}  // namespace

bool lseMassTf32Fits(const AttentionKernelArgs& args) {
  static const bool present = tensorCoresPresent(Tf32Tiling<128>::kSharedBytes);
  return (args.kvType == DType::F16 || args.kvType == DType::BF16) && args.headDim <= 128 && present;
}

cudaError_t launchLseMassTf32(const AttentionKernelArgs& args, double* mass, long long massStride, cudaStream_t stream) {
  if (massStride <= 0) return cudaSuccess;  // no token: no column
  if (!lseMassTf32Fits(args)) return cudaErrorInvalidValue;
  return args.kvType == DType::F16 ? launchTf32Shape<DType::F16>(args, mass, massStride, stream)
                                   : launchTf32Shape<DType::BF16>(args, mass, massStride, stream);
}

}  // namespace kvslim::cuda
