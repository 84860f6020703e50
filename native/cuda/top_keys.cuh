// The flat retrieval's best score per key over a kv head's query rows (top_keys.cu), folded chunk
// of rows by chunk of rows from the scores kernel's output; block_scores.cu's top-k then picks the
// keys.
#pragma once
#include <cuda_runtime.h>

namespace kvslim::cuda {

// best[t] = max over rows r of scores[r * tokens + t] as a double (exact: the top-k ranks doubles in
// the order of the f32 scores), for t < tokens; -inf for t in [tokens, stride). The first chunk of a
// head (`first`) sets best, a later one takes the max with it. rows may be 0 (a head without keys).
cudaError_t launchBestRows(const float* scores, int rows, long long tokens, double* best, long long stride, bool first,
                           cudaStream_t stream);

}  // namespace kvslim::cuda
