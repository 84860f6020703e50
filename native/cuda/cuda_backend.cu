// The CUDA backend: KV pages in GPU memory, attention by the kernels of attention_*.cu and
// kivi_attention.cu. attention(), attentionScores(), attentionMass() and kiviAttention() receive
// host queries and host arrays of device page pointers; they upload both in one copy into a
// reusable device workspace, launch decode or prefill (the CPU backend's split), the scores
// kernel, the attention mass kernels or the KIVI kernel, merge key splits, and copy the output
// (and the log-sum-exp rows when asked) back before they return. pageBoxes() and topPages()
// (Quest, page_bounds.cu and block_scores.cu's top-k) do the same with every kv head's page
// tables or query rows in one upload, keep the boxes in device memory the quest policy allocated,
// and bring back only the chosen pages; blockScores() and topBlocks() (ActQKV,
// block_scores.cu) score the representatives the actqkv policy keeps in device memory.
// kiviAttention() also masks the tokens H2O flagged and, when the mass is asked, sums it from the
// scores the KIVI kernel captured (captured_mass.cu): only [kvHeads, massStride] doubles come back.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <numeric>
#include <new>
#include <string>
#include <vector>

#include "../core/backend.h"
#include "../core/cuda_info.h"
#include "attention_kernels.cuh"
#include "block_scores.cuh"
#include "captured_mass.cuh"
#include "gather.cuh"
#include "kivi_kernels.cuh"
#include "top_keys.cuh"

