// Runs of device memory copied by one kernel (gather.cu): Backend::gather and Backend::copyRuns.
#pragma once
#include <cuda_runtime.h>

namespace kvslim::cuda {

// One copy as staged in device memory: bytes from source to target, both device memory.
struct CopyRun {
  const unsigned char* source;
  unsigned char* target;
  long long bytes;
};

// runs: `count` staged copies in device memory, no target overlapping another. Only enqueues work.
cudaError_t launchCopyRuns(const CopyRun* runs, long long count, cudaStream_t stream);

}  // namespace kvslim::cuda
