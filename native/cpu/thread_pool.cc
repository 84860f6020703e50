#include "thread_pool.h"

#include <memory>

namespace kvslim::cpu {

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

void ThreadPool::runTasks(int32_t worker) {
  for (int64_t index = next_.fetch_add(1); index < tasks_; index = next_.fetch_add(1)) (*task_)(index, worker);
}

void ThreadPool::workerLoop(int32_t worker) {
  uint64_t seen = 0;
  for (;;) {
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
  if (participants == 1) {
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
  std::unique_lock<std::mutex> lock(stateMutex_);
  done_.wait(lock, [&] { return pending_ == 0; });
  task_ = nullptr;
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

}  // namespace kvslim::cpu
