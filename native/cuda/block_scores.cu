// ActQKV's block scores and top blocks on the GPU (core/block_scores_args.h), so a GPU cache keeps
// its final block representatives in device memory and only u, each head's newest representative,
// kvHeads entropies and k block indices per head cross the bus.
// - Scores: one thread per (kv head, block) runs the contract's dot: eight partials fused in order
//   of t (fma, no other contraction), the fixed tree, an IEEE division; the same bits as the CPU.
// - Entropies: one block per kv head reduces max, sum of exp, sum of p ln p in double: in another
//   order than the CPU's, and with CUDA's exp and log, so they may differ from the CPU's in the last
//   bits (the block count k that the policy derives from them could then, rarely, differ by one).
// - Top blocks: one block per kv head finds the k-th best score by an 8-bit radix select over
//   order-preserving 64-bit keys, then takes, in block order, every block above it and the first
//   of those equal to it (ties to the lower block): the output comes out ascending, as the CPU's.
#include <cuda_runtime.h>

#include <algorithm>

#include "attention_device.cuh"
#include "block_scores.cuh"

namespace kvslim::cuda {

namespace {

constexpr int kScoreThreads = 128;
constexpr int kReduceThreads = 256;
constexpr int kSelectThreads = 1024;
constexpr long long kMaxGridX = 1 << 20;  // grid-stride beyond this many blocks per head

// u of the head (blockIdx.y) in shared memory; each thread scores its blocks. Final
// representatives are read in their dtype T (widened exactly), the newest one as f32.
template <DType T>
__global__ void __launch_bounds__(kScoreThreads) blockScoresKernel(const BlockScoresKernelArgs args) {
  extern __shared__ double u[];
  const int h = blockIdx.y;
  for (int t = threadIdx.x; t < args.headDim; t += blockDim.x) u[t] = args.u[static_cast<size_t>(h) * args.headDim + t];
  __syncthreads();
  const BlockHeadSpan head = args.heads[h];
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  for (long long b = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; b < args.blocks; b += stride) {
    const bool newest = b == args.blocks - 1;
    const float* newestRow = args.newest + static_cast<size_t>(h) * static_cast<size_t>(args.headDim);
    const unsigned char* row = static_cast<const unsigned char*>(head.reprs) +
                               static_cast<size_t>(newest ? 0 : b) * static_cast<size_t>(args.headDim) * (T == DType::F32 ? 4 : 2);
    auto element = [&](int t) -> double {
      return static_cast<double>(newest ? newestRow[t] : loadElement<T>(row, t));
    };
    double part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int t = 0;
    if (args.vectorRows && !newest) {
      // Eight elements per 16- or 32-byte load (one row per thread: scalar loads would touch each
      // L1 sector eight or sixteen times); the same partials in the same order.
      for (; t + 8 <= args.headDim; t += 8) {
        float x[8];
        if constexpr (T == DType::F32) {
          const float4 a = __ldg(reinterpret_cast<const float4*>(row) + t / 4);
          const float4 c = __ldg(reinterpret_cast<const float4*>(row) + t / 4 + 1);
          x[0] = a.x; x[1] = a.y; x[2] = a.z; x[3] = a.w; x[4] = c.x; x[5] = c.y; x[6] = c.z; x[7] = c.w;
        } else {
          const uint4 w = __ldg(reinterpret_cast<const uint4*>(row) + t / 8);
          const unsigned words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            const unsigned low = words[k] & 0xffffu, high = words[k] >> 16;
            x[2 * k] = T == DType::BF16 ? bf16BitsToFloat(low) : f16BitsToFloat(low);
            x[2 * k + 1] = T == DType::BF16 ? bf16BitsToFloat(high) : f16BitsToFloat(high);
          }
        }
#pragma unroll
        for (int k = 0; k < 8; ++k) part[k] = fma(static_cast<double>(x[k]), u[t + k], part[k]);
      }
    }
    for (; t + 8 <= args.headDim; t += 8) {
#pragma unroll
      for (int k = 0; k < 8; ++k) part[k] = fma(element(t + k), u[t + k], part[k]);
    }
    // The tail: element t + k goes to partial k (t is a multiple of 8); unrolled so part[] stays
    // in registers.
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      if (t + k < args.headDim) part[k] = fma(element(t + k), u[t + k], part[k]);
    }
    // __dadd_rn: the tree exactly as written (never contracted or reassociated).
    const double dot = __dadd_rn(__dadd_rn(__dadd_rn(part[0], part[1]), __dadd_rn(part[2], part[3])),
                                 __dadd_rn(__dadd_rn(part[4], part[5]), __dadd_rn(part[6], part[7])));
    const double norm = newest ? head.newestNorm : head.norms[b];
    args.scores[static_cast<size_t>(h) * static_cast<size_t>(args.blocks) + static_cast<size_t>(b)] = norm > 0 ? __ddiv_rn(dot, norm) : 0.0;
  }
}

