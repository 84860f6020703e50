// Grow-only per-thread scratch for the attention drivers, on 2 MiB pages (huge_memory.h). A
// 4K-token prefill needs ~150 MB of f32 buffers; allocating them per call means mmap, page faults
// and munmap every time, which cost as much as the math. Each calling thread keeps its largest
// buffers (up to a cap) until releaseScratch().
#pragma once
#include <cstddef>
#include <vector>

namespace kvslim::cpu {

enum class ScratchSlot { Queries = 0, Accumulators, Keys, Values, Count };

// Held by a driver for as long as it uses the calling thread's scratch: releaseScratch() on
// another thread skips a leased thread instead of freeing buffers in use. Nested leases on one
// thread cost nothing.
class ScratchLease {
 public:
  ScratchLease();
  ~ScratchLease();
  ScratchLease(const ScratchLease&) = delete;
  ScratchLease& operator=(const ScratchLease&) = delete;
};

// Uninitialised floats, valid until the next call for the same slot on this thread and while the
// lease (the caller's, on this thread) lives.
float* scratchFloats(const ScratchLease& lease, ScratchSlot slot, size_t count);

// Bytes of scratch every thread keeps.
size_t scratchBytes();
// Frees the scratch of every thread not inside a lease; returns the bytes freed.
size_t releaseScratch();

}  // namespace kvslim::cpu
