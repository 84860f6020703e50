// TF32 tensor-core pieces shared by the kernels that use them (lse_mass_tf32.cu,
// attention_prefill_tf32.cu): the rounding to TF32, the two-part split that keeps f32 accuracy,
// and the m16n8k8 MMA with its fragment layout.
//
// f16 and bf16 numbers are TF32 numbers as they are (11 and 8 significant bits), so K and V stored
// in those types enter the MMA exactly; an f32 operand x is split into hi = tf32(x) and
// lo = tf32(x - hi) (x - hi is exact), which leaves x - hi - lo below 2^-22 |x|. The products of
// TF32 numbers are exact in f32 and the MMA sums in f32: hi.y + lo.y is as accurate as f32 FMAs.
#pragma once
#include <cuda_runtime.h>

namespace kvslim::cuda {

// TF32 arithmetic exists from compute capability 8.0; below it these kernels are never launched
// (tensorCoresPresent), and the device functions compile to placeholders.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define KVSLIM_TF32_MMA 1
#endif

__device__ __forceinline__ unsigned toTf32(float value) {
#ifdef KVSLIM_TF32_MMA
  unsigned bits;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(bits) : "f"(value));
  return bits;
#else
  return __float_as_uint(value);
#endif
}

// x as hi + lo, both TF32.
struct Tf32Pair {
  unsigned hi;
  unsigned lo;
};

__device__ __forceinline__ Tf32Pair splitTf32(float value) {
  const unsigned hi = toTf32(value);
  return {hi, toTf32(value - __uint_as_float(hi))};
}

// c += a * b for one 16x8x8 tile: a holds rows (g, g + 8) x columns (t, t + 4) of a 16x8 tile as
// a[0] = (g, t), a[1] = (g + 8, t), a[2] = (g, t + 4), a[3] = (g + 8, t + 4); b rows (t, t + 4) of
// column g of an 8x8 tile; c[0..3] = (g, 2t), (g, 2t + 1), (g + 8, 2t), (g + 8, 2t + 1); where
// g = lane / 4 and t = lane % 4 (the PTX ISA's fragment layout for .tf32 m16n8k8).
__device__ __forceinline__ void mmaTf32(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
#ifdef KVSLIM_TF32_MMA
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
  __trap();
#endif
}

// Whether the current device has TF32 tensor cores and grants `sharedBytes` of shared memory to a
// block (asked once per size by the caller's static).
inline bool tensorCoresPresent(size_t sharedBytes) {
  int device = 0, major = 0, optIn = 0;
  return cudaGetDevice(&device) == cudaSuccess &&
         cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess && major >= 8 &&
         cudaDeviceGetAttribute(&optIn, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) == cudaSuccess &&
         size_t(optIn) >= sharedBytes;
}

}  // namespace kvslim::cuda