// Block-wide reductions in double (every thread gets the result).
__device__ double blockMax(double x, double* shared) {
  for (int offset = 16; offset > 0; offset /= 2) x = fmax(x, __shfl_xor_sync(0xffffffffu, x, offset));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  __syncthreads();
  if (lane == 0) shared[warp] = x;
  __syncthreads();
  double result = shared[0];
  for (int w = 1; w < warps; ++w) result = fmax(result, shared[w]);
  return result;
}

__device__ double blockSum(double x, double* shared) {
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  __syncthreads();
  if (lane == 0) shared[warp] = x;
  __syncthreads();
  double result = 0;
  for (int w = 0; w < warps; ++w) result += shared[w];
  return result;
}

__global__ void __launch_bounds__(kReduceThreads) entropyKernel(const BlockScoresKernelArgs args) {
  __shared__ double shared[kReduceThreads / 32];
  const int h = blockIdx.x;
  const double* s = args.scores + static_cast<size_t>(h) * static_cast<size_t>(args.blocks);
  if (args.blocks <= 1) {
    if (threadIdx.x == 0) args.entropies[h] = 1.0;
    return;
  }
  double high = -INFINITY;
  for (long long b = threadIdx.x; b < args.blocks; b += blockDim.x) high = fmax(high, s[b]);
  const double max = blockMax(high, shared);
  double z = 0;
  for (long long b = threadIdx.x; b < args.blocks; b += blockDim.x) z += exp((s[b] - max) / args.temperature);
  z = blockSum(z, shared);
  double entropy = 0;
  for (long long b = threadIdx.x; b < args.blocks; b += blockDim.x) {
    const double p = exp((s[b] - max) / args.temperature) / z;
    if (p > 0) entropy -= p * log(p);
  }
  entropy = blockSum(entropy, shared);
  if (threadIdx.x == 0) args.entropies[h] = entropy / log(static_cast<double>(args.blocks));
}

// Ascending in the score; -0.0 counts as +0.0 (the CPU's comparison sees them equal), and a NaN
// ranks below everything, -inf included (Quest's bounds, the flat scan and SnapKV's votes rank a
// NaN last).
__device__ __forceinline__ unsigned long long orderKey(double s) {
  if (isnan(s)) return 0;  // -inf's key is 0x000f...f
  const unsigned long long bits = static_cast<unsigned long long>(__double_as_longlong(s == 0 ? 0.0 : s));
  return (bits >> 63) != 0 ? ~bits : bits | 0x8000000000000000ull;
}

// Exclusive prefix sum of x over the block (blockDim.x a multiple of 32); *total gets the sum.
__device__ int blockExclusiveScan(int x, int* total, int* warpSums) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  int inclusive = x;
  for (int offset = 1; offset < 32; offset *= 2) {
    const int y = __shfl_up_sync(0xffffffffu, inclusive, offset);
    if (lane >= offset) inclusive += y;
  }
  __syncthreads();  // warpSums of a previous call are no longer read
  if (lane == 31) warpSums[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    int v = lane < warps ? warpSums[lane] : 0;
    for (int offset = 1; offset < 32; offset *= 2) {
      const int y = __shfl_up_sync(0xffffffffu, v, offset);
      if (lane >= offset) v += y;
    }
    if (lane < warps) warpSums[lane] = v;
  }
  __syncthreads();
  *total = warpSums[warps - 1];
  return (warp > 0 ? warpSums[warp - 1] : 0) + inclusive - x;
}

struct TopBlocksKernelArgs {
  const double* scores = nullptr;  // [kvHeads, blocks], device
  long long* out = nullptr;        // [kvHeads, k], device
  long long blocks = 0;
  long long k = 0;
};

