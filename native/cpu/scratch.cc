#include "scratch.h"

#include <memory>

namespace kvslim::cpu {

namespace {
constexpr size_t kKeepFloats = size_t(256) << 20 >> 2;  // keep at most 256 MiB per slot

struct ThreadScratch {
  std::unique_ptr<float[]> buffers[size_t(ScratchSlot::Count)];
  size_t sizes[size_t(ScratchSlot::Count)] = {};
  std::unique_ptr<float[]> oversized[size_t(ScratchSlot::Count)];  // above the cap: freed by the next request
};
}  // namespace

float* scratchFloats(ScratchSlot slot, size_t count) {
  thread_local ThreadScratch scratch;
  const size_t index = size_t(slot);
  if (count > kKeepFloats) {
    scratch.oversized[index].reset(new float[count]);
    return scratch.oversized[index].get();
  }
  scratch.oversized[index].reset();
  if (scratch.sizes[index] < count) {
    scratch.buffers[index].reset(new float[count]);
    scratch.sizes[index] = count;
  }
  return scratch.buffers[index].get();
}

}  // namespace kvslim::cpu
