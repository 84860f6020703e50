// Attention mass of one kv head's query rows on the GPU (AttentionMassArgs, core/attention_args.h).
// The rows go in blocks whose scores fit a bounded device buffer (no rows x tokens matrix for a
// long prefill), each block in three steps:
//   1. the scores kernel (attention_scores.cu) writes the block's kept and tail scores;
//   2. one warp per row finds its causal max and softmax denominator;
//   3. one thread per (member, token) adds the block's probabilities, row after row, to a double
//      column sum in device memory.
// Blocks run in row order on one stream, so every column sum adds its rows in row order whatever
// the block size. Then one thread per token pools each member's votes and averages them over the
// group (SnapKV), as native/cpu/attention_mass.cc does, and the backend copies back [columns] doubles.
#include <algorithm>

#include "../core/attention_args.h"
#include "attention_device.cuh"

namespace kvslim::cuda {

namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr int kStatsWarps = 8;                            // rows per block of the row statistics
constexpr int kColumnThreads = 256;                       // tokens per block of the column sums
constexpr long long kScoreBudget = 1LL << 25;             // floats of scores one row block may hold (128 MiB)
constexpr long long kMaxBlockRows = 4096;
constexpr size_t kAlignment = 256;

size_t alignUp(size_t bytes) { return (bytes + kAlignment - 1) / kAlignment * kAlignment; }

// Query rows scored at once: as many as the score budget allows for the head's tokens.
long long blockRows(const AttentionMassArgs& args) {
  const long long rows = static_cast<long long>(args.n) * args.group;
  const long long tokens = std::max<long long>(1, args.kept.tokens + args.tail.tokens);
  return std::max<long long>(1, std::min({rows, kMaxBlockRows, kScoreBudget / tokens}));
}

// Byte offsets inside the scratch of launchAttentionMass: the result first, then the per-member
// sums (the result itself when summed over members), row statistics and one block's scores.
struct MassScratch {
  size_t out = 0, sums = 0, rowOffset = 0, rowInverse = 0, keptScores = 0, tailScores = 0, totalBytes = 0;
  bool perMember = false;
  long long width = 0;  // doubles of the sums

  explicit MassScratch(const AttentionMassArgs& args) {
    const size_t rows = static_cast<size_t>(blockRows(args));
    perMember = args.pooling != MassPooling::None;
    width = (perMember ? args.group : 1) * args.columns;
    const size_t outBytes = static_cast<size_t>(args.columns) * sizeof(double);
    sums = alignUp(outBytes);
    rowOffset = sums + (perMember ? alignUp(static_cast<size_t>(width) * sizeof(double)) : 0);
    rowInverse = rowOffset + alignUp(rows * sizeof(float));
    keptScores = rowInverse + alignUp(rows * sizeof(float));
    tailScores = keptScores + alignUp(rows * static_cast<size_t>(args.kept.tokens) * sizeof(float));
    totalBytes = tailScores + rows * static_cast<size_t>(args.tail.tokens) * sizeof(float);
  }
};

// One block of rows [firstRow, firstRow + rows) and where its scores and statistics live.
struct MassBlock {
  const float* keptScores = nullptr;  // [rows, kept]
  const float* tailScores = nullptr;  // [rows, tailStride]
  float* rowOffset = nullptr;         // [rows]: -max * log2(e)
  float* rowInverse = nullptr;        // [rows]: 1 / softmax denominator
  double* sums = nullptr;             // [members, columns]
  long long kept = 0;
  long long tailStride = 0;
  long long firstSeen = 0;            // tail tokens query 0 sees; query i sees i more
  long long columns = 0;
  int firstRow = 0;
  int rows = 0;
  int group = 1;
  bool perMember = false;
};

__device__ __forceinline__ float blockScore(const MassBlock& block, int r, long long t) {
  return t < block.kept ? block.keptScores[static_cast<size_t>(r) * block.kept + t]
                        : block.tailScores[static_cast<size_t>(r) * block.tailStride + (t - block.kept)];
}

// Tokens local row r sees (kept + its causal part of the tail).
__device__ __forceinline__ long long visibleTokens(const MassBlock& block, int r) {
  return block.kept + block.firstSeen + (block.firstRow + r) / block.group;
}

// One warp per row: the softmax as VectorOps::softmaxRow computes it, e = 2^(s log2(e) - max log2(e)).
__global__ void __launch_bounds__(32 * kStatsWarps) massRowStatsKernel(const MassBlock block) {
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int r = blockIdx.x * kStatsWarps + warp;
  if (r >= block.rows) return;  // warp-uniform
  const long long visible = visibleTokens(block, r);
  float max = -INFINITY;
  for (long long t = lane; t < visible; t += 32) max = fmaxf(max, blockScore(block, r, t));
  max = warpMax(max);
  const float offset = -max * kLog2e;
  float sum = 0.0f;
  for (long long t = lane; t < visible; t += 32) sum += exp2f(fmaf(blockScore(block, r, t), kLog2e, offset));
  sum = warpSum(sum);
  if (lane == 0) {
    block.rowOffset[r] = offset;
    block.rowInverse[r] = sum > 0.0f ? 1.0f / sum : 0.0f;
  }
}

// One thread per (member, token): the running column sum continues over the block's rows in order.
__global__ void __launch_bounds__(kColumnThreads) massColumnsKernel(const MassBlock block) {
  const long long t = static_cast<long long>(blockIdx.x) * kColumnThreads + threadIdx.x;
  if (t >= block.columns) return;
  const int member = blockIdx.y;  // 0 when summed over members
  const int step = block.perMember ? block.group : 1;
  // The block's first row of this member (rows are position * group + member).
  int r = block.perMember ? ((member - block.firstRow % block.group) % block.group + block.group) % block.group : 0;
  double* sum = block.sums + static_cast<size_t>(member) * block.columns + t;
  double total = *sum;
  for (; r < block.rows; r += step) {
    if (t < visibleTokens(block, r)) {
      const float p = exp2f(fmaf(blockScore(block, r, t), kLog2e, block.rowOffset[r])) * block.rowInverse[r];
      total += static_cast<double>(p);
    }
  }
  *sum = total;
}

// One thread per token: each member's votes pooled (stride 1, padding kernel / 2: max ignores it,
// avg counts it as zeros), then averaged over the group in member order.
__global__ void __launch_bounds__(kColumnThreads) massPoolKernel(const double* sums, double* out, long long columns, int group,
                                                                 int kernel, bool maxPooling) {
  const long long j = static_cast<long long>(blockIdx.x) * kColumnThreads + threadIdx.x;
  if (j >= columns) return;
  const long long half = kernel / 2;
  const long long begin = j - half > 0 ? j - half : 0;
  const long long end = j + half + 1 < columns ? j + half + 1 : columns;
  double score = 0.0;
  for (int g = 0; g < group; ++g) {
    const double* votes = sums + static_cast<size_t>(g) * columns;
    double value = maxPooling ? -INFINITY : 0.0;
    for (long long t = begin; t < end; ++t) value = maxPooling ? fmax(value, votes[t]) : value + votes[t];
    score += (maxPooling ? value : value / static_cast<double>(kernel)) / group;
  }
  out[j] = isnan(score) ? -INFINITY : score;  // SnapKV ranks a NaN vote last (the top-k sees -inf)
}

}  // namespace

