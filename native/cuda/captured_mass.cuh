// H2O's attention mass from scores an attention kernel captured while it ran (KIVI attention's
// KiviKernelArgs::scores): no second pass over the keys.
#pragma once
#include <cuda_runtime.h>

namespace kvslim::cuda {

struct CapturedMassArgs {
  // [kvHeads, rowsPerHead, width] in log2 units: row r of head h holds its masked scores of
  // tokens [0, last + 1) (-inf where masked); last = tokens[h] - n + r / group when causal.
  const float* scores = nullptr;
  long long width = 0;
  const int* tokens = nullptr;  // [kvHeads], device memory
  int kvHeads = 0;
  int rowsPerHead = 0;
  int n = 0;
  int group = 1;
  bool causal = true;
  // Scratch of 2 x kvHeads x rowsPerHead floats (each row's max and inverse denominator).
  float* rowMax = nullptr;
  float* rowInverse = nullptr;
  // mass[h * massStride + t] = sum over the head's rows, in row order, of the row's probability of
  // token t (double); 0 for the tokens no row sees, up to massStride.
  double* mass = nullptr;
  long long massStride = 0;
};

// Enqueues the row statistics and the column sums on `stream`.
cudaError_t launchCapturedMass(const CapturedMassArgs& args, cudaStream_t stream);

}  // namespace kvslim::cuda
