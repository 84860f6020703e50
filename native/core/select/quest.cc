// Quest (methods/retrieval-attention.md, Baselines): the dynamic part in pages of `pageSize`
// tokens, each with the per-channel minimum and maximum of its keys; a decode call loads the
// `pages` pages whose upper bound sum_i max(q_i * min_i, q_i * max_i) is highest (GQA: the max of
// the bound over the group's query rows, one decision per kv head).
// The boxes (the rule of PageBoxes, index/page_boxes.h) live in backend memory, one growable
// allocation per (layer, kv head): the backend's pageBoxes op builds them straight from the
// store's key pages and its pageBounds op scores them, so no key is copied to the host and a GPU
// cache bounds its pages on the GPU. Top-k of the bounds and the token expansion run here.
#include <algorithm>
#include <cmath>
#include <memory>
#include <new>
#include <string>

#include "loading_policy.h"

namespace kvslim {

namespace {

// Boxes are allocated in steps of this many Quest pages, and grow by half when full.
constexpr int64_t kPageGranule = 64;

// One kv head's boxes in backend memory: lo then hi, each [capacity, headDim] floats. The backend
// outlives it: every cache holding the policy (and its forks) holds the backend, and destroys its
// policy first (kv_cache.h declares backend_ before policy_).
class BoxBuffer {
 public:
  BoxBuffer(Backend& backend, int32_t dim) : memory_(backend), dim_(dim) {}

  Status allocate(int64_t capacity) {
    KVSLIM_RETURN_IF_ERROR(memory_.allocate(2 * size_t(capacity) * size_t(dim_) * sizeof(float), "Quest page boxes"));
    capacity_ = capacity;
    return Status::ok();
  }
  float* lo() const { return static_cast<float*>(memory_.data()); }
  float* hi() const { return lo() + size_t(capacity_) * size_t(dim_); }
  int64_t capacity() const { return capacity_; }

 private:
  BackendBuffer memory_;
  int32_t dim_;
  int64_t capacity_ = 0;
};

struct HeadBoxes {
  // Shared read-only with forks (clone() copies the pointer); a policy writes only a buffer it
  // alone holds, and copies a shared one first (QuestPolicy::reserve), so a fork costs nothing
  // until its first decode call and never changes its parent's boxes.
  std::shared_ptr<BoxBuffer> buffer;  // null until the first token is boxed
  int64_t pages = 0;                  // Quest pages boxed (the last may be partial)
};

class QuestPolicy final : public LoadingPolicy {
 public:
  QuestPolicy(const SelectConfig& config, int32_t layers, int32_t kvHeads, int32_t headDim)
      : LoadingPolicy(config.sink, config.window, layers, kvHeads),
        dim_(headDim),
        pageSize_(config.pageSize),
        pages_(config.pages),
        heads_(size_t(layers) * size_t(kvHeads)) {}

  std::unique_ptr<SelectPolicy> clone() const override { return std::make_unique<QuestPolicy>(*this); }

  // The boxes in use (pages x headDim x lo, hi), as PageBoxes::bytes() counts them.
  size_t indexBytes() const override {
    size_t bytes = 0;
    for (const HeadBoxes& head : heads_) bytes += 2 * size_t(head.pages) * size_t(dim_) * sizeof(float);
    return bytes;
  }

 protected:
  bool needsKeys() const override { return false; }
  bool hostOnly() const override { return false; }  // the backend boxes and bounds (in parallel inside)