size_t attentionMassScratchBytes(const AttentionMassArgs& args) { return MassScratch(args).totalBytes; }

// args: the checked host arguments (only their sizes are read here). keptScores / tailScores: the
// scores kernel's arguments for the two views with q = all rows on the device; rows, out and the
// tail's token count are set per block. scratch: attentionMassScratchBytes(args) bytes of device
// memory, 256-byte aligned; the result is its first args.columns doubles. Only enqueues work.
cudaError_t launchAttentionMass(const AttentionMassArgs& args, const ScoresKernelArgs& keptScores,
                                const ScoresKernelArgs& tailScores, void* scratch, cudaStream_t stream) {
  const MassScratch layout(args);
  unsigned char* base = static_cast<unsigned char*>(scratch);
  double* out = reinterpret_cast<double*>(base);
  float* keptBuffer = reinterpret_cast<float*>(base + layout.keptScores);
  float* tailBuffer = reinterpret_cast<float*>(base + layout.tailScores);
  MassBlock block;
  block.keptScores = keptBuffer;
  block.tailScores = tailBuffer;
  block.rowOffset = reinterpret_cast<float*>(base + layout.rowOffset);
  block.rowInverse = reinterpret_cast<float*>(base + layout.rowInverse);
  block.sums = layout.perMember ? reinterpret_cast<double*>(base + layout.sums) : out;
  block.kept = args.kept.tokens;
  block.firstSeen = args.tail.tokens - args.after - args.n + 1;
  block.columns = args.columns;
  block.group = args.group;
  block.perMember = layout.perMember;
  cudaError_t error = cudaMemsetAsync(block.sums, 0, static_cast<size_t>(layout.width) * sizeof(double), stream);
  if (error != cudaSuccess) return error;

  const long long rows = static_cast<long long>(args.n) * args.group;
  const long long step = blockRows(args);
  const dim3 columnGrid(static_cast<unsigned>((args.columns + kColumnThreads - 1) / kColumnThreads),
                        layout.perMember ? static_cast<unsigned>(args.group) : 1u);
  for (long long first = 0; first < rows; first += step) {
    const int count = static_cast<int>(std::min(step, rows - first));
    // Tail scores up to what the block's last (latest) query sees.
    const long long tailSeen = block.firstSeen + (first + count - 1) / args.group;
    if (block.kept > 0) {
      ScoresKernelArgs scores = keptScores;
      scores.q = keptScores.q + static_cast<size_t>(first) * args.headDim;
      scores.rows = count;
      scores.out = keptBuffer;
      if ((error = launchAttentionScores(scores, stream)) != cudaSuccess) return error;
    }
    ScoresKernelArgs scores = tailScores;
    scores.q = tailScores.q + static_cast<size_t>(first) * args.headDim;
    scores.rows = count;
    scores.head.tokens = static_cast<int>(tailSeen);
    scores.out = tailBuffer;
    if ((error = launchAttentionScores(scores, stream)) != cudaSuccess) return error;

    block.firstRow = static_cast<int>(first);
    block.rows = count;
    block.tailStride = tailSeen;
    massRowStatsKernel<<<(count + kStatsWarps - 1) / kStatsWarps, 32 * kStatsWarps, 0, stream>>>(block);
    if ((error = cudaGetLastError()) != cudaSuccess) return error;
    massColumnsKernel<<<columnGrid, kColumnThreads, 0, stream>>>(block);
    if ((error = cudaGetLastError()) != cudaSuccess) return error;
  }
  if (layout.perMember) {
    massPoolKernel<<<columnGrid.x, kColumnThreads, 0, stream>>>(block.sums, out, args.columns, args.group, args.kernel,
                                                                 args.pooling == MassPooling::Max);
    if ((error = cudaGetLastError()) != cudaSuccess) return error;
  }
  return cudaSuccess;
}

}  // namespace kvslim::cuda
