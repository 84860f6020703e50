// StreamingLLM (methods/streaming.md): the first `sink` tokens plus the last `window` tokens.
// A decode query attends to the sinks and the last `window` tokens counting itself. A block of n
// tokens is trimmed once, before it attends, to the last max(window, n) tokens including itself
// (the reference's evict_for_space), so a block longer than the window attends densely within
// itself; after the call the window is trimmed to `window`. Positions stay absolute.
#include "select_policy.h"

namespace kvslim {

namespace {

class StreamingPolicy final : public WindowPolicy {
 public:
  explicit StreamingPolicy(const SelectConfig& config) : sink_(config.sink), window_(config.window) {}

  bool windowOf(int32_t, int32_t, int64_t* sink, int64_t* window) const override {
    *sink = sink_;
    *window = window_;
    return true;
  }

  std::unique_ptr<SelectPolicy> clone() const override { return std::make_unique<StreamingPolicy>(*this); }

 private:
  int64_t sink_;
  int64_t window_;
};

}  // namespace

std::unique_ptr<SelectPolicy> makeStreamingPolicy(const SelectConfig& config) {
  return std::make_unique<StreamingPolicy>(config);
}

}  // namespace kvslim
