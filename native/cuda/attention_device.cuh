// Device-side pieces every attention kernel shares: which query a row reads, where its causal
// window ends, where a token's K/V row lives in its pages, and stored dtypes turned into floats.
#pragma once
#include <cuda_fp16.h>

#include "attention_kernels.cuh"

namespace kvslim::cuda {

// Finite start of a running max: exp2(kNoScoreYet - m) is 0 and exp2(kNoScoreYet - kNoScoreYet)
// is 1, so a row that has seen only masked keys never computes inf - inf.
constexpr float kNoScoreYet = -1e30f;

// Index of a row's query vector in q / out, in units of headDim (rows ordered position, group member).
__device__ __forceinline__ int queryIndex(const AttentionKernelArgs& args, int head, int row) {
  return (row / args.group) * args.qHeads + head * args.group + row % args.group;
}

// Last key a row may attend in a head of `tokens` keys (DESIGN.md causal alignment); -1 and
// below mean none.
__device__ __forceinline__ int lastKey(const AttentionKernelArgs& args, int tokens, int row) {
  return args.causal ? tokens - args.n + row / args.group : tokens - 1;
}

// Keys [begin, end) of `split` that a block whose rows end at `blockLastKey` needs.
struct KeyRange {
  int begin;
  int end;
};

__device__ __forceinline__ KeyRange splitKeys(const AttentionKernelArgs& args, int tokens, int split, int blockLastKey) {
  const long long first = static_cast<long long>(split) * args.splitTokens;
  const int begin = first < tokens ? static_cast<int>(first) : tokens;
  long long end = first + args.splitTokens;
  if (end > tokens) end = tokens;
  if (end > static_cast<long long>(blockLastKey) + 1) end = static_cast<long long>(blockLastKey) + 1;
  return {begin, end > begin ? static_cast<int>(end) : begin};
}

// Token t is row r = span.firstRow + t of the head's pages: row r % pageTokens of page
// r / pageTokens; 32-bit division because the backend keeps firstRow + tokens and pageTokens
// below 2^31. Args is AttentionKernelArgs or ScoresKernelArgs (pageTokens, rowBytes).
template <class Args>
__device__ __forceinline__ const unsigned char* kvRow(const void* const* pages, const HeadSpan& span, int token,
                                                      const Args& args) {
  const unsigned row = static_cast<unsigned>(span.firstRow) + static_cast<unsigned>(token);
  const unsigned page = row / static_cast<unsigned>(args.pageTokens);
  const unsigned slot = row - page * static_cast<unsigned>(args.pageTokens);
  return static_cast<const unsigned char*>(pages[span.firstPage + page]) + static_cast<size_t>(slot) * args.rowBytes;
}

// What a row's softmax state (max and sum in log2 units) leaves in AttentionKernelArgs::lse.
__device__ __forceinline__ float rowLse(float max, float sum) { return sum > 0.0f ? max + log2f(sum) : -INFINITY; }

template <DType T>
__host__ __device__ constexpr int elementBytes() {
  return T == DType::F32 ? 4 : 2;
}

__device__ __forceinline__ float f16BitsToFloat(unsigned bits) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
}

// bf16 is the top half of an f32: widening is a shift.
__device__ __forceinline__ float bf16BitsToFloat(unsigned bits) { return __uint_as_float(bits << 16); }

template <DType T>
__device__ __forceinline__ float loadElement(const unsigned char* row, int element) {
  if constexpr (T == DType::F32) {
    return __ldg(reinterpret_cast<const float*>(row) + element);
  } else {
    const unsigned bits = __ldg(reinterpret_cast<const unsigned short*>(row) + element);
    return T == DType::BF16 ? bf16BitsToFloat(bits) : f16BitsToFloat(bits);
  }
}

// VEC consecutive elements of a row in stored dtype, loaded now and widened later so the loads
// of several tokens are in flight before any arithmetic waits on them.
template <DType T, int VEC>
struct KvPacket;

// Eight elements in 16-byte loads (two for f32); the row must be 16-byte aligned.
template <DType T>
struct KvPacket<T, 8> {
  static constexpr int kLoads = T == DType::F32 ? 2 : 1;
  uint4 raw[kLoads];

