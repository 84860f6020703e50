// Decode (flash-decoding): grid = key split x row block x kv head. A block streams its key range
// straight from the pages in stored dtype, once for all the rows of its kv head (GQA), and
// leaves one softmax partial per row; launchMergeSplits combines the splits.
//
// Inside a block, groups of TPT threads each take one token at a time: the TPT threads split the
// head dim (VEC elements per load, CHUNKS loads per thread), reduce the dot products with warp
// shuffles, and keep a private online softmax over the tokens they saw. The groups are merged
// once, at the end, through shared memory, so the streaming loop has no block-wide barrier.
#include "attention_device.cuh"

namespace kvslim::cuda {

namespace {

constexpr int kDecodeThreads = 128;
constexpr int kMinSplitTokens = 256;  // shorter splits cost more in partials and merging than they win
// Blocks per multiprocessor the key splits aim at: a block keeps about 16 KB of K and V in flight,
// and an H200 needs several times that per multiprocessor to cover the memory latency (at 2 blocks,
// ncu read 48% of DRAM bandwidth on a 256K-token f16 decode).
constexpr int kBlocksPerMultiprocessor = 8;
// Per-thread register budget: query and accumulator floats of all rows of a block, each.
constexpr int kMaxRowDims = 64;

// Row blocks: a thread holds ROWS x (VEC x CHUNKS) query and accumulator floats. The scalar path
// keeps one row per block, its CHUNKS already fill the budget.
__host__ __device__ constexpr int decodeMaxRows(int vec, int chunks) { return vec == 1 ? 1 : kMaxRowDims / (vec * chunks); }

// Tokens each group loads before it computes: about 64 bytes of K (and of V) per thread in flight.
__host__ __device__ constexpr int decodeUnroll(DType type, int dimsPerThread) {
  const int unroll = 64 / (dimsPerThread * (type == DType::F32 ? 4 : 2));
  return unroll < 1 ? 1 : unroll > 4 ? 4 : unroll;
}

template <DType T, int VEC, int TPT, int CHUNKS, int ROWS>
__global__ void __launch_bounds__(kDecodeThreads) attentionDecodeKernel(const AttentionKernelArgs args) {
  constexpr int kDims = VEC * CHUNKS;  // elements of a row one thread owns
  constexpr int kGroups = kDecodeThreads / TPT;
  constexpr int kUnroll = decodeUnroll(T, kDims);
  constexpr int kPaddedDim = TPT * kDims;
  static_assert(TPT <= 32 && 32 % TPT == 0, "a token group lives inside one warp");
  static_assert(sizeof(float) * kGroups * ROWS * (kPaddedDim + 2) <= 48 * 1024, "static shared memory limit");
  __shared__ float groupMax[kGroups][ROWS];
  __shared__ float groupSum[kGroups][ROWS];
  __shared__ __align__(16) float groupAcc[kGroups][ROWS][kPaddedDim];
  __shared__ float rowMax[ROWS];
  __shared__ float rowSum[ROWS];

  const int split = blockIdx.x;
  const int firstRow = blockIdx.y * ROWS;
  const int head = blockIdx.z;
  const int group = threadIdx.x / TPT;
  const int lane = threadIdx.x % TPT;
  const int dim = args.headDim;
  const HeadSpan span = args.heads[head];

  // Element e of chunk c of this thread is dimension (c * TPT + lane) * VEC + e: consecutive
  // threads read consecutive VEC-element pieces of a row.
  auto dimension = [&](int chunk, int element) { return (chunk * TPT + lane) * VEC + element; };
  auto chunkInRow = [&](int chunk) { return dimension(chunk, 0) < dim; };  // whole chunk: dim % VEC == 0

  int last[ROWS];
  int blockLast = -1;
  float q[ROWS][kDims];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const int row = firstRow + r;
    const bool inHead = row < args.rowsPerHead;
    last[r] = inHead ? lastKey(args, span.tokens, row) : -1;
    blockLast = max(blockLast, last[r]);
    const float* query = args.q + static_cast<size_t>(inHead ? queryIndex(args, head, row) : 0) * dim;
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c)
#pragma unroll
      for (int e = 0; e < VEC; ++e)
        q[r][c * VEC + e] = inHead && chunkInRow(c) ? query[dimension(c, e)] * args.scaleLog2e : 0.0f;
  }
  const KeyRange keys = splitKeys(args, span.tokens, split, blockLast);

