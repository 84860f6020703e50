// The CPU backend: pages in host memory, attention through the SIMD drivers.
#include <atomic>
#include <chrono>
#include <cstring>
#include <new>
#include <stdexcept>
#include <thread>
#include <vector>

#include "../core/backend.h"
#include "../core/environment.h"
#include "../core/index/key_index.h"
#include "attention_plan.h"
#include "page_pool.h"
#include "scratch.h"
#include "thread_pool.h"

namespace kvslim {

namespace {
// KVSLIM_TEST_THROW_IN_TASK=n (read once; tests only): the first n attention calls throw a
// std::logic_error from a thread-pool task on a worker thread, the route by which a bug's C++
// exception would leave the core. It must reach JavaScript as ERR_INTERNAL and leave the pool
// working. The calling thread's tasks wait 10 ms each so that a worker takes one (none does in a
// one-thread pool or a nested job: then nothing is thrown).
void throwInTaskForTests() {
  static std::atomic<int64_t> left{environmentInteger("KVSLIM_TEST_THROW_IN_TASK", 0, 0)};
  if (left.load(std::memory_order_relaxed) <= 0 || left.fetch_sub(1) <= 0) return;
  cpu::globalPool().parallelFor(64, 0, [](int64_t, int32_t worker) {
    if (worker != 0) throw std::logic_error("KVSLIM_TEST_THROW_IN_TASK");
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  });
}

class CpuBackend final : public Backend {
 public:
  DeviceKind kind() const override { return DeviceKind::Cpu; }
  const char* name() const override { return "cpu"; }

  void* allocate(size_t bytes) override { return pages_.allocate(bytes); }
  void release(void* ptr) override { pages_.release(ptr); }
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
    // Few rows per kv head: the decode driver. Many: tile the rows over f32 keys, head by head
    // while a head's keys fit the budget, else in chunks of every head.
    KVSLIM_RETURN_IF_ERROR(checkAttentionOlder(args, joinsOlder(args)));
    KVSLIM_RETURN_IF_ERROR(checkAttentionMass(args, true));
    throwInTaskForTests();
    if (decodes(args)) {
      cpu::attentionDecode(args);
    } else if (cpu::decodesTiled(args)) {
      cpu::attentionDecodeTiled(args);
    } else if (cpu::prefillHeadsFits(args)) {
      cpu::attentionPrefillHeads(args);
    } else {
      cpu::attentionPrefill(args);
      if (args.mass != nullptr) cpu::prefillMass(args);
    }
    return Status::ok();
  }

  bool fusesMass() const override {
    // KVSLIM_CPU_FUSES_MASS=0 (read once): never, as a backend that cannot; tests run core's path
    // for one (H2O's mass by attentionMass after the call) on the CPU.
    static const bool fuses = environmentInteger("KVSLIM_CPU_FUSES_MASS", 1, 0) != 0;
    return fuses;
  }
  bool fusesKiviMass() const override { return true; }
  // The decode driver splits keys anyway: the older segment is more splits of the same merge. The
  // tiled decode driver, and a prefill (or a few queries with the mass) that runs head by head,
  // walk it in front of each head's keys, given the same queries for both (cpu::decodesTiled,
  // cpu::attentionPrefillHeads when the joined keys fit).
  bool joinsOlder(const AttentionArgs& args) const override {
    // KVSLIM_CPU_JOINS_OLDER=0 (read once): never, as CUDA; tests run core's paths for a backend
    // that does not join on the CPU.
    static const bool joins = environmentInteger("KVSLIM_CPU_JOINS_OLDER", 1, 0) != 0;
    return joins && (decodes(args) || (args.olderQ == args.q && (cpu::decodesTiled(args) || cpu::prefillHeadsFits(args))));
  }

  Status attentionScores(const ScoresArgs& args) override {
    cpu::attentionScores(args);
    return Status::ok();
  }

  Status attentionMass(const AttentionMassArgs& args) override {
    KVSLIM_RETURN_IF_ERROR(checkAttentionMassArgs(args));
    if (args.chosen == nullptr) {
      cpu::attentionMass(args);
      return Status::ok();
    }
    std::vector<double> result;
    try {
      result.resize(size_t(args.columns));
    } catch (const std::bad_alloc&) {
      return Status(ErrorCode::OutOfMemory, "out of host memory for the attention mass");
    }
    AttentionMassArgs columns = args;
    columns.out = result.data();
    cpu::attentionMass(columns);
    topPositions(result.data(), args.columns, args.k, args.chosen);
    return Status::ok();
  }

  Status kiviAttention(const KiviAttentionArgs& args) override {
    KVSLIM_RETURN_IF_ERROR(checkKiviMass(args, true));
    cpu::attentionKivi(args);
    return Status::ok();
  }

  Status pageBoxes(const PageBoxesArgs* heads, int32_t count) override {
    for (int32_t i = 0; i < count; ++i) KVSLIM_RETURN_IF_ERROR(checkPageBoxesArgs(heads[i]));
    for (int32_t i = 0; i < count; ++i) KVSLIM_RETURN_IF_ERROR(cpu::pageBoxes(heads[i]));
    return Status::ok();
  }

  Status topKeys(const TopKeysArgs& args) override {
    KVSLIM_RETURN_IF_ERROR(checkTopKeysArgs(args));
    return cpu::topKeys(args);
  }

  Status topPages(const TopPagesArgs& args) override {
    KVSLIM_RETURN_IF_ERROR(checkTopPagesArgs(args));
    return cpu::topPages(args);
  }

  Status blockScores(const BlockScoresArgs& args) override {
    KVSLIM_RETURN_IF_ERROR(checkBlockScoresArgs(args));
    return cpu::blockScores(args);
  }

  Status topBlocks(const TopBlocksArgs& args) override {
    KVSLIM_RETURN_IF_ERROR(checkTopBlocksArgs(args));
    return cpu::topBlocks(args);
  }

  void hostParallel(int64_t tasks, int32_t threads, const std::function<void(int64_t)>& task) override {
    cpu::globalPool().parallelFor(tasks, threads, [&task](int64_t index, int32_t) { task(index); });
  }
  int32_t hostThreads() const override { return cpu::globalPool().size(); }

  KeptMemory keptMemory() override { return {pages_.mappedBytes(), pages_.idleBytes(), cpu::scratchBytes()}; }
  size_t releaseKept() override { return pages_.releaseIdle() + cpu::releaseScratch(); }

 private:
  // Few rows per kv head: memory-bound, so the decode driver reads the pages directly.
  static bool decodes(const AttentionArgs& args) {
    return int64_t(args.n) * (args.qHeads / args.kvHeads) <= cpu::kMaxDecodeDriverRows;
  }

  cpu::PagePool pages_;
};

}  // namespace

std::shared_ptr<Backend> cpuBackend() {
  static std::shared_ptr<Backend> backend = std::make_shared<CpuBackend>();
  return backend;
}

}  // namespace kvslim
