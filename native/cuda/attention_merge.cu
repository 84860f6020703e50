// Log-sum-exp merge of key-split partials (DESIGN.md): out = sum_s acc_s 2^(m_s - M) / sum_s l_s 2^(m_s - M)
// with M the largest split max; a row that saw no key at all (every l_s == 0) gets zeros. With
// args.lse set, also lse = M + log2(sum_s l_s 2^(m_s - M)) (-inf for a row that saw no key).
#include "attention_device.cuh"

namespace kvslim::cuda {

namespace {

constexpr int kMergeThreads = 128;

// One block per (kv head, row): partials of a row are contiguous, so each thread walks them for
// its dimensions and the split statistics come from cache after the first pass.
__global__ void __launch_bounds__(kMergeThreads) mergeSplitsKernel(const AttentionKernelArgs args) {
  const int partialRow = blockIdx.x;  // head * rowsPerHead + row
  const int head = partialRow / args.rowsPerHead;
  const int row = partialRow - head * args.rowsPerHead;
  const size_t first = static_cast<size_t>(partialRow) * args.splits;
  const float* maxes = args.partialMax + first;
  const float* sums = args.partialSum + first;
  const float* accs = args.partialAcc + first * args.headDim;

  float globalMax = maxes[0];
  for (int s = 1; s < args.splits; ++s) globalMax = fmaxf(globalMax, maxes[s]);
  float total = 0.0f;
  for (int s = 0; s < args.splits; ++s) total += sums[s] * exp2f(maxes[s] - globalMax);
  const float inverse = total > 0.0f ? 1.0f / total : 0.0f;

  const int query = queryIndex(args, head, row);
  if (threadIdx.x == 0 && args.lse != nullptr) args.lse[query] = rowLse(globalMax, total);
  float* out = args.out + static_cast<size_t>(query) * args.headDim;
  for (int d = threadIdx.x; d < args.headDim; d += kMergeThreads) {
    float value = 0.0f;
    for (int s = 0; s < args.splits; ++s)
      value = fmaf(accs[static_cast<size_t>(s) * args.headDim + d], exp2f(maxes[s] - globalMax), value);
    out[d] = value * inverse;
  }
}

}  // namespace

cudaError_t launchMergeSplits(const AttentionKernelArgs& args, cudaStream_t stream) {
  mergeSplitsKernel<<<args.kvHeads * args.rowsPerHead, kMergeThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace kvslim::cuda
