// A persistent pool of worker threads. parallelFor hands out task indices through one atomic
// counter; the calling thread works too. One job runs at a time: callers from several threads
// (async work on different caches) queue on a mutex instead of oversubscribing the cores.
// Workers and the caller spin briefly before they block: back-to-back jobs (layer after layer of a
// decode step) then start without a futex wake-up, which costs tens of microseconds in a VM.
#pragma once
#include <atomic>
#include <condition_variable>
#include <exception>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace kvslim::cpu {

class ThreadPool {
 public:
  explicit ThreadPool(int32_t threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int32_t size() const { return int32_t(workers_.size()) + 1; }

  // Runs task(index, worker) for index in [0, tasks) on at most maxThreads threads (0 = all);
  // worker is in [0, threads used) so callers can give each thread its own scratch. Called from
  // inside a task, it runs every index on the calling thread (worker 0). Tasks report failures
  // through their own state; an exception one throws anyway (a bug) stops the job from handing out
  // more indices and is rethrown here, on the calling thread, once every thread has left the job
  // (thrown on a worker it would abort the process).
  void parallelFor(int64_t tasks, int32_t maxThreads, const std::function<void(int64_t, int32_t)>& task);

 private:
  void workerLoop(int32_t worker);
  void runTasks(int32_t worker);

  std::vector<std::thread> workers_;
  std::mutex jobMutex_;  // one job at a time
  std::mutex stateMutex_;
  std::condition_variable wake_;
  std::condition_variable done_;
  const std::function<void(int64_t, int32_t)>* task_ = nullptr;
  int64_t tasks_ = 0;
  int32_t participants_ = 0;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int32_t> pending_{0};
  std::atomic<bool> stopping_{false};
  std::atomic<int64_t> next_{0};
  std::exception_ptr error_;  // the job's first escaped exception (under stateMutex_)
};

// Threads for `tasks` independent tasks: the caller's limit (0 = the whole pool), at most one per
// task, at least one.
int32_t threadsFor(int32_t requested, int64_t tasks);

// The process-wide pool. Its size is set once from JS (os.availableParallelism() unless
// overridden); resizing replaces it.
ThreadPool& globalPool();
void setGlobalPoolSize(int32_t threads);
int32_t globalPoolSize();

}  // namespace kvslim::cpu
