// StreamingLLM (methods/streaming.md): the first `sink` tokens plus the last `window` tokens.
// A decode query attends to the sinks and the last `window` tokens counting itself. A block of n
// tokens is trimmed once, before it attends, to the last max(window, n) tokens including itself
// (the reference's evict_for_space), so a block longer than the window attends densely within
// itself; after the call the window is trimmed to `window`. Positions stay absolute.
#include "select_policy.h"

namespace kvslim {

namespace {

class StreamingPolicy final : public SelectPolicy {
 public:
  explicit StreamingPolicy(const SelectConfig& config) : sink_(config.sink), window_(config.window) {}

  Status beforeAttend(SelectContext& context, int32_t layer, int64_t n) override {
    // The last `window` tokens counting the new ones; a longer block keeps all of itself.
    const int64_t keep = n > window_ ? n : window_;
    for (int32_t h = 0; h < context.kvHeads; ++h) KVSLIM_RETURN_IF_ERROR(trimWindow(context.store, layer, h, sink_, keep));
    return Status::ok();
  }

  Status afterAppend(SelectContext& context, int32_t layer, const float*, int64_t, bool) override {
    for (int32_t h = 0; h < context.kvHeads; ++h) KVSLIM_RETURN_IF_ERROR(trimWindow(context.store, layer, h, sink_, window_));
    return Status::ok();
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
