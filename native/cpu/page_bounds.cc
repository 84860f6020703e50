// Quest's page boxes and top pages on the CPU backend (PageBoxesArgs, TopPagesArgs in
// core/attention_args.h). Boxes: whole Quest pages per task, each key row converted to f32 once
// (toFloat32 kernel) and folded into its page with std::min / std::max as PageBoxes::add does.
// Bounds: the boxBound kernel of PageBoxes::bounds over chunks of pages; a page's bound does not
// depend on the chunking, so the result has the same bits as PageBoxes whatever the thread count.
// The top k of each head's bounds by the host indexes' topK (ties to the lower page).
#include <algorithm>
#include <cstring>
#include <new>
#include <vector>

#include "../core/index/key_index.h"
#include "attention_plan.h"
#include "simd_level.h"
#include "thread_pool.h"

namespace kvslim::cpu {

namespace {

constexpr int64_t kBoxTaskTokens = 4096;        // keys boxed per task (whole Quest pages)
constexpr int64_t kBoundTaskWork = int64_t(1) << 16;  // products (rows x channels x pages) per task

// Folds dynamic tokens [begin, end) (all inside Quest page `page`) into that page's box; row
// holds headDim floats of scratch for converted keys.
void boxPage(const KernelTable& kernels, const PageBoxesArgs& args, int64_t page, int64_t begin, int64_t end, float* row) {
  const size_t dim = size_t(args.headDim);
  const size_t rowBytes = size_t(args.rowStride) * dtypeBytes(args.kvType);
  float* lo = args.lo + size_t(page) * dim;
  float* hi = args.hi + size_t(page) * dim;
  for (int64_t token = begin; token < end; ++token) {
    const int64_t storeRow = args.keys.firstRow + (token - args.first);
    const unsigned char* source = static_cast<const unsigned char*>(args.keys.keyPages[storeRow / args.pageTokens]) +
                                  size_t(storeRow % args.pageTokens) * rowBytes;
    const float* key = reinterpret_cast<const float*>(source);
    if (args.kvType != DType::F32) {
      kernels.toFloat32(source, args.kvType, row, args.headDim);
      key = row;
    }
    if (token % args.pageSize == 0) {  // a new page starts with this key
      std::memcpy(lo, key, dim * sizeof(float));
      std::memcpy(hi, key, dim * sizeof(float));
      continue;
    }
    for (size_t d = 0; d < dim; ++d) {
      lo[d] = std::min(lo[d], key[d]);
      hi[d] = std::max(hi[d], key[d]);
    }
  }
}

}  // namespace

Status pageBoxes(const PageBoxesArgs& args) {
  const int64_t count = args.keys.tokens;
  if (count == 0) return Status::ok();
  const KernelTable& kernels = activeKernels();
  const int64_t end = args.first + count;
  const int64_t firstPage = args.first / args.pageSize;
  const int64_t pages = (end - 1) / args.pageSize + 1 - firstPage;
  const int64_t pagesPerTask = std::max<int64_t>(1, kBoxTaskTokens / args.pageSize);
  const int64_t tasks = (pages + pagesPerTask - 1) / pagesPerTask;
  const int32_t threads = threadsFor(args.threads, tasks);
  std::vector<float> rows;  // headDim floats of converted keys per thread, allocated here: a task must not throw
  try {
    rows.resize(size_t(threads) * size_t(args.headDim));
  } catch (const std::bad_alloc&) {
    return Status(ErrorCode::OutOfMemory, "out of host memory for page boxes");
  }
  auto run = [&](int64_t task, int32_t worker) {
    const int64_t last = std::min(pages, (task + 1) * pagesPerTask);
    for (int64_t p = firstPage + task * pagesPerTask; p < firstPage + last; ++p) {
      const int64_t begin = std::max(args.first, p * args.pageSize);
      boxPage(kernels, args, p, begin, std::min(end, (p + 1) * args.pageSize), rows.data() + size_t(worker) * size_t(args.headDim));
    }
  };
  if (tasks == 1) {
    run(0, 0);  // a decode step boxes a token or two: no pool wake-up
  } else {
    globalPool().parallelFor(tasks, threads, run);
  }
  return Status::ok();
}

Status topPages(const TopPagesArgs& args) {
  const KernelTable& kernels = activeKernels();
  const size_t dim = size_t(args.headDim);
  std::vector<float> bounds;
  std::vector<uint32_t> best;
  for (int32_t h = 0; h < args.kvHeads; ++h) {
    const TopPagesHead& head = args.heads[h];
    const float* q = args.q + size_t(h) * size_t(args.rows) * dim;
    try {
      bounds.resize(size_t(head.pages));
    } catch (const std::bad_alloc&) {
      return Status(ErrorCode::OutOfMemory, "out of host memory for page bounds");
    }
    // Bounds over chunks of pages: a page's bound does not depend on the chunking.
    const int64_t work = int64_t(std::max(args.rows, 1)) * args.headDim;
    const int64_t pagesPerTask = std::max<int64_t>(1, kBoundTaskWork / work);
    const int64_t tasks = (head.pages + pagesPerTask - 1) / pagesPerTask;
    auto run = [&](int64_t task, int32_t) {
      const int64_t first = task * pagesPerTask;
      const size_t offset = size_t(first) * dim;
      kernels.boxBound(q, args.rows, args.headDim, head.lo + offset, head.hi + offset, std::min(pagesPerTask, head.pages - first),
                       bounds.data() + first);
    };
    if (tasks == 1) {
      run(0, 0);
    } else if (tasks > 1) {
      globalPool().parallelFor(tasks, threadsFor(args.threads, tasks), run);
    }
    // Higher bound first, ties to the lower page.
    topKAscending(bounds.data(), head.pages, args.k, &best, args.out + size_t(h) * size_t(args.k));
  }
  return Status::ok();
}

}  // namespace kvslim::cpu
