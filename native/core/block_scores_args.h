// ActQKV's per-call block choice (methods/actqkv.md steps 4-5) as two backend operations, so a GPU
// cache scores its block representatives where they live and only a few numbers cross to the host:
//   blockScores: every kv head's block scores (backend memory) and their normalised entropies (host);
//   topBlocks:   once the policy has turned the entropies into a block count k, each head's k best
//                blocks (host).
// The score of block b of head h is (r_b . u_h) / |r_b| (0 when |r_b| is 0) in double. The dot is
// the fixed-order sum every backend computes with the same bits: eight partial sums, element t
// going to partial t % 8 as part = fma(r_t, u_t, part) in order of t, then
// ((p0 + p1) + (p2 + p3)) + ((p4 + p5) + (p6 + p7)); the division is IEEE. So CPU and CUDA rank the
// blocks identically. The entropies are reduced in each backend's own order with its own exp and
// log, so they may differ in the last bits, and a block count derived from them could, rarely,
// differ by one.
#pragma once
#include <cmath>
#include <cstdint>
#include <string>

#include "dtype.h"
#include "status.h"

namespace kvslim {

// One kv head's representatives. Blocks [0, blocks - 1) are final and read from reprs / norms
// (backend memory, possibly shared with a fork's policy: never written here); the newest block,
// blocks - 1, whose representative still changes while it fills, comes from host memory.
struct BlockHeadView {
  const void* reprs = nullptr;    // [>= blocks - 1, headDim] of reprType, backend memory (null when blocks == 1)
  const double* norms = nullptr;  // [>= blocks - 1], backend memory: |r_b| as the host computed it
  int64_t stored = 0;             // rows held by reprs / norms
  const float* newest = nullptr;  // [headDim], host memory, f32 (values of reprType)
  double newestNorm = 0;
};

struct BlockScoresArgs {
  int32_t kvHeads = 0;
  int32_t headDim = 0;
  int64_t blocks = 0;                  // blocks scored per head (>= 1)
  DType reprType = DType::F32;         // of the final representatives (widened exactly)
  const BlockHeadView* heads = nullptr;  // [kvHeads], host memory
  const double* u = nullptr;           // [kvHeads, headDim], host memory
  double temperature = 1;              // entropy of softmax(s / temperature)
  double* scores = nullptr;            // [kvHeads, blocks], backend memory (written)
  double* entropies = nullptr;         // [kvHeads], host memory: entropy / ln(blocks), 1 for one block
  int32_t threads = 0;                 // 0 = every worker of the pool
};

// out[h * k + i]: the k blocks of head h with the highest scores (ties to the lower block),
// ascending.
struct TopBlocksArgs {
  int32_t kvHeads = 0;
  int64_t blocks = 0;
  const double* scores = nullptr;  // [kvHeads, blocks], backend memory (blockScores' output)
  int64_t k = 0;                   // in [1, blocks]
  int64_t* out = nullptr;          // [kvHeads, k], host memory
  int32_t threads = 0;
};

// Bound so that element indices (blocks x headDim, kvHeads x blocks) cannot overflow.
constexpr int64_t kBlockArgsLimit = int64_t(1) << 40;

// The contract of BlockScoresArgs, checked by every backend before it touches memory.
inline Status checkBlockScoresArgs(const BlockScoresArgs& args) {
  if (args.kvHeads < 1 || args.headDim < 1 || args.blocks < 1 || args.blocks > kBlockArgsLimit / args.headDim ||
      args.blocks > kBlockArgsLimit / args.kvHeads) {
    return Status(ErrorCode::Shape, "block scores: needs kvHeads >= 1, headDim >= 1 and blocks >= 1 (below 2^40 elements), but received kvHeads=" +
                                        std::to_string(args.kvHeads) + ", headDim=" + std::to_string(args.headDim) +
                                        ", blocks=" + std::to_string(args.blocks));
  }
  if (args.reprType != DType::F32 && args.reprType != DType::F16 && args.reprType != DType::BF16) {
    return Status(ErrorCode::Dtype, "block scores: unknown representative dtype " + std::to_string(int(args.reprType)));
  }
  if (!(args.temperature > 0) || !std::isfinite(args.temperature)) {
    return Status(ErrorCode::Shape, "block scores: temperature must be a positive finite number, but received " + std::to_string(args.temperature));
  }
  if (args.heads == nullptr || args.u == nullptr || args.scores == nullptr || args.entropies == nullptr) {
    return Status(ErrorCode::Internal, "block scores received a null head table, u, scores or entropies array");
  }
  for (int32_t h = 0; h < args.kvHeads; ++h) {
    const BlockHeadView& head = args.heads[h];
    if (head.stored < args.blocks - 1 || head.newest == nullptr || (args.blocks > 1 && (head.reprs == nullptr || head.norms == nullptr))) {
      return Status(ErrorCode::Internal, "block scores: kv head " + std::to_string(h) + " holds " + std::to_string(head.stored) +
                                             " final representatives but " + std::to_string(args.blocks) + " blocks are scored");
    }
  }
  return Status::ok();
}

// The contract of TopBlocksArgs.
inline Status checkTopBlocksArgs(const TopBlocksArgs& args) {
  if (args.kvHeads < 1 || args.blocks < 1 || args.blocks > kBlockArgsLimit / args.kvHeads || args.k < 1 || args.k > args.blocks) {
    return Status(ErrorCode::Shape, "top blocks: needs kvHeads >= 1 and 1 <= k <= blocks (below 2^40 scores), but received kvHeads=" +
                                        std::to_string(args.kvHeads) + ", blocks=" + std::to_string(args.blocks) +
                                        ", k=" + std::to_string(args.k));
  }
  if (args.scores == nullptr || args.out == nullptr) return Status(ErrorCode::Internal, "top blocks received a null scores or output array");
  return Status::ok();
}

}  // namespace kvslim
