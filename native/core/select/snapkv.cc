// SnapKV and PyramidKV (methods/snapkv.md): once, at the end of the first prefill of a layer, the
// last `window` prompt queries vote for prefix tokens (causal softmax in fp32, summed over the
// window), the votes are pooled along the tokens (odd kernel, stride 1), averaged over the query
// heads of each kv head (GQA: one decision per kv head), and each kv head keeps its top prefix
// tokens (ties: the lower index) plus the window. PyramidKV gives layer l an arithmetic share of
// the same total budget, large at the bottom. Decode tokens are appended afterwards, never evicted.
#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

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
    const float* windowQueries = q + size_t(n - window) * size_t(context.qHeads) * size_t(context.headDim);
    std::vector<int64_t> chosen(static_cast<size_t>(keepPrefix));
    for (int32_t h = 0; h < context.kvHeads; ++h) {
      // Votes index tail tokens: every head must still hold the whole prompt.
      if (context.store.keptTokens(layer, h) != 0 || context.store.tailTokens(layer, h) != length) {
        return Status(ErrorCode::Internal, "snapkv: kv head " + std::to_string(h) + " lost tokens before its selection");
      }
    }
    for (int32_t h = 0; h < context.kvHeads; ++h) {
      // The backend's votes per query head over the prefix, pooled, averaged over the group, and
      // its top keepPrefix (ties the lower index, a NaN vote ranks last), chosen where the votes live.
      if (keepPrefix > 0) {
        const std::vector<float> rows = groupRows(windowQueries, window, context.qHeads, context.kvHeads, h, context.headDim);
        AttentionMassArgs args;
        KVSLIM_RETURN_IF_ERROR(headMassArgs(context, layer, h, rows.data(), window, 0, &args));
        args.columns = prefix;
        args.pooling = config_.pooling == Pooling::Max ? MassPooling::Max : MassPooling::Avg;
        args.kernel = config_.kernel;
        args.k = keepPrefix;
        args.chosen = chosen.data();
        KVSLIM_RETURN_IF_ERROR(context.backend.attentionMass(args));
      }
      KVSLIM_RETURN_IF_ERROR(context.store.keepTailRows(layer, h, chosen));
      context.store.dropTailFront(layer, h, prefix);
    }
    return Status::ok();
  }

  std::unique_ptr<SelectPolicy> clone() const override { return std::make_unique<SnapKVPolicy>(*this); }
  bool settled(int32_t layer) const override { return !decided_.empty() && decided_[size_t(layer)] != 0; }

  // State: one byte per layer, 1 once it selected.
  Status saveState(int32_t layers, std::vector<uint8_t>* out) const override {
    for (int32_t layer = 0; layer < layers; ++layer) out->push_back(settled(layer) ? 1 : 0);
    return Status::ok();
  }
  Status loadState(const uint8_t* data, size_t size, const RestoredStores&, int32_t layers) override {
    if (size != size_t(layers)) return Status(ErrorCode::Corrupt, "cannot load cache: the snapkv state has the wrong size");
    decided_.assign(data, data + size);
    for (const uint8_t flag : decided_) {
      if (flag > 1) return Status(ErrorCode::Corrupt, "cannot load cache: a snapkv layer flag is not 0 or 1");
    }
    return Status::ok();
  }

 private:
  // Prefix tokens layer `layer` keeps: budget - window (SnapKV), or PyramidKV's arithmetic share,
  // rounded half to even as kvpress rounds it. The sequence is symmetric about the (whole) mean, so
  // the upper half is taken as the mirror of the lower: the layers then keep exactly the uniform
  // total whatever the floating-point rounding of the shares (methods/snapkv.md).
  int64_t prefixBudget(int32_t layers, int32_t layer, int64_t length, int64_t window) const {
    const int64_t mean = config_.budget - window;
    if (config_.kind != SelectKind::PyramidKV || layers < 2) return mean;
    double low = double(mean) / config_.beta, high = 2.0 * double(mean) - low;
    if (high > double(length - window)) {
      high = double(length - window);
      low = 2.0 * double(mean) - high;
    }
    if (!(double(length) >= high && high >= low && low >= double(window))) return mean;
    const auto share = [&](int32_t l) { return int64_t(std::nearbyint(high - double(l) * (high - low) / double(layers - 1))); };
    const int32_t mirror = layers - 1 - layer;
    if (mirror == layer) return mean;
    return layer < mirror ? share(layer) : 2 * mean - share(mirror);
  }

  SelectConfig config_;
  std::vector<uint8_t> decided_;  // per layer: selection done
};

}  // namespace

std::unique_ptr<SelectPolicy> makeSnapKVPolicy(const SelectConfig& config) {
  return std::make_unique<SnapKVPolicy>(config);
}

}  // namespace kvslim
