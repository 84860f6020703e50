// AVX2 + FMA + F16C kernels. This file alone is compiled with -mavx2 -mfma -mf16c
// (binding.gyp target kvslim_avx2); it is only called after CPUID said those exist.
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "../core/dtype.h"
#include "kernel_table.h"
#include "prefetch.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

namespace kvslim::cpu {
namespace {
#include "vec_avx2.h"
#include "attention_kernels.inl"
#include "kivi_kernels.inl"
#include "vector_kernels.inl"
#include "kernel_table.inl"
const KernelTable kTable = makeTable<VecAvx2>();
}  // namespace

const KernelTable* avx2Kernels() { return &kTable; }

}  // namespace kvslim::cpu
#else
namespace kvslim::cpu {
const KernelTable* avx2Kernels() { return nullptr; }
}  // namespace kvslim::cpu
#endif
