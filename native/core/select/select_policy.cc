#include "select_policy.h"

#include <algorithm>
#include <cmath>
#include <string>

namespace kvslim {

namespace {
Status optionError(const std::string& message) { return Status(ErrorCode::Option, "policy.select." + message); }
}  // namespace

Status makeSelectPolicy(const SelectConfig& config, int32_t layers, int32_t kvHeads, std::unique_ptr<SelectPolicy>* out) {
  out->reset();
  constexpr int64_t kMaxTokens = int64_t(1) << 40;
  auto positive = [&](const char* name, int64_t value) {
    return value >= 1 && value <= kMaxTokens ? Status::ok()
                                             : optionError(std::string(name) + " must be a positive integer, but received " +
                                                           std::to_string(value));
  };
  switch (config.kind) {
    case SelectKind::Full:
      return Status::ok();
    case SelectKind::Streaming:
    case SelectKind::Duo:
      if (config.sink < 0 || config.sink > kMaxTokens) return optionError("sink must be an integer >= 0");
      KVSLIM_RETURN_IF_ERROR(positive("window", config.window));
      if (config.kind == SelectKind::Streaming) {
        *out = makeStreamingPolicy(config);
        return Status::ok();
      }
      if (config.retrieval.size() != size_t(layers) * size_t(kvHeads)) {
        return optionError("heads must hold layers x kvHeads = " + std::to_string(size_t(layers) * size_t(kvHeads)) +
                           " entries, but holds " + std::to_string(config.retrieval.size()));
      }
      *out = makeDuoPolicy(config, kvHeads);
      return Status::ok();
    case SelectKind::SnapKV:
    case SelectKind::PyramidKV:
      KVSLIM_RETURN_IF_ERROR(positive("budget", config.budget));
      KVSLIM_RETURN_IF_ERROR(positive("window", config.window));
      if (config.window >= config.budget) {
        return optionError("window (" + std::to_string(config.window) + ") must be smaller than budget (" +
                           std::to_string(config.budget) + ")");
      }
      if (config.kernel < 1 || config.kernel % 2 == 0 || config.kernel > 1023) {
        return optionError("kernel must be an odd integer in [1, 1023], but received " + std::to_string(config.kernel));
      }
      if (!(config.beta >= 1.0) || !std::isfinite(config.beta)) return optionError("beta must be a finite number >= 1");
      *out = makeSnapKVPolicy(config);
      return Status::ok();
    case SelectKind::H2O:
      KVSLIM_RETURN_IF_ERROR(positive("budget", config.budget));
      KVSLIM_RETURN_IF_ERROR(positive("recent", config.recent));
      if (config.recent >= config.budget) {
        return optionError("recent (" + std::to_string(config.recent) + ") must be smaller than budget (" +
                           std::to_string(config.budget) + ")");
      }
      *out = makeH2OPolicy(config, layers, kvHeads);
      return Status::ok();
  }
  return optionError("kind is unknown");
}

Status trimWindow(PagedStore& store, int32_t layer, int32_t head, int64_t sink, int64_t keep) {
  const int64_t tail = store.tailTokens(layer, head);
  if (tail <= keep) return Status::ok();
  const int64_t drop = tail - keep;
  // The first `sink` tokens ever appended leave the window as kept sinks.
  const int64_t first = store.tailFirstPosition(layer, head);
  const int64_t sinks = std::max<int64_t>(0, std::min(drop, sink - first));
  if (sinks > 0) {
    std::vector<int64_t> indices(static_cast<size_t>(sinks));
    for (int64_t i = 0; i < sinks; ++i) indices[size_t(i)] = i;
    KVSLIM_RETURN_IF_ERROR(store.keepTailRows(layer, head, indices));
  }
  store.dropTailFront(layer, head, drop);
  return Status::ok();
}

Status headProbabilities(SelectContext& context, int32_t layer, int32_t head, const float* q, int64_t n, int64_t after,
                         std::vector<float>* probs) {
  const PagedStore& store = context.store;
  const int32_t group = context.qHeads / context.kvHeads;
  const int32_t dim = context.headDim;
  const int64_t kept = store.keptTokens(layer, head), tail = store.tailTokens(layer, head);
  const int64_t tokens = kept + tail;
  const int64_t rows = n * group;
  // The group's query rows, ordered (position, member).
  std::vector<float> queries(size_t(rows) * size_t(dim));
  for (int64_t i = 0; i < n; ++i)
    for (int32_t g = 0; g < group; ++g)
      std::copy(q + (size_t(i) * size_t(context.qHeads) + size_t(head * group + g)) * size_t(dim),
                q + (size_t(i) * size_t(context.qHeads) + size_t(head * group + g) + 1) * size_t(dim),
                queries.begin() + (size_t(i) * size_t(group) + size_t(g)) * size_t(dim));
  probs->assign(size_t(rows) * size_t(tokens), 0.0f);
  std::vector<float> scores;
  for (const bool keptPart : {true, false}) {
    const int64_t count = keptPart ? kept : tail;
    if (count == 0) continue;
    ScoresArgs args;
    args.q = queries.data();
    args.rows = int32_t(rows);
    args.headDim = dim;
    args.kvType = store.shape().storeType;
    args.pageTokens = store.shape().pageTokens;
    args.rowStride = dim;
    args.head = keptPart ? store.keptView(layer, head) : store.tailView(layer, head);
    args.scale = context.scale;
    args.threads = context.threads;
    scores.resize(size_t(rows) * size_t(count));
    args.out = scores.data();
    KVSLIM_RETURN_IF_ERROR(context.backend.attentionScores(args));
    const int64_t offset = keptPart ? 0 : kept;
    for (int64_t r = 0; r < rows; ++r)
      std::copy(scores.begin() + r * count, scores.begin() + (r + 1) * count, probs->begin() + r * tokens + offset);
  }
  // Causal softmax per row: query i sees every kept token and tail tokens up to tail - after - n + i.
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t visible = kept + (tail - after - n + r / group) + 1;
    float* row = probs->data() + size_t(r) * size_t(tokens);
    float max = -INFINITY;
    for (int64_t j = 0; j < visible; ++j) max = std::max(max, row[j]);
    double sum = 0;
    for (int64_t j = 0; j < visible; ++j) {
      row[j] = std::exp(row[j] - max);
      sum += row[j];
    }
    const float inverse = sum > 0 ? float(1.0 / sum) : 0.0f;
    for (int64_t j = 0; j < visible; ++j) row[j] *= inverse;
    std::fill(row + visible, row + tokens, 0.0f);
  }
  return Status::ok();
}

}  // namespace kvslim
