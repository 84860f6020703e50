#include "loading_policy.h"

#include <algorithm>
#include <chrono>

namespace kvslim {

int64_t LoadingPolicy::dynamicEnd(const SelectContext& context, int32_t layer) const {
  return std::max(sink_, context.store.tokens(layer) - window_);
}

Status LoadingPolicy::catchUp(SelectContext& context, int32_t layer, const float* q, int64_t n) {
  const int64_t end = dynamicEnd(context, layer);
  for (int32_t h = 0; h < kvHeads_; ++h) {
    int64_t& indexed = indexed_[size_t(layer) * size_t(kvHeads_) + size_t(h)];
    if (indexed >= end) continue;
    std::vector<float> keys;
    if (needsKeys()) KVSLIM_RETURN_IF_ERROR(readKeys(context.store, layer, h, indexed, end - indexed, &keys));
    KVSLIM_RETURN_IF_ERROR(index(context, layer, h, indexed, end - indexed, keys, q, n));
    indexed = end;
  }
  return Status::ok();
}

Status LoadingPolicy::afterAppend(SelectContext& context, int32_t layer, const float* q, int64_t n, bool prefill) {
  if (!prefill) return Status::ok();
  return catchUp(context, layer, q, n);
}

Status LoadingPolicy::planLoad(SelectContext& context, int32_t layer, const float* q, int64_t n, LoadPlan* plan) {
  const auto start = std::chrono::steady_clock::now();
  KVSLIM_RETURN_IF_ERROR(catchUp(context, layer, nullptr, 0));
  plan->indexMs = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  plan->sink = sink_;
  plan->window = window_;
  plan->tokens.assign(size_t(kvHeads_), {});
  const int64_t end = dynamicEnd(context, layer);
  if (context.store.tokens(layer) <= sink_ + window_) return Status::ok();
  for (int32_t h = 0; h < kvHeads_; ++h) {
    const std::vector<float> rows = groupRows(q, n, context.qHeads, context.kvHeads, h, context.headDim);
    KVSLIM_RETURN_IF_ERROR(choose(context, layer, h, rows, end, &plan->tokens[size_t(h)]));
  }
  return Status::ok();
}

}  // namespace kvslim
