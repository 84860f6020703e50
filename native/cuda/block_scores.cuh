// ActQKV's block scores and top blocks on the GPU (block_scores.cu): what the CUDA backend stages
// and launches.
#pragma once
#include <cuda_runtime.h>

#include "../core/block_scores_args.h"

namespace kvslim::cuda {

// One kv head of a blockScores call, as staged in device memory.
struct BlockHeadSpan {
  const void* reprs;    // final blocks [0, blocks - 1), of BlockScoresKernelArgs::reprType
  const double* norms;
  double newestNorm;    // the newest block's (its representative: BlockScoresKernelArgs::newest)
};

struct BlockScoresKernelArgs {
  const BlockHeadSpan* heads = nullptr;  // [kvHeads], device
  const double* u = nullptr;             // [kvHeads, headDim], device
  const float* newest = nullptr;         // [kvHeads, headDim], device: each head's newest representative
  double* scores = nullptr;              // [kvHeads, blocks], device
  double* entropies = nullptr;           // [kvHeads], device
  long long blocks = 0;
  DType reprType = DType::F32;
  bool vectorRows = false;  // rows 16-byte aligned with headDim % 8 == 0: vector loads
  int kvHeads = 0;
  int headDim = 0;
  double temperature = 1;
};

// args: checked; heads, u, newest, entropies: device copies; scores: the caller's device buffer.
// Only enqueues work.
cudaError_t launchBlockScores(const BlockScoresKernelArgs& args, cudaStream_t stream);
// args: checked; out: a device buffer of [kvHeads, k]. Only enqueues work.
cudaError_t launchTopBlocks(const TopBlocksArgs& args, long long* out, cudaStream_t stream);

}  // namespace kvslim::cuda
