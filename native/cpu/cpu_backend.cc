// The CPU backend: pages in host memory, attention through the SIMD drivers.
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "../core/backend.h"
#include "attention_plan.h"

namespace kvslim {

namespace {

class CpuBackend final : public Backend {
 public:
  DeviceKind kind() const override { return DeviceKind::Cpu; }
  const char* name() const override { return "cpu"; }

  // Freed pages are kept for reuse (up to kCachedBytes): a server disposes and creates caches
  // all the time, and fresh pages cost a page fault per 4 KiB on first write.
  void* allocate(size_t bytes) override {
    // 64-byte alignment: one cache line, one zmm load.
    const size_t rounded = bytes == 0 ? 64 : (bytes + 63) / 64 * 64;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto found = freePages_.find(rounded);
      if (found != freePages_.end() && !found->second.empty()) {
        void* page = found->second.back();
        found->second.pop_back();
        cachedBytes_ -= rounded;
        sizes_[page] = rounded;
        return page;
      }
    }
    void* page = std::aligned_alloc(64, rounded);
    if (page != nullptr) {
      std::lock_guard<std::mutex> lock(mutex_);
      sizes_[page] = rounded;
    }
    return page;
  }
  void release(void* ptr) override {
    if (ptr == nullptr) return;
    std::lock_guard<std::mutex> lock(mutex_);
    auto entry = sizes_.find(ptr);
    const size_t bytes = entry->second;
    sizes_.erase(entry);
    if (cachedBytes_ + bytes <= kCachedBytes) {
      freePages_[bytes].push_back(ptr);
      cachedBytes_ += bytes;
    } else {
      std::free(ptr);
    }
  }
  Status upload(void* dst, const void* hostSrc, size_t bytes) override {
    std::memcpy(dst, hostSrc, bytes);
    return Status::ok();
  }
  Status download(void* hostDst, const void* src, size_t bytes) override {
    std::memcpy(hostDst, src, bytes);
    return Status::ok();
  }
  Status copy(void* dst, const void* src, size_t bytes) override {
    std::memcpy(dst, src, bytes);
    return Status::ok();
  }

  Status attention(const AttentionArgs& args) override {
    // Few rows per kv head: memory-bound, read pages directly. Many: tile and convert chunks.
    constexpr int64_t kDecodeRowsLimit = 16;
    const int64_t rowsPerHead = int64_t(args.n) * (args.qHeads / args.kvHeads);
    if (rowsPerHead <= kDecodeRowsLimit) {
      cpu::attentionDecode(args);
    } else {
      cpu::attentionPrefill(args);
    }
    return Status::ok();
  }

 private:
  static constexpr size_t kCachedBytes = size_t(256) << 20;
  std::mutex mutex_;
  std::unordered_map<size_t, std::vector<void*>> freePages_;  // by size
  std::unordered_map<void*, size_t> sizes_;                   // of every live page
  size_t cachedBytes_ = 0;
};

}  // namespace

std::shared_ptr<Backend> cpuBackend() {
  static std::shared_ptr<Backend> backend = std::make_shared<CpuBackend>();
  return backend;
}

}  // namespace kvslim
