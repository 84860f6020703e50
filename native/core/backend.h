// What core needs from a compute backend: memory for KV pages and the attention kernels.
// native/cpu and native/cuda implement it; core never includes their headers.
#pragma once
#include <cstddef>
#include <functional>
#include <memory>
#include <string>

#include "attention_args.h"
#include "block_scores_args.h"
#include "kivi_format.h"
#include "status.h"

namespace kvslim {

enum class DeviceKind { Cpu = 0, Cuda = 1 };

// A run of bytes in backend memory (Backend::gather).
struct DeviceRun {
  const void* source = nullptr;
  size_t bytes = 0;
};

// A copy inside backend memory (Backend::copyRuns).
struct DeviceCopy {
  void* target = nullptr;
  const void* source = nullptr;
  size_t bytes = 0;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual DeviceKind kind() const = 0;
  virtual const char* name() const = 0;

  // Page memory lives where this backend computes (host RAM or GPU memory).
  virtual void* allocate(size_t bytes) = 0;  // nullptr when out of memory
  virtual void release(void* ptr) = 0;
  // Copy from host memory into backend memory.
  virtual Status upload(void* dst, const void* hostSrc, size_t bytes) = 0;
  // Copy from backend memory into host memory.
  virtual Status download(void* hostDst, const void* src, size_t bytes) = 0;
  // Copy inside backend memory (copy-on-write of a shared page).
  virtual Status copy(void* dst, const void* src, size_t bytes) = 0;
  // Many copies inside backend memory, none overlapping another's target, done when it returns: an
  // eviction's kept rows, in one launch where the backend can (a GPU pays a synchronous round
  // trip per copy()). The default copies run by run.
  virtual Status copyRuns(const DeviceCopy* runs, int64_t count) {
    for (int64_t i = 0; i < count; ++i) KVSLIM_RETURN_IF_ERROR(copy(runs[i].target, runs[i].source, runs[i].bytes));
    return Status::ok();
  }
  // Copies the runs, in order, into consecutive host memory at hostOut, in one transfer where the
  // backend can (a decode call's new keys of every kv head, for the host indexes). The default
  // downloads run by run.
  virtual Status gather(const DeviceRun* runs, int64_t count, void* hostOut) {
    auto* out = static_cast<unsigned char*>(hostOut);
    for (int64_t i = 0; i < count; ++i) {
      KVSLIM_RETURN_IF_ERROR(download(out, runs[i].source, runs[i].bytes));
      out += runs[i].bytes;
    }
    return Status::ok();
  }

  // args.heads[*] page pointers are backend memory; q and out are host memory.
  virtual Status attention(const AttentionArgs& args) = 0;
  // Whether attention() fills AttentionArgs::mass; a backend that does not refuses a call that asks.
  virtual bool fusesMass() const { return false; }
  // Whether attention() takes this call's older segment (AttentionArgs::olderHeads) itself; when
  // it does not, core attends the segment in a second call and merges the two by log-sum-exp.
  // args.mass is non-null when the call will ask for the mass (its memory is not set yet).
  virtual bool joinsOlder(const AttentionArgs&) const { return false; }
  // Raw scores q.k * scale of one kv head (the attentionScores op).
  virtual Status attentionScores(const ScoresArgs& args) = 0;
  // The flat retrieval's choice for a layer: every kv head's best score per token over its rows
  // and their top k tokens; only the chosen tokens reach args.out (host memory).
  virtual Status topKeys(const TopKeysArgs& args) = 0;
  // Per-token attention mass of one kv head's query rows (H2O accumulation, SnapKV pooled votes),
  // computed where the pages live; only the [columns] result reaches args.out (host memory).
  virtual Status attentionMass(const AttentionMassArgs& args) = 0;
  // Attention straight from KIVI codes (kivi_format.h); page and residual pointers are backend memory.
  virtual Status kiviAttention(const KiviAttentionArgs& args) = 0;
  // Whether kiviAttention() masks single evicted tokens (KiviHeadView::evicted) and fills
  // KiviAttentionArgs::mass: what H2O over a KIVI store needs.
  virtual bool fusesKiviMass() const { return false; }
  // Quest's page boxes of `count` kv heads (heads[i] each), extended from the keys in the
  // backend's pages into lo / hi in backend memory (the quest policy; no key reaches host memory).
  // One call for a layer's heads: a GPU backend uploads and waits once.
  virtual Status pageBoxes(const PageBoxesArgs* heads, int32_t count) = 0;
  // Quest's choice for a layer: every kv head's page bounds against its query rows and their top
  // k pages; only the chosen pages reach args.out (host memory).
  virtual Status topPages(const TopPagesArgs& args) = 0;

