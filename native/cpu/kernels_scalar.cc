// Portable kernels: the trusted twin of every SIMD kernel, the fallback, and KVSLIM_SIMD=scalar.
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "../core/dtype.h"
#include "kernel_table.h"
#include "prefetch.h"

namespace kvslim::cpu {
namespace {
#include "vec_scalar.h"
#include "attention_kernels.inl"
#include "kivi_kernels.inl"
#include "vector_kernels.inl"
#include "kernel_table.inl"
const KernelTable kTable = makeTable<VecScalar>();
}  // namespace

const KernelTable* scalarKernels() { return &kTable; }

}  // namespace kvslim::cpu
