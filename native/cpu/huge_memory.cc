#include "huge_memory.h"

#include <sys/mman.h>

#include <cstdint>

namespace kvslim::cpu {

namespace {
constexpr size_t kHugePage = size_t(2) << 20;
}  // namespace

char* mapHuge(size_t bytes, size_t* mappedBytes) {
  bytes = (bytes + kHugePage - 1) / kHugePage * kHugePage;
  const size_t over = bytes + kHugePage;
  void* raw = mmap(nullptr, over, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) return nullptr;
  char* base = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(raw) + kHugePage - 1) & ~(kHugePage - 1));
  // Give back the unaligned head and tail so the mapping is exactly [base, base + bytes).
  const size_t head = size_t(base - static_cast<char*>(raw));
  if (head > 0) munmap(raw, head);
  const size_t tail = over - head - bytes;
  if (tail > 0) munmap(base + bytes, tail);
  *mappedBytes = bytes;
#ifdef MADV_HUGEPAGE
  madvise(base, bytes, MADV_HUGEPAGE);
#endif
  return base;
}

void unmapHuge(void* base, size_t mappedBytes) {
  if (base != nullptr) munmap(base, mappedBytes);
}

}  // namespace kvslim::cpu
