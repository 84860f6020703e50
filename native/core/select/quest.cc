// Quest (methods/retrieval-attention.md, Baselines): the dynamic part in pages of `pageSize`
// tokens, each with the per-channel minimum and maximum of its keys; a decode call loads the
// `pages` pages whose upper bound sum_i max(q_i * min_i, q_i * max_i) is highest (GQA: the max of
// the bound over the group's query rows, one decision per kv head).
// The boxes (the rule of PageBoxes, index/page_boxes.h) live in backend memory, one growable
// allocation per (layer, kv head): the backend's pageBoxes op builds them straight from the
// store's key pages and its topPages op bounds them and picks each head's best pages, so neither
// keys nor bounds reach the host and a GPU cache chooses its pages on the GPU; each op serves all
// the kv heads of a layer in one call. The token expansion runs here.
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
  // A layer's boxes catch up in one backend call for all its kv heads (one upload and one wait on a
  // GPU): the dynamic tokens that left the window since the last call.
  Status catchUp(SelectContext& context, int32_t layer, const float*, int64_t) override {
    const int64_t end = dynamicEnd(context, layer);
    const int64_t pages = (end - sink_ + pageSize_ - 1) / pageSize_;
    std::vector<PageBoxesArgs> calls;
    std::vector<int32_t> callHeads;
    for (int32_t h = 0; h < kvHeads_; ++h) {
      const int64_t first = indexed_[size_t(layer) * size_t(kvHeads_) + size_t(h)];
      if (first >= end) continue;
      // Nothing is evicted under a loading policy, so tail token t is position t.
      if (first < sink_ || end > context.store.tailTokens(layer, h) || context.store.tailTokens(layer, h) != context.store.tokens(layer)) {
        return Status(ErrorCode::Internal, "quest: tokens to index lie outside the stored tail");
      }
      HeadBoxes& head = heads_[size_t(layer) * size_t(kvHeads_) + size_t(h)];
      KVSLIM_RETURN_IF_ERROR(reserve(context.backend, &head, pages));
      PageBoxesArgs args;
      args.headDim = dim_;
      args.kvType = context.store.shape().storeType;
      args.pageTokens = context.store.shape().pageTokens;
      args.rowStride = dim_;
      args.keys = context.store.tailRange(layer, h, first, end - first);
      args.first = first - sink_;  // dynamic tokens already in the boxes
      args.pageSize = pageSize_;
      args.lo = head.buffer->lo();
      args.hi = head.buffer->hi();
      args.threads = context.threads;
      calls.push_back(args);
      callHeads.push_back(h);
    }
    if (calls.empty()) return Status::ok();
    KVSLIM_RETURN_IF_ERROR(context.backend.pageBoxes(calls.data(), int32_t(calls.size())));
    for (const int32_t h : callHeads) {
      heads_[size_t(layer) * size_t(kvHeads_) + size_t(h)].pages = pages;
      indexed_[size_t(layer) * size_t(kvHeads_) + size_t(h)] = end;
    }
    return Status::ok();
  }

  // Every kv head's pages in one backend call (bounds and top-k where the boxes live); the token
  // expansion is here.
  Status chooseLayer(SelectContext& context, int32_t layer, const float* q, int64_t n, int64_t end, LoadPlan* plan) override {
    std::vector<TopPagesHead> boxes(static_cast<size_t>(kvHeads_));
    int64_t mostPages = 0;
    for (int32_t h = 0; h < kvHeads_; ++h) {
      const HeadBoxes& head = heads_[size_t(layer) * size_t(kvHeads_) + size_t(h)];
      if (head.pages > 0) boxes[size_t(h)] = {head.buffer->lo(), head.buffer->hi(), head.pages};
      mostPages = std::max(mostPages, head.pages);
    }
    if (mostPages == 0) return Status::ok();
    std::vector<float> rows;
    TopPagesArgs args;
    KVSLIM_RETURN_IF_ERROR(layerRows(context, q, n, &rows, &args.rows));
    args.q = rows.data();
    args.kvHeads = kvHeads_;
    args.headDim = dim_;
    args.heads = boxes.data();
    args.k = std::min(pages_, mostPages);
    std::vector<int64_t> chosen(size_t(kvHeads_) * size_t(args.k));
    args.out = chosen.data();
    args.threads = context.threads;
    KVSLIM_RETURN_IF_ERROR(context.backend.topPages(args));
    for (int32_t h = 0; h < kvHeads_; ++h) {
      std::vector<int64_t>& tokens = plan->tokens[size_t(h)];
      for (int64_t i = 0; i < args.k; ++i) {
        const int64_t page = chosen[size_t(h) * size_t(args.k) + size_t(i)];
        if (page < 0) break;  // the head has fewer pages than k
        if (page >= boxes[size_t(h)].pages) return Status(ErrorCode::Internal, "quest: the backend chose a page past the boxes");
        const int64_t begin = sink_ + page * pageSize_;
        const int64_t stop = std::min(begin + pageSize_, end);
        for (int64_t t = begin; t < stop; ++t) tokens.push_back(t);
      }
    }
    return Status::ok();
  }

  // catchUp and chooseLayer are overridden (the backend serves every kv head at once); nothing calls these.
  Status index(SelectContext&, int32_t, int32_t, int64_t, int64_t, const std::vector<float>&, const float*, int64_t) override {
    return Status(ErrorCode::Internal, "quest indexes per layer in catchUp");
  }
  Status choose(SelectContext&, int32_t, int32_t, const std::vector<float>&, int64_t, std::vector<int64_t>*) override {
    return Status(ErrorCode::Internal, "quest chooses per layer in chooseLayer");
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
