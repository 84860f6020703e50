// Software prefetch hints shared by the kernels (compiled once per instruction set) and the
// drivers. Prefetch builtins only, always inlined: no copy compiled with one instruction set's
// flags can end up in code that runs on another. always_inline also because GCC finds a function
// whose only effect is prefetching "const" and deletes its calls unless they were inlined first.
#pragma once

namespace kvslim::cpu {

// Software prefetch of a streamed line (decode, score scans, KIVI): into L1 (prefetcht0) or L2
// (prefetcht1), as streamPrefetchToL1() chose for this CPU (kernel_table.h); a kernel reads the
// choice once per call. With the non-temporal hint (prefetchnta) an Intel Xeon (Granite Rapids
// class) stalled on the prefetches themselves: a 64K-token f16 decode read 7 GB/s instead of 19
// of its 28.
__attribute__((always_inline)) inline void prefetchStream(const void* line, bool toL1) {
  if (toL1) {
    __builtin_prefetch(line, 0, 3);
  } else {
    __builtin_prefetch(line, 0, 2);
  }
}

// Into L2 (prefetcht1) whatever the CPU: the prefill's key blocks ahead and the H2O slab (the T0
// hint made no difference to the prefill on the AMD VM where it made decode faster).
__attribute__((always_inline)) inline void prefetchL2(const void* line) { __builtin_prefetch(line, 0, 2); }

}  // namespace kvslim::cpu
