#include "probes.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <vector>

#include "simd_level.h"
#include "thread_pool.h"

namespace kvslim::cpu {

namespace {
double secondsOf(const std::function<void()>& work) {
  const auto start = std::chrono::steady_clock::now();
  work();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}
}  // namespace

double measureReadBandwidth(size_t bytes, int32_t threads, int32_t repeats) {
  ThreadPool& pool = globalPool();
  const int32_t used = threads > 0 ? std::min(threads, pool.size()) : pool.size();
  const size_t count = bytes / sizeof(float);
  std::vector<float> buffer(count);
  // Written by the threads that will read it, so pages are mapped before timing.
  const int64_t tasks = int64_t(used) * 8;
  const size_t perTask = (count + size_t(tasks) - 1) / size_t(tasks);
  pool.parallelFor(tasks, used, [&](int64_t task, int32_t) {
    const size_t begin = std::min(count, size_t(task) * perTask), end = std::min(count, begin + perTask);
    for (size_t i = begin; i < end; ++i) buffer[i] = float(i & 1023) * 1e-3f;
  });
  const KernelTable& kernels = activeKernels();
  std::atomic<int64_t> sink{0};
  double best = 0;
  for (int32_t r = 0; r < std::max(1, repeats); ++r) {
    const double seconds = secondsOf([&] {
      pool.parallelFor(tasks, used, [&](int64_t task, int32_t) {
        const size_t begin = std::min(count, size_t(task) * perTask), end = std::min(count, begin + perTask);
        sink += int64_t(kernels.streamSum(buffer.data() + begin, end - begin));
      });
    });
    best = std::max(best, double(count * sizeof(float)) / seconds);
  }
  return best;
}

double measureFmaPeak(int32_t threads, int32_t repeats) {
  ThreadPool& pool = globalPool();
  const int32_t used = threads > 0 ? std::min(threads, pool.size()) : pool.size();
  const KernelTable& kernels = activeKernels();
  constexpr int64_t kIterations = 4 << 20;
  double best = 0;
  for (int32_t r = 0; r < std::max(1, repeats); ++r) {
    std::atomic<double> flops{0};
    const double seconds = secondsOf([&] {
      pool.parallelFor(used, used, [&](int64_t task, int32_t) {
        const double done = kernels.fmaBurn(kIterations, 1.0f + float(task));
        double expected = flops.load();
        while (!flops.compare_exchange_weak(expected, expected + done)) {
        }
      });
    });
    best = std::max(best, flops.load() / seconds);
  }
  return best;
}

}  // namespace kvslim::cpu
