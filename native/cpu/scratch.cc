#include "scratch.h"

#include "huge_memory.h"

namespace kvslim::cpu {

namespace {
constexpr size_t kKeepFloats = size_t(256) << 20 >> 2;  // keep at most 256 MiB per slot

struct ThreadScratch {
  HugeArray<float> buffers[size_t(ScratchSlot::Count)];
  HugeArray<float> oversized[size_t(ScratchSlot::Count)];  // above the cap: freed by the next request
};
}  // namespace

float* scratchFloats(ScratchSlot slot, size_t count) {
  thread_local ThreadScratch scratch;
  const size_t index = size_t(slot);
  if (count > kKeepFloats) {
    scratch.oversized[index].release();
    scratch.oversized[index].reserve(count);
    return scratch.oversized[index].data();
  }
  scratch.oversized[index].release();
  scratch.buffers[index].reserve(count);
  return scratch.buffers[index].data();
}

}  // namespace kvslim::cpu
