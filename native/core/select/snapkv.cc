// SnapKV and PyramidKV (methods/snapkv.md): once, at the end of the first prefill of a layer, the
// last `window` prompt queries vote for prefix tokens (causal softmax in fp32, summed over the
// window), the votes are pooled along the tokens (odd kernel, stride 1), averaged over the query
// heads of each kv head (GQA: one decision per kv head), and each kv head keeps its top prefix
// tokens (ties: the lower index) plus the window. PyramidKV gives layer l an arithmetic share of
// the same total budget, large at the bottom. Decode tokens are appended afterwards, never evicted.
#include <algorithm>
#include <cmath>
#include <numeric>

#include "select_policy.h"

namespace kvslim {

namespace {

class SnapKVPolicy final : public SelectPolicy {
 public:
  explicit SnapKVPolicy(const SelectConfig& config) : config_(config) {}

  Status afterAppend(SelectContext& context, int32_t layer, const float* q, int64_t n, bool prefill) override {
    if (!prefill || q == nullptr) return Status::ok();
    if (decided_.empty()) decided_.assign(size_t(context.layers), 0);
    if (decided_[size_t(layer)] != 0) return Status::ok();
    decided_[size_t(layer)] = 1;
    const int64_t length = context.store.tailTokens(layer, 0);
    const int64_t window = std::min({config_.window, n, length});
    const int64_t prefix = length - window;
    const int64_t keepPrefix = prefixBudget(context.layers, layer, length, window);
    if (keepPrefix >= prefix) return Status::ok();  // the prompt fits: keep everything
    const int32_t group = context.qHeads / context.kvHeads;
    const float* windowQueries = q + size_t(n - window) * size_t(context.qHeads) * size_t(context.headDim);
    std::vector<float> probs;
    for (int32_t h = 0; h < context.kvHeads; ++h) {
      KVSLIM_RETURN_IF_ERROR(headProbabilities(context, layer, h, windowQueries, window, 0, &probs));
      // Votes per query head over the prefix, pooled, then averaged over the group.
      std::vector<double> score(static_cast<size_t>(prefix), 0.0), votes(static_cast<size_t>(prefix));
      for (int32_t g = 0; g < group; ++g) {
        std::fill(votes.begin(), votes.end(), 0.0);
        for (int64_t i = 0; i < window; ++i) {
          const float* row = probs.data() + size_t(i * group + g) * size_t(length);
          for (int64_t j = 0; j < prefix; ++j) votes[size_t(j)] += row[j];
        }
        const std::vector<double> pooled = pool(votes);
        for (int64_t j = 0; j < prefix; ++j) score[size_t(j)] += pooled[size_t(j)] / group;
      }
      std::vector<int64_t> order(static_cast<size_t>(prefix));
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return score[size_t(a)] > score[size_t(b)]; });
      order.resize(size_t(keepPrefix));
      std::sort(order.begin(), order.end());
      KVSLIM_RETURN_IF_ERROR(context.store.keepTailRows(layer, h, order));
      context.store.dropTailFront(layer, h, prefix);
    }
    return Status::ok();
  }

  std::unique_ptr<SelectPolicy> clone() const override { return std::make_unique<SnapKVPolicy>(*this); }
  bool settled(int32_t layer) const override { return !decided_.empty() && decided_[size_t(layer)] != 0; }

  // State: one byte per layer, 1 once it selected.
  void saveState(int32_t layers, std::vector<uint8_t>* out) const override {
    for (int32_t layer = 0; layer < layers; ++layer) out->push_back(settled(layer) ? 1 : 0);
  }
  Status loadState(const uint8_t* data, size_t size, const PagedStore&, int32_t layers) override {
    if (size != size_t(layers)) return Status(ErrorCode::Corrupt, "cannot load cache: the snapkv state has the wrong size");
    decided_.assign(data, data + size);
    for (const uint8_t flag : decided_) {
      if (flag > 1) return Status(ErrorCode::Corrupt, "cannot load cache: a snapkv layer flag is not 0 or 1");
    }
    return Status::ok();
  }

 private:
  // Prefix tokens layer `layer` keeps: budget - window (SnapKV), or PyramidKV's arithmetic share.
  int64_t prefixBudget(int32_t layers, int32_t layer, int64_t length, int64_t window) const {
    const double mean = double(config_.budget - window);
    if (config_.kind != SelectKind::PyramidKV || layers < 2) return int64_t(mean);
    double low = mean / config_.beta, high = 2 * mean - low;
    if (high > double(length - window)) {
      high = double(length - window);
      low = 2 * mean - high;
    }
    if (!(double(length) >= high && high >= low && low >= double(window))) return int64_t(mean);
    return int64_t(high - double(layer) * (high - low) / double(layers - 1));
  }

  // Stride-1 pooling with padding kernel / 2: max ignores the padding, avg counts it as zeros.
  std::vector<double> pool(const std::vector<double>& votes) const {
    const int64_t size = int64_t(votes.size()), half = config_.kernel / 2;
    std::vector<double> out(votes.size());
    for (int64_t j = 0; j < size; ++j) {
      const int64_t begin = std::max<int64_t>(0, j - half), end = std::min(size, j + half + 1);
      double value = config_.pooling == Pooling::Max ? -INFINITY : 0.0;
      for (int64_t t = begin; t < end; ++t) {
        value = config_.pooling == Pooling::Max ? std::max(value, votes[size_t(t)]) : value + votes[size_t(t)];
      }
      out[size_t(j)] = config_.pooling == Pooling::Max ? value : value / double(config_.kernel);
    }
    return out;
  }

  SelectConfig config_;
  std::vector<uint8_t> decided_;  // per layer: selection done
};

}  // namespace

std::unique_ptr<SelectPolicy> makeSnapKVPolicy(const SelectConfig& config) {
  return std::make_unique<SnapKVPolicy>(config);
}

}  // namespace kvslim
