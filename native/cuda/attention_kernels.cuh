// What cuda_backend.cu hands the attention kernels, and the launchers it calls.
// Everything a kernel reads lives in device memory; the backend uploads q and the page tables.
#pragma once
#include <cuda_runtime.h>

#include "../core/dtype.h"

namespace kvslim::cuda {

// Where one kv head's page pointers start in the flattened page tables, how many tokens it holds,
// and the row of its first staged page that holds token 0 (token t is row firstRow + t of the
// head's pages). The backend stages only the pages a head's tokens touch, so firstRow is below
// pageTokens and firstRow + tokens stays below 2^31.
struct HeadSpan {
  long long firstPage;
  int tokens;
  int firstRow;
};

struct AttentionKernelArgs {
  const float* q = nullptr;  // [n, qHeads, headDim], unscaled
  float* out = nullptr;      // [n, qHeads, headDim]
  const void* const* keyPages = nullptr;    // the pages of every kv head, head after head
  const void* const* valuePages = nullptr;
  const HeadSpan* heads = nullptr;          // [kvHeads]
  // Split partials, [kvHeads, rowsPerHead, splits] x (max, sum, acc[headDim]); unused when splits == 1.
  float* partialMax = nullptr;
  float* partialSum = nullptr;
  float* partialAcc = nullptr;
  // Optional [n, qHeads] (rows as in out): max + log2(sum) of each row's softmax in log2 units,
  // -inf for a row that sees no key. nullptr: not written.
  float* lse = nullptr;
  int n = 0;
  int qHeads = 0;
  int kvHeads = 0;
  int headDim = 0;
  int group = 0;        // qHeads / kvHeads
  int rowsPerHead = 0;  // n * group; row = position * group + g reads query head kvHead * group + g
  int pageTokens = 0;
  long long rowBytes = 0;  // rowStride x element bytes
  DType kvType = DType::F32;
  bool causal = true;
  bool vectorized = false;  // headDim % 8 == 0 and every K/V row 16-byte aligned: 16-byte loads
  float scaleLog2e = 0.0f;  // scale * log2(e), folded into q so the kernels use exp2
  int maxTokens = 0;        // largest head
  int splits = 1;           // key ranges per (kv head, row block), merged by launchMergeSplits
  int splitTokens = 0;
};

struct SplitPlan {
  int splits;
  int splitTokens;
};

// Enough key splits that `blocksPerSplit` x splits reaches two blocks per multiprocessor, but no
// split shorter than `minSplitTokens`; split lengths are rounded up to `granule` keys.
inline SplitPlan planKeySplits(int maxTokens, long long blocksPerSplit, int multiprocessors, int minSplitTokens,
                               int granule, int blocksPerMultiprocessor = 2) {
  const long long wanted = (static_cast<long long>(blocksPerMultiprocessor) * multiprocessors + blocksPerSplit - 1) / blocksPerSplit;
  const long long bySize = (maxTokens + minSplitTokens - 1) / minSplitTokens;
  const long long splits = wanted < bySize ? wanted : bySize;
  if (splits <= 1) return {1, maxTokens > 0 ? maxTokens : 1};
  long long splitTokens = (maxTokens + splits - 1) / splits;
  splitTokens = (splitTokens + granule - 1) / granule * granule;
  return {int((maxTokens + splitTokens - 1) / splitTokens), int(splitTokens)};
}

// Decode: at most 16 rows per kv head, keys read straight from their pages (memory-bound).
SplitPlan planAttentionDecode(const AttentionKernelArgs& args, int multiprocessors);
cudaError_t launchAttentionDecode(const AttentionKernelArgs& args, cudaStream_t stream);

// Prefill: many rows per kv head, K/V tiles staged in shared memory (compute-bound).
SplitPlan planAttentionPrefill(const AttentionKernelArgs& args, int multiprocessors);
cudaError_t launchAttentionPrefill(const AttentionKernelArgs& args, cudaStream_t stream);
// Query rows one prefill block covers for a head size (the row tiles are ceil(rowsPerHead / it)).
int prefillRowsPerBlock(int headDim);
// The same prefill on the tensor cores (attention_prefill_tf32.cu): f16/bf16 K/V, headDim <= 128,
// compute capability 8.0 or later (attentionPrefillTf32Fits); launchAttentionPrefill runs it when
// KVSLIM_CUDA_TF32_PREFILL=1.
bool attentionPrefillTf32Fits(const AttentionKernelArgs& args);
cudaError_t launchAttentionPrefillTf32(const AttentionKernelArgs& args, cudaStream_t stream);

// Log-sum-exp merge of the split partials into out (and lse when set; only when args.splits > 1).
cudaError_t launchMergeSplits(const AttentionKernelArgs& args, cudaStream_t stream);

// H2O's attention mass of an attention call (lse_mass.cu), after its kernels (and split merge)
// have written args.lse: mass[h * massStride + t] = sum over head h's rows of 2^(q.k_t * scale *
// log2(e) - lse[row]) in double, for t < massStride (0 past a head's tokens).
cudaError_t launchLseMass(const AttentionKernelArgs& args, double* mass, long long massStride, cudaStream_t stream);
// The same on the tensor cores (lse_mass_tf32.cu): f16/bf16 keys, headDim <= 128, compute
// capability 8.0 or later (lseMassTf32Fits); launchLseMass runs it when KVSLIM_CUDA_TF32_MASS=1.
bool lseMassTf32Fits(const AttentionKernelArgs& args);
cudaError_t launchLseMassTf32(const AttentionKernelArgs& args, double* mass, long long massStride, cudaStream_t stream);

// Raw scores of one kv head (attention_scores.cu): out[r * tokens + t] = scale * dot(q[r], key t).
struct ScoresKernelArgs {
  const float* q = nullptr;               // [rows, headDim], unscaled
  float* out = nullptr;                   // [rows, head.tokens]
  const void* const* keyPages = nullptr;  // the pages head.firstPage... of the head
  HeadSpan head{0, 0, 0};
  int rows = 0;
  int headDim = 0;
  int pageTokens = 0;
  long long rowBytes = 0;  // rowStride x element bytes
  DType kvType = DType::F32;
  bool vectorized = false;  // as AttentionKernelArgs::vectorized
  float scale = 1.0f;
};

// Query rows one scores block covers for a head size: the row tiles (grid y) are
// ceil(rows / scoresRowsPerBlock(headDim)).
int scoresRowsPerBlock(int headDim);
cudaError_t launchAttentionScores(const ScoresKernelArgs& args, cudaStream_t stream);

}  // namespace kvslim::cuda
