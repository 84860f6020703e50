#include "thread_pool.h"

#include <algorithm>
#include <chrono>
#include <memory>
#include <utility>

namespace kvslim::cpu {

namespace {
constexpr int64_t kSpinMicros = 200;  // how long a thread spins before it blocks

inline void cpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// Spins until ready() or kSpinMicros have passed (the clock read every 64 turns).
template <class Ready>
void spinUntil(const Ready& ready) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::microseconds(kSpinMicros);
  for (int i = 1; !ready(); ++i) {
    cpuRelax();
    if ((i & 63) == 0 && std::chrono::steady_clock::now() >= deadline) return;
  }
}
}  // namespace

ThreadPool::ThreadPool(int32_t threads) {
  for (int32_t w = 1; w < threads; ++w) workers_.emplace_back([this, w] { workerLoop(w); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(stateMutex_);
    stopping_ = true;
  }
  wake_.notify_all();
  for (std::thread& worker : workers_) worker.join();
}

namespace {
// True on a thread while it runs a pool task: a parallelFor inside a task (a batch's cache step
// on each of its threads) runs inline there instead of waiting for the job the thread is part of.
thread_local bool insideTask = false;
}  // namespace

void ThreadPool::runTasks(int32_t worker) {
  const bool outer = insideTask;
  insideTask = true;
  try {
    for (int64_t index = next_.fetch_add(1); index < tasks_; index = next_.fetch_add(1)) (*task_)(index, worker);
  } catch (...) {
    next_.store(tasks_);  // no thread starts another index
    std::lock_guard<std::mutex> lock(stateMutex_);
    if (!error_) error_ = std::current_exception();
  }
  insideTask = outer;
}

void ThreadPool::workerLoop(int32_t worker) {
  uint64_t seen = 0;
  for (;;) {
    spinUntil([&] { return stopping_.load(std::memory_order_acquire) || generation_.load(std::memory_order_acquire) != seen; });
    {
      std::unique_lock<std::mutex> lock(stateMutex_);
      wake_.wait(lock, [&] { return stopping_ || generation_.load() != seen; });
      if (stopping_) return;
      seen = generation_.load();
      if (worker >= participants_) continue;
    }
    runTasks(worker);
    {
      std::lock_guard<std::mutex> lock(stateMutex_);
      if (--pending_ == 0) done_.notify_one();
    }
  }
}

void ThreadPool::parallelFor(int64_t tasks, int32_t maxThreads,
                             const std::function<void(int64_t, int32_t)>& task) {
  if (tasks <= 0) return;
  int32_t participants = maxThreads > 0 && maxThreads < size() ? maxThreads : size();
  if (int64_t(participants) > tasks) participants = int32_t(tasks);
  if (participants == 1 || insideTask) {
    for (int64_t index = 0; index < tasks; ++index) task(index, 0);
    return;
  }
  std::lock_guard<std::mutex> job(jobMutex_);
  {
    std::lock_guard<std::mutex> lock(stateMutex_);
    task_ = &task;
    tasks_ = tasks;
    participants_ = participants;
    pending_ = participants - 1;
    next_.store(0);
    generation_.fetch_add(1, std::memory_order_release);
  }
  wake_.notify_all();
  runTasks(0);
  spinUntil([&] { return pending_.load(std::memory_order_acquire) == 0; });
  std::unique_lock<std::mutex> lock(stateMutex_);
  done_.wait(lock, [&] { return pending_ == 0; });
  task_ = nullptr;
  if (error_) std::rethrow_exception(std::exchange(error_, nullptr));
}

namespace {
std::mutex poolMutex;
std::unique_ptr<ThreadPool> pool;
int32_t defaultThreads() {
  unsigned hardware = std::thread::hardware_concurrency();
  return hardware == 0 ? 1 : int32_t(hardware);
}
}  // namespace

ThreadPool& globalPool() {
  std::lock_guard<std::mutex> lock(poolMutex);
  if (!pool) pool = std::make_unique<ThreadPool>(defaultThreads());
  return *pool;
}

void setGlobalPoolSize(int32_t threads) {
  std::lock_guard<std::mutex> lock(poolMutex);
  if (pool && pool->size() == threads) return;
  pool = std::make_unique<ThreadPool>(threads < 1 ? 1 : threads);
}

int32_t globalPoolSize() { return globalPool().size(); }

int32_t threadsFor(int32_t requested, int64_t tasks) {
  ThreadPool& pool = globalPool();
  const int32_t allowed = requested > 0 ? std::min(requested, pool.size()) : pool.size();
  return int32_t(std::max<int64_t>(1, std::min<int64_t>(allowed, tasks)));
}

}  // namespace kvslim::cpu