__global__ void __launch_bounds__(kSelectThreads) topBlocksKernel(const TopBlocksKernelArgs args) {
  __shared__ unsigned int histogram[256];
  __shared__ unsigned long long prefix, mask;
  __shared__ long long wanted;
  __shared__ int warpSums[kSelectThreads / 32];
  const int h = blockIdx.x;
  const double* s = args.scores + static_cast<size_t>(h) * static_cast<size_t>(args.blocks);
  if (threadIdx.x == 0) {
    prefix = 0;
    mask = 0;
    wanted = args.k;  // rank (from the top) of the threshold among the keys matching prefix
  }
  // The k-th largest key, 8 bits at a time from the top.
  for (int shift = 56; shift >= 0; shift -= 8) {
    for (int d = threadIdx.x; d < 256; d += blockDim.x) histogram[d] = 0;
    __syncthreads();
    const unsigned long long p = prefix, m = mask;
    // Whole warps per round, so the lanes of a warp that share a digit add once together: the
    // top digits (sign, exponent) are nearly all equal, and one shared counter per add would
    // serialise them.
    for (long long first = 0; first < args.blocks; first += blockDim.x) {
      const long long b = first + threadIdx.x;
      unsigned digit = 256;  // no digit: outside the array or the prefix
      if (b < args.blocks) {
        const unsigned long long key = orderKey(s[b]);
        if ((key & m) == p) digit = static_cast<unsigned>((key >> shift) & 255u);
      }
      const unsigned peers = __match_any_sync(0xffffffffu, digit);
      if (digit < 256 && (threadIdx.x % 32) == static_cast<unsigned>(__ffs(peers) - 1)) atomicAdd(&histogram[digit], __popc(peers));
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      long long above = 0;
      for (int d = 255; d >= 0; --d) {
        if (above + histogram[d] >= wanted) {
          wanted -= above;
          prefix |= static_cast<unsigned long long>(d) << shift;
          mask |= 255ull << shift;
          break;
        }
        above += histogram[d];
      }
    }
    __syncthreads();
  }
  // prefix is the threshold key; `wanted` of the blocks equal to it are taken, the lowest first.
  const unsigned long long threshold = prefix;
  const long long equalTaken = wanted;
  long long equalBefore = 0, takenBefore = 0;
  long long* out = args.out + static_cast<size_t>(h) * static_cast<size_t>(args.k);
  for (long long first = 0; first < args.blocks; first += blockDim.x) {
    const long long b = first + threadIdx.x;
    const unsigned long long key = b < args.blocks ? orderKey(s[b]) : 0;
    const bool equal = b < args.blocks && key == threshold;
    int equalCount = 0, takenCount = 0;
    const long long equalRank = equalBefore + blockExclusiveScan(equal ? 1 : 0, &equalCount, warpSums);
    const bool take = b < args.blocks && (key > threshold || (equal && equalRank < equalTaken));
    const long long at = takenBefore + blockExclusiveScan(take ? 1 : 0, &takenCount, warpSums);
    if (take) out[at] = b;
    equalBefore += equalCount;
    takenBefore += takenCount;
  }
}

unsigned gridFor(long long blocks) { return static_cast<unsigned>(std::max(1LL, std::min(blocks, kMaxGridX))); }

}  // namespace

cudaError_t launchBlockScores(const BlockScoresKernelArgs& args, cudaStream_t stream) {
  const dim3 grid(gridFor((args.blocks + kScoreThreads - 1) / kScoreThreads), static_cast<unsigned>(args.kvHeads));
  const size_t shared = static_cast<size_t>(args.headDim) * sizeof(double);
  switch (args.reprType) {
    case DType::F16: blockScoresKernel<DType::F16><<<grid, kScoreThreads, shared, stream>>>(args); break;
    case DType::BF16: blockScoresKernel<DType::BF16><<<grid, kScoreThreads, shared, stream>>>(args); break;
    default: blockScoresKernel<DType::F32><<<grid, kScoreThreads, shared, stream>>>(args); break;
  }
  entropyKernel<<<args.kvHeads, kReduceThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

cudaError_t launchTopBlocks(const TopBlocksArgs& args, long long* out, cudaStream_t stream) {
  TopBlocksKernelArgs kernel;
  kernel.scores = args.scores;
  kernel.out = out;
  kernel.blocks = args.blocks;
  kernel.k = args.k;
  topBlocksKernel<<<args.kvHeads, kSelectThreads, 0, stream>>>(kernel);
  return cudaGetLastError();
}

}  // namespace kvslim::cuda
