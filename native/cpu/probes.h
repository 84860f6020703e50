// Machine-limit probes for the bench: measured in the same process and run as the kernels.
#pragma once
#include <cstddef>
#include <cstdint>

namespace kvslim::cpu {

// Best-of-`repeats` streaming read rate over a `bytes` buffer with `threads` threads, bytes/s.
double measureReadBandwidth(size_t bytes, int32_t threads, int32_t repeats);
// Best-of-`repeats` f32 FMA throughput of the active SIMD table on `threads` threads, FLOP/s.
double measureFmaPeak(int32_t threads, int32_t repeats);

}  // namespace kvslim::cpu
