// The contract between core (which knows where tokens live) and the backends (which do the math).
#pragma once
#include <cmath>
#include <cstdint>
#include <string>

#include "dtype.h"
#include "status.h"

namespace kvslim {

// The tokens one kv head can attend to, stored as pages of `pageTokens` rows each.
// Token t lives in page t / pageTokens at row t % pageTokens; a row holds headDim elements and
// consecutive rows are `rowStride` elements apart. A paged cache uses rowStride = headDim; the
// stateless op views a contiguous [T, kvHeads, headDim] tensor as one page per head with
// rowStride = kvHeads * headDim, so both run the same kernels without a copy.
// A head's tokens may start `firstRow` rows into its first page (a window whose oldest tokens were
// evicted): token t is row firstRow + t of the page list.
struct KVHeadView {
  const void* const* keyPages = nullptr;    // [ceil((firstRow + tokens) / pageTokens)] backend pointers
  const void* const* valuePages = nullptr;
  int64_t tokens = 0;
  int64_t firstRow = 0;
};

// Attention of n query rows per query head over the tokens of each kv head.
// Causal alignment (DESIGN.md): query i of n attends a head's tokens [0, tokens - n + i];
// without `causal` every query attends all of them.
struct AttentionArgs {
  const float* q = nullptr;  // [n, qHeads, headDim], host memory, unscaled
  float* out = nullptr;      // [n, qHeads, headDim], host memory
  int32_t n = 0;
  int32_t qHeads = 0;
  int32_t kvHeads = 0;
  int32_t headDim = 0;
  DType kvType = DType::F32;
  int64_t pageTokens = 0;
  int64_t rowStride = 0;
  const KVHeadView* heads = nullptr;  // [kvHeads]
  bool causal = true;
  float scale = 1.0f;
  int32_t threads = 0;  // 0 = every worker of the pool
  // Optional [n, qHeads]: log2 of each row's softmax denominator with scores in log2 units
  // (q.k * scale * log2(e)); -inf for a row that sees no key. Lets core merge the outputs of
  // several calls over disjoint token sets (log-sum-exp).
  float* lse = nullptr;
  // Optional (H2O; backends with fusesMass() only): mass[h * massStride + t], for t < heads[h].tokens
  // (with an older segment: its olderHeads[h].tokens first, then these), receives the softmax
  // probability token t of kv head h gets, summed over the head's n x group query rows (f32
  // probabilities, double columns): AttentionMassArgs' None reduction, from the scores the
  // attention computes anyway. Needs causal. Added in an order that depends on the shape only.
  double* mass = nullptr;
  int64_t massStride = 0;
  // Optional (backends whose joinsOlder() accepts the call): per kv head, tokens older than every
  // query (a policy's kept segment, a loading policy's gathered tokens), seen by every row
  // without a causal mask, in the same softmax as `heads`. They sit in pages of olderPageTokens
  // rows (rowStride apart) and are scored with olderQ ([n, qHeads, headDim]; q itself when the
  // queries are the same). One call then does what two calls merged by `lse` would.
  const KVHeadView* olderHeads = nullptr;
  int64_t olderPageTokens = 0;
  const float* olderQ = nullptr;
};

// The older-segment fields of AttentionArgs, checked by every backend (`joins`: whether it
// accepts them for this call).
inline Status checkAttentionOlder(const AttentionArgs& args, bool joins) {
  if (args.olderHeads == nullptr) return Status::ok();
  if (!joins) return Status(ErrorCode::Internal, "this backend does not attend an older segment within this call");
  if (args.olderQ == nullptr || args.olderPageTokens <= 0) {
    return Status(ErrorCode::Internal, "an older segment needs its queries and a positive page size");
  }
  for (int32_t h = 0; h < args.kvHeads; ++h) {
    if (args.olderHeads[h].tokens < 0 || args.olderHeads[h].firstRow < 0) {
      return Status(ErrorCode::Internal, "the older segment of kv head " + std::to_string(h) + " has a negative size");
    }
  }
  return Status::ok();
}

// The mass fields of AttentionArgs, checked by every backend (`fuses`: whether it fills them).
inline Status checkAttentionMass(const AttentionArgs& args, bool fuses) {
  if (args.mass == nullptr) return Status::ok();
  if (!fuses) return Status(ErrorCode::Internal, "this backend does not compute the attention mass within attention");
  if (!args.causal) return Status(ErrorCode::Internal, "the attention mass needs causal attention");
  for (int32_t h = 0; h < args.kvHeads; ++h) {
    const int64_t tokens = args.heads[h].tokens + (args.olderHeads != nullptr ? args.olderHeads[h].tokens : 0);
    if (args.massStride < tokens) {
      return Status(ErrorCode::Internal, "the attention mass stride " + std::to_string(args.massStride) + " is below the " +
                                             std::to_string(tokens) + " tokens of kv head " + std::to_string(h));
    }
  }
  return Status::ok();
}

// Raw scores q.k * scale of the query rows of one kv head against all its tokens (the
// attentionScores op, the retrieval policy's flat scan).
struct ScoresArgs {
  const float* q = nullptr;  // [rows, headDim], host memory, unscaled
  int32_t rows = 0;
  int32_t headDim = 0;
  DType kvType = DType::F32;
  int64_t pageTokens = 0;
  int64_t rowStride = 0;
  KVHeadView head;
  float scale = 1.0f;
  float* out = nullptr;      // [rows, head.tokens], host memory
  int32_t threads = 0;
};

// The flat retrieval's choice for every kv head of a layer in one call: token t of head h's view
// scores best[t] = max over the head's query rows of q . key t (unscaled, f32), and the call
// returns the k tokens with the highest scores (ties to the lower token), ascending. Only the
// chosen tokens reach the host. Backends compute the dots in their own order, so a near tie with
// the last token chosen may go either way.
struct TopKeysArgs {
  const float* q = nullptr;  // [kvHeads, rows, headDim], host memory, unscaled: head h's rows
  int32_t rows = 0;          // query rows per kv head
  int32_t kvHeads = 0;
  int32_t headDim = 0;
  DType kvType = DType::F32;
  int64_t pageTokens = 0;
  int64_t rowStride = 0;
  const KVHeadView* heads = nullptr;  // [kvHeads], host memory: each head's candidate keys (valuePages unused)
  int64_t k = 0;                      // tokens chosen per head (>= 1)
  // [kvHeads, k], host memory: head h's min(k, tokens) chosen view tokens ascending, then -1.
  int64_t* out = nullptr;
  int32_t threads = 0;  // 0 = every worker of the pool
};

// How attentionMass reduces the probabilities of its rows (AttentionMassArgs::out).
enum class MassPooling : int32_t { None = 0, Max = 1, Avg = 2 };

// Attention mass that query rows of one kv head give each of its tokens, for the selection
// policies (H2O heavy hitters, SnapKV votes). The backend computes the scores (q.k * scale), a
// causal softmax per row in fp32 and the column sums itself, so no rows x tokens matrix reaches
// host memory or is held whole.
// - Tokens: kept first, then tail: token t < kept.tokens is kept token t, else tail token
//   t - kept.tokens.
// - Rows: row = i * group + g is query i, group member g (groupRows() order). Query i is tail
//   token tail.tokens - after - n + i: it sees every kept token and the tail up to itself.
// - out ([columns] doubles; tokens >= columns only normalise the rows):
//   None:     out[t] = sum over all n * group rows of p_row(t)            (H2O's accumulation);
//   Max, Avg: per member g, v_g(t) = sum over queries i of p_(i,g)(t); v_g is pooled over
//             [0, columns) with stride 1, odd `kernel` and padding kernel / 2 (max ignores the
//             padding, avg counts it as zeros and divides by kernel); out[t] = sum over g of
//             pooled_g(t) / group                                           (SnapKV's votes).
// Column sums are doubles added in an order that depends on the shape only (not on the thread
// count), so a backend returns the same result on every run.
struct AttentionMassArgs {
  const float* q = nullptr;  // [n * group, headDim], host memory, unscaled
  int32_t n = 0;             // queries
  int32_t group = 1;         // query heads of the kv head
  int32_t headDim = 0;
  DType kvType = DType::F32;
  int64_t pageTokens = 0;
  int64_t rowStride = 0;
  KVHeadView kept;           // page pointers in backend memory
  KVHeadView tail;           // page pointers in backend memory
  int64_t after = 0;         // tail tokens after the last query
  float scale = 1.0f;
  int64_t columns = 0;       // tokens [0, columns) reported, columns <= kept.tokens + tail.tokens
  MassPooling pooling = MassPooling::None;
  int32_t kernel = 1;        // Max, Avg: odd pooling kernel
  double* out = nullptr;     // [columns], host memory (unused when chosen is set)
  // Optional (SnapKV's selection where the mass is computed): instead of out, the k columns with
  // the highest result (ties to the lower column, a NaN result ranks last), ascending, k in
  // [1, columns]; only these reach the host.
  int64_t k = 0;
  int64_t* chosen = nullptr;  // [k], host memory
  int32_t threads = 0;        // 0 = every worker of the pool
};

// The contract of AttentionMassArgs, checked by every backend before it touches memory.
inline Status checkAttentionMassArgs(const AttentionMassArgs& args) {
  auto shape = [](const std::string& message) { return Status(ErrorCode::Shape, "attention mass: " + message); };
  if (args.n < 0 || args.group < 1 || int64_t(args.n) * args.group > INT32_MAX) {
    return shape("needs n >= 0, group >= 1 and n x group below 2^31, but received n=" + std::to_string(args.n) +
                 ", group=" + std::to_string(args.group));
  }
  if (args.headDim < 1 || args.pageTokens < 1 || args.rowStride < args.headDim) {
    return shape("needs headDim >= 1, pageTokens >= 1 and rowStride >= headDim, but received headDim=" +
                 std::to_string(args.headDim) + ", pageTokens=" + std::to_string(args.pageTokens) +
                 ", rowStride=" + std::to_string(args.rowStride));
  }
  if (args.kvType != DType::F32 && args.kvType != DType::F16 && args.kvType != DType::BF16) {
    return Status(ErrorCode::Dtype, "attention mass: unknown kv dtype " + std::to_string(int(args.kvType)));
  }
  for (const KVHeadView* view : {&args.kept, &args.tail}) {
    const char* which = view == &args.kept ? "kept" : "tail";
    if (view->tokens < 0 || view->firstRow < 0 || view->firstRow > INT64_MAX / 2 - view->tokens) {
      return shape(std::string(which) + " view needs tokens >= 0 and firstRow >= 0, but holds tokens=" +
                   std::to_string(view->tokens) + ", firstRow=" + std::to_string(view->firstRow));
    }
    if (view->tokens == 0) continue;
    if (view->keyPages == nullptr) return Status(ErrorCode::Internal, std::string("attention mass: null ") + which + " page table");
    const int64_t last = (view->firstRow + view->tokens - 1) / args.pageTokens;
    for (int64_t p = view->firstRow / args.pageTokens; p <= last; ++p) {
      if (view->keyPages[p] == nullptr) {
        return Status(ErrorCode::Internal, std::string("attention mass: ") + which + " key page " + std::to_string(p) + " is null");
      }
    }
  }
  if (args.after < 0 || args.after > args.tail.tokens - args.n) {
    return shape("the n queries and the after tokens must lie in the tail, but received n=" + std::to_string(args.n) +
                 ", after=" + std::to_string(args.after) + " with tail=" + std::to_string(args.tail.tokens));
  }
  if (args.columns < 0 || args.columns > args.kept.tokens + args.tail.tokens) {
    return shape("columns must be in [0, kept + tail = " + std::to_string(args.kept.tokens + args.tail.tokens) +
                 "], but received " + std::to_string(args.columns));
  }
  if (args.pooling != MassPooling::None && args.pooling != MassPooling::Max && args.pooling != MassPooling::Avg) {
    return Status(ErrorCode::Option, "attention mass: unknown pooling " + std::to_string(int(args.pooling)));
  }
  if (args.pooling != MassPooling::None && (args.kernel < 1 || args.kernel % 2 == 0)) {
    return Status(ErrorCode::Option, "attention mass: the pooling kernel must be odd and >= 1, but received " +
                                         std::to_string(args.kernel));
  }
  if (!std::isfinite(args.scale)) return Status(ErrorCode::Value, "attention mass: scale must be finite");
  if (args.chosen != nullptr && (args.k < 1 || args.k > args.columns)) {
    return shape("k must be in [1, columns = " + std::to_string(args.columns) + "], but received " + std::to_string(args.k));
  }
  if ((args.n > 0 && args.q == nullptr) || (args.columns > 0 && args.out == nullptr && args.chosen == nullptr)) {
    return Status(ErrorCode::Internal, "attention mass received a null query or output array");
  }
  return Status::ok();
}

// Quest's page boxes of one kv head (methods/retrieval-attention.md, Baselines), built where the
// keys live. The dynamic part is cut into Quest pages of `pageSize` tokens counted from its start;
// page p holds in lo[p] / hi[p] the per-channel minimum / maximum of its keys. The call boxes the
// dynamic tokens [first, first + keys.tokens), whose keys are the view `keys` (view token j is
// dynamic token first + j):
// - the page holding `first`, when `first` does not start it, already holds the boxes of its
//   earlier tokens and is extended (min / max with them);
// - every later page is written from the keys alone, so a call that failed can be repeated;
// - the last page may stay partial (a later call extends it).
// lo and hi ([ceil((first + keys.tokens) / pageSize), headDim] f32 each) are backend memory; the
// rule per channel is lo = min(lo, key), hi = max(hi, key) as std::min / std::max (PageBoxes).
struct PageBoxesArgs {
  int32_t headDim = 0;
  DType kvType = DType::F32;  // store dtype of the key pages
  int64_t pageTokens = 0;     // rows per store page
  int64_t rowStride = 0;      // elements between consecutive rows of a store page
  KVHeadView keys;            // key pages in backend memory (valuePages unused)
  int64_t first = 0;          // dynamic tokens boxed before this call
  int64_t pageSize = 0;       // tokens per Quest page
  float* lo = nullptr;        // backend memory
  float* hi = nullptr;        // backend memory
  int32_t threads = 0;        // 0 = every worker of the pool
};

// Quest's choice for every kv head of a layer in one call. Head h's page upper bounds against its
// query rows are bound[p] = max over the rows of sum_i max(q_i * lo_pi, q_i * hi_pi) (-inf without
// rows), the rule of PageBoxes::bounds, and the call returns the k pages with the highest bounds
// (ties to the lower page), ascending. The CPU backend runs PageBoxes' kernel
// (VectorOps::boxBound), so its bounds have the same bits; other backends sum the channels in
// their own order (a near tie with the last page chosen may go the other way). Only the chosen
// pages reach the host.
struct TopPagesHead {
  const float* lo = nullptr;  // [pages, headDim], backend memory
  const float* hi = nullptr;  // [pages, headDim], backend memory
  int64_t pages = 0;
};

struct TopPagesArgs {
  const float* q = nullptr;  // [kvHeads, rows, headDim], host memory, unscaled: head h's rows
  int32_t rows = 0;          // query rows per kv head
  int32_t kvHeads = 0;
  int32_t headDim = 0;
  const TopPagesHead* heads = nullptr;  // [kvHeads], host memory
  int64_t k = 0;                        // pages chosen per head (>= 1)
  // [kvHeads, k], host memory: head h's min(k, pages) chosen pages ascending, then -1.
  int64_t* out = nullptr;
  int32_t threads = 0;  // 0 = every worker of the pool
};

// The contract of PageBoxesArgs, checked by every backend before it touches memory.
inline Status checkPageBoxesArgs(const PageBoxesArgs& args) {
  auto shape = [](const std::string& message) { return Status(ErrorCode::Shape, "page boxes: " + message); };
  if (args.headDim < 1 || args.pageTokens < 1 || args.rowStride < args.headDim || args.pageSize < 1) {
    return shape("needs headDim >= 1, pageTokens >= 1, rowStride >= headDim and pageSize >= 1, but received headDim=" +
                 std::to_string(args.headDim) + ", pageTokens=" + std::to_string(args.pageTokens) +
                 ", rowStride=" + std::to_string(args.rowStride) + ", pageSize=" + std::to_string(args.pageSize));
  }
  if (args.kvType != DType::F32 && args.kvType != DType::F16 && args.kvType != DType::BF16) {
    return Status(ErrorCode::Dtype, "page boxes: unknown kv dtype " + std::to_string(int(args.kvType)));
  }
  const KVHeadView& view = args.keys;
  // Bounded so that token and element indices (pages x headDim floats) cannot overflow.
  constexpr int64_t kLimit = int64_t(1) << 40;
  if (view.tokens < 0 || view.firstRow < 0 || args.first < 0 || view.tokens > kLimit || view.firstRow > kLimit ||
      args.first > kLimit || (args.first + view.tokens) / args.pageSize + 1 > kLimit / args.headDim) {
    return shape("needs tokens, firstRow and first in [0, 2^40] and the boxes below 2^40 floats, but received tokens=" +
                 std::to_string(view.tokens) + ", firstRow=" + std::to_string(view.firstRow) +
                 ", first=" + std::to_string(args.first));
  }
  if (view.tokens == 0) return Status::ok();
  if (view.keyPages == nullptr || args.lo == nullptr || args.hi == nullptr) {
    return Status(ErrorCode::Internal, "page boxes received a null page table or box array");
  }
  const int64_t last = (view.firstRow + view.tokens - 1) / args.pageTokens;
  for (int64_t p = view.firstRow / args.pageTokens; p <= last; ++p) {
    if (view.keyPages[p] == nullptr) return Status(ErrorCode::Internal, "page boxes: key page " + std::to_string(p) + " is null");
  }
  return Status::ok();
}

// The contract of TopPagesArgs, checked by every backend before it touches memory.
inline Status checkTopPagesArgs(const TopPagesArgs& args) {
  constexpr int64_t kLimit = int64_t(1) << 40;
  if (args.rows < 0 || args.kvHeads < 1 || args.headDim < 1 || args.k < 1 || args.k > kLimit / args.kvHeads) {
    return Status(ErrorCode::Shape, "top pages: needs rows >= 0, kvHeads >= 1, headDim >= 1 and k >= 1 (k x kvHeads below 2^40), but received rows=" +
                                        std::to_string(args.rows) + ", kvHeads=" + std::to_string(args.kvHeads) +
                                        ", headDim=" + std::to_string(args.headDim) + ", k=" + std::to_string(args.k));
  }
  if (args.heads == nullptr || args.out == nullptr || (args.rows > 0 && args.q == nullptr)) {
    return Status(ErrorCode::Internal, "top pages received a null query, head or output array");
  }
  for (int32_t h = 0; h < args.kvHeads; ++h) {
    const TopPagesHead& head = args.heads[h];
    if (head.pages < 0 || head.pages > kLimit / args.headDim || (head.pages > 0 && (head.lo == nullptr || head.hi == nullptr))) {
      return Status(ErrorCode::Internal, "top pages: kv head " + std::to_string(h) + " needs 0 to 2^40 / headDim pages, and boxes "
                                             "when it has pages, but has " + std::to_string(head.pages) + " pages");
    }
  }
  return Status::ok();
}

// The contract of TopKeysArgs (page geometry, dtype and page pointers as for attention; the CUDA
// backend checks its own limits too), checked by every backend before it touches memory.
inline Status checkTopKeysArgs(const TopKeysArgs& args) {
  constexpr int64_t kLimit = int64_t(1) << 40;
  if (args.rows < 1 || args.kvHeads < 1 || args.headDim < 1 || args.k < 1 || args.k > kLimit / args.kvHeads ||
      args.pageTokens < 1 || args.rowStride < args.headDim) {
    return Status(ErrorCode::Shape, "top keys: needs rows, kvHeads, headDim, k and pageTokens >= 1 (k x kvHeads below 2^40) and rowStride >= headDim, "
                                    "but received rows=" + std::to_string(args.rows) + ", kvHeads=" + std::to_string(args.kvHeads) +
                                        ", headDim=" + std::to_string(args.headDim) + ", k=" + std::to_string(args.k) +
                                        ", pageTokens=" + std::to_string(args.pageTokens) + ", rowStride=" + std::to_string(args.rowStride));
  }
  if (args.kvType != DType::F32 && args.kvType != DType::F16 && args.kvType != DType::BF16) {
    return Status(ErrorCode::Dtype, "top keys: unknown kv dtype " + std::to_string(int(args.kvType)));
  }
  if (args.q == nullptr || args.heads == nullptr || args.out == nullptr) {
    return Status(ErrorCode::Internal, "top keys received a null query, head or output array");
  }
  for (int32_t h = 0; h < args.kvHeads; ++h) {
    const KVHeadView& view = args.heads[h];
    if (view.tokens < 0 || view.tokens > kLimit || view.firstRow < 0 || view.firstRow > kLimit) {
      return Status(ErrorCode::Shape, "top keys: kv head " + std::to_string(h) + " needs tokens and firstRow in [0, 2^40], but holds tokens=" +
                                          std::to_string(view.tokens) + ", firstRow=" + std::to_string(view.firstRow));
    }
    if (view.tokens == 0) continue;
    if (view.keyPages == nullptr) return Status(ErrorCode::Internal, "top keys: kv head " + std::to_string(h) + " has a null page table");
    const int64_t last = (view.firstRow + view.tokens - 1) / args.pageTokens;
    for (int64_t p = view.firstRow / args.pageTokens; p <= last; ++p) {
      if (view.keyPages[p] == nullptr) {
        return Status(ErrorCode::Internal, "top keys: kv head " + std::to_string(h) + " key page " + std::to_string(p) + " is null");
      }
    }
  }
  return Status::ok();
}

}  // namespace kvslim