namespace kvslim {

namespace cuda {
// attention_mass.cu: device scratch of one call, and its kernels enqueued on `stream` (the result
// is the first args.columns doubles of the scratch).
size_t attentionMassScratchBytes(const AttentionMassArgs& args);
cudaError_t launchAttentionMass(const AttentionMassArgs& args, const ScoresKernelArgs& keptScores,
                                const ScoresKernelArgs& tailScores, void* scratch, cudaStream_t stream);
// page_bounds.cu: Quest's boxes (keyPages: the view's page table from its first page, on the
// device) and every head's bounds (q, heads and bounds: device memory), enqueued on `stream`.
cudaError_t launchPageBoxes(const PageBoxesArgs& args, const void* const* keyPages, cudaStream_t stream);
cudaError_t launchPageBounds(const TopPagesArgs& args, const float* q, const TopPagesHead* heads, double* bounds, long long stride,
                             cudaStream_t stream);
}  // namespace cuda

namespace {

using cuda::AttentionKernelArgs;
using cuda::HeadSpan;
using cuda::KiviHeadSpan;
using cuda::KiviKernelArgs;
using cuda::ScoresKernelArgs;
using cuda::SplitPlan;

constexpr int64_t kDecodeRowsLimit = 16;  // rows per kv head up to which decode wins (as on the CPU)
// Tokens per kv head the kernels index with 32-bit integers, with room for a step past the end.
constexpr int64_t kMaxTokens = int64_t(1) << 30;
constexpr int32_t kMaxKvHeads = 65535;  // a grid dimension
constexpr size_t kAlignment = 256;      // of every workspace region (cudaMalloc's own alignment)

// An error stays with the call that returned it: the runtime's last-error slot is cleared so a
// later cudaGetLastError after a kernel launch does not report it again.
Status cudaStatus(cudaError_t error, const std::string& call) {
  if (error == cudaSuccess) return Status::ok();
  cudaGetLastError();
  const ErrorCode code = error == cudaErrorMemoryAllocation ? ErrorCode::OutOfMemory : ErrorCode::Internal;
  return Status(code, "CUDA " + call + " failed: " + cudaGetErrorString(error));
}

size_t alignUp(size_t bytes) { return (bytes + kAlignment - 1) / kAlignment * kAlignment; }

// The query-side fields both attention entry points give their kernels.
AttentionKernelArgs kernelShape(int32_t n, int32_t qHeads, int32_t kvHeads, int32_t headDim, bool causal, float scale) {
  AttentionKernelArgs kernel;
  kernel.n = n;
  kernel.qHeads = qHeads;
  kernel.kvHeads = kvHeads;
  kernel.headDim = headDim;
  kernel.group = qHeads / kvHeads;
  kernel.rowsPerHead = n * kernel.group;
  kernel.causal = causal;
  kernel.scaleLog2e = scale * 1.4426950408889634f;  // folded into q so the kernels use exp2
  return kernel;
}

// Sizes core validated already, checked again before any memory is touched (a caller can lie)
// together with the limits of the kernels' integer indexing. Shared by attention and kiviAttention.
Status checkQueryShape(const char* what, int32_t n, int32_t qHeads, int32_t kvHeads, int32_t headDim) {
  if (n < 1 || qHeads < 1 || kvHeads < 1 || qHeads % kvHeads != 0) {
    return Status(ErrorCode::Shape, std::string(what) + " needs n, qHeads, kvHeads >= 1 with qHeads a multiple of kvHeads, but received n=" +
                                        std::to_string(n) + ", qHeads=" + std::to_string(qHeads) +
                                        ", kvHeads=" + std::to_string(kvHeads));
  }
  if (headDim < 1 || headDim > 1024) {
    return Status(ErrorCode::Shape, "headDim must be in [1, 1024], but received " + std::to_string(headDim));
  }
  if (kvHeads > kMaxKvHeads) {
    return Status(ErrorCode::Shape, "the CUDA backend supports at most " + std::to_string(kMaxKvHeads) +
                                        " kv heads, but received " + std::to_string(kvHeads));
  }
  if (int64_t(n) * qHeads > INT32_MAX) {
    return Status(ErrorCode::Shape, "n x qHeads must be below 2^31 on the CUDA backend, but is " +
                                        std::to_string(int64_t(n) * qHeads));
  }
  return Status::ok();
}

Status checkHeadTokens(int32_t head, int64_t tokens) {
  if (tokens < 0 || tokens > kMaxTokens) {
    return Status(ErrorCode::Shape, "the CUDA backend supports 0 to 2^30 tokens per kv head, but kv head " +
                                        std::to_string(head) + " holds " + std::to_string(tokens));
  }
  return Status::ok();
}

// Host arrays every entry point reads or writes.
Status checkHostPointers(const char* what, const void* q, const void* out, const void* heads) {
  if (q == nullptr || out == nullptr || heads == nullptr) {
    return Status(ErrorCode::Internal, std::string(what) + " received a null query, output or head array");
  }
  return Status::ok();
}

// Page geometry and dtype shared by attention and attentionScores.
Status checkPages(int32_t headDim, int64_t pageTokens, int64_t rowStride, DType kvType) {
  if (pageTokens < 1 || rowStride < headDim) {
    return Status(ErrorCode::Shape, "pages need pageTokens >= 1 and rowStride >= headDim, but received pageTokens=" +
                                        std::to_string(pageTokens) + ", rowStride=" + std::to_string(rowStride));
  }
  if (kvType != DType::F32 && kvType != DType::F16 && kvType != DType::BF16) {
    return Status(ErrorCode::Dtype, "unknown kv dtype " + std::to_string(int(kvType)));
  }
  return Status::ok();
}

// The pages of a head's page table that its tokens touch: token t is row firstRow + t of the
// table, so they are pages [first, first + count), and token 0 is row `firstRow` of page `first`.
// Only these are staged for the kernels (a head without tokens stages none).
struct HeadPages {
  int64_t first = 0;
  int64_t count = 0;
  int64_t firstRow = 0;
};

// For a checked head (tokens in [0, 2^30], 0 <= firstRow <= INT64_MAX - tokens).
HeadPages headPages(const KVHeadView& head, int64_t pageTokens) {
  HeadPages pages;
  if (head.tokens == 0) return pages;
  pages.first = head.firstRow / pageTokens;
  pages.count = (head.firstRow + head.tokens - 1) / pageTokens + 1 - pages.first;
  pages.firstRow = head.firstRow - pages.first * pageTokens;
  return pages;
}

// A head's token count and first row, and a non-null pointer for every page the kernels read
// (values only for attention). The kernels index rows with 32-bit integers and a page clamped to
// 2^30 rows: a head that starts inside a page longer than that is refused.
Status checkHeadView(int32_t h, const KVHeadView& head, int64_t pageTokens, bool values) {
  KVSLIM_RETURN_IF_ERROR(checkHeadTokens(h, head.tokens));
  if (head.firstRow < 0 || head.firstRow > INT64_MAX - head.tokens) {
    return Status(ErrorCode::Shape, "kv head " + std::to_string(h) + " needs firstRow >= 0, but holds firstRow=" +
                                        std::to_string(head.firstRow) + " with tokens=" + std::to_string(head.tokens));
  }
  const HeadPages pages = headPages(head, pageTokens);
  if (pageTokens > kMaxTokens && pages.firstRow != 0) {
    return Status(ErrorCode::Shape, "the CUDA backend needs firstRow a multiple of pageTokens when pageTokens exceeds 2^30, but kv head " +
                                        std::to_string(h) + " holds firstRow=" + std::to_string(head.firstRow) +
                                        " with pageTokens=" + std::to_string(pageTokens));
  }
  if (pages.count == 0) return Status::ok();
  if (head.keyPages == nullptr || (values && head.valuePages == nullptr)) {
    return Status(ErrorCode::Internal, "kv head " + std::to_string(h) + " holds tokens but has a null page table");
  }
  for (int64_t p = pages.first; p < pages.first + pages.count; ++p) {
    if (head.keyPages[p] == nullptr || (values && head.valuePages[p] == nullptr)) {
      return Status(ErrorCode::Internal, "kv head " + std::to_string(h) + " page " + std::to_string(p) + " is null");
    }
  }
  return Status::ok();
}

Status checkArgs(const AttentionArgs& args) {
  KVSLIM_RETURN_IF_ERROR(checkQueryShape("attention", args.n, args.qHeads, args.kvHeads, args.headDim));
  KVSLIM_RETURN_IF_ERROR(checkHostPointers("attention", args.q, args.out, args.heads));
  KVSLIM_RETURN_IF_ERROR(checkPages(args.headDim, args.pageTokens, args.rowStride, args.kvType));
  for (int32_t h = 0; h < args.kvHeads; ++h) KVSLIM_RETURN_IF_ERROR(checkHeadView(h, args.heads[h], args.pageTokens, true));
  // Core attends an older segment in a second call (joinsOlder() is false), so a call with the
  // mass (fusesMass()) holds one segment.
  KVSLIM_RETURN_IF_ERROR(checkAttentionOlder(args, false));
  return checkAttentionMass(args, true);
}

// The limits of the top-k ops' kernels (topKeys, topPages): kv heads on a grid dimension, a
// head's query rows staged in shared memory.
Status checkTopLimits(const char* what, int32_t headDim, int32_t kvHeads) {
  if (headDim > 1024 || kvHeads > kMaxKvHeads) {
    return Status(ErrorCode::Shape, std::string(what) + " on CUDA need headDim <= 1024 and kvHeads <= " + std::to_string(kMaxKvHeads) +
                                        ", but received headDim=" + std::to_string(headDim) + ", kvHeads=" + std::to_string(kvHeads));
  }
  return Status::ok();
}

// Rows and tokens of a scores call; q and out are only read or written when both are nonzero.
Status checkScoresArgs(const ScoresArgs& args) {
  if (args.headDim < 1 || args.headDim > 1024) {
    return Status(ErrorCode::Shape, "headDim must be in [1, 1024], but received " + std::to_string(args.headDim));
  }
  const int64_t rowsPerBlock = cuda::scoresRowsPerBlock(args.headDim);
  if (args.rows < 0 || (int64_t(args.rows) + rowsPerBlock - 1) / rowsPerBlock > kMaxKvHeads) {
    return Status(ErrorCode::Shape, "attention scores need 0 to " + std::to_string(kMaxKvHeads * rowsPerBlock) +
                                        " query rows for headDim " + std::to_string(args.headDim) + " on the CUDA backend, but received " +
                                        std::to_string(args.rows));
  }
  KVSLIM_RETURN_IF_ERROR(checkPages(args.headDim, args.pageTokens, args.rowStride, args.kvType));
  KVSLIM_RETURN_IF_ERROR(checkHeadView(0, args.head, args.pageTokens, false));
  if (args.rows > 0 && args.head.tokens > 0 && (args.q == nullptr || args.out == nullptr)) {
    return Status(ErrorCode::Internal, "attention scores received a null query or output array");
  }
  return Status::ok();
}

// The attention mass contract (core/attention_args.h) and the limits of the kernels it runs.
Status checkMassArgs(const AttentionMassArgs& args) {
  KVSLIM_RETURN_IF_ERROR(checkAttentionMassArgs(args));
  if (args.headDim > 1024) {
    return Status(ErrorCode::Shape, "headDim must be in [1, 1024], but received " + std::to_string(args.headDim));
  }
  if (args.group > kMaxKvHeads) {
    return Status(ErrorCode::Shape, "the CUDA backend supports at most " + std::to_string(kMaxKvHeads) +
                                        " query heads per kv head, but received " + std::to_string(args.group));
  }
  KVSLIM_RETURN_IF_ERROR(checkHeadView(0, args.kept, args.pageTokens, false));
  return checkHeadView(0, args.tail, args.pageTokens, false);
}

// The scores kernel's arguments for one checked head's keys; q, out and rows are the caller's.
ScoresKernelArgs scoresKernelOf(const KVHeadView& head, int32_t headDim, DType kvType, int64_t pageTokens, int64_t rowStride,
                                float scale) {
  ScoresKernelArgs kernel;
  kernel.headDim = headDim;
  // As in attention: a head holds at most kMaxTokens tokens, and starts at row 0 of a clamped page.
  kernel.pageTokens = int(std::min(pageTokens, kMaxTokens));
  kernel.rowBytes = rowStride * int64_t(dtypeBytes(kvType));
  kernel.kvType = kvType;
  kernel.scale = scale;
  const HeadPages pages = headPages(head, pageTokens);
  kernel.head = HeadSpan{0, int(head.tokens), int(pages.firstRow)};
  bool aligned = headDim % 8 == 0 && kernel.rowBytes % 16 == 0;
  for (int64_t p = pages.first; p < pages.first + pages.count; ++p) {
    aligned = aligned && reinterpret_cast<uintptr_t>(head.keyPages[p]) % 16 == 0;
  }
  kernel.vectorized = aligned;
  return kernel;
}

// Page table entries of each KIVI head: the pages of key group records for its quantized keys and
// of value token records for its quantized values, less those a window policy's hole released
// (page counts of a checked head; the per-page counts are >= 1 where used).
int64_t kiviKeyPages(const KiviAttentionArgs& args, const KiviHeadView& head) {
  const int64_t groups = head.quantizedKeys / args.format.group;
  return (groups == 0 ? 0 : (groups + args.keyGroupsPerPage - 1) / args.keyGroupsPerPage) - head.releasedKeyPages;
}
int64_t kiviValuePages(const KiviAttentionArgs& args, const KiviHeadView& head) {
  return (head.quantizedValues == 0 ? 0 : (head.quantizedValues + args.valueTokensPerPage - 1) / args.valueTokensPerPage) -
         head.releasedValuePages;
}

bool misaligned(const void* pointer) { return reinterpret_cast<uintptr_t>(pointer) % 4 != 0; }

// The KIVI contract (core/kivi_format.h), per head: the quantized parts end inside the head, the
// keys at a whole group, and the fp16 parts fit the residual buffers. Pages and residuals are
// read in 4-byte words, so they must be 4-byte aligned (record sizes are multiples of 4).
Status checkKiviArgs(const KiviAttentionArgs& args) {
  const KiviFormat& format = args.format;
  KVSLIM_RETURN_IF_ERROR(checkQueryShape("KIVI attention", args.n, args.qHeads, args.kvHeads, format.headDim));
  KVSLIM_RETURN_IF_ERROR(checkHostPointers("KIVI attention", args.q, args.out, args.heads));
  if (format.bits != 2 && format.bits != 4 && format.bits != 8) {
    return Status(ErrorCode::Option, "KIVI bits must be 2, 4 or 8, but received " + std::to_string(format.bits));
  }
  if (format.group < 16 || format.group % 16 != 0 || format.headDim % format.group != 0) {
    return Status(ErrorCode::Shape, "KIVI group must be a multiple of 16 that divides headDim, but received group=" +
                                        std::to_string(format.group) + ", headDim=" + std::to_string(format.headDim));
  }
  if (args.residual < 0 || args.residual > kMaxTokens) {
    return Status(ErrorCode::Shape, "KIVI residual must be in [0, 2^30], but received " + std::to_string(args.residual));
  }
  for (int32_t h = 0; h < args.kvHeads; ++h) {
    const KiviHeadView& head = args.heads[h];
    KVSLIM_RETURN_IF_ERROR(checkHeadTokens(h, head.tokens));
    const std::string which = "KIVI kv head " + std::to_string(h);
    if (head.quantizedKeys < 0 || head.quantizedKeys > head.tokens || head.quantizedKeys % format.group != 0 ||
        head.tokens - head.quantizedKeys > args.residual) {
      return Status(ErrorCode::Shape, which + " needs quantizedKeys a multiple of group in [tokens - residual, tokens], but holds tokens=" +
                                          std::to_string(head.tokens) + ", quantizedKeys=" + std::to_string(head.quantizedKeys) +
                                          ", residual=" + std::to_string(args.residual));
    }
    if (head.quantizedValues < 0 || head.quantizedValues > head.tokens || head.tokens - head.quantizedValues > args.residual) {
      return Status(ErrorCode::Shape, which + " needs quantizedValues in [tokens - residual, tokens], but holds tokens=" +
                                          std::to_string(head.tokens) + ", quantizedValues=" + std::to_string(head.quantizedValues) +
                                          ", residual=" + std::to_string(args.residual));
    }
    const bool keyRing = head.tokens > head.quantizedKeys;
    const bool valueRing = head.tokens > head.quantizedValues;
    if (valueRing && (head.valueRingStart < 0 || head.valueRingStart >= args.residual)) {
      return Status(ErrorCode::Shape, which + " needs valueRingStart in [0, residual), but holds " +
                                          std::to_string(head.valueRingStart) + " with residual=" + std::to_string(args.residual));
    }
    if ((head.quantizedKeys > 0 && (args.keyGroupsPerPage < 1 || head.keyPages == nullptr)) ||
        (head.quantizedValues > 0 && (args.valueTokensPerPage < 1 || head.valuePages == nullptr))) {
      return Status(ErrorCode::Shape, which + " holds quantized tokens but no pages (keyGroupsPerPage=" +
                                          std::to_string(args.keyGroupsPerPage) + ", valueTokensPerPage=" +
                                          std::to_string(args.valueTokensPerPage) + ")");
    }
    if ((keyRing && (head.keyResidual == nullptr || misaligned(head.keyResidual))) ||
        (valueRing && (head.valueResidual == nullptr || misaligned(head.valueResidual)))) {
      return Status(ErrorCode::Internal, which + " has a null or misaligned residual buffer");
    }
    if (head.holeBegin < 0 || head.holeBegin > head.holeEnd || head.holeEnd > head.tokens) {
      return Status(ErrorCode::Shape, which + " needs 0 <= holeBegin <= holeEnd <= tokens, but holds [" +
                                          std::to_string(head.holeBegin) + ", " + std::to_string(head.holeEnd) + ")");
    }
    // Released pages lie wholly inside the hole (the kernel then never asks for them).
    const auto insideHole = [&](int64_t count, int64_t tokensPerPage) {
      return count == 0 || (head.releasedFirst >= 0 && head.releasedFirst * tokensPerPage >= head.holeBegin &&
                            (head.releasedFirst + count) * tokensPerPage <= head.holeEnd);
    };
    const int64_t keyPages = kiviKeyPages(args, head);
    const int64_t valuePages = kiviValuePages(args, head);
    if (head.releasedKeyPages < 0 || head.releasedValuePages < 0 || keyPages < 0 || valuePages < 0 ||
        !insideHole(head.releasedKeyPages, args.keyGroupsPerPage * format.group) ||
        !insideHole(head.releasedValuePages, args.valueTokensPerPage)) {
      return Status(ErrorCode::Shape, which + " has released pages outside its hole");
    }
    for (int64_t p = 0; p < keyPages; ++p) {
      if (head.keyPages[p] == nullptr || misaligned(head.keyPages[p])) {
        return Status(ErrorCode::Internal, which + " key page entry " + std::to_string(p) + " is null or not 4-byte aligned");
      }
    }
    for (int64_t p = 0; p < valuePages; ++p) {
      if (head.valuePages[p] == nullptr || misaligned(head.valuePages[p])) {
        return Status(ErrorCode::Internal, which + " value page entry " + std::to_string(p) + " is null or not 4-byte aligned");
      }
    }
  }
  return Status::ok();
}

// Byte offsets inside the device workspace. The first `uploadBytes` mirror the host staging
// buffer, so a single copy moves head spans, page tables, queries and `extraUpload` bytes of the
// caller's (at `extra`); `extraScratch` bytes of device scratch follow the rest (at `scratch`).
struct WorkspaceLayout {
  size_t heads = 0, keyPages = 0, valuePages = 0, q = 0, queryBytes = 0, extra = 0, uploadBytes = 0;
  size_t out = 0, lse = 0, lseBytes = 0, partialMax = 0, partialSum = 0, partialAcc = 0, scratch = 0, totalBytes = 0;

