// The CUDA backend: KV pages in GPU memory, attention by the kernels of attention_*.cu.
// attention() receives host queries and host arrays of device page pointers; it uploads both in
// one copy into a reusable device workspace, launches decode or prefill (the CPU backend's
// split), merges key splits, and copies the output back before it returns.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <new>
#include <string>
#include <vector>

#include "../core/backend.h"
#include "../core/cuda_info.h"
#include "attention_kernels.cuh"

namespace kvslim {

namespace {

using cuda::AttentionKernelArgs;
using cuda::HeadSpan;
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

// Sizes core validated already, checked again before any memory is touched (a caller can lie)
// together with the limits of the kernels' integer indexing.
Status checkArgs(const AttentionArgs& args) {
  if (args.n < 1 || args.qHeads < 1 || args.kvHeads < 1 || args.qHeads % args.kvHeads != 0) {
    return Status(ErrorCode::Shape, "attention needs n, qHeads, kvHeads >= 1 with qHeads a multiple of kvHeads, but received n=" +
                                        std::to_string(args.n) + ", qHeads=" + std::to_string(args.qHeads) +
                                        ", kvHeads=" + std::to_string(args.kvHeads));
  }
  if (args.headDim < 1 || args.headDim > 1024) {
    return Status(ErrorCode::Shape, "headDim must be in [1, 1024], but received " + std::to_string(args.headDim));
  }
  if (args.kvHeads > kMaxKvHeads) {
    return Status(ErrorCode::Shape, "the CUDA backend supports at most " + std::to_string(kMaxKvHeads) +
                                        " kv heads, but received " + std::to_string(args.kvHeads));
  }
  if (int64_t(args.n) * args.qHeads > INT32_MAX) {
    return Status(ErrorCode::Shape, "n x qHeads must be below 2^31 on the CUDA backend, but is " +
                                        std::to_string(int64_t(args.n) * args.qHeads));
  }
  if (args.pageTokens < 1 || args.rowStride < args.headDim) {
    return Status(ErrorCode::Shape, "pages need pageTokens >= 1 and rowStride >= headDim, but received pageTokens=" +
                                        std::to_string(args.pageTokens) + ", rowStride=" + std::to_string(args.rowStride));
  }
  if (args.kvType != DType::F32 && args.kvType != DType::F16 && args.kvType != DType::BF16) {
    return Status(ErrorCode::Dtype, "unknown kv dtype " + std::to_string(int(args.kvType)));
  }
  for (int32_t h = 0; h < args.kvHeads; ++h) {
    if (args.heads[h].tokens < 0 || args.heads[h].tokens > kMaxTokens) {
      return Status(ErrorCode::Shape, "the CUDA backend supports 0 to 2^30 tokens per kv head, but kv head " +
                                          std::to_string(h) + " holds " + std::to_string(args.heads[h].tokens));
    }
  }
  return Status::ok();
}

// Byte offsets inside the device workspace. The first `uploadBytes` mirror the host staging
// buffer, so a single copy moves head spans, page tables and queries.
struct WorkspaceLayout {
  size_t heads = 0, keyPages = 0, valuePages = 0, q = 0, uploadBytes = 0;
  size_t out = 0, partialMax = 0, partialSum = 0, partialAcc = 0, totalBytes = 0;

