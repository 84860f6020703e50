// Quest (methods/retrieval-attention.md, Baselines): the dynamic part in pages of `pageSize`
// tokens, each with the per-channel minimum and maximum of its keys; a decode call loads the
// `pages` pages whose upper bound sum_i max(q_i * min_i, q_i * max_i) is highest (GQA: the max of
// the bound over the group's query rows, one decision per kv head).
#include <algorithm>
#include <cmath>

#include "../index/page_boxes.h"
#include "loading_policy.h"

namespace kvslim {

namespace {

class QuestPolicy final : public LoadingPolicy {
 public:
  QuestPolicy(const SelectConfig& config, int32_t layers, int32_t kvHeads, int32_t headDim)
      : LoadingPolicy(config.sink, config.window, layers, kvHeads),
        dim_(headDim),
        pageSize_(config.pageSize),
        pages_(config.pages),
        heads_(size_t(layers) * size_t(kvHeads), PageBoxes(headDim, config.pageSize)) {}

  std::unique_ptr<SelectPolicy> clone() const override { return std::make_unique<QuestPolicy>(*this); }

  size_t indexBytes() const override {
    size_t bytes = 0;
    for (const PageBoxes& head : heads_) bytes += head.bytes();
    return bytes;
  }

 protected:
  Status index(SelectContext&, int32_t layer, int32_t h, int64_t, int64_t count, const std::vector<float>& keys,
               const float*, int64_t) override {
    heads_[size_t(layer) * size_t(kvHeads_) + size_t(h)].add(keys.data(), count);
    return Status::ok();
  }

  Status choose(SelectContext&, int32_t layer, int32_t h, const std::vector<float>& rows, int64_t dynamicEnd,
                std::vector<int64_t>* tokens) override {
    const PageBoxes& head = heads_[size_t(layer) * size_t(kvHeads_) + size_t(h)];
    std::vector<float> bounds;
    head.bounds(rows.data(), int32_t(rows.size() / size_t(dim_)), &bounds);
    std::vector<uint32_t> best;
    topK(bounds.data(), head.pages(), pages_, &best);
    std::sort(best.begin(), best.end());
    for (const uint32_t page : best) {
      const int64_t begin = sink_ + int64_t(page) * pageSize_;
      const int64_t end = std::min(begin + pageSize_, dynamicEnd);
      for (int64_t t = begin; t < end; ++t) tokens->push_back(t);
    }
    return Status::ok();
  }

 private:
  int32_t dim_;
  int64_t pageSize_, pages_;
  std::vector<PageBoxes> heads_;  // [layers * kvHeads]
};

}  // namespace

std::unique_ptr<SelectPolicy> makeQuestPolicy(const SelectConfig& config, int32_t layers, int32_t kvHeads, int32_t headDim) {
  return std::make_unique<QuestPolicy>(config, layers, kvHeads, headDim);
}

}  // namespace kvslim