  // queryRows = n x qHeads; partials are [queryRows, splits] when the keys are split.
  WorkspaceLayout(size_t headBytes, int64_t keyPageCount, int64_t valuePageCount, size_t queryRows, int32_t headDim,
                  int splits, size_t extraUpload = 0, size_t extraScratch = 0) {
    queryBytes = queryRows * size_t(headDim) * sizeof(float);
    const size_t partials = splits > 1 ? queryRows * size_t(splits) : 0;
    keyPages = alignUp(headBytes);
    valuePages = keyPages + alignUp(size_t(keyPageCount) * sizeof(void*));
    q = valuePages + alignUp(size_t(valuePageCount) * sizeof(void*));
    extra = alignUp(q + queryBytes);
    uploadBytes = extraUpload > 0 ? extra + extraUpload : q + queryBytes;
    out = alignUp(uploadBytes);
    lse = out + alignUp(queryBytes);
    lseBytes = queryRows * sizeof(float);
    partialMax = lse + alignUp(lseBytes);
    partialSum = partialMax + alignUp(partials * sizeof(float));
    partialAcc = partialSum + alignUp(partials * sizeof(float));
    scratch = alignUp(partialAcc + partials * size_t(headDim) * sizeof(float));
    totalBytes = scratch + extraScratch;
  }
};

// Byte offsets of a scores call inside the device workspace: the staged key page table and
// queries (uploaded in one copy), then the scores.
struct ScoresLayout {
  size_t keyPages = 0, q = 0, uploadBytes = 0, out = 0, totalBytes = 0;

  ScoresLayout(int64_t pageCount, size_t rows, int32_t headDim, size_t tokens) {
    q = alignUp(size_t(pageCount) * sizeof(void*));
    uploadBytes = q + rows * size_t(headDim) * sizeof(float);
    out = alignUp(uploadBytes);
    totalBytes = out + outBytes(rows, tokens);
  }
  static size_t outBytes(size_t rows, size_t tokens) { return rows * tokens * sizeof(float); }
};

// Byte offsets of an attention mass call inside the device workspace: the kept and tail key page
// tables and the query rows (uploaded in one copy), then the scratch of launchAttentionMass.
struct MassLayout {
  size_t keptPages = 0, tailPages = 0, q = 0, uploadBytes = 0, scratch = 0, totalBytes = 0;

  MassLayout(int64_t keptPageCount, int64_t tailPageCount, size_t rows, int32_t headDim, size_t scratchBytes) {
    tailPages = alignUp(size_t(keptPageCount) * sizeof(void*));
    q = tailPages + alignUp(size_t(tailPageCount) * sizeof(void*));
    uploadBytes = q + rows * size_t(headDim) * sizeof(float);
    scratch = alignUp(uploadBytes);
    totalBytes = scratch + scratchBytes;
  }
};

// H2O's parts of a KIVI attention call (KiviAttentionArgs::mass and the heads' eviction flags):
// offsets inside the workspace layout's extra upload (the flags of every head, then each head's
// token count when the mass is asked) and scratch (the captured scores [kvHeads, rowsPerHead,
// maxTokens], two floats per row, the mass [kvHeads, massStride]). All zero when neither is used.
struct KiviMassLayout {
  std::vector<int64_t> flagOffset;  // per head, into the flags
  size_t flags = 0, tokens = 0, uploadBytes = 0;
  size_t scores = 0, rowMax = 0, rowInverse = 0, mass = 0, massBytes = 0, scratchBytes = 0;
  bool fits = true;

  KiviMassLayout(const KiviAttentionArgs& args, const AttentionKernelArgs& kernel) {
    int64_t flagBytes = 0;
    flagOffset.resize(size_t(args.kvHeads));
    for (int32_t h = 0; h < args.kvHeads; ++h) {
      flagOffset[size_t(h)] = flagBytes;
      flagBytes += args.heads[h].evictedTokens;  // each <= tokens <= 2^30 (checked)
    }
    tokens = alignUp(size_t(flagBytes));
    if (args.mass == nullptr) {
      uploadBytes = size_t(flagBytes);
      return;
    }
    uploadBytes = tokens + size_t(args.kvHeads) * sizeof(int);
    // Bounded before any size is formed: heads <= 65535, rows < 2^31, tokens <= 2^30, but their
    // product is not.
    const double rows = double(args.kvHeads) * double(kernel.rowsPerHead);
    const double bytes = rows * double(kernel.maxTokens) * sizeof(float) + double(args.kvHeads) * double(args.massStride) * sizeof(double);
    constexpr double kLimit = double(int64_t(1) << 37);
    if (bytes + rows * 2 * sizeof(float) > kLimit) {
      fits = false;
      return;
    }
    rowMax = alignUp(size_t(rows) * size_t(kernel.maxTokens) * sizeof(float));
    rowInverse = rowMax + alignUp(size_t(rows) * sizeof(float));
    mass = rowInverse + alignUp(size_t(rows) * sizeof(float));
    massBytes = size_t(args.kvHeads) * size_t(args.massStride) * sizeof(double);
    scratchBytes = mass + massBytes;
  }
};

class CudaBackend final : public Backend {
 public:
  CudaBackend(cudaStream_t stream, int multiprocessors) : stream_(stream), multiprocessors_(multiprocessors) {}

  ~CudaBackend() override {
    // Runs at process exit, when the runtime may already be unloading: nothing is left to report to.
    if (workspace_ != nullptr) static_cast<void>(cudaFree(workspace_));
    static_cast<void>(cudaStreamDestroy(stream_));
  }

  DeviceKind kind() const override { return DeviceKind::Cuda; }
  const char* name() const override { return "cuda"; }

  void* allocate(size_t bytes) override {
    void* memory = nullptr;
    if (cudaMalloc(&memory, bytes == 0 ? 1 : bytes) != cudaSuccess) {
      cudaGetLastError();  // out of memory is answered with nullptr; it must not fail a later launch check
      return nullptr;
    }
    return memory;
  }

  void release(void* ptr) override {
    // release() cannot report; a failing cudaFree (only after a sticky error) is cleared so the
    // next checked call reports its own state.
    if (cudaFree(ptr) != cudaSuccess) cudaGetLastError();
  }

  Status upload(void* dst, const void* hostSrc, size_t bytes) override {
    return copyAndWait(dst, hostSrc, bytes, cudaMemcpyHostToDevice, "upload");
  }
  Status download(void* hostDst, const void* src, size_t bytes) override {
    return copyAndWait(hostDst, src, bytes, cudaMemcpyDeviceToHost, "download");
  }
  Status copy(void* dst, const void* src, size_t bytes) override {
    return copyAndWait(dst, src, bytes, cudaMemcpyDeviceToDevice, "device copy");
  }

