// DuoAttention heads (methods/duoattention.md): per (layer, kv head), a retrieval head keeps the
// full cache and a streaming head keeps `sink` + `window` tokens. A call of n tokens attends over
// the sinks, the window's last `window` - 1 tokens and the whole call, densely within it, and is
// then trimmed back. Duo's deployment does the same: its chunked prefill (duo_attn/patch/llama.py,
// the static cache's forward) attends each chunk over the cached sink + recent tokens and the
// chunk, causal, trimming after, and its first prefill is dense. Every query thus sees at least the
// last `window` tokens counting itself, as a decode step does (streaming.md's convention), where
// streaming's evict_for_space would leave a long chunk's first query the sinks and itself alone.
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

  int64_t attendWindow(int64_t window, int64_t n) const override { return n <= 1 ? window : window - 1 + n; }

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
