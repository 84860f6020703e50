// DuoAttention heads (methods/duoattention.md): per (layer, kv head), a retrieval head keeps the
// full cache and a streaming head keeps `sink` + `window` tokens, trimmed like StreamingLLM.
#include "select_policy.h"

namespace kvslim {

namespace {

class DuoPolicy final : public WindowPolicy {
 public:
  DuoPolicy(const SelectConfig& config, int32_t kvHeads)
      : sink_(config.sink), window_(config.window), kvHeads_(kvHeads), retrieval_(config.retrieval) {}

  bool windowOf(int32_t layer, int32_t head, int64_t* sink, int64_t* window) const override {
    if (retrieval_[size_t(layer) * size_t(kvHeads_) + size_t(head)] != 0) return false;
    *sink = sink_;
    *window = window_;
    return true;
  }

  std::unique_ptr<SelectPolicy> clone() const override { return std::make_unique<DuoPolicy>(*this); }

 private:
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