  Status gather(const DeviceRun* runs, int64_t count, void* hostOut) override {
    if (count <= 0) return Status::ok();
    // The run table up, one kernel copying every run into the workspace, one copy down.
    const size_t tableBytes = size_t(count) * sizeof(cuda::CopyRun);
    size_t total = 0;
    for (int64_t i = 0; i < count; ++i) total += runs[i].bytes;
    if (total == 0) return Status::ok();
    std::lock_guard<std::mutex> lock(mutex_);
    const size_t outOffset = alignUp(tableBytes);
    KVSLIM_RETURN_IF_ERROR(reserveStaging(tableBytes));
    KVSLIM_RETURN_IF_ERROR(reserveWorkspace(outOffset + total));
    unsigned char* device = static_cast<unsigned char*>(workspace_);
    size_t offset = 0;
    for (int64_t i = 0; i < count; ++i) {
      stageCopyRun(i, device + outOffset + offset, runs[i].source, runs[i].bytes);
      offset += runs[i].bytes;
    }
    KVSLIM_RETURN_IF_ERROR(launchStagedCopies(count, "gather"));
    KVSLIM_RETURN_IF_ERROR(cudaStatus(cudaMemcpyAsync(hostOut, device + outOffset, total, cudaMemcpyDeviceToHost, stream_),
                                      "gather (kernel or copy)"));
    return cudaStatus(cudaStreamSynchronize(stream_), "cudaStreamSynchronize (gather)");
  }

  Status copyRuns(const DeviceCopy* runs, int64_t count) override {
    if (count <= 0) return Status::ok();
    // The copy table up and one kernel for every run, instead of a synchronous copy each.
    std::lock_guard<std::mutex> lock(mutex_);
    KVSLIM_RETURN_IF_ERROR(reserveStaging(size_t(count) * sizeof(cuda::CopyRun)));
    for (int64_t i = 0; i < count; ++i) stageCopyRun(i, runs[i].target, runs[i].source, runs[i].bytes);
    KVSLIM_RETURN_IF_ERROR(launchStagedCopies(count, "copy runs"));
    return cudaStatus(cudaStreamSynchronize(stream_), "cudaStreamSynchronize (copy runs)");
  }

  Status attention(const AttentionArgs& args) override {
    KVSLIM_RETURN_IF_ERROR(checkArgs(args));
    AttentionKernelArgs kernel = kernelShape(args.n, args.qHeads, args.kvHeads, args.headDim, args.causal, args.scale);
    // A head holds at most kMaxTokens tokens: clamping a longer page to that many rows moves none.
    kernel.pageTokens = int(std::min(args.pageTokens, kMaxTokens));
    kernel.rowBytes = args.rowStride * int64_t(dtypeBytes(args.kvType));
    kernel.kvType = args.kvType;

    // 16-byte loads need every row 16-byte aligned: page starts and the row stride.
    bool aligned = args.headDim % 8 == 0 && kernel.rowBytes % 16 == 0;
    int64_t totalPages = 0;
    for (int32_t h = 0; h < args.kvHeads; ++h) {
      const KVHeadView& head = args.heads[h];
      const HeadPages pages = headPages(head, args.pageTokens);
      for (int64_t p = pages.first; p < pages.first + pages.count; ++p) {
        aligned = aligned && (reinterpret_cast<uintptr_t>(head.keyPages[p]) | reinterpret_cast<uintptr_t>(head.valuePages[p])) % 16 == 0;
      }
      totalPages += pages.count;
      kernel.maxTokens = std::max(kernel.maxTokens, int(head.tokens));
    }
    kernel.vectorized = aligned;

    const bool decode = kernel.rowsPerHead <= kDecodeRowsLimit;
    const SplitPlan plan = decode ? cuda::planAttentionDecode(kernel, multiprocessors_)
                                  : cuda::planAttentionPrefill(kernel, multiprocessors_);
    kernel.splits = plan.splits;
    kernel.splitTokens = plan.splitTokens;
    // H2O's mass (args.mass): [kvHeads, massStride] doubles in the scratch, from the rows' lse.
    const size_t massBytes = args.mass != nullptr ? size_t(args.kvHeads) * size_t(args.massStride) * sizeof(double) : 0;
    const WorkspaceLayout layout(size_t(args.kvHeads) * sizeof(HeadSpan), totalPages, totalPages,
                                 size_t(args.n) * size_t(args.qHeads), args.headDim, plan.splits, 0, massBytes);

    std::lock_guard<std::mutex> lock(mutex_);
    KVSLIM_RETURN_IF_ERROR(reserveStaging(layout.uploadBytes));
    unsigned char* staging = staging_.data();
    int64_t firstPage = 0;
    for (int32_t h = 0; h < args.kvHeads; ++h) {
      const KVHeadView& head = args.heads[h];
      const HeadPages pages = headPages(head, args.pageTokens);
      // firstRow < pageTokens, and 0 whenever the kernels' page size is clamped (checkHeadView).
      const HeadSpan span{firstPage, int(head.tokens), int(pages.firstRow)};
      std::memcpy(staging + layout.heads + size_t(h) * sizeof(HeadSpan), &span, sizeof(HeadSpan));
      stagePages(layout.keyPages, firstPage, head.keyPages + pages.first, pages.count);
      stagePages(layout.valuePages, firstPage, head.valuePages + pages.first, pages.count);
      firstPage += pages.count;
    }
    std::memcpy(staging + layout.q, args.q, layout.queryBytes);

    unsigned char* device = nullptr;
    KVSLIM_RETURN_IF_ERROR(uploadInputs(layout, kernel, &device));
    kernel.heads = reinterpret_cast<const HeadSpan*>(device + layout.heads);
    if (args.lse != nullptr || args.mass != nullptr) kernel.lse = reinterpret_cast<float*>(device + layout.lse);
    if (decode) {
      KVSLIM_RETURN_IF_ERROR(cudaStatus(cuda::launchAttentionDecode(kernel, stream_), "attention decode launch"));
    } else {
      KVSLIM_RETURN_IF_ERROR(cudaStatus(cuda::launchAttentionPrefill(kernel, stream_), "attention prefill launch"));
    }
    if (args.mass == nullptr) return finishAttention(kernel, layout, args.out, args.lse, "attention");
    // The mass needs every row's final lse: after the merge of the splits.
    KVSLIM_RETURN_IF_ERROR(mergeSplits(kernel, "attention"));
    double* mass = reinterpret_cast<double*>(device + layout.scratch);
    KVSLIM_RETURN_IF_ERROR(cudaStatus(cuda::launchLseMass(kernel, mass, args.massStride, stream_), "attention mass launch"));
    const HostCopy massCopy{args.mass, mass, massBytes};
    return copyBack(kernel, layout, args.out, args.lse, "attention", &massCopy);
  }
  bool fusesMass() const override { return true; }

  Status attentionScores(const ScoresArgs& args) override {
    KVSLIM_RETURN_IF_ERROR(checkScoresArgs(args));
    if (args.rows == 0 || args.head.tokens == 0) return Status::ok();  // no score to write
    ScoresKernelArgs kernel = scoresKernelOf(args.head, args.headDim, args.kvType, args.pageTokens, args.rowStride, args.scale);
    kernel.rows = args.rows;
    const HeadPages pages = headPages(args.head, args.pageTokens);
    const size_t rows = size_t(args.rows);
    const size_t tokens = size_t(args.head.tokens);
    const ScoresLayout layout(pages.count, rows, args.headDim, tokens);

    std::lock_guard<std::mutex> lock(mutex_);
    KVSLIM_RETURN_IF_ERROR(reserveStaging(layout.uploadBytes));
    stagePages(layout.keyPages, 0, args.head.keyPages + pages.first, pages.count);
    stageScaledQueries(layout.q, args.q, (layout.uploadBytes - layout.q) / sizeof(float), args.scale);
    kernel.scale = 1.0f;
    KVSLIM_RETURN_IF_ERROR(reserveWorkspace(layout.totalBytes));
    unsigned char* device = static_cast<unsigned char*>(workspace_);
    KVSLIM_RETURN_IF_ERROR(cudaStatus(cudaMemcpyAsync(device, staging_.data(), layout.uploadBytes, cudaMemcpyHostToDevice, stream_),
                                      "cudaMemcpyAsync (attention scores inputs)"));
    kernel.keyPages = reinterpret_cast<const void* const*>(device + layout.keyPages);
    kernel.q = reinterpret_cast<const float*>(device + layout.q);
    kernel.out = reinterpret_cast<float*>(device + layout.out);
    KVSLIM_RETURN_IF_ERROR(cudaStatus(cuda::launchAttentionScores(kernel, stream_), "attention scores launch"));
    // A fault inside the kernel surfaces at the first call that waits for it: the output copy.
    KVSLIM_RETURN_IF_ERROR(cudaStatus(cudaMemcpyAsync(args.out, kernel.out, ScoresLayout::outBytes(rows, tokens),
                                                      cudaMemcpyDeviceToHost, stream_),
                                      "attention scores (kernel or output copy)"));
    return cudaStatus(cudaStreamSynchronize(stream_), "cudaStreamSynchronize (attention scores)");
  }

