// H2O's mass from captured scores (captured_mass.cuh), in two steps as attention_mass.cu:
//   1. one warp per row finds its max and softmax denominator over the tokens it sees;
//   2. one thread per (token, head) adds the rows' probabilities in row order, in double.
// Probabilities are 2^(s - max) / sum in float, summed in double, as the CPU's massFromScores sums
// its float softmax rows.
#include "captured_mass.cuh"
#include "attention_device.cuh"

namespace kvslim::cuda {

namespace {

constexpr int kStatsWarps = 8;       // rows per block of the row statistics
constexpr int kColumnThreads = 256;  // tokens per block of the column sums

// Tokens row `row` of head `head` sees.
__device__ __forceinline__ long long seenTokens(const CapturedMassArgs& args, int head, int row) {
  const int tokens = args.tokens[head];
  const long long last = args.causal ? static_cast<long long>(tokens) - args.n + row / args.group : tokens - 1;
  return last + 1 > 0 ? last + 1 : 0;
}

__device__ __forceinline__ const float* rowScores(const CapturedMassArgs& args, int head, int row) {
  return args.scores + (static_cast<size_t>(head) * args.rowsPerHead + row) * args.width;
}

__global__ void __launch_bounds__(32 * kStatsWarps) capturedRowStatsKernel(const CapturedMassArgs args) {
  const int row = blockIdx.x * kStatsWarps + threadIdx.x / 32;
  const int head = blockIdx.y;
  const int lane = threadIdx.x % 32;
  if (row >= args.rowsPerHead) return;  // warp-uniform
  const long long seen = seenTokens(args, head, row);
  const float* scores = rowScores(args, head, row);
  float max = -INFINITY;
  for (long long t = lane; t < seen; t += 32) max = fmaxf(max, scores[t]);
  max = warpMax(max);
  // A row whose every token is masked gives no mass (and never computes inf - inf).
  const float offset = max == -INFINITY ? 0.0f : max;
  float sum = 0.0f;
  for (long long t = lane; t < seen; t += 32) sum += exp2f(scores[t] - offset);
  sum = warpSum(sum);
  if (lane == 0) {
    const size_t index = static_cast<size_t>(head) * args.rowsPerHead + row;
    args.rowMax[index] = offset;
    args.rowInverse[index] = sum > 0.0f ? 1.0f / sum : 0.0f;
  }
}

__global__ void __launch_bounds__(kColumnThreads) capturedColumnsKernel(const CapturedMassArgs args) {
  const long long t = static_cast<long long>(blockIdx.x) * kColumnThreads + threadIdx.x;
  const int head = blockIdx.y;
  if (t >= args.massStride) return;
  double total = 0.0;
  for (int row = 0; row < args.rowsPerHead; ++row) {
    if (t < seenTokens(args, head, row)) {
      const size_t index = static_cast<size_t>(head) * args.rowsPerHead + row;
      total += static_cast<double>(exp2f(rowScores(args, head, row)[t] - args.rowMax[index]) * args.rowInverse[index]);
    }
  }
  args.mass[static_cast<size_t>(head) * args.massStride + t] = total;
}

}  // namespace

cudaError_t launchCapturedMass(const CapturedMassArgs& args, cudaStream_t stream) {
  if (args.kvHeads < 1 || args.rowsPerHead < 1 || args.massStride < 1) return cudaSuccess;
  const dim3 statsGrid((args.rowsPerHead + kStatsWarps - 1) / kStatsWarps, args.kvHeads);
  capturedRowStatsKernel<<<statsGrid, 32 * kStatsWarps, 0, stream>>>(args);
  cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess) return error;
  const dim3 columnGrid(static_cast<unsigned>((args.massStride + kColumnThreads - 1) / kColumnThreads), args.kvHeads);
  capturedColumnsKernel<<<columnGrid, kColumnThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace kvslim::cuda
