#include "simd_level.h"

#include <cstdlib>
#include <cstring>

#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
#include <cpuid.h>
#define KVSLIM_X86 1
#endif

namespace kvslim::cpu {
namespace {

#ifdef KVSLIM_X86
uint64_t xgetbv0() {
  uint32_t eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (uint64_t(edx) << 32) | eax;
}
#endif

SimdInfo detect() {
  SimdInfo info;
#ifdef KVSLIM_X86
  unsigned eax, ebx, ecx, edx;
  if (__get_cpuid(0, &eax, &ebx, &ecx, &edx)) {
    char vendor[13];
    std::memcpy(vendor, &ebx, 4);
    std::memcpy(vendor + 4, &edx, 4);
    std::memcpy(vendor + 8, &ecx, 4);
    vendor[12] = '\0';
    info.vendor = vendor;
  }
  info.prefetchToL1 = info.vendor == "AuthenticAMD" || info.vendor == "HygonGenuine";
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return info;
  const bool osxsave = ecx & (1u << 27), fma = ecx & (1u << 12), f16c = ecx & (1u << 29);
  if (!osxsave) return info;
  const uint64_t xcr0 = xgetbv0();
  const bool ymmState = (xcr0 & 0x6) == 0x6;
  const bool zmmState = (xcr0 & 0xe6) == 0xe6;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return info;
  const bool avx2 = ebx & (1u << 5);
  const bool avx512f = ebx & (1u << 16), avx512dq = ebx & (1u << 17), avx512bw = ebx & (1u << 30),
             avx512vl = ebx & (1u << 31);
  info.avx2 = ymmState && avx2 && fma && f16c && avx2Kernels() != nullptr;
  info.avx512 = info.avx2 && zmmState && avx512f && avx512dq && avx512bw && avx512vl && avx512Kernels() != nullptr;
#endif
  return info;
}

struct Selection {
  SimdInfo info;
  const KernelTable* table = nullptr;
  Status status;
};

Selection select() {
  Selection selection;
  selection.info = detect();
  const char* forced = std::getenv("KVSLIM_SIMD");
  selection.table = selection.info.avx512 ? avx512Kernels() : selection.info.avx2 ? avx2Kernels() : scalarKernels();
  if (forced != nullptr && *forced != '\0') {
    const std::string level = forced;
    selection.info.forcedBy = level;
    if (level == "scalar") {
      selection.table = scalarKernels();
    } else if (level == "avx2" && selection.info.avx2) {
      selection.table = avx2Kernels();
    } else if (level == "avx512" && selection.info.avx512) {
      selection.table = avx512Kernels();
    } else if (level != "auto") {
      selection.status = Status(ErrorCode::Option, "KVSLIM_SIMD must be scalar, avx2, avx512 or auto (and supported by "
                                                   "this CPU), but received '" + level + "'; using " +
                                                   selection.table->name);
    }
  }
  selection.info.active = selection.table->name;
  const char* prefetch = std::getenv("KVSLIM_PREFETCH");
  if (prefetch != nullptr && *prefetch != '\0') {
    const std::string level = prefetch;
    if (level == "l1" || level == "l2") {
      selection.info.prefetchToL1 = level == "l1";
    } else if (level != "auto" && selection.status.isOk()) {
      selection.status = Status(ErrorCode::Option, "KVSLIM_PREFETCH must be l1, l2 or auto, but received '" + level +
                                                   "'; using " + (selection.info.prefetchToL1 ? "l1" : "l2"));
    }
  }
  return selection;
}

const Selection& selection() {
  static const Selection chosen = select();
  return chosen;
}

}  // namespace

const KernelTable& activeKernels() { return *selection().table; }
bool streamPrefetchToL1() { return selection().info.prefetchToL1; }
const SimdInfo& simdInfo() { return selection().info; }
Status simdStatus() { return selection().status; }

}  // namespace kvslim::cpu