  float runMax[ROWS], runSum[ROWS], acc[ROWS][kDims];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    runMax[r] = kNoScoreYet;
    runSum[r] = 0.0f;
#pragma unroll
    for (int i = 0; i < kDims; ++i) acc[r][i] = 0.0f;
  }

  for (int step = keys.begin; step < keys.end; step += kGroups * kUnroll) {
    // All K and V loads of the step first: kUnroll tokens per group in flight together.
    KvPacket<T, VEC> keyPackets[kUnroll][CHUNKS], valuePackets[kUnroll][CHUNKS];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int token = step + u * kGroups + group;
      const bool present = token < keys.end;
      const unsigned char* keyRow = present ? kvRow(args.keyPages, span, token, args) : nullptr;
      const unsigned char* valueRow = present ? kvRow(args.valuePages, span, token, args) : nullptr;
#pragma unroll
      for (int c = 0; c < CHUNKS; ++c) {
        if (present && chunkInRow(c)) {
          keyPackets[u][c].load(keyRow, dimension(c, 0));
          valuePackets[u][c].load(valueRow, dimension(c, 0));
        } else {
          keyPackets[u][c].clear();
          valuePackets[u][c].clear();
        }
      }
    }

    float scores[kUnroll][ROWS];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float key[kDims];
#pragma unroll
      for (int c = 0; c < CHUNKS; ++c) keyPackets[u][c].toFloat(key + c * VEC);
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        float dot = 0.0f;
#pragma unroll
        for (int i = 0; i < kDims; ++i) dot = fmaf(q[r][i], key[i], dot);
        scores[u][r] = dot;
      }
    }
    // Dot products are split over the TPT threads of a group: xor offsets below TPT stay inside it.
#pragma unroll
    for (int offset = TPT / 2; offset > 0; offset /= 2)
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
#pragma unroll
        for (int r = 0; r < ROWS; ++r) scores[u][r] += __shfl_xor_sync(0xffffffffu, scores[u][r], offset);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int token = step + u * kGroups + group;
#pragma unroll
      for (int r = 0; r < ROWS; ++r)
        if (token >= keys.end || token > last[r]) scores[u][r] = -INFINITY;
    }

    // Online softmax over the step's tokens, then their values.
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      float stepMax = runMax[r];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) stepMax = fmaxf(stepMax, scores[u][r]);
      const float alpha = exp2f(runMax[r] - stepMax);
      runMax[r] = stepMax;
      runSum[r] *= alpha;
#pragma unroll
      for (int i = 0; i < kDims; ++i) acc[r][i] *= alpha;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) scores[u][r] = exp2f(scores[u][r] - stepMax);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float value[kDims];
#pragma unroll
      for (int c = 0; c < CHUNKS; ++c) valuePackets[u][c].toFloat(value + c * VEC);
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        runSum[r] += scores[u][r];
#pragma unroll
        for (int i = 0; i < kDims; ++i) acc[r][i] = fmaf(scores[u][r], value[i], acc[r][i]);
      }
    }
  }

  // Merge the groups: rescale each to the block max, then sum them per (row, dimension).
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      groupMax[group][r] = runMax[r];
      groupSum[group][r] = runSum[r];
    }
  }
  __syncthreads();
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    float blockMax = groupMax[0][r];
#pragma unroll
    for (int g = 1; g < kGroups; ++g) blockMax = fmaxf(blockMax, groupMax[g][r]);
    const float weight = exp2f(runMax[r] - blockMax);
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c)
#pragma unroll
      for (int e = 0; e < VEC; ++e) groupAcc[group][r][dimension(c, e)] = acc[r][c * VEC + e] * weight;
    if (threadIdx.x == r) {
      float total = 0.0f;
#pragma unroll
      for (int g = 0; g < kGroups; ++g) total += groupSum[g][r] * exp2f(groupMax[g][r] - blockMax);
      rowMax[r] = blockMax;
      rowSum[r] = total;
    }
  }
  __syncthreads();

  for (int i = threadIdx.x; i < ROWS * dim; i += kDecodeThreads) {
    const int r = i / dim;
    const int d = i - r * dim;
    const int row = firstRow + r;
    if (row >= args.rowsPerHead) break;  // rows only grow with i
    float value = 0.0f;
#pragma unroll
    for (int g = 0; g < kGroups; ++g) value += groupAcc[g][r][d];
    if (args.splits == 1) {
      const float inverse = rowSum[r] > 0.0f ? 1.0f / rowSum[r] : 0.0f;
      const int query = queryIndex(args, head, row);
      args.out[static_cast<size_t>(query) * dim + d] = value * inverse;
      if (d == 0 && args.lse != nullptr) args.lse[query] = rowLse(rowMax[r], rowSum[r]);
    } else {
      const size_t partial = (static_cast<size_t>(head) * args.rowsPerHead + row) * args.splits + split;
      args.partialAcc[partial * dim + d] = value;
      if (d == 0) {
        args.partialMax[partial] = rowMax[r];
        args.partialSum[partial] = rowSum[r];
      }
    }
  }
}

