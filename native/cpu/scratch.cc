#include "scratch.h"

#include <atomic>
#include <mutex>
#include <set>

#include "huge_memory.h"

namespace kvslim::cpu {

namespace {
constexpr size_t kKeepFloats = size_t(256) << 20 >> 2;  // keep at most 256 MiB per slot

struct ThreadScratch;

// Every thread's scratch, for scratchBytes() and releaseScratch() from any thread.
struct Registry {
  std::mutex mutex;
  std::set<ThreadScratch*> threads;
};
Registry& registry() {
  static Registry* instance = new Registry();  // never destroyed: threads may exit after static teardown
  return *instance;
}

struct ThreadScratch {
  std::mutex inUse;          // held by the thread's outermost lease
  int leases = 0;            // this thread's lease depth (only this thread touches it)
  std::atomic<size_t> bytes{0};
  HugeArray<float> buffers[size_t(ScratchSlot::Count)];
  HugeArray<float> oversized[size_t(ScratchSlot::Count)];  // above the cap: freed by the next request

  ThreadScratch() {
    std::lock_guard<std::mutex> lock(registry().mutex);
    registry().threads.insert(this);
  }
  ~ThreadScratch() {
    std::lock_guard<std::mutex> lock(registry().mutex);
    registry().threads.erase(this);
  }
  // Frees every buffer and returns their bytes; the caller holds inUse (or is this thread between leases).
  size_t freeAll() {
    for (size_t i = 0; i < size_t(ScratchSlot::Count); ++i) {
      buffers[i].release();
      oversized[i].release();
    }
    return bytes.exchange(0);  // recount() keeps it equal to the buffers' mapped bytes
  }
  void recount() {
    size_t total = 0;
    for (size_t i = 0; i < size_t(ScratchSlot::Count); ++i) total += buffers[i].mappedBytes() + oversized[i].mappedBytes();
    bytes = total;
  }
};

ThreadScratch& threadScratch() {
  thread_local ThreadScratch scratch;
  return scratch;
}
}  // namespace

ScratchLease::ScratchLease() {
  ThreadScratch& scratch = threadScratch();
  if (scratch.leases++ == 0) scratch.inUse.lock();
}

ScratchLease::~ScratchLease() {
  ThreadScratch& scratch = threadScratch();
  if (--scratch.leases == 0) scratch.inUse.unlock();
}

float* scratchFloats(const ScratchLease&, ScratchSlot slot, size_t count) {
  ThreadScratch& scratch = threadScratch();
  const size_t index = size_t(slot);
  scratch.oversized[index].release();
  float* data;
  if (count > kKeepFloats) {
    scratch.oversized[index].reserve(count);
    data = scratch.oversized[index].data();
  } else {
    scratch.buffers[index].reserve(count);
    data = scratch.buffers[index].data();
  }
  scratch.recount();
  return data;
}

size_t scratchBytes() {
  std::lock_guard<std::mutex> lock(registry().mutex);
  size_t total = 0;
  for (ThreadScratch* scratch : registry().threads) total += scratch->bytes;
  return total;
}

size_t releaseScratch() {
  ThreadScratch* self = &threadScratch();  // before the registry's lock: a new one registers itself
  std::lock_guard<std::mutex> lock(registry().mutex);
  size_t freed = 0;
  for (ThreadScratch* scratch : registry().threads) {
    // The calling thread between leases owns its buffers outright (and inside one, they are in use).
    if (scratch == self) {
      if (scratch->leases == 0) freed += scratch->freeAll();
      continue;
    }
    std::unique_lock<std::mutex> busy(scratch->inUse, std::try_to_lock);
    if (busy.owns_lock()) freed += scratch->freeAll();
  }
  return freed;
}

}  // namespace kvslim::cpu
