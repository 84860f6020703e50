#include "select_policy.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <utility>

namespace kvslim {

namespace {
constexpr std::pair<const char*, SelectKind> kKindNames[] = {
    {"full", SelectKind::Full},   {"streaming", SelectKind::Streaming}, {"snapkv", SelectKind::SnapKV},
    {"pyramidkv", SelectKind::PyramidKV}, {"h2o", SelectKind::H2O},   {"duo", SelectKind::Duo},
    {"quest", SelectKind::Quest}, {"retrieval", SelectKind::Retrieval}, {"actqkv", SelectKind::ActQKV}};

Status optionError(const std::string& message) { return Status(ErrorCode::Option, "policy.select." + message); }
}  // namespace

const char* selectKindName(SelectKind kind) {
  for (const auto& [name, value] : kKindNames) {
    if (value == kind) return name;
  }
  return "unknown";
}

bool selectKindFromName(const std::string& name, SelectKind* kind) {
  for (const auto& [candidate, value] : kKindNames) {
    if (name == candidate) {
      *kind = value;
      return true;
    }
  }
  return false;
}

Status makeSelectPolicy(const SelectConfig& config, int32_t layers, int32_t kvHeads, int32_t headDim,
                        std::unique_ptr<SelectPolicy>* out) {
  out->reset();
  constexpr int64_t kMaxTokens = int64_t(1) << 40;
  auto positive = [&](const char* name, int64_t value) {
    return value >= 1 && value <= kMaxTokens ? Status::ok()
                                             : optionError(std::string(name) + " must be a positive integer, but received " +
                                                           std::to_string(value));
  };
  auto nonNegative = [&](const char* name, int64_t value) {
    return value >= 0 && value <= kMaxTokens ? Status::ok()
                                             : optionError(std::string(name) + " must be an integer >= 0, but received " +
                                                           std::to_string(value));
  };
  switch (config.kind) {
    case SelectKind::Full:
      return Status::ok();
    case SelectKind::Streaming:
    case SelectKind::Duo:
      KVSLIM_RETURN_IF_ERROR(nonNegative("sink", config.sink));
      KVSLIM_RETURN_IF_ERROR(positive("window", config.window));
      if (config.kind == SelectKind::Streaming) {
        *out = makeStreamingPolicy(config);
        return Status::ok();
      }
      if (config.retrieval.size() != size_t(layers) * size_t(kvHeads)) {
        return optionError("heads must hold layers x kvHeads = " + std::to_string(size_t(layers) * size_t(kvHeads)) +
                           " entries, but holds " + std::to_string(config.retrieval.size()));
      }
      for (size_t i = 0; i < config.retrieval.size(); ++i) {
        if (config.retrieval[i] > 1) {
          return optionError("heads must hold 0 (streaming) or 1 (retrieval), but entry " + std::to_string(i) + " is " +
                             std::to_string(config.retrieval[i]));
        }
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
      if (!(config.beta >= 1.0) || !std::isfinite(config.beta)) {
        return optionError("beta must be a finite number >= 1, but received " + std::to_string(config.beta));
      }
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
    case SelectKind::Quest:
    case SelectKind::Retrieval:
    case SelectKind::ActQKV:
      KVSLIM_RETURN_IF_ERROR(nonNegative("sink", config.sink));
      KVSLIM_RETURN_IF_ERROR(positive("window", config.window));
      if (config.kind == SelectKind::Quest) {
        KVSLIM_RETURN_IF_ERROR(positive("pageSize", config.pageSize));
        KVSLIM_RETURN_IF_ERROR(positive("pages", config.pages));
        *out = makeQuestPolicy(config, layers, kvHeads, headDim);
      } else if (config.kind == SelectKind::Retrieval) {
        KVSLIM_RETURN_IF_ERROR(positive("topK", config.topK));
        KVSLIM_RETURN_IF_ERROR(positive("trainQueries", config.trainQueries));
        IndexOptions probe = config.index;
        probe.dim = 1;  // the cache's headDim is checked with the cache
        std::unique_ptr<KeyIndex> index;
        const Status valid = makeKeyIndex(probe, &index);
        if (!valid.isOk()) return optionError(valid.message());
        *out = makeRetrievalPolicy(config, layers, kvHeads);
      } else {
        KVSLIM_RETURN_IF_ERROR(positive("blockSize", config.blockSize));
        KVSLIM_RETURN_IF_ERROR(positive("blocks", config.blocks));
        if (config.reprTopK < 1 || config.reprTopK > config.blockSize) {
          return optionError("reprTopK must be in [1, blockSize], but is " + std::to_string(config.reprTopK));
        }
        KVSLIM_RETURN_IF_ERROR(positive("queryWindow", config.queryWindow));
        if (!(config.questionWeight >= 0) || !std::isfinite(config.questionWeight)) {
          return optionError("questionWeight must be a finite number >= 0, but received " + std::to_string(config.questionWeight));
        }
        if (!(config.temperature > 0) || !std::isfinite(config.temperature)) {
          return optionError("temperature must be a finite number > 0, but received " + std::to_string(config.temperature));
        }
        *out = makeActQKVPolicy(config, layers, kvHeads, headDim);
      }
      return Status::ok();
  }
  return optionError("kind " + std::to_string(int(config.kind)) + " is unknown");
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

Status trimWindows(SelectContext& context, const SelectPolicy& policy, int32_t layer, int64_t n) {
  for (int32_t h = 0; h < context.kvHeads; ++h) {
    int64_t sink = 0, window = 0;
    if (!policy.windowOf(layer, h, &sink, &window)) continue;
    KVSLIM_RETURN_IF_ERROR(trimWindow(context.store, layer, h, sink, policy.attendWindow(window, n)));
  }
  return Status::ok();
}

Status WindowPolicy::beforeAttend(SelectContext& context, int32_t layer, int64_t n) {
  return trimWindows(context, *this, layer, n);
}

Status WindowPolicy::afterAppend(SelectContext& context, int32_t layer, const float*, int64_t, bool) {
  return trimWindows(context, *this, layer, 0);
}

Status headMassArgs(const SelectContext& context, int32_t layer, int32_t head, const float* rows, int64_t n, int64_t after,
                    AttentionMassArgs* args) {
  const PagedStore& store = context.store;
  const int32_t group = context.qHeads / context.kvHeads;
  if (n < 0 || n > INT32_MAX / group) {
    return Status(ErrorCode::Shape, "a selection policy needs n x group below 2^31 query rows, but received n=" + std::to_string(n));
  }
  *args = AttentionMassArgs();
  args->q = rows;
  args->n = int32_t(n);
  args->group = group;
  args->headDim = context.headDim;
  args->kvType = store.shape().storeType;
  args->pageTokens = store.shape().pageTokens;
  args->rowStride = context.headDim;
  args->kept = store.keptView(layer, head);
  args->tail = store.tailView(layer, head);
  args->after = after;
  args->scale = context.scale;
  args->threads = context.threads;
  return Status::ok();
}

std::vector<float> groupRows(const float* q, int64_t n, int32_t qHeads, int32_t kvHeads, int32_t head, int32_t headDim) {
  const int32_t group = qHeads / kvHeads;
  const size_t dim = size_t(headDim);
  std::vector<float> rows(size_t(n) * size_t(group) * dim);
  for (int64_t i = 0; i < n; ++i)
    for (int32_t g = 0; g < group; ++g) {
      const float* from = q + (size_t(i) * size_t(qHeads) + size_t(head * group + g)) * dim;
      std::copy(from, from + dim, rows.begin() + (size_t(i) * size_t(group) + size_t(g)) * dim);
    }
  return rows;
}

Status forEachHeadOnHost(Backend& backend, int32_t kvHeads, int32_t threads, const std::function<Status(int32_t)>& body) {
  std::vector<Status> results(static_cast<size_t>(kvHeads));
  backend.hostParallel(kvHeads, threads, [&](int64_t h) {
    try {
      results[size_t(h)] = body(int32_t(h));
    } catch (const std::bad_alloc&) {
      results[size_t(h)] = Status(ErrorCode::OutOfMemory, "out of host memory in a selection policy's work on kv head " + std::to_string(h));
    }
  });
  for (const Status& result : results) KVSLIM_RETURN_IF_ERROR(result);
  return Status::ok();
}

Status readKeys(const PagedStore& store, int32_t layer, int32_t head, int64_t first, int64_t count, std::vector<float>* out) {
  const DType type = store.shape().storeType;
  const size_t elements = size_t(count) * size_t(store.shape().headDim);
  std::vector<uint8_t> raw(elements * dtypeBytes(type));
  KVSLIM_RETURN_IF_ERROR(store.readRows(layer, head, first, count, raw.data(), nullptr));
  const size_t begin = out->size();
  out->resize(begin + elements);
  return toFloat32(HostTensor{raw.data(), type, elements}, out->data() + begin, "stored keys");
}

}  // namespace kvslim