// Rows per block on the host side, matching the kernel launchDecodeShape picks.
int decodeRowsPerBlock(const AttentionKernelArgs& args) {
  if (!args.vectorized) return 1;
  const int dimsPerThread = args.headDim <= 256 ? 8 : args.headDim <= 512 ? 16 : 32;
  const int maxRows = decodeMaxRows(8, dimsPerThread / 8);
  int rows = 1;
  while (rows < args.rowsPerHead && rows < maxRows) rows *= 2;
  return rows;
}

// Smallest compiled row count that holds `rows` (rows never exceeds decodeMaxRows).
template <DType T, int VEC, int TPT, int CHUNKS, int ROWS = 1>
cudaError_t launchDecodeRows(const AttentionKernelArgs& args, int rows, cudaStream_t stream) {
  if constexpr (ROWS < decodeMaxRows(VEC, CHUNKS)) {
    if (rows > ROWS) return launchDecodeRows<T, VEC, TPT, CHUNKS, ROWS * 2>(args, rows, stream);
  }
  const dim3 grid(args.splits, (args.rowsPerHead + ROWS - 1) / ROWS, args.kvHeads);
  attentionDecodeKernel<T, VEC, TPT, CHUNKS, ROWS><<<grid, kDecodeThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

// Threads per token and loads per thread by head size: a row is read by as few threads as keep
// loads 16 bytes wide, so short rows still fill a warp with several tokens.
template <DType T>
cudaError_t launchDecodeShape(const AttentionKernelArgs& args, cudaStream_t stream) {
  const int rows = decodeRowsPerBlock(args);
  const int dim = args.headDim;
  if (args.vectorized) {
    if (dim <= 64) return launchDecodeRows<T, 8, 8, 1>(args, rows, stream);
    if (dim <= 128) return launchDecodeRows<T, 8, 16, 1>(args, rows, stream);
    if (dim <= 256) return launchDecodeRows<T, 8, 32, 1>(args, rows, stream);
    if (dim <= 512) return launchDecodeRows<T, 8, 32, 2>(args, rows, stream);
    return launchDecodeRows<T, 8, 32, 4>(args, rows, stream);
  }
  if (dim <= 128) return launchDecodeRows<T, 1, 32, 4>(args, rows, stream);
  if (dim <= 256) return launchDecodeRows<T, 1, 32, 8>(args, rows, stream);
  return launchDecodeRows<T, 1, 32, 32>(args, rows, stream);
}

}  // namespace

SplitPlan planAttentionDecode(const AttentionKernelArgs& args, int multiprocessors) {
  const int rows = decodeRowsPerBlock(args);
  const long long rowBlocks = (args.rowsPerHead + rows - 1) / rows;
  return planKeySplits(args.maxTokens, rowBlocks * args.kvHeads, multiprocessors, kMinSplitTokens, 1, kBlocksPerMultiprocessor);
}

cudaError_t launchAttentionDecode(const AttentionKernelArgs& args, cudaStream_t stream) {
  switch (args.kvType) {
    case DType::F16: return launchDecodeShape<DType::F16>(args, stream);
    case DType::BF16: return launchDecodeShape<DType::BF16>(args, stream);
    default: return launchDecodeShape<DType::F32>(args, stream);
  }
}

}  // namespace kvslim::cuda
