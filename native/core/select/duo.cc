// DuoAttention heads (methods/duoattention.md): per (layer, kv head), a retrieval head keeps the
// full cache and a streaming head keeps `sink` + `window` tokens, trimmed like StreamingLLM.
#include "select_policy.h"

namespace kvslim {

namespace {

class DuoPolicy final : public SelectPolicy {
 public:
  DuoPolicy(const SelectConfig& config, int32_t kvHeads)
      : sink_(config.sink), window_(config.window), kvHeads_(kvHeads), retrieval_(config.retrieval) {}

  Status beforeAttend(SelectContext& context, int32_t layer, int64_t n) override {
    return trim(context, layer, n > window_ ? n : window_);
  }

  Status afterAppend(SelectContext& context, int32_t layer, const float*, int64_t, bool) override {
    return trim(context, layer, window_);
  }

  std::unique_ptr<SelectPolicy> clone() const override { return std::make_unique<DuoPolicy>(*this); }

 private:
  Status trim(SelectContext& context, int32_t layer, int64_t keep) {
    for (int32_t h = 0; h < kvHeads_; ++h) {
      if (retrieval_[size_t(layer) * size_t(kvHeads_) + size_t(h)] != 0) continue;
      KVSLIM_RETURN_IF_ERROR(trimWindow(context.store, layer, h, sink_, keep));
    }
    return Status::ok();
  }

  int64_t sink_;
  int64_t window_;
  int32_t kvHeads_;
  std::vector<uint8_t> retrieval_;
};

}  // namespace

std::unique_ptr<SelectPolicy> makeDuoPolicy(const SelectConfig& config, int32_t kvHeads) {
  return std::make_unique<DuoPolicy>(config, kvHeads);
}

}  // namespace kvslim
