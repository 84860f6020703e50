// Which kernel table runs: the best the CPU supports, unless KVSLIM_SIMD asks for less; and where
// the kernels' software prefetches of streamed KV put it (streamPrefetchToL1, kernel_table.h).
#pragma once
#include <string>

#include "../core/status.h"
#include "kernel_table.h"

namespace kvslim::cpu {

struct SimdInfo {
  bool avx2 = false;    // AVX2 + FMA + F16C, with OS support for ymm state
  bool avx512 = false;  // AVX-512 F/BW/VL/DQ, with OS support for zmm state
  std::string active;   // name of the table in use
  std::string forcedBy; // value of KVSLIM_SIMD, empty when not set
  std::string vendor;   // cpuid's vendor string, e.g. "AuthenticAMD" (empty off x86)
  bool prefetchToL1 = false;  // streamed KV prefetched into L1 (see streamPrefetchToL1)
};

// The active table. Throws nothing: an unusable KVSLIM_SIMD value is reported by simdStatus().
const KernelTable& activeKernels();
const SimdInfo& simdInfo();
// ERR_OPTION when KVSLIM_SIMD names an unknown level or one this CPU lacks, or KVSLIM_PREFETCH
// is not l1, l2 or auto.
Status simdStatus();

}  // namespace kvslim::cpu
