// AVX-512 F/BW/VL kernels. This file alone is compiled with -mavx512f -mavx512bw -mavx512vl
// -mavx512dq -mfma -mf16c (binding.gyp target kvslim_avx512); only called after CPUID said so.
#include <cmath>
#include <cstdlib>
#include <cstdint>
#include <type_traits>

#include "../core/dtype.h"
#include "kernel_table.h"
#include "prefetch.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

namespace kvslim::cpu {
namespace {
#include "vec_avx512.h"
#include "attention_kernels.inl"
#include "kivi_kernels.inl"
#include "vector_kernels.inl"
#include "kernel_table.inl"
const KernelTable kTable = makeTable<VecAvx512>();
}  // namespace

const KernelTable* avx512Kernels() { return &kTable; }

}  // namespace kvslim::cpu
#else
namespace kvslim::cpu {
const KernelTable* avx512Kernels() { return nullptr; }
}  // namespace kvslim::cpu
#endif
