// Backend::gather on the GPU (gather.cu): the staged run table and the launcher.
#pragma once
#include <cuda_runtime.h>

namespace kvslim::cuda {

// One run as staged in device memory: bytes from source to the gather buffer at offset.
struct GatherRun {
  const unsigned char* source;
  long long bytes;
  long long offset;
};

// runs: `count` staged runs in device memory; out: a device buffer of their total size. Only enqueues work.
cudaError_t launchGather(const GatherRun* runs, long long count, unsigned char* out, cudaStream_t stream);

}  // namespace kvslim::cuda