  __device__ __forceinline__ void load(const unsigned char* row, int element) {
    const uint4* source = reinterpret_cast<const uint4*>(row + static_cast<size_t>(element) * elementBytes<T>());
#pragma unroll
    for (int i = 0; i < kLoads; ++i) raw[i] = __ldg(source + i);
  }
  __device__ __forceinline__ void clear() {
#pragma unroll
    for (int i = 0; i < kLoads; ++i) raw[i] = make_uint4(0, 0, 0, 0);
  }
  __device__ __forceinline__ void toFloat(float* out) const {
#pragma unroll
    for (int i = 0; i < kLoads; ++i) {
      const unsigned words[4] = {raw[i].x, raw[i].y, raw[i].z, raw[i].w};
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        if constexpr (T == DType::F32) {
          out[i * 4 + w] = __uint_as_float(words[w]);
        } else if constexpr (T == DType::BF16) {
          out[i * 8 + 2 * w] = bf16BitsToFloat(words[w] & 0xffffu);  // the low half is the earlier element
          out[i * 8 + 2 * w + 1] = __uint_as_float(words[w] & 0xffff0000u);
        } else {
          out[i * 8 + 2 * w] = f16BitsToFloat(words[w] & 0xffffu);
          out[i * 8 + 2 * w + 1] = f16BitsToFloat(words[w] >> 16);
        }
      }
    }
  }
};

// One element: any headDim and any alignment.
template <DType T>
struct KvPacket<T, 1> {
  float value;

  __device__ __forceinline__ void load(const unsigned char* row, int element) { value = loadElement<T>(row, element); }
  __device__ __forceinline__ void clear() { value = 0.0f; }
  __device__ __forceinline__ void toFloat(float* out) const { out[0] = value; }
};

// Copies dimensions [first, first + CHUNK) of keys (or values) [firstKey, firstKey + KEYS) into a
// shared tile of rows CHUNK + 4 floats apart (the padding puts the float4 reads of 8 consecutive
// lanes, one row each, in distinct banks), widened to f32; tokens at or past keyEnd and dimensions
// past headDim become 0, so they add nothing to dot products. THREADS: the block's threads, all of
// which call it. Args is AttentionKernelArgs or ScoresKernelArgs.
template <DType T, int KEYS, int CHUNK, int THREADS, class Args>
__device__ __forceinline__ void stageRows(float* tile, const void* const* pages, const HeadSpan& span, const Args& args,
                                          int firstKey, int keyEnd, int first) {
  constexpr int kStride = CHUNK + 4;
  if (args.vectorized) {
    constexpr int kPackets = CHUNK / 8;
    for (int i = threadIdx.x; i < KEYS * kPackets; i += THREADS) {
      const int j = i / kPackets;
      const int offset = (i - j * kPackets) * 8;
      const int key = firstKey + j;
      float values[8];
      if (key < keyEnd && first + offset < args.headDim) {
        KvPacket<T, 8> packet;
        packet.load(kvRow(pages, span, key, args), first + offset);
        packet.toFloat(values);
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) values[e] = 0.0f;
      }
      float4* destination = reinterpret_cast<float4*>(tile + j * kStride + offset);
      destination[0] = make_float4(values[0], values[1], values[2], values[3]);
      destination[1] = make_float4(values[4], values[5], values[6], values[7]);
    }
  } else {
    for (int i = threadIdx.x; i < KEYS * CHUNK; i += THREADS) {
      const int j = i / CHUNK;
      const int offset = i - j * CHUNK;
      const int key = firstKey + j;
      const bool present = key < keyEnd && first + offset < args.headDim;
      tile[j * kStride + offset] = present ? loadElement<T>(kvRow(pages, span, key, args), first + offset) : 0.0f;
    }
  }
}

__device__ __forceinline__ float warpMax(float value) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) value = fmaxf(value, __shfl_xor_sync(0xffffffffu, value, offset));
  return value;
}

__device__ __forceinline__ float warpSum(float value) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

// The grid of an attention-mass kernel (lse_mass.cu, lse_mass_tf32.cu): a block per `keys` mass
// columns and kv head. False when no launch can cover it.
inline bool massGrid(long long massStride, int keys, int kvHeads, dim3* grid) {
  const long long keyBlocks = (massStride + keys - 1) / keys;
  if (keyBlocks < 1 || keyBlocks > 0x7fffffffLL || kvHeads < 1 || kvHeads > 65535) return false;
  *grid = dim3(static_cast<unsigned>(keyBlocks), static_cast<unsigned>(kvHeads));
  return true;
}

// Launches KERNEL with `shared` bytes of dynamic shared memory. Above 48 KiB a kernel must opt in:
// once per kernel (device 0 is the only device used); an opt-in the device cannot grant fails
// here instead of at launch.
template <auto KERNEL, class... Args>
cudaError_t launchWithShared(dim3 grid, int threads, size_t shared, cudaStream_t stream, const Args&... args) {
  static const cudaError_t optIn = cudaFuncSetAttribute(KERNEL, cudaFuncAttributeMaxDynamicSharedMemorySize, int(shared));
  if (optIn != cudaSuccess) return optIn;
  KERNEL<<<grid, threads, shared, stream>>>(args...);
  return cudaGetLastError();
}

}  // namespace kvslim::cuda