  WorkspaceLayout(const AttentionArgs& args, int64_t totalPages, int splits) {
    const size_t queryBytes = size_t(args.n) * size_t(args.qHeads) * size_t(args.headDim) * sizeof(float);
    const size_t tableBytes = size_t(totalPages) * sizeof(void*);
    const size_t partials = splits > 1 ? size_t(args.n) * size_t(args.qHeads) * size_t(splits) : 0;
    keyPages = alignUp(size_t(args.kvHeads) * sizeof(HeadSpan));
    valuePages = keyPages + alignUp(tableBytes);
    q = valuePages + alignUp(tableBytes);
    uploadBytes = q + queryBytes;
    out = alignUp(uploadBytes);
    partialMax = out + alignUp(queryBytes);
    partialSum = partialMax + alignUp(partials * sizeof(float));
    partialAcc = partialSum + alignUp(partials * sizeof(float));
    totalBytes = partialAcc + partials * size_t(args.headDim) * sizeof(float);
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

  Status attention(const AttentionArgs& args) override {
    KVSLIM_RETURN_IF_ERROR(checkArgs(args));
    AttentionKernelArgs kernel;
    kernel.n = args.n;
    kernel.qHeads = args.qHeads;
    kernel.kvHeads = args.kvHeads;
    kernel.headDim = args.headDim;
    kernel.group = args.qHeads / args.kvHeads;
    kernel.rowsPerHead = args.n * kernel.group;
    // A head holds at most kMaxTokens tokens: clamping a longer page to that many rows moves none.
    kernel.pageTokens = int(std::min(args.pageTokens, kMaxTokens));
    kernel.rowBytes = args.rowStride * int64_t(dtypeBytes(args.kvType));
    kernel.kvType = args.kvType;
    kernel.causal = args.causal;
    kernel.scaleLog2e = args.scale * 1.4426950408889634f;

    // 16-byte loads need every row 16-byte aligned: page starts and the row stride.
    bool aligned = args.headDim % 8 == 0 && kernel.rowBytes % 16 == 0;
    int64_t totalPages = 0;
    for (int32_t h = 0; h < args.kvHeads; ++h) {
      const KVHeadView& head = args.heads[h];
      const int64_t pages = (head.tokens + args.pageTokens - 1) / args.pageTokens;
      for (int64_t p = 0; p < pages; ++p) {
        aligned = aligned && (reinterpret_cast<uintptr_t>(head.keyPages[p]) | reinterpret_cast<uintptr_t>(head.valuePages[p])) % 16 == 0;
      }
      totalPages += pages;
      kernel.maxTokens = std::max(kernel.maxTokens, int(head.tokens));
    }
    kernel.vectorized = aligned;

    const bool decode = kernel.rowsPerHead <= kDecodeRowsLimit;
    const SplitPlan plan = decode ? cuda::planAttentionDecode(kernel, multiprocessors_)
                                  : cuda::planAttentionPrefill(kernel, multiprocessors_);
    kernel.splits = plan.splits;
    kernel.splitTokens = plan.splitTokens;
    const WorkspaceLayout layout(args, totalPages, plan.splits);

    std::lock_guard<std::mutex> lock(mutex_);
    try {
      if (staging_.size() < layout.uploadBytes) staging_.resize(layout.uploadBytes);
    } catch (const std::bad_alloc&) {
      return Status(ErrorCode::OutOfMemory, "out of host memory staging " + std::to_string(layout.uploadBytes) +
                                                " bytes for CUDA attention");
    }
    unsigned char* staging = staging_.data();
    int64_t firstPage = 0;
    for (int32_t h = 0; h < args.kvHeads; ++h) {
      const KVHeadView& head = args.heads[h];
      const int64_t pages = (head.tokens + args.pageTokens - 1) / args.pageTokens;
      const HeadSpan span{firstPage, int(head.tokens)};
      std::memcpy(staging + layout.heads + size_t(h) * sizeof(HeadSpan), &span, sizeof(HeadSpan));
      if (pages > 0) {
        std::memcpy(staging + layout.keyPages + size_t(firstPage) * sizeof(void*), head.keyPages, size_t(pages) * sizeof(void*));
        std::memcpy(staging + layout.valuePages + size_t(firstPage) * sizeof(void*), head.valuePages, size_t(pages) * sizeof(void*));
      }
      firstPage += pages;
    }
    const size_t queryBytes = layout.uploadBytes - layout.q;
    std::memcpy(staging + layout.q, args.q, queryBytes);

    KVSLIM_RETURN_IF_ERROR(reserveWorkspace(layout.totalBytes));
    unsigned char* device = static_cast<unsigned char*>(workspace_);
    KVSLIM_RETURN_IF_ERROR(cudaStatus(cudaMemcpyAsync(device, staging, layout.uploadBytes, cudaMemcpyHostToDevice, stream_),
                                      "cudaMemcpyAsync (attention inputs)"));
    kernel.heads = reinterpret_cast<const HeadSpan*>(device + layout.heads);
    kernel.keyPages = reinterpret_cast<const void* const*>(device + layout.keyPages);
    kernel.valuePages = reinterpret_cast<const void* const*>(device + layout.valuePages);
    kernel.q = reinterpret_cast<const float*>(device + layout.q);
    kernel.out = reinterpret_cast<float*>(device + layout.out);
    kernel.partialMax = reinterpret_cast<float*>(device + layout.partialMax);
    kernel.partialSum = reinterpret_cast<float*>(device + layout.partialSum);
    kernel.partialAcc = reinterpret_cast<float*>(device + layout.partialAcc);

    if (decode) {
      KVSLIM_RETURN_IF_ERROR(cudaStatus(cuda::launchAttentionDecode(kernel, stream_), "attention decode launch"));
    } else {
      KVSLIM_RETURN_IF_ERROR(cudaStatus(cuda::launchAttentionPrefill(kernel, stream_), "attention prefill launch"));
    }
    if (kernel.splits > 1) {
      KVSLIM_RETURN_IF_ERROR(cudaStatus(cuda::launchMergeSplits(kernel, stream_), "attention split merge launch"));
    }
    // A fault inside a kernel surfaces at the first call that waits for it: the output copy.
    KVSLIM_RETURN_IF_ERROR(cudaStatus(cudaMemcpyAsync(args.out, kernel.out, queryBytes, cudaMemcpyDeviceToHost, stream_),
                                      "attention (kernels or output copy)"));
    return cudaStatus(cudaStreamSynchronize(stream_), "cudaStreamSynchronize (attention)");
  }

 private:
  Status copyAndWait(void* dst, const void* src, size_t bytes, cudaMemcpyKind direction, const char* what) {
    KVSLIM_RETURN_IF_ERROR(cudaStatus(cudaMemcpyAsync(dst, src, bytes, direction, stream_), std::string("cudaMemcpyAsync (") + what + ")"));
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
