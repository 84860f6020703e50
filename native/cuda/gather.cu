// Runs of device memory copied by one kernel. Backend::gather copies a decode call's new keys of
// every kv head into one buffer, so the caller makes a single device-to-host copy; copyRuns moves
// an eviction's kept rows. Either would otherwise cost one synchronous copy per run.
#include <cuda_runtime.h>

#include <algorithm>

#include "gather.cuh"

namespace kvslim::cuda {

namespace {

constexpr int kCopyThreads = 256;
constexpr long long kMaxCopyBlocks = 1 << 16;

// One block per run (grid-stride over runs); 16-byte words when the run allows it.
__global__ void __launch_bounds__(kCopyThreads) copyRunsKernel(const CopyRun* runs, long long count) {
  for (long long r = blockIdx.x; r < count; r += gridDim.x) {
    const CopyRun run = runs[r];
    const bool words = (reinterpret_cast<unsigned long long>(run.source) | reinterpret_cast<unsigned long long>(run.target) |
                        static_cast<unsigned long long>(run.bytes)) % 16 == 0;
    if (words) {
      const uint4* from = reinterpret_cast<const uint4*>(run.source);
      uint4* to = reinterpret_cast<uint4*>(run.target);
      for (long long i = threadIdx.x; i < run.bytes / 16; i += blockDim.x) to[i] = from[i];
    } else {
      for (long long i = threadIdx.x; i < run.bytes; i += blockDim.x) run.target[i] = run.source[i];
    }
  }
}

}  // namespace

cudaError_t launchCopyRuns(const CopyRun* runs, long long count, cudaStream_t stream) {
  if (count <= 0) return cudaSuccess;
  const unsigned grid = static_cast<unsigned>(std::min(count, kMaxCopyBlocks));
  copyRunsKernel<<<grid, kCopyThreads, 0, stream>>>(runs, count);
  return cudaGetLastError();
}

}  // namespace kvslim::cuda
