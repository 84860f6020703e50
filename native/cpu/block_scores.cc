// ActQKV's block scores and top blocks on the CPU backend (core/block_scores_args.h). Scores:
// chunks of blocks per task through the dotsF64 kernel (the contract's summation order), entropies
// per head in block order. Top blocks: a partial sort per head, best first with ties to the lower
// block, then ascending.
#include <algorithm>
#include <cmath>
#include <new>
#include <numeric>
#include <string>
#include <vector>

#include "attention_plan.h"
#include "simd_level.h"
#include "thread_pool.h"

namespace kvslim::cpu {

namespace {

constexpr int64_t kScoreTaskBlocks = 1024;  // representatives scored per task

// `perWorker` elements for each of the threads that run `tasks` tasks, allocated before the
// parallel part (a worker must not throw).
template <class T>
Status workerScratch(int32_t requested, int64_t tasks, int64_t perWorker, const char* what, std::vector<T>* out) {
  try {
    out->resize(size_t(threadsFor(requested, tasks)) * size_t(perWorker));
  } catch (const std::bad_alloc&) {
    return Status(ErrorCode::OutOfMemory, std::string("out of host memory for ") + what);
  }
  return Status::ok();
}

// Entropy of softmax(s / temperature) over ln(count); 1 for a single block.
double normalisedEntropy(const double* s, int64_t count, double temperature, double* scratch) {
  if (count <= 1) return 1.0;
  double max = s[0];
  for (int64_t b = 1; b < count; ++b) max = std::max(max, s[b]);
  double z = 0;
  for (int64_t b = 0; b < count; ++b) {
    scratch[b] = std::exp((s[b] - max) / temperature);
    z += scratch[b];
  }
  double entropy = 0;
  for (int64_t b = 0; b < count; ++b) {
    const double p = scratch[b] / z;
    if (p > 0) entropy -= p * std::log(p);
  }
  return entropy / std::log(double(count));
}

}  // namespace

Status blockScores(const BlockScoresArgs& args) {
  const KernelTable& kernels = activeKernels();
  const size_t dim = size_t(args.headDim);
  const int64_t blocks = args.blocks;
  const int64_t chunks = (blocks + kScoreTaskBlocks - 1) / kScoreTaskBlocks;
  const int64_t tasks = int64_t(args.kvHeads) * chunks;
  globalPool().parallelFor(tasks, threadsFor(args.threads, tasks), [&](int64_t task, int32_t) {
    const int32_t h = int32_t(task / chunks);
    const int64_t begin = (task % chunks) * kScoreTaskBlocks;
    const int64_t end = std::min(begin + kScoreTaskBlocks, blocks);
    const int64_t stored = std::min(end, blocks - 1);  // final blocks of this chunk end here
    const BlockHeadView& head = args.heads[h];
    const double* u = args.u + size_t(h) * dim;
    double* scores = args.scores + size_t(h) * size_t(blocks);
    if (stored > begin) {
      const void* rows = static_cast<const uint8_t*>(head.reprs) + size_t(begin) * dim * dtypeBytes(args.reprType);
      kernels.dotsF64(u, args.headDim, rows, args.reprType, stored - begin, scores + begin);
    }
    if (end == blocks) kernels.dotsF64(u, args.headDim, head.newest, DType::F32, 1, scores + blocks - 1);
    for (int64_t b = begin; b < end; ++b) {
      const double norm = b < blocks - 1 ? head.norms[b] : head.newestNorm;
      scores[b] = norm > 0 ? scores[b] / norm : 0.0;
    }
  });
  std::vector<double> scratch;
  KVSLIM_RETURN_IF_ERROR(workerScratch(args.threads, args.kvHeads, blocks, "block entropies", &scratch));
  globalPool().parallelFor(args.kvHeads, threadsFor(args.threads, args.kvHeads), [&](int64_t h, int32_t worker) {
    args.entropies[h] = normalisedEntropy(args.scores + size_t(h) * size_t(blocks), blocks, args.temperature,
                                          scratch.data() + size_t(worker) * size_t(blocks));
  });
  return Status::ok();
}

Status topBlocks(const TopBlocksArgs& args) {
  const int64_t blocks = args.blocks, k = args.k;
  std::vector<int64_t> order;
  KVSLIM_RETURN_IF_ERROR(workerScratch(args.threads, args.kvHeads, blocks, "top blocks", &order));
  globalPool().parallelFor(args.kvHeads, threadsFor(args.threads, args.kvHeads), [&](int64_t h, int32_t worker) {
    const double* s = args.scores + size_t(h) * size_t(blocks);
    int64_t* rank = order.data() + size_t(worker) * size_t(blocks);
    std::iota(rank, rank + blocks, int64_t(0));
    // Best first, ties to the earlier block.
    std::partial_sort(rank, rank + k, rank + blocks,
                      [&](int64_t a, int64_t b) { return s[a] > s[b] || (s[a] == s[b] && a < b); });
    std::sort(rank, rank + k);
    std::copy(rank, rank + k, args.out + size_t(h) * size_t(k));
  });
  return Status::ok();
}

}  // namespace kvslim::cpu
