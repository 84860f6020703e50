// Grow-only per-thread scratch for the attention drivers, on 2 MiB pages (huge_memory.h). A
// 4K-token prefill needs ~150 MB of f32 buffers; allocating them per call means mmap, page faults
// and munmap every time, which cost as much as the math. Each calling thread keeps its largest
// buffers (up to a cap).
#pragma once
#include <cstddef>
#include <vector>

namespace kvslim::cpu {

enum class ScratchSlot { Queries = 0, Accumulators, Keys, Values, Count };

// Uninitialised floats, valid until the next call for the same slot on this thread.
float* scratchFloats(ScratchSlot slot, size_t count);

}  // namespace kvslim::cpu
