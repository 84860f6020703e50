// Quest's page boxes and page bounds on the GPU (PageBoxesArgs, TopPagesArgs in
// core/attention_args.h), so a GPU cache never copies keys or bounds to the host for Quest (the
// top pages are block_scores.cu's top-k over the bounds).
// - Boxes: one thread per (Quest page, channel) folds the page's new keys, read from the store's
//   pages in their dtype, into the channel's minimum and maximum with PageBoxes' rule
//   (lo = key < lo ? key : lo, hi = hi < key ? key : hi), so the boxes have the CPU's bits.
//   Neighbouring threads read neighbouring channels of one key row (coalesced). A page's keys are
//   folded in order by one thread: long Quest pages (thousands of tokens) box slowly, but boxing
//   runs once per token.
// - Bounds: grid (page groups, kv heads), one warp per page, lanes over channels; the block stages
//   its head's query rows in shared memory tile by tile. The channel sum is a warp reduction, so
//   bounds differ from the CPU's SIMD sums in the last bits (a near tie between pages may rank
//   differently).
#include <algorithm>

#include "../core/attention_args.h"
#include "attention_device.cuh"

namespace kvslim::cuda {

namespace {

constexpr int kBoxThreads = 256;
constexpr int kBoundWarps = 8;             // pages per block of the bounds
constexpr int kQueryTileFloats = 8192;     // 32 KiB of query rows in shared memory
constexpr long long kMaxBlocks = 1 << 20;  // grid-stride beyond this many blocks

// Where the keys of one boxes call live: view token j is dynamic token first + j and store row
// firstRow + j of the staged page table.
struct BoxesKernelArgs {
  const void* const* keyPages = nullptr;  // device copy of the view's page table, from its first page
  long long firstRow = 0;                 // < pageTokens
  long long pageTokens = 0;
  long long rowBytes = 0;
  long long first = 0;
  long long end = 0;                      // first + tokens
  long long pageSize = 0;
  long long firstPage = 0;                // Quest page of `first`
  long long work = 0;                     // Quest pages touched x headDim
  int headDim = 0;
  float* lo = nullptr;
  float* hi = nullptr;
};

template <DType T>
__device__ __forceinline__ float boxKey(const BoxesKernelArgs& args, long long token, int channel) {
  const long long row = args.firstRow + (token - args.first);
  const long long page = row / args.pageTokens;
  const unsigned char* bytes = static_cast<const unsigned char*>(args.keyPages[page]) +
                               static_cast<size_t>(row - page * args.pageTokens) * static_cast<size_t>(args.rowBytes);
  return loadElement<T>(bytes, channel);
}

template <DType T>
__global__ void __launch_bounds__(kBoxThreads) pageBoxesKernel(const BoxesKernelArgs args) {
  const long long stride = static_cast<long long>(gridDim.x) * kBoxThreads;
  for (long long i = static_cast<long long>(blockIdx.x) * kBoxThreads + threadIdx.x; i < args.work; i += stride) {
    const long long page = args.firstPage + i / args.headDim;
    const int channel = static_cast<int>(i % args.headDim);
    long long token = page * args.pageSize > args.first ? page * args.pageSize : args.first;
    const long long stop = (page + 1) * args.pageSize < args.end ? (page + 1) * args.pageSize : args.end;
    const size_t at = static_cast<size_t>(page) * static_cast<size_t>(args.headDim) + static_cast<size_t>(channel);
    float low, high;
    if (token % args.pageSize == 0) {  // a new page starts with this key
      low = high = boxKey<T>(args, token, channel);
      ++token;
    } else {  // extends the keys boxed by an earlier call
      low = args.lo[at];
      high = args.hi[at];
    }
    for (; token < stop; ++token) {
      const float key = boxKey<T>(args, token, channel);
      low = key < low ? key : low;     // std::min(low, key)
      high = high < key ? key : high;  // std::max(high, key)
    }
    args.lo[at] = low;
    args.hi[at] = high;
  }
}

struct BoundsKernelArgs {
  const float* q = nullptr;                // [kvHeads, rows, headDim], device
  const TopPagesHead* heads = nullptr;     // [kvHeads], device
  double* out = nullptr;                   // [kvHeads, stride], device
  long long stride = 0;                    // the most pages of a head; a head's pages past its own are -inf
  int rows = 0;
  int headDim = 0;
  int tileRows = 1;                        // query rows per shared-memory tile
};

// Grid (page groups, kv heads).
__global__ void __launch_bounds__(32 * kBoundWarps) pageBoundsKernel(const BoundsKernelArgs args) {
  __shared__ float tile[kQueryTileFloats];
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int h = blockIdx.y;
  const TopPagesHead head = args.heads[h];
  const float* q = args.q + static_cast<size_t>(h) * args.rows * args.headDim;
  double* out = args.out + static_cast<size_t>(h) * args.stride;
  const long long groups = (args.stride + kBoundWarps - 1) / kBoundWarps;
  // Block-uniform loops: every thread reaches each __syncthreads.
  for (long long group = blockIdx.x; group < groups; group += gridDim.x) {
    const long long page = group * kBoundWarps + warp;
    const bool active = page < head.pages;
    const float* lo = head.lo + static_cast<size_t>(active ? page : 0) * static_cast<size_t>(args.headDim);
    const float* hi = head.hi + static_cast<size_t>(active ? page : 0) * static_cast<size_t>(args.headDim);
    float best = -INFINITY;
    for (int firstRow = 0; firstRow < args.rows; firstRow += args.tileRows) {
      const int rows = min(args.tileRows, args.rows - firstRow);
      const float* source = q + static_cast<size_t>(firstRow) * static_cast<size_t>(args.headDim);
      __syncthreads();  // the previous tile is no longer read
      for (int i = threadIdx.x; i < rows * args.headDim; i += blockDim.x) tile[i] = source[i];
      __syncthreads();
      if (!active) continue;  // warp-uniform
      for (int r = 0; r < rows; ++r) {
        const float* query = tile + r * args.headDim;
        float sum = 0.0f;
        for (int i = lane; i < args.headDim; i += 32) {
          const float value = query[i];
          sum += fmaxf(value * __ldg(lo + i), value * __ldg(hi + i));
        }
        best = fmaxf(best, warpSum(sum));
      }
    }
    // Widened exactly: the top-k ranks doubles in the order of the float bounds.
    if (page < args.stride && lane == 0) out[page] = static_cast<double>(best);
  }
}

unsigned gridFor(long long blocks) { return static_cast<unsigned>(std::max(1LL, std::min(blocks, kMaxBlocks))); }

}  // namespace

// args: checked host arguments with at least one token; keyPages: the view's key page table from
// page keys.firstRow / pageTokens on, in device memory. Only enqueues work.
cudaError_t launchPageBoxes(const PageBoxesArgs& args, const void* const* keyPages, cudaStream_t stream) {
  BoxesKernelArgs kernel;
  kernel.keyPages = keyPages;
  kernel.firstRow = args.keys.firstRow % args.pageTokens;
  kernel.pageTokens = args.pageTokens;
  kernel.rowBytes = args.rowStride * static_cast<long long>(dtypeBytes(args.kvType));
  kernel.first = args.first;
  kernel.end = args.first + args.keys.tokens;
  kernel.pageSize = args.pageSize;
  kernel.firstPage = args.first / args.pageSize;
  kernel.work = ((kernel.end - 1) / args.pageSize + 1 - kernel.firstPage) * args.headDim;
  kernel.headDim = args.headDim;
  kernel.lo = args.lo;
  kernel.hi = args.hi;
  const unsigned grid = gridFor((kernel.work + kBoxThreads - 1) / kBoxThreads);
  switch (args.kvType) {
    case DType::F16: pageBoxesKernel<DType::F16><<<grid, kBoxThreads, 0, stream>>>(kernel); break;
    case DType::BF16: pageBoxesKernel<DType::BF16><<<grid, kBoxThreads, 0, stream>>>(kernel); break;
    default: pageBoxesKernel<DType::F32><<<grid, kBoxThreads, 0, stream>>>(kernel); break;
  }
  return cudaGetLastError();
}

// args: checked host arguments with headDim <= kQueryTileFloats; q ([kvHeads, rows, headDim]) and
// heads are device copies; bounds: [kvHeads, stride] doubles of device memory, stride >= every
// head's pages (>= 1). Only enqueues work.
cudaError_t launchPageBounds(const TopPagesArgs& args, const float* q, const TopPagesHead* heads, double* bounds, long long stride,
                             cudaStream_t stream) {
  BoundsKernelArgs kernel;
  kernel.q = q;
  kernel.heads = heads;
  kernel.out = bounds;
  kernel.stride = stride;
  kernel.rows = args.rows;
  kernel.headDim = args.headDim;
  kernel.tileRows = std::max(1, kQueryTileFloats / args.headDim);
  const dim3 grid(gridFor((stride + kBoundWarps - 1) / kBoundWarps), static_cast<unsigned>(args.kvHeads));
  pageBoundsKernel<<<grid, 32 * kBoundWarps, 0, stream>>>(kernel);
  return cudaGetLastError();
}

}  // namespace kvslim::cuda
