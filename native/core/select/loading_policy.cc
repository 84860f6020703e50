#include "loading_policy.h"

#include <algorithm>
#include <chrono>
#include <new>

namespace kvslim {

namespace {
constexpr size_t kGatherBytes = size_t(4) << 20;  // new keys of all heads read in one gather up to this
}  // namespace

int64_t LoadingPolicy::dynamicEnd(const SelectContext& context, int32_t layer) const {
  return std::max(sink_, context.store.tokens(layer) - window_);
}

void LoadingPolicy::saveIndexed(ByteWriter* writer) const { writer->putArray(indexed_); }

Status LoadingPolicy::loadIndexed(ByteReader* reader, const RestoredStores& restored) {
  std::vector<int64_t> indexed;
  if (!reader->getArray(&indexed, uint64_t(indexed_.size()))) return Status(ErrorCode::Corrupt, "cannot load cache: the index extents are truncated");
  for (size_t i = 0; i < indexed.size(); ++i) {
    const int32_t layer = int32_t(i / size_t(kvHeads_));
    const int64_t end = std::max(sink_, restored.store.tokens(layer) - window_);
    if (indexed[i] < sink_ || indexed[i] > end) {
      return Status(ErrorCode::Corrupt, "cannot load cache: an index extent is out of range");
    }
  }
  indexed_ = std::move(indexed);
  return Status::ok();
}

Status LoadingPolicy::forEachHead(SelectContext& context, const std::function<Status(int32_t)>& body) {
  if (!hostOnly()) {
    for (int32_t h = 0; h < kvHeads_; ++h) KVSLIM_RETURN_IF_ERROR(body(h));
    return Status::ok();
  }
  return forEachHeadOnHost(context.backend, kvHeads_, context.threads, body);
}

Status LoadingPolicy::catchUp(SelectContext& context, int32_t layer, const float* q, int64_t n) {
  const int64_t end = dynamicEnd(context, layer);
  const size_t rowBytes = size_t(context.headDim) * dtypeBytes(context.store.shape().storeType);
  // A few new keys per head (a decode call's one token): every head's in one gather, so a GPU
  // cache makes one transfer instead of one per head. Long catch-ups read head by head.
  std::vector<uint8_t> gathered;
  std::vector<size_t> offsets(size_t(kvHeads_) + 1, 0);
  if (needsKeys()) {
    for (int32_t h = 0; h < kvHeads_; ++h) {
      const int64_t from = indexed_[size_t(layer) * size_t(kvHeads_) + size_t(h)];
      offsets[size_t(h) + 1] = offsets[size_t(h)] + size_t(std::max<int64_t>(0, end - from)) * rowBytes;
    }
    if (offsets.back() > 0 && offsets.back() <= kGatherBytes) {
      std::vector<DeviceRun> runs;
      for (int32_t h = 0; h < kvHeads_; ++h) {
        const int64_t from = indexed_[size_t(layer) * size_t(kvHeads_) + size_t(h)];
        if (from < end) KVSLIM_RETURN_IF_ERROR(context.store.keyRuns(layer, h, from, end - from, &runs));
      }
      gathered.resize(offsets.back());
      KVSLIM_RETURN_IF_ERROR(context.backend.gather(runs.data(), int64_t(runs.size()), gathered.data()));
    }
  }
  return forEachHead(context, [&](int32_t h) {
    int64_t& indexed = indexed_[size_t(layer) * size_t(kvHeads_) + size_t(h)];
    if (indexed >= end) return Status::ok();
    std::vector<float> keys;
    if (needsKeys() && !gathered.empty()) {
      const size_t elements = size_t(end - indexed) * size_t(context.headDim);
      keys.resize(elements);
      KVSLIM_RETURN_IF_ERROR(toFloat32(HostTensor{gathered.data() + offsets[size_t(h)], context.store.shape().storeType, elements},
                                       keys.data(), "stored keys"));
    } else if (needsKeys()) {
      KVSLIM_RETURN_IF_ERROR(readKeys(context.store, layer, h, indexed, end - indexed, &keys));
    }
    KVSLIM_RETURN_IF_ERROR(index(context, layer, h, indexed, end - indexed, keys, q, n));
    indexed = end;
    return Status::ok();
  });
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
  if (context.store.tokens(layer) <= sink_ + window_) return Status::ok();
  return chooseLayer(context, layer, q, n, dynamicEnd(context, layer), plan);
}

Status LoadingPolicy::chooseLayer(SelectContext& context, int32_t layer, const float* q, int64_t n, int64_t end, LoadPlan* plan) {
  return forEachHead(context, [&](int32_t h) {
    const std::vector<float> rows = groupRows(q, n, context.qHeads, context.kvHeads, h, context.headDim);
    return choose(context, layer, h, rows, end, &plan->tokens[size_t(h)]);
  });
}

Status LoadingPolicy::layerRows(const SelectContext& context, const float* q, int64_t n, std::vector<float>* rows,
                                int32_t* rowsPerHead) const {
  const int64_t perHead = n * int64_t(context.qHeads / context.kvHeads);
  if (perHead > int64_t(INT32_MAX)) return Status(ErrorCode::Shape, "a loading policy takes at most 2^31 query rows per kv head");
  *rowsPerHead = int32_t(perHead);
  rows->clear();
  rows->reserve(size_t(kvHeads_) * size_t(perHead) * size_t(context.headDim));
  for (int32_t h = 0; h < kvHeads_; ++h) {
    const std::vector<float> group = groupRows(q, n, context.qHeads, context.kvHeads, h, context.headDim);
    rows->insert(rows->end(), group.begin(), group.end());
  }
  return Status::ok();
}

}  // namespace kvslim