  Status topKeys(const TopKeysArgs& args) override {
    KVSLIM_RETURN_IF_ERROR(checkTopKeysArgs(args));
    KVSLIM_RETURN_IF_ERROR(checkTopLimits("top keys", args.headDim, args.kvHeads));
    KVSLIM_RETURN_IF_ERROR(checkPages(args.headDim, args.pageTokens, args.rowStride, args.kvType));
    const size_t heads = size_t(args.kvHeads);
    int64_t stride = 0;
    std::vector<size_t> tableOffsets(heads + 1, 0);
    for (int32_t h = 0; h < args.kvHeads; ++h) {
      KVSLIM_RETURN_IF_ERROR(checkHeadView(h, args.heads[h], args.pageTokens, false));
      stride = std::max(stride, args.heads[h].tokens);
      tableOffsets[size_t(h) + 1] = tableOffsets[size_t(h)] + size_t(headPages(args.heads[h], args.pageTokens).count) * sizeof(void*);
    }
    std::fill(args.out, args.out + heads * size_t(args.k), int64_t(-1));
    if (stride == 0) return Status::ok();
    // Rows go through the scores kernel in chunks whose scores stay within 2^25 floats (128 MiB),
    // or of one row when a head holds more tokens than that (then stride floats).
    const int64_t rowLimit = int64_t(kMaxKvHeads) * cuda::scoresRowsPerBlock(args.headDim);
    const int64_t chunkRows = std::max<int64_t>(1, std::min<int64_t>({int64_t(args.rows), (int64_t(1) << 25) / stride, rowLimit}));
    const size_t k = size_t(std::min<int64_t>(args.k, stride));
    // One upload (page tables, every head's rows); then scratch: best scores, a chunk's scores, the chosen keys.
    const size_t queryOffset = alignUp(tableOffsets.back());
    const size_t uploadBytes = queryOffset + heads * size_t(args.rows) * size_t(args.headDim) * sizeof(float);
    const size_t bestOffset = alignUp(uploadBytes);
    const size_t scoresOffset = bestOffset + alignUp(heads * size_t(stride) * sizeof(double));
    const size_t outOffset = scoresOffset + alignUp(size_t(chunkRows) * size_t(stride) * sizeof(float));
    const size_t outBytes = heads * k * sizeof(long long);

    std::lock_guard<std::mutex> lock(mutex_);
    KVSLIM_RETURN_IF_ERROR(reserveStaging(uploadBytes));
    for (int32_t h = 0; h < args.kvHeads; ++h) {
      const HeadPages pages = headPages(args.heads[h], args.pageTokens);
      stagePages(tableOffsets[size_t(h)], 0, args.heads[h].keyPages + pages.first, pages.count);
    }
    std::memcpy(staging_.data() + queryOffset, args.q, uploadBytes - queryOffset);
    KVSLIM_RETURN_IF_ERROR(reserveWorkspace(outOffset + outBytes));
    unsigned char* device = static_cast<unsigned char*>(workspace_);
    KVSLIM_RETURN_IF_ERROR(cudaStatus(cudaMemcpyAsync(device, staging_.data(), uploadBytes, cudaMemcpyHostToDevice, stream_),
                                      "cudaMemcpyAsync (top keys inputs)"));
    double* best = reinterpret_cast<double*>(device + bestOffset);
    float* scores = reinterpret_cast<float*>(device + scoresOffset);
    for (int32_t h = 0; h < args.kvHeads; ++h) {
      const KVHeadView& view = args.heads[h];
      double* headBest = best + size_t(h) * size_t(stride);
      if (view.tokens == 0) {
        KVSLIM_RETURN_IF_ERROR(cudaStatus(cuda::launchBestRows(scores, 0, 0, headBest, stride, true, stream_), "top keys launch"));
        continue;
      }
      ScoresKernelArgs kernel = scoresKernelOf(view, args.headDim, args.kvType, args.pageTokens, args.rowStride, 1.0f);
      kernel.keyPages = reinterpret_cast<const void* const*>(device + tableOffsets[size_t(h)]);
      kernel.out = scores;
      const float* rows = reinterpret_cast<const float*>(device + queryOffset) + size_t(h) * size_t(args.rows) * size_t(args.headDim);
      for (int64_t first = 0; first < args.rows; first += chunkRows) {
        kernel.rows = int(std::min<int64_t>(chunkRows, args.rows - first));
        kernel.q = rows + size_t(first) * size_t(args.headDim);
        KVSLIM_RETURN_IF_ERROR(cudaStatus(cuda::launchAttentionScores(kernel, stream_), "top keys scores launch"));
        KVSLIM_RETURN_IF_ERROR(cudaStatus(cuda::launchBestRows(scores, kernel.rows, view.tokens, headBest, stride, first == 0, stream_),
                                          "top keys launch"));
      }
    }
    std::vector<int64_t> counts(heads);
    for (size_t h = 0; h < heads; ++h) counts[h] = args.heads[h].tokens;
    return chooseTop(best, stride, k, reinterpret_cast<long long*>(device + outOffset), counts, args.out, args.k, "top keys");
  }

  Status attentionMass(const AttentionMassArgs& args) override {
    KVSLIM_RETURN_IF_ERROR(checkMassArgs(args));
    if (args.columns >= (int64_t(1) << 32)) {  // the top-k histogram counts in 32 bits
      return Status(ErrorCode::Shape, "attention mass on CUDA needs fewer than 2^32 columns, but received " + std::to_string(args.columns));
    }
    if (args.chosen == nullptr) std::fill(args.out, args.out + args.columns, 0.0);
    if (args.n == 0 || args.columns == 0) {  // no row gives mass: every column is 0, the lowest k win
      if (args.chosen != nullptr) std::iota(args.chosen, args.chosen + args.k, int64_t(0));
      return Status::ok();
    }
    ScoresKernelArgs kept = scoresKernelOf(args.kept, args.headDim, args.kvType, args.pageTokens, args.rowStride, args.scale);
    ScoresKernelArgs tail = scoresKernelOf(args.tail, args.headDim, args.kvType, args.pageTokens, args.rowStride, args.scale);
    const HeadPages keptPages = headPages(args.kept, args.pageTokens);
    const HeadPages tailPages = headPages(args.tail, args.pageTokens);
    const MassLayout layout(keptPages.count, tailPages.count, size_t(args.n) * size_t(args.group), args.headDim,
                            cuda::attentionMassScratchBytes(args));
    // SnapKV's choice (args.chosen): the top k of the result on the device, after the scratch.
    const size_t chosenOffset = alignUp(layout.totalBytes);
    const size_t chosenBytes = args.chosen != nullptr ? size_t(args.k) * sizeof(long long) : 0;

    std::lock_guard<std::mutex> lock(mutex_);
    KVSLIM_RETURN_IF_ERROR(reserveStaging(layout.uploadBytes));
    stagePages(layout.keptPages, 0, args.kept.keyPages + keptPages.first, keptPages.count);
    stagePages(layout.tailPages, 0, args.tail.keyPages + tailPages.first, tailPages.count);
    stageScaledQueries(layout.q, args.q, (layout.uploadBytes - layout.q) / sizeof(float), args.scale);
    kept.scale = tail.scale = 1.0f;
    KVSLIM_RETURN_IF_ERROR(reserveWorkspace(chosenOffset + chosenBytes));
    unsigned char* device = static_cast<unsigned char*>(workspace_);
    KVSLIM_RETURN_IF_ERROR(cudaStatus(cudaMemcpyAsync(device, staging_.data(), layout.uploadBytes, cudaMemcpyHostToDevice, stream_),
                                      "cudaMemcpyAsync (attention mass inputs)"));
    kept.keyPages = reinterpret_cast<const void* const*>(device + layout.keptPages);
    tail.keyPages = reinterpret_cast<const void* const*>(device + layout.tailPages);
    kept.q = tail.q = reinterpret_cast<const float*>(device + layout.q);
    KVSLIM_RETURN_IF_ERROR(cudaStatus(cuda::launchAttentionMass(args, kept, tail, device + layout.scratch, stream_),
                                      "attention mass launch"));
    if (args.chosen != nullptr) {
      // Only the k chosen columns come back (a NaN vote ranks last, as on the CPU).
      return chooseTop(reinterpret_cast<const double*>(device + layout.scratch), args.columns, size_t(args.k),
                       reinterpret_cast<long long*>(device + chosenOffset), {args.columns}, args.chosen, args.k, "attention mass");
    }
    // Only the [columns] result comes back; a fault inside a kernel surfaces at this copy.
    KVSLIM_RETURN_IF_ERROR(cudaStatus(cudaMemcpyAsync(args.out, device + layout.scratch, size_t(args.columns) * sizeof(double),
                                                      cudaMemcpyDeviceToHost, stream_),
                                      "attention mass (kernels or output copy)"));
    return cudaStatus(cudaStreamSynchronize(stream_), "cudaStreamSynchronize (attention mass)");
  }

