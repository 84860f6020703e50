// What cuda_backend.cu hands the KIVI attention kernel (kivi_attention.cu), and its launchers.
// The layouts are those of core/kivi_format.h; everything a kernel reads lives in device memory.
#pragma once
#include <cuda_runtime.h>

#include "attention_kernels.cuh"

namespace kvslim::cuda {

// One kv head: where its pages start in the flattened page tables, its fp16 residuals, and where
// the quantized parts of K and V end (methods/kivi.md: they end at different tokens).
struct KiviHeadSpan {
  long long firstKeyPage;    // into KiviKernelArgs::attention.keyPages (key group records)
  long long firstValuePage;  // into KiviKernelArgs::attention.valuePages (value token records)
  const unsigned short* keyResidual;    // f16 [residual, headDim]: token quantizedKeys + i at row i
  const unsigned short* valueResidual;  // f16 ring [residual, headDim]: token quantizedValues + i at
  int valueRingStart;                   //   row (valueRingStart + i) % residual
  int quantizedKeys;                    // a multiple of quantGroup
  int quantizedValues;
  int tokens;
  // A window policy's hole (core/kivi_format.h): tokens [holeBegin, holeEnd) are masked; the
  // kernel walks tokens - skipLength tokens, jumping from skipBegin (a multiple of 32) over
  // skipLength tokens (a multiple of 32). Pages [releasedFirst, releasedFirst + releasedKeyPages)
  // of the keys (likewise the values) have no page table entry: page p after them is entry
  // p - releasedKeyPages of the head's run.
  int holeBegin;
  int holeEnd;
  int skipBegin;
  int skipLength;
  int releasedFirst;
  int releasedKeyPages;
  int releasedValuePages;
  // Tokens H2O evicted after the layer was quantized: token t < evictedTokens is masked when
  // evicted[t] != 0 (a device copy of the host flags; null when none). Their records stay readable.
  const unsigned char* evicted;
  int evictedTokens;
};

struct KiviKernelArgs {
  // Queries, output, split partials, shape, causal rule, scale and split plan, as for the f32/f16
  // kernels (launchMergeSplits takes it as is). keyPages / valuePages are the page tables of every
  // kv head, head after head; heads, pageTokens, rowBytes, kvType and vectorized are unused.
  AttentionKernelArgs attention;
  const KiviHeadSpan* heads = nullptr;  // [kvHeads]
  int bits = 2;                         // 2, 4 or 8
  int quantGroup = 32;                  // tokens per key group and channels per value group
  int keyGroupsPerPage = 0;
  int valueTokensPerPage = 0;
  int residual = 0;                  // rows of each residual buffer
  int keyWordsPerChannel = 0;        // KiviFormat::keyGroupWordsPerChannel()
  long long keyGroupBytes = 0;       // one key group record
  long long keyCodeBytes = 0;        //   of which codes; scale and min follow
  long long valueTokenBytes = 0;     // one value token record
  long long valueCodeBytes = 0;      //   of which codes; scale and min follow
  // Optional (H2O's mass): every row's masked score of every token it sees, in log2 units (the
  // kernel's own scores), at scores[(head * rowsPerHead + row) * scoresWidth + token]; tokens a
  // row does not see are not written. Needs heads without a hole (walk index = token).
  float* scores = nullptr;
  long long scoresWidth = 0;
  // Whether any head has eviction flags or scores are captured: the launch picks the kernels that
  // read flags and capture (plain KIVI attention runs kernels without either).
  bool h2o = false;
};

// Split plan of launchKiviAttention (the rows per block it picks, the keys each block streams).
SplitPlan planKiviAttention(const KiviKernelArgs& args, int multiprocessors);
// Attention straight from the codes; leaves split partials for launchMergeSplits(args.attention)
// when args.attention.splits > 1, else writes out.
cudaError_t launchKiviAttention(const KiviKernelArgs& args, cudaStream_t stream);

}  // namespace kvslim::cuda