  Status index(SelectContext& context, int32_t layer, int32_t h, int64_t first, int64_t count, const std::vector<float>&,
               const float*, int64_t) override {
    // Nothing is evicted under a loading policy, so tail token t is position t.
    if (first < sink_ || count < 0 || first + count > context.store.tailTokens(layer, h) ||
        context.store.tailTokens(layer, h) != context.store.tokens(layer)) {
      return Status(ErrorCode::Internal, "quest: tokens to index lie outside the stored tail");
    }
    HeadBoxes& head = heads_[size_t(layer) * size_t(kvHeads_) + size_t(h)];
    const int64_t boxed = first - sink_;  // dynamic tokens already in the boxes
    const int64_t pages = (boxed + count + pageSize_ - 1) / pageSize_;
    KVSLIM_RETURN_IF_ERROR(reserve(context.backend, &head, pages));
    PageBoxesArgs args;
    args.headDim = dim_;
    args.kvType = context.store.shape().storeType;
    args.pageTokens = context.store.shape().pageTokens;
    args.rowStride = dim_;
    args.keys = context.store.tailRange(layer, h, first, count);
    args.first = boxed;
    args.pageSize = pageSize_;
    args.lo = head.buffer->lo();
    args.hi = head.buffer->hi();
    args.threads = context.threads;
    KVSLIM_RETURN_IF_ERROR(context.backend.pageBoxes(args));
    head.pages = pages;
    return Status::ok();
  }

  Status choose(SelectContext& context, int32_t layer, int32_t h, const std::vector<float>& rows, int64_t dynamicEnd,
                std::vector<int64_t>* tokens) override {
    const HeadBoxes& head = heads_[size_t(layer) * size_t(kvHeads_) + size_t(h)];
    const size_t rowCount = rows.size() / size_t(dim_);
    if (rowCount > size_t(INT32_MAX)) return Status(ErrorCode::Shape, "quest: more than 2^31 query rows per kv head");
    std::vector<float> bounds(size_t(head.pages));
    if (head.pages > 0) {
      PageBoundsArgs args;
      args.q = rows.data();
      args.rows = int32_t(rowCount);
      args.headDim = dim_;
      args.lo = head.buffer->lo();
      args.hi = head.buffer->hi();
      args.pages = head.pages;
      args.out = bounds.data();
      args.threads = context.threads;
      KVSLIM_RETURN_IF_ERROR(context.backend.pageBounds(args));
    }
    std::vector<uint32_t> best;
    topK(bounds.data(), head.pages, pages_, &best);
    std::sort(best.begin(), best.end());
    for (const uint32_t page : best) {
      const int64_t begin = sink_ + int64_t(page) * pageSize_;
      const int64_t end = std::min(begin + pageSize_, dynamicEnd);
      for (int64_t t = begin; t < end; ++t) tokens->push_back(t);
    }
    return Status::ok();
  }

 private:
  // Gives a head a buffer it alone holds with room for `pages` pages: a new one (larger by half
  // when full) holding a copy of the boxed pages when the old one is too small or shared with a fork.
  Status reserve(Backend& backend, HeadBoxes* head, int64_t pages) {
    const int64_t capacity = head->buffer ? head->buffer->capacity() : 0;
    const bool shared = head->buffer && head->buffer.use_count() > 1;
    if (pages <= capacity && !shared) return Status::ok();
    int64_t grown = pages > capacity ? std::max(pages, capacity + capacity / 2) : capacity;
    grown = (grown + kPageGranule - 1) / kPageGranule * kPageGranule;
    std::shared_ptr<BoxBuffer> buffer;
    try {
      buffer = std::make_shared<BoxBuffer>(backend, dim_);
    } catch (const std::bad_alloc&) {
      return Status(ErrorCode::OutOfMemory, "out of host memory for Quest page boxes");
    }
    KVSLIM_RETURN_IF_ERROR(buffer->allocate(grown));
    if (head->pages > 0) {
      const size_t bytes = size_t(head->pages) * size_t(dim_) * sizeof(float);
      KVSLIM_RETURN_IF_ERROR(backend.copy(buffer->lo(), head->buffer->lo(), bytes));
      KVSLIM_RETURN_IF_ERROR(backend.copy(buffer->hi(), head->buffer->hi(), bytes));
    }
    head->buffer = std::move(buffer);
    return Status::ok();
  }

  int32_t dim_;
  int64_t pageSize_, pages_;
  std::vector<HeadBoxes> heads_;  // [layers * kvHeads]
};

}  // namespace

std::unique_ptr<SelectPolicy> makeQuestPolicy(const SelectConfig& config, int32_t layers, int32_t kvHeads, int32_t headDim) {
  return std::make_unique<QuestPolicy>(config, layers, kvHeads, headDim);
}

}  // namespace kvslim