  Status pageBoxes(const PageBoxesArgs* heads, int32_t count) override {
    if (count < 0 || (count > 0 && heads == nullptr)) return Status(ErrorCode::Internal, "page boxes received no head array");
    // Only the store pages each head's new keys touch are staged (their pointers, in one upload);
    // one kernel per head, one wait.
    std::vector<size_t> tableOffsets(size_t(count) + 1, 0);
    for (int32_t i = 0; i < count; ++i) {
      const PageBoxesArgs& args = heads[i];
      KVSLIM_RETURN_IF_ERROR(checkPageBoxesArgs(args));
      const int64_t pageCount =
          args.keys.tokens == 0 ? 0 : (args.keys.firstRow + args.keys.tokens - 1) / args.pageTokens + 1 - args.keys.firstRow / args.pageTokens;
      tableOffsets[size_t(i) + 1] = tableOffsets[size_t(i)] + size_t(pageCount) * sizeof(void*);
    }
    const size_t tableBytes = tableOffsets.back();
    if (tableBytes == 0) return Status::ok();

    std::lock_guard<std::mutex> lock(mutex_);
    KVSLIM_RETURN_IF_ERROR(reserveStaging(tableBytes));
    for (int32_t i = 0; i < count; ++i) {
      const PageBoxesArgs& args = heads[i];
      const size_t bytes = tableOffsets[size_t(i) + 1] - tableOffsets[size_t(i)];
      if (bytes > 0) std::memcpy(staging_.data() + tableOffsets[size_t(i)], args.keys.keyPages + args.keys.firstRow / args.pageTokens, bytes);
    }
    KVSLIM_RETURN_IF_ERROR(reserveWorkspace(tableBytes));
    unsigned char* device = static_cast<unsigned char*>(workspace_);
    KVSLIM_RETURN_IF_ERROR(cudaStatus(cudaMemcpyAsync(device, staging_.data(), tableBytes, cudaMemcpyHostToDevice, stream_),
                                      "cudaMemcpyAsync (page boxes page tables)"));
    for (int32_t i = 0; i < count; ++i) {
      if (heads[i].keys.tokens == 0) continue;
      const void* const* table = reinterpret_cast<const void* const*>(device + tableOffsets[size_t(i)]);
      KVSLIM_RETURN_IF_ERROR(cudaStatus(cuda::launchPageBoxes(heads[i], table, stream_), "page boxes launch"));
    }
    // The boxes stay on the device; waiting here reports a fault inside a kernel to this call.
    return cudaStatus(cudaStreamSynchronize(stream_), "cudaStreamSynchronize (page boxes)");
  }

  Status topPages(const TopPagesArgs& args) override {
    KVSLIM_RETURN_IF_ERROR(checkTopPagesArgs(args));
    KVSLIM_RETURN_IF_ERROR(checkTopLimits("top pages", args.headDim, args.kvHeads));
    int64_t stride = 0;
    for (int32_t h = 0; h < args.kvHeads; ++h) stride = std::max(stride, args.heads[h].pages);
    const size_t heads = size_t(args.kvHeads), k = size_t(std::min<int64_t>(args.k, std::max<int64_t>(stride, 1)));
    if (stride >= (int64_t(1) << 32)) {  // the top-k histogram counts in 32 bits
      return Status(ErrorCode::Shape, "top pages on CUDA need fewer than 2^32 pages per head, but received " + std::to_string(stride));
    }
    std::fill(args.out, args.out + heads * size_t(args.k), int64_t(-1));
    if (stride == 0) return Status::ok();
    // One upload (the head table and every head's rows), the bounds and the top-k on the device,
    // the chosen pages back.
    const size_t queryOffset = alignUp(heads * sizeof(TopPagesHead));
    const size_t uploadBytes = queryOffset + heads * size_t(args.rows) * size_t(args.headDim) * sizeof(float);
    const size_t boundsOffset = alignUp(uploadBytes);
    const size_t outOffset = boundsOffset + alignUp(heads * size_t(stride) * sizeof(double));
    const size_t outBytes = heads * k * sizeof(long long);

    std::lock_guard<std::mutex> lock(mutex_);
    KVSLIM_RETURN_IF_ERROR(reserveStaging(uploadBytes));
    std::memcpy(staging_.data(), args.heads, heads * sizeof(TopPagesHead));
    if (uploadBytes > queryOffset) std::memcpy(staging_.data() + queryOffset, args.q, uploadBytes - queryOffset);
    KVSLIM_RETURN_IF_ERROR(reserveWorkspace(outOffset + outBytes));
    unsigned char* device = static_cast<unsigned char*>(workspace_);
    KVSLIM_RETURN_IF_ERROR(cudaStatus(cudaMemcpyAsync(device, staging_.data(), uploadBytes, cudaMemcpyHostToDevice, stream_),
                                      "cudaMemcpyAsync (top pages inputs)"));
    double* bounds = reinterpret_cast<double*>(device + boundsOffset);
    KVSLIM_RETURN_IF_ERROR(cudaStatus(cuda::launchPageBounds(args, reinterpret_cast<const float*>(device + queryOffset),
                                                             reinterpret_cast<const TopPagesHead*>(device), bounds, stride, stream_),
                                      "page bounds launch"));
    std::vector<int64_t> counts(heads);
    for (size_t h = 0; h < heads; ++h) counts[h] = args.heads[h].pages;
    return chooseTop(bounds, stride, k, reinterpret_cast<long long*>(device + outOffset), counts, args.out, args.k, "top pages");
  }

  Status blockScores(const BlockScoresArgs& args) override {
    KVSLIM_RETURN_IF_ERROR(checkBlockScoresArgs(args));
    if (args.headDim > 1024 || args.kvHeads > 65535 || args.blocks >= (int64_t(1) << 32)) {
      return Status(ErrorCode::Shape, "block scores on CUDA need headDim <= 1024, kvHeads <= 65535 and blocks < 2^32, but received headDim=" +
                                          std::to_string(args.headDim) + ", kvHeads=" + std::to_string(args.kvHeads) +
                                          ", blocks=" + std::to_string(args.blocks));
    }
    // One upload: the head spans, u, the newest representatives; the entropies come back.
    const size_t heads = size_t(args.kvHeads), dim = size_t(args.headDim);
    const size_t uOffset = alignUp(heads * sizeof(cuda::BlockHeadSpan));
    const size_t newestOffset = uOffset + alignUp(heads * dim * sizeof(double));
    const size_t uploadBytes = newestOffset + heads * dim * sizeof(float);
    const size_t entropyOffset = alignUp(uploadBytes);
    const size_t totalBytes = entropyOffset + heads * sizeof(double);

    std::lock_guard<std::mutex> lock(mutex_);
    KVSLIM_RETURN_IF_ERROR(reserveStaging(uploadBytes));
    unsigned char* staging = staging_.data();
    for (int32_t h = 0; h < args.kvHeads; ++h) {
      const BlockHeadView& view = args.heads[h];
      const cuda::BlockHeadSpan span{view.reprs, view.norms, view.newestNorm};
      std::memcpy(staging + size_t(h) * sizeof(cuda::BlockHeadSpan), &span, sizeof(span));
      std::memcpy(staging + newestOffset + size_t(h) * dim * sizeof(float), view.newest, dim * sizeof(float));
    }
    std::memcpy(staging + uOffset, args.u, heads * dim * sizeof(double));
    KVSLIM_RETURN_IF_ERROR(reserveWorkspace(totalBytes));
    unsigned char* device = static_cast<unsigned char*>(workspace_);
    KVSLIM_RETURN_IF_ERROR(cudaStatus(cudaMemcpyAsync(device, staging, uploadBytes, cudaMemcpyHostToDevice, stream_),
                                      "cudaMemcpyAsync (block scores inputs)"));
    cuda::BlockScoresKernelArgs kernel;
    kernel.heads = reinterpret_cast<const cuda::BlockHeadSpan*>(device);
    kernel.u = reinterpret_cast<const double*>(device + uOffset);
    kernel.newest = reinterpret_cast<const float*>(device + newestOffset);
    kernel.scores = args.scores;
    kernel.entropies = reinterpret_cast<double*>(device + entropyOffset);
    kernel.blocks = args.blocks;
    kernel.reprType = args.reprType;
    // Row starts are 16-byte aligned when every head's buffer is and a row is a whole number of 16 bytes.
    kernel.vectorRows = args.headDim % 8 == 0;
    for (int32_t h = 0; h < args.kvHeads; ++h) {
      kernel.vectorRows = kernel.vectorRows && reinterpret_cast<uintptr_t>(args.heads[h].reprs) % 16 == 0;
    }
    kernel.kvHeads = args.kvHeads;
    kernel.headDim = args.headDim;
    kernel.temperature = args.temperature;
    KVSLIM_RETURN_IF_ERROR(cudaStatus(cuda::launchBlockScores(kernel, stream_), "block scores launch"));
    // The scores stay on the device; a fault inside a kernel surfaces at this copy.
    KVSLIM_RETURN_IF_ERROR(cudaStatus(cudaMemcpyAsync(args.entropies, kernel.entropies, heads * sizeof(double), cudaMemcpyDeviceToHost, stream_),
                                      "block scores (kernels or entropy copy)"));
    return cudaStatus(cudaStreamSynchronize(stream_), "cudaStreamSynchronize (block scores)");
  }

  Status topBlocks(const TopBlocksArgs& args) override {
    KVSLIM_RETURN_IF_ERROR(checkTopBlocksArgs(args));
    if (args.blocks >= (int64_t(1) << 32)) {  // the radix histogram counts in 32 bits
      return Status(ErrorCode::Shape, "top blocks on CUDA need blocks < 2^32, but received " + std::to_string(args.blocks));
    }
    const size_t outBytes = size_t(args.kvHeads) * size_t(args.k) * sizeof(long long);
    std::lock_guard<std::mutex> lock(mutex_);
    KVSLIM_RETURN_IF_ERROR(reserveWorkspace(outBytes));
    long long* out = static_cast<long long*>(workspace_);
    KVSLIM_RETURN_IF_ERROR(cudaStatus(cuda::launchTopBlocks(args, out, stream_), "top blocks launch"));
    static_assert(sizeof(long long) == sizeof(int64_t), "block indices are 64-bit on both sides");
    KVSLIM_RETURN_IF_ERROR(cudaStatus(cudaMemcpyAsync(args.out, out, outBytes, cudaMemcpyDeviceToHost, stream_),
                                      "top blocks (kernel or output copy)"));
    return cudaStatus(cudaStreamSynchronize(stream_), "cudaStreamSynchronize (top blocks)");
  }