  // ActQKV's block scores of one layer (block_scores_args.h): scores every block of every kv head
  // into args.scores (backend memory) and returns each head's normalised entropy (host memory).
  virtual Status blockScores(const BlockScoresArgs& args) = 0;
  // Each head's k best blocks from blockScores' output, ascending (host memory).
  virtual Status topBlocks(const TopBlocksArgs& args) = 0;

  // Host-side work of the policies (index searches per kv head) on the host threads this backend
  // computes with: task(i) for i in [0, tasks), at most `threads` at once (0 = all). A task may
  // copy memory but must not run the backend's kernels (they use the same threads). The default runs them in order.
  virtual void hostParallel(int64_t tasks, int32_t threads, const std::function<void(int64_t)>& task) {
    for (int64_t i = 0; i < tasks; ++i) task(i);
  }
  // Threads hostParallel runs on (1: it runs tasks one after another). A backend call made from
  // inside a hostParallel task runs on that task's thread alone.
  virtual int32_t hostThreads() const { return 1; }

  // Memory kept between calls for reuse: the page pool's mappings (of which `pagesIdle` hold no
  // cache's page) and the drivers' scratch. releaseKept() gives back what no cache and no running
  // call holds, and returns the bytes given back. The defaults keep nothing.
  struct KeptMemory {
    size_t pagesMapped = 0;
    size_t pagesIdle = 0;
    size_t scratch = 0;
  };
  virtual KeptMemory keptMemory() { return {}; }
  virtual size_t releaseKept() { return 0; }
};

// Owns one allocation in a backend's memory (RAII).
class BackendBuffer {
 public:
  explicit BackendBuffer(Backend& backend) : backend_(backend) {}
  ~BackendBuffer() {
    if (data_ != nullptr) backend_.release(data_);
  }
  BackendBuffer(const BackendBuffer&) = delete;
  BackendBuffer& operator=(const BackendBuffer&) = delete;
  void* data() const { return data_; }
  // `what` names the contents in the out-of-memory message ("" for none).
  Status allocate(size_t bytes, const std::string& what = "") {
    data_ = backend_.allocate(bytes);
    if (data_ == nullptr) {
      return Status(ErrorCode::OutOfMemory, "could not allocate " + std::to_string(bytes) + " bytes" +
                                                (what.empty() ? "" : " of " + what) + " on " + backend_.name());
    }
    return Status::ok();
  }
  Status upload(const void* hostSrc, size_t bytes) {
    KVSLIM_RETURN_IF_ERROR(allocate(bytes));
    return backend_.upload(data_, hostSrc, bytes);
  }
  // Bytes [offset, offset + bytes) back to the host.
  Status download(void* hostDst, size_t offset, size_t bytes) const {
    return backend_.download(hostDst, static_cast<const uint8_t*>(data_) + offset, bytes);
  }

 private:
  Backend& backend_;
  void* data_ = nullptr;
};

// Implemented by native/cpu (always) and native/cuda (or its stub when built without CUDA).
std::shared_ptr<Backend> cpuBackend();
std::shared_ptr<Backend> cudaBackend(Status* whyUnavailable);

}  // namespace kvslim
