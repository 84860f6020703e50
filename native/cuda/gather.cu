// Backend::gather on the GPU: runs of device memory copied into one device buffer by one kernel,
// so the caller makes a single device-to-host copy (a decode call's new keys of every kv head
// would otherwise cost one synchronous copy per head).
#include <cuda_runtime.h>

#include <algorithm>

#include "gather.cuh"

namespace kvslim::cuda {

namespace {

constexpr int kGatherThreads = 256;
constexpr long long kMaxGatherBlocks = 1 << 16;

// One block per run (grid-stride over runs); 16-byte words when the run allows it.
__global__ void __launch_bounds__(kGatherThreads) gatherKernel(const GatherRun* runs, long long count, unsigned char* out) {
  for (long long r = blockIdx.x; r < count; r += gridDim.x) {
    const GatherRun run = runs[r];
    unsigned char* target = out + run.offset;
    const bool words = (reinterpret_cast<unsigned long long>(run.source) | reinterpret_cast<unsigned long long>(target) |
                        static_cast<unsigned long long>(run.bytes)) % 16 == 0;
    if (words) {
      const uint4* from = reinterpret_cast<const uint4*>(run.source);
      uint4* to = reinterpret_cast<uint4*>(target);
      for (long long i = threadIdx.x; i < run.bytes / 16; i += blockDim.x) to[i] = from[i];
    } else {
      for (long long i = threadIdx.x; i < run.bytes; i += blockDim.x) target[i] = run.source[i];
    }
  }
}

}  // namespace

cudaError_t launchGather(const GatherRun* runs, long long count, unsigned char* out, cudaStream_t stream) {
  if (count <= 0) return cudaSuccess;
  const unsigned grid = static_cast<unsigned>(std::min(count, kMaxGatherBlocks));
  gatherKernel<<<grid, kGatherThreads, 0, stream>>>(runs, count, out);
  return cudaGetLastError();
}

}  // namespace kvslim::cuda