  Status kiviAttention(const KiviAttentionArgs& args) override {
    KVSLIM_RETURN_IF_ERROR(checkKiviArgs(args));
    KVSLIM_RETURN_IF_ERROR(checkKiviMass(args, true));
    if (args.format.keyOutliers > 0 || args.format.valueOutliers > 0) {
      // Dense-and-sparse records (kivi_format.h): the CUDA kernels do not add outlier corrections.
      return Status(ErrorCode::BackendUnavailable,
                    "KIVI attention over records with outliers (policy.store.outliers > 0) is not implemented on "
                    "CUDA in this version; use device 'cpu'");
    }
    if (args.preRope) {
      // Pre-RoPE keys (kivi_format.h): the CUDA kernels do not rotate keys.
      return Status(ErrorCode::BackendUnavailable,
                    "KIVI attention over pre-RoPE keys (policy.store.preRope) is not implemented on CUDA in this "
                    "version; use device 'cpu'");
    }
    const KiviFormat& format = args.format;
    KiviKernelArgs kernel;
    kernel.attention = kernelShape(args.n, args.qHeads, args.kvHeads, format.headDim, args.causal, args.scale);
    kernel.bits = format.bits;
    kernel.quantGroup = format.group;
    // A head holds at most kMaxTokens tokens, so at most that many records of a page are read:
    // clamping keeps the kernel's 32-bit page arithmetic exact.
    kernel.keyGroupsPerPage = int(std::min(args.keyGroupsPerPage, kMaxTokens));
    kernel.valueTokensPerPage = int(std::min(args.valueTokensPerPage, kMaxTokens));
    kernel.residual = int(args.residual);
    kernel.keyWordsPerChannel = int(format.keyGroupWordsPerChannel());
    kernel.keyGroupBytes = static_cast<long long>(format.keyGroupBytes());
    kernel.keyCodeBytes = static_cast<long long>(format.keyGroupCodeBytes());
    kernel.valueTokenBytes = static_cast<long long>(format.valueTokenBytes());
    kernel.valueCodeBytes = static_cast<long long>(format.valueCodeBytes());

    int64_t totalKeyPages = 0;
    int64_t totalValuePages = 0;
    for (int32_t h = 0; h < args.kvHeads; ++h) {
      totalKeyPages += kiviKeyPages(args, args.heads[h]);
      totalValuePages += kiviValuePages(args, args.heads[h]);
      // Splits cover the walked tokens: a window policy's hole is skipped, not split.
      kernel.attention.maxTokens =
          std::max(kernel.attention.maxTokens, int(args.heads[h].tokens - kiviSkip(args.heads[h]).length));
    }
    const SplitPlan plan = cuda::planKiviAttention(kernel, multiprocessors_);
    kernel.attention.splits = plan.splits;
    kernel.attention.splitTokens = plan.splitTokens;
    // H2O (checkKiviMass): the heads' eviction flags and token counts travel with the upload; the
    // captured scores, row statistics and mass live in the scratch.
    const KiviMassLayout mass(args, kernel.attention);
    if (!mass.fits) {
      return Status(ErrorCode::OutOfMemory, "the KIVI attention mass of " + std::to_string(args.n) +
                                                " queries over " + std::to_string(kernel.attention.maxTokens) +
                                                " tokens needs more GPU scratch than the CUDA backend allows (2^37 bytes)");
    }
    const WorkspaceLayout layout(size_t(args.kvHeads) * sizeof(KiviHeadSpan), totalKeyPages, totalValuePages,
                                 size_t(args.n) * size_t(args.qHeads), format.headDim, plan.splits, mass.uploadBytes,
                                 mass.scratchBytes);

    std::lock_guard<std::mutex> lock(mutex_);
    KVSLIM_RETURN_IF_ERROR(reserveStaging(layout.uploadBytes));
    // The workspace's address is staged in the head spans (their flags): reserved before staging.
    KVSLIM_RETURN_IF_ERROR(reserveWorkspace(layout.totalBytes));
    unsigned char* staging = staging_.data();
    unsigned char* const workspace = static_cast<unsigned char*>(workspace_);
    int64_t firstKeyPage = 0;
    int64_t firstValuePage = 0;
    for (int32_t h = 0; h < args.kvHeads; ++h) {
      const KiviHeadView& head = args.heads[h];
      const int64_t keyPages = kiviKeyPages(args, head);
      const int64_t valuePages = kiviValuePages(args, head);
      const KiviSkip skip = kiviSkip(head);
      KiviHeadSpan span{firstKeyPage,
                              firstValuePage,
                              head.keyResidual,
                              head.valueResidual,
                              int(head.valueRingStart),
                              int(head.quantizedKeys),
                              int(head.quantizedValues),
                              int(head.tokens),
                              int(head.holeBegin),
                              int(head.holeEnd),
                              int(skip.begin),
                              int(skip.length),
                              int(head.releasedFirst),
                              int(head.releasedKeyPages),
                              int(head.releasedValuePages),
                              nullptr,
                              int(head.evictedTokens)};
      if (head.evictedTokens > 0) {
        const size_t flags = layout.extra + mass.flags + size_t(mass.flagOffset[size_t(h)]);
        std::memcpy(staging + flags, head.evicted, size_t(head.evictedTokens));
        span.evicted = workspace + flags;
      }
      if (args.mass != nullptr) {
        const int tokens = int(head.tokens);
        std::memcpy(staging + layout.extra + mass.tokens + size_t(h) * sizeof(int), &tokens, sizeof(int));
      }
      std::memcpy(staging + layout.heads + size_t(h) * sizeof(KiviHeadSpan), &span, sizeof(KiviHeadSpan));
      stagePages(layout.keyPages, firstKeyPage, head.keyPages, keyPages);
      stagePages(layout.valuePages, firstValuePage, head.valuePages, valuePages);
      firstKeyPage += keyPages;
      firstValuePage += valuePages;
    }
    std::memcpy(staging + layout.q, args.q, layout.queryBytes);

    unsigned char* device = nullptr;
    KVSLIM_RETURN_IF_ERROR(uploadInputs(layout, kernel.attention, &device));
    kernel.heads = reinterpret_cast<const KiviHeadSpan*>(device + layout.heads);
    kernel.h2o = args.mass != nullptr;
    for (int32_t h = 0; h < args.kvHeads; ++h) kernel.h2o = kernel.h2o || args.heads[h].evictedTokens > 0;
    cuda::CapturedMassArgs captured;
    if (args.mass != nullptr) {
      unsigned char* scratch = device + layout.scratch;
      kernel.scores = reinterpret_cast<float*>(scratch + mass.scores);
      kernel.scoresWidth = kernel.attention.maxTokens;
      captured.scores = kernel.scores;
      captured.width = kernel.scoresWidth;
      captured.tokens = reinterpret_cast<const int*>(device + layout.extra + mass.tokens);
      captured.kvHeads = args.kvHeads;
      captured.rowsPerHead = kernel.attention.rowsPerHead;
      captured.n = args.n;
      captured.group = kernel.attention.group;
      captured.causal = args.causal;
      captured.rowMax = reinterpret_cast<float*>(scratch + mass.rowMax);
      captured.rowInverse = reinterpret_cast<float*>(scratch + mass.rowInverse);
      captured.mass = reinterpret_cast<double*>(scratch + mass.mass);
      captured.massStride = args.massStride;
    }
    KVSLIM_RETURN_IF_ERROR(cudaStatus(cuda::launchKiviAttention(kernel, stream_), "KIVI attention launch"));
    if (args.mass == nullptr) return finishAttention(kernel.attention, layout, args.out, nullptr, "KIVI attention");
    KVSLIM_RETURN_IF_ERROR(cudaStatus(cuda::launchCapturedMass(captured, stream_), "KIVI attention mass launch"));
    // The mass comes back with the output, after the merge is enqueued (a copy to pageable memory
    // holds the host until the kernels before it are done).
    const HostCopy massCopy{args.mass, captured.mass, mass.massBytes};
    return finishAttention(kernel.attention, layout, args.out, nullptr, "KIVI attention", &massCopy);
  }
  bool fusesKiviMass() const override { return true; }

 private:
  Status copyAndWait(void* dst, const void* src, size_t bytes, cudaMemcpyKind direction, const char* what) {
    KVSLIM_RETURN_IF_ERROR(cudaStatus(cudaMemcpyAsync(dst, src, bytes, direction, stream_), std::string("cudaMemcpyAsync (") + what + ")"));
    return cudaStatus(cudaStreamSynchronize(stream_), std::string("cudaStreamSynchronize (") + what + ")");
  }

  // Writes copy run i into the staging buffer's run table (mutex_ held).
  void stageCopyRun(int64_t i, void* target, const void* source, size_t bytes) {
    const cuda::CopyRun run{static_cast<const unsigned char*>(source), static_cast<unsigned char*>(target),
                            static_cast<long long>(bytes)};
    std::memcpy(staging_.data() + size_t(i) * sizeof(run), &run, sizeof(run));
  }

  // Uploads the staged table of `count` copy runs to the workspace's start and launches them
  // (mutex_ held; the workspace holds the table and anything the runs write behind it).
  Status launchStagedCopies(int64_t count, const char* what) {
    const size_t tableBytes = size_t(count) * sizeof(cuda::CopyRun);
    KVSLIM_RETURN_IF_ERROR(reserveWorkspace(tableBytes));
    auto* table = static_cast<cuda::CopyRun*>(workspace_);
    KVSLIM_RETURN_IF_ERROR(cudaStatus(cudaMemcpyAsync(table, staging_.data(), tableBytes, cudaMemcpyHostToDevice, stream_),
                                      std::string("cudaMemcpyAsync (") + what + " table)"));
    return cudaStatus(cuda::launchCopyRuns(table, count, stream_), std::string(what) + " launch");
  }

