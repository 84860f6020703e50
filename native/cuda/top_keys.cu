// The flat retrieval's best score per key (top_keys.cuh): one thread per key, the rows in order.
#include "top_keys.cuh"

#include <cmath>

namespace kvslim::cuda {

namespace {

constexpr int kBestThreads = 256;

__global__ void __launch_bounds__(kBestThreads) bestRowsKernel(const float* scores, int rows, long long tokens, double* best,
                                                                long long stride, bool first) {
  const long long t = static_cast<long long>(blockIdx.x) * kBestThreads + threadIdx.x;
  if (t >= stride) return;
  if (t >= tokens) {
    if (first) best[t] = -INFINITY;  // padding: ranks after every key
    return;
  }
  float value = first ? -INFINITY : static_cast<float>(best[t]);
  for (int r = 0; r < rows; ++r) value = fmaxf(value, scores[static_cast<size_t>(r) * tokens + t]);
  best[t] = static_cast<double>(value);
}

}  // namespace

cudaError_t launchBestRows(const float* scores, int rows, long long tokens, double* best, long long stride, bool first,
                           cudaStream_t stream) {
  if (stride < 1) return cudaSuccess;
  const long long blocks = (stride + kBestThreads - 1) / kBestThreads;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidValue;  // the backend bounds stride to 2^30
  bestRowsKernel<<<static_cast<unsigned>(blocks), kBestThreads, 0, stream>>>(scores, rows, tokens, best, stride, first);
  return cudaGetLastError();
}

}  // namespace kvslim::cuda
