// KVCache::stepBatch: one decode step of many caches (a server's batch of sequences) in one call.
// Every input is checked before any cache changes, so a bad token leaves every cache as it was.
// On a backend with host threads, and at least as many caches as threads, the caches step in
// parallel, each on one thread (a cache's own parallel work runs inline there): a batch of short
// sequences keeps every core busy without a thread hand-off per cache and layer. With fewer
// caches, or on the GPU, they step one after another, each with all of its threads.
#include <cmath>
#include <string>
#include <unordered_set>

#include "kv_cache.h"

namespace kvslim {

namespace {

// An f32 value an f16 store (or a KIVI store's f16 residual) cannot hold: |x| >= 65520 rounds to Inf.
int64_t firstOutsideHalf(const HostTensor& tensor) {
  if (tensor.dtype != DType::F32) return -1;
  const auto* values = static_cast<const float*>(tensor.data);
  for (size_t i = 0; i < tensor.count; ++i) {
    if (std::fabs(values[i]) >= 65520.0f) return int64_t(i);
  }
  return -1;
}

HostTensor rows(const HostTensor& tensor, size_t row, size_t rowElements) {
  return HostTensor{static_cast<const uint8_t*>(tensor.data) + row * rowElements * dtypeBytes(tensor.dtype), tensor.dtype, rowElements};
}

}  // namespace

Status KVCache::stepBatch(const std::vector<KVCache*>& caches, int32_t layer, const HostTensor& q, const HostTensor& k,
                          const HostTensor& v, float* out, size_t outCount) {
  if (caches.empty()) return Status(ErrorCode::Shape, "stepBatch needs at least one cache");
  const CacheConfig& first = caches[0]->config_;
  const size_t n = caches.size();
  const size_t qRow = size_t(first.qHeads) * size_t(first.headDim), kvRow = size_t(first.kvHeads) * size_t(first.headDim);
  std::unordered_set<const KVCache*> distinct;
  for (size_t i = 0; i < n; ++i) {
    const KVCache* cache = caches[i];
    const CacheConfig& c = cache->config_;
    if (!distinct.insert(cache).second) return Status(ErrorCode::Option, "caches[" + std::to_string(i) + "] appears twice in the batch");
    if (c.qHeads != first.qHeads || c.kvHeads != first.kvHeads || c.headDim != first.headDim) {
      return Status(ErrorCode::Shape, "caches[" + std::to_string(i) + "] has another shape than caches[0] (qHeads, kvHeads, headDim)");
    }
    if (cache->backend_ != caches[0]->backend_) return Status(ErrorCode::Option, "caches[" + std::to_string(i) + "] is on another device than caches[0]");
    if (layer < 0 || layer >= c.layers) {
      return Status(ErrorCode::Shape, "layer must be in [0, " + std::to_string(c.layers - 1) + "] for caches[" + std::to_string(i) + "], but is " + std::to_string(layer));
    }
  }
  if (q.count != n * qRow || outCount != n * qRow) {
    return Status(ErrorCode::Shape, "q and out must hold one token per cache, " + std::to_string(n * qRow) + " elements, but hold " +
                                        std::to_string(q.count) + " and " + std::to_string(outCount));
  }
  if (k.count != n * kvRow || v.count != n * kvRow) {
    return Status(ErrorCode::Shape, "k and v must hold one token per cache, " + std::to_string(n * kvRow) + " elements, but hold " +
                                        std::to_string(k.count) + " and " + std::to_string(v.count));
  }
  for (const auto& [tensor, name] : {std::pair{&q, "q"}, std::pair{&k, "k"}, std::pair{&v, "v"}}) {
    const int64_t bad = findNonFinite(*tensor);
    if (bad >= 0) return Status(ErrorCode::Value, std::string(name) + " must hold finite values, but element " + std::to_string(bad) + " is not");
  }
  for (size_t i = 0; i < n; ++i) {
    const CacheConfig& c = caches[i]->config_;
    if (c.storeType != DType::F16 && c.storeKind != StoreKind::Kivi) continue;
    for (const auto& [tensor, name] : {std::pair{&k, "k"}, std::pair{&v, "v"}}) {
      const int64_t bad = firstOutsideHalf(rows(*tensor, i, kvRow));
      if (bad >= 0) {
        return Status(ErrorCode::Value, std::string(name) + " element " + std::to_string(i * kvRow + size_t(bad)) +
                                            " is outside the f16 range (|x| <= 65504) of caches[" + std::to_string(i) + "]'s store");
      }
    }
  }
  std::vector<Status> results(n);
  auto stepOne = [&](int64_t i) {
    results[size_t(i)] = caches[size_t(i)]->step(layer, rows(q, size_t(i), qRow), rows(k, size_t(i), kvRow), rows(v, size_t(i), kvRow),
                                                 out + size_t(i) * qRow, qRow);
  };
  Backend& backend = *caches[0]->backend_;
  if (n >= size_t(backend.hostThreads()) && backend.hostThreads() > 1) {
    backend.hostParallel(int64_t(n), 0, stepOne);
  } else {
    for (size_t i = 0; i < n; ++i) stepOne(int64_t(i));
  }
  for (size_t i = 0; i < n; ++i) {
    if (!results[i].isOk()) return Status(results[i].code(), "caches[" + std::to_string(i) + "]: " + results[i].message());
  }
  return Status::ok();
}

}  // namespace kvslim