  // Grows the host staging buffer (mutex_ held).
  Status reserveStaging(size_t bytes) {
    try {
      if (staging_.size() < bytes) staging_.resize(bytes);
    } catch (const std::bad_alloc&) {
      return Status(ErrorCode::OutOfMemory, "out of host memory staging " + std::to_string(bytes) + " bytes for CUDA attention");
    }
    return Status::ok();
  }

  // Copies `count` page pointers of one head into the staged page table at `table` (mutex_ held).
  // Queries times scale, as the CPU scales them before the dot (the score kernels then use 1).
  void stageScaledQueries(size_t offset, const float* q, size_t count, float scale) {
    float* staged = reinterpret_cast<float*>(staging_.data() + offset);
    for (size_t i = 0; i < count; ++i) staged[i] = q[i] * scale;
  }

  void stagePages(size_t table, int64_t firstPage, const void* const* pages, int64_t count) {
    if (count > 0) {
      std::memcpy(staging_.data() + table + size_t(firstPage) * sizeof(void*), pages, size_t(count) * sizeof(void*));
    }
  }

  // Moves the staged inputs into the workspace in one copy and points `kernel` at its regions;
  // `device` is the workspace, for the caller's head spans (mutex_ held).
  Status uploadInputs(const WorkspaceLayout& layout, AttentionKernelArgs& kernel, unsigned char** device) {
    KVSLIM_RETURN_IF_ERROR(reserveWorkspace(layout.totalBytes));
    unsigned char* base = static_cast<unsigned char*>(workspace_);
    KVSLIM_RETURN_IF_ERROR(cudaStatus(cudaMemcpyAsync(base, staging_.data(), layout.uploadBytes, cudaMemcpyHostToDevice, stream_),
                                      "cudaMemcpyAsync (attention inputs)"));
    kernel.keyPages = reinterpret_cast<const void* const*>(base + layout.keyPages);
    kernel.valuePages = reinterpret_cast<const void* const*>(base + layout.valuePages);
    kernel.q = reinterpret_cast<const float*>(base + layout.q);
    kernel.out = reinterpret_cast<float*>(base + layout.out);
    kernel.partialMax = reinterpret_cast<float*>(base + layout.partialMax);
    kernel.partialSum = reinterpret_cast<float*>(base + layout.partialSum);
    kernel.partialAcc = reinterpret_cast<float*>(base + layout.partialAcc);
    *device = base;
    return Status::ok();
  }

  // Each head's k best of `stride` scores at `scores` ([heads, stride] doubles in device memory, the
  // entries past a head's counts[h] padded with -inf) by the radix top-k into chosen (device, [heads,
  // k]), copied back and waited for; out ([heads, outStride] host memory, filled with -1 by the
  // caller) gets each head's choices ascending. Padding ranks last (ties to the lower index), so it
  // can only end a head's list, and is dropped (mutex_ held).
  Status chooseTop(const double* scores, int64_t stride, size_t k, long long* chosen, const std::vector<int64_t>& counts,
                   int64_t* out, int64_t outStride, const char* what) {
    static_assert(sizeof(long long) == sizeof(int64_t), "indices are 64-bit on both sides");
    const size_t heads = counts.size();
    TopBlocksArgs top;
    top.kvHeads = int32_t(heads);
    top.blocks = stride;
    top.scores = scores;
    top.k = int64_t(k);
    KVSLIM_RETURN_IF_ERROR(cudaStatus(cuda::launchTopBlocks(top, chosen, stream_), std::string(what) + " selection launch"));
    std::vector<long long> host(heads * k);
    KVSLIM_RETURN_IF_ERROR(cudaStatus(cudaMemcpyAsync(host.data(), chosen, host.size() * sizeof(long long), cudaMemcpyDeviceToHost, stream_),
                                      std::string(what) + " (kernels or output copy)"));
    KVSLIM_RETURN_IF_ERROR(cudaStatus(cudaStreamSynchronize(stream_), std::string("cudaStreamSynchronize (") + what + ")"));
    for (size_t h = 0; h < heads; ++h) {
      for (size_t i = 0; i < k; ++i) {
        const long long index = host[h * k + i];
        if (index >= 0 && index < counts[h]) out[h * size_t(outStride) + i] = index;
      }
    }
    return Status::ok();
  }

  // A device-to-host copy that finishAttention makes once the merge is enqueued.
  struct HostCopy {
    void* host;
    const void* device;
    size_t bytes;
  };

  // After the attention kernel: merges key splits, then copyBack (mutex_ held).
  Status finishAttention(const AttentionKernelArgs& kernel, const WorkspaceLayout& layout, float* hostOut, float* hostLse,
                         const char* what, const HostCopy* extra = nullptr) {
    KVSLIM_RETURN_IF_ERROR(mergeSplits(kernel, what));
    return copyBack(kernel, layout, hostOut, hostLse, what, extra);
  }

  // Merges the key splits' partials into kernel.out and kernel.lse, when split (mutex_ held).
  Status mergeSplits(const AttentionKernelArgs& kernel, const char* what) {
    if (kernel.splits <= 1) return Status::ok();
    return cudaStatus(cuda::launchMergeSplits(kernel, stream_), std::string(what) + " split merge launch");
  }

  // Copies `extra` (when set), the output (and kernel.lse into hostLse when both are set) to the
  // host and waits (mutex_ held).
  Status copyBack(const AttentionKernelArgs& kernel, const WorkspaceLayout& layout, float* hostOut, float* hostLse,
                  const char* what, const HostCopy* extra = nullptr) {
    if (extra != nullptr) {
      KVSLIM_RETURN_IF_ERROR(cudaStatus(cudaMemcpyAsync(extra->host, extra->device, extra->bytes, cudaMemcpyDeviceToHost, stream_),
                                        std::string(what) + " (kernels or mass copy)"));
    }
    // A fault inside a kernel surfaces at the first call that waits for it: the output copy.
    KVSLIM_RETURN_IF_ERROR(cudaStatus(cudaMemcpyAsync(hostOut, kernel.out, layout.queryBytes, cudaMemcpyDeviceToHost, stream_),
                                      std::string(what) + " (kernels or output copy)"));
    if (hostLse != nullptr && kernel.lse != nullptr) {
      KVSLIM_RETURN_IF_ERROR(cudaStatus(cudaMemcpyAsync(hostLse, kernel.lse, layout.lseBytes, cudaMemcpyDeviceToHost, stream_),
                                        std::string(what) + " (log-sum-exp copy)"));
    }
    return cudaStatus(cudaStreamSynchronize(stream_), std::string("cudaStreamSynchronize (") + what + ")");
  }

  // Grows the workspace (mutex_ held). Geometric growth: the page tables of a decode grow a
  // little every step, and a reallocation synchronizes the whole device.
  Status reserveWorkspace(size_t bytes) {
    if (bytes <= workspaceBytes_) return Status::ok();
    const size_t grown = std::max(bytes, workspaceBytes_ + workspaceBytes_ / 2);
    if (workspace_ != nullptr) {
      const cudaError_t freed = cudaFree(workspace_);
      workspace_ = nullptr;
      workspaceBytes_ = 0;
      KVSLIM_RETURN_IF_ERROR(cudaStatus(freed, "cudaFree (attention workspace)"));
    }
    for (const size_t attempt : {grown, bytes}) {
      if (cudaMalloc(&workspace_, attempt) == cudaSuccess) {
        workspaceBytes_ = attempt;
        return Status::ok();
      }
      cudaGetLastError();
      workspace_ = nullptr;
    }
    return Status(ErrorCode::OutOfMemory, "could not allocate " + std::to_string(bytes) + " bytes of GPU memory for attention");
  }

  const cudaStream_t stream_;
  const int multiprocessors_;
  std::mutex mutex_;  // one attention at a time owns the staging buffer and the workspace
  std::vector<unsigned char> staging_;
  void* workspace_ = nullptr;
  size_t workspaceBytes_ = 0;
};

struct BackendOrReason {
  std::shared_ptr<Backend> backend;
  Status reason;
};

BackendOrReason createCudaBackend() {
  int multiprocessors = 0;
  Status status = cudaStatus(cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, 0),
                             "cudaDeviceGetAttribute (multiprocessors)");
  cudaStream_t stream = nullptr;
  if (status.isOk()) status = cudaStatus(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
  if (!status.isOk()) return {nullptr, Status(ErrorCode::BackendUnavailable, status.message())};
  return {std::make_shared<CudaBackend>(stream, multiprocessors), Status::ok()};
}

}  // namespace

std::shared_ptr<Backend> cudaBackend(Status* whyUnavailable) {
  const CudaInfo info = cudaInfo();
  if (!info.available) {
    if (whyUnavailable != nullptr) *whyUnavailable = Status(ErrorCode::BackendUnavailable, info.reason);
    return nullptr;
  }
  // One backend per process: its stream and workspace serve every cache.
  static const BackendOrReason instance = createCudaBackend();
  if (instance.backend == nullptr && whyUnavailable != nullptr) *whyUnavailable = instance.reason;
  return instance.backend;
}

}  // namespace kvslim
