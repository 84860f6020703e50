#include "kv_cache.h"

#include <chrono>
#include <cmath>
#include <new>
#include <string>

#include "shape_checks.h"

namespace kvslim {

namespace {
double millisecondsSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
}

PagedStoreShape storeShape(const CacheConfig& config) {
  PagedStoreShape shape;
  shape.layers = config.layers;
  shape.kvHeads = config.kvHeads;
  shape.headDim = config.headDim;
  shape.storeType = config.storeType;
  shape.pageTokens = config.pageTokens;
  return shape;
}
}  // namespace

KVCache::KVCache(const CacheConfig& config, std::shared_ptr<Backend> backend)
    : config_(config), backend_(backend), store_(std::move(backend), storeShape(config)) {}

Status KVCache::create(const CacheConfig& config, std::shared_ptr<Backend> backend, std::unique_ptr<KVCache>* out) {
  KVSLIM_RETURN_IF_ERROR(expectPositive("layers", config.layers));
  KVSLIM_RETURN_IF_ERROR(checkHeads(config.qHeads, config.kvHeads, config.headDim));
  KVSLIM_RETURN_IF_ERROR(expectPositive("pageTokens", config.pageTokens));
  if (config.pageTokens > (1 << 20)) {
    return Status(ErrorCode::Option, "pageTokens must be at most 1048576, but received " + std::to_string(config.pageTokens));
  }
  if (!(config.scale >= 0.0f) || !std::isfinite(config.scale)) {
    return Status(ErrorCode::Option, "scale must be a positive finite number");
  }
  if (config.threads < 0) return Status(ErrorCode::Option, "threads must be >= 0");
  if (int(config.storeType) < 0 || int(config.storeType) > 2) return Status(ErrorCode::Option, "unknown store dtype");
  CacheConfig resolved = config;
  if (resolved.scale == 0.0f) resolved.scale = 1.0f / std::sqrt(float(config.headDim));
  out->reset(new KVCache(resolved, std::move(backend)));
  return Status::ok();
}

Status KVCache::checkLayer(int32_t layer) const {
  if (layer >= 0 && layer < config_.layers) return Status::ok();
  return Status(ErrorCode::Shape, "layer must be an integer in [0, " + std::to_string(config_.layers - 1) +
                                      "], but received " + std::to_string(layer));
}

Status KVCache::checkKV(const HostTensor& k, const HostTensor& v, int64_t* n) const {
  const size_t row = size_t(config_.kvHeads) * size_t(config_.headDim);
  if (k.count == 0 || k.count % row != 0) {
    return Status(ErrorCode::Shape, "k must hold n x kvHeads x headDim = n x " + std::to_string(row) +
                                        " elements with n >= 1, but holds " + std::to_string(k.count));
  }
  KVSLIM_RETURN_IF_ERROR(expectCount("v", v.count, k.count, "(the same as k)"));
  *n = int64_t(k.count / row);
  return Status::ok();
}

Status KVCache::checkQuery(const HostTensor& q, size_t outCount, int64_t* n) const {
  const size_t row = size_t(config_.qHeads) * size_t(config_.headDim);
  if (q.count == 0 || q.count % row != 0) {
    return Status(ErrorCode::Shape, "q must hold n x qHeads x headDim = n x " + std::to_string(row) +
                                        " elements with n >= 1, but holds " + std::to_string(q.count));
  }
  KVSLIM_RETURN_IF_ERROR(expectCount("out", outCount, q.count, "(n x qHeads x headDim)"));
  *n = int64_t(q.count / row);
  return Status::ok();
}

Status KVCache::append(int32_t layer, const HostTensor& k, const HostTensor& v) {
  KVSLIM_RETURN_IF_ERROR(checkLayer(layer));
  int64_t n = 0;
  KVSLIM_RETURN_IF_ERROR(checkKV(k, v, &n));
  try {
    return store_.append(layer, k, v, n);
  } catch (const std::bad_alloc&) {
    return Status(ErrorCode::OutOfMemory, "out of host memory appending " + std::to_string(n) + " tokens");
  }
}

Status KVCache::attendChecked(int32_t layer, const float* q, int64_t n, float* out) {
  const int64_t tokens = store_.tokens(layer);
  if (n > tokens) {
    return Status(ErrorCode::Shape, "attend needs at least as many tokens in layer " + std::to_string(layer) +
                                        " as queries (causal), but the layer holds " + std::to_string(tokens) +
                                        " tokens and q holds " + std::to_string(n) + " queries");
  }
  std::vector<KVHeadView> heads(size_t(config_.kvHeads));
  for (int32_t h = 0; h < config_.kvHeads; ++h) heads[size_t(h)] = store_.view(layer, h);
  AttentionArgs args;
  args.q = q;
  args.out = out;
  args.n = int32_t(n);
  args.qHeads = config_.qHeads;
  args.kvHeads = config_.kvHeads;
  args.headDim = config_.headDim;
  args.kvType = config_.storeType;
  args.pageTokens = config_.pageTokens;
  args.rowStride = config_.headDim;
  args.heads = heads.data();
  args.causal = true;
  args.scale = config_.scale;
  args.threads = config_.threads;
  lastLoadedTokens_ = double(tokens);
  return backend_->attention(args);
}

Status KVCache::attend(int32_t layer, const HostTensor& q, float* out, size_t outCount) {
  KVSLIM_RETURN_IF_ERROR(checkLayer(layer));
  int64_t n = 0;
  KVSLIM_RETURN_IF_ERROR(checkQuery(q, outCount, &n));
  const auto start = std::chrono::steady_clock::now();
  try {
    std::vector<float> converted;
    const float* query = nullptr;
    KVSLIM_RETURN_IF_ERROR(queryAsFloat32(q, &converted, &query));
    KVSLIM_RETURN_IF_ERROR(attendChecked(layer, query, n, out));
  } catch (const std::bad_alloc&) {
    return Status(ErrorCode::OutOfMemory, "out of host memory in attend");
  }
  times_.decodeMs += millisecondsSince(start);
  return Status::ok();
}

Status KVCache::appendAndAttend(int32_t layer, const HostTensor& q, const HostTensor& k, const HostTensor& v,
                                float* out, size_t outCount, Stage stage) {
  KVSLIM_RETURN_IF_ERROR(checkLayer(layer));
  int64_t n = 0, kvN = 0;
  KVSLIM_RETURN_IF_ERROR(checkQuery(q, outCount, &n));
  KVSLIM_RETURN_IF_ERROR(checkKV(k, v, &kvN));
  if (n != kvN) {
    return Status(ErrorCode::Shape, "q and k must hold the same number of tokens, but q holds " + std::to_string(n) +
                                        " and k holds " + std::to_string(kvN));
  }
  const auto start = std::chrono::steady_clock::now();
  try {
    // Check q before appending, so a bad query leaves the cache unchanged.
    std::vector<float> converted;
    const float* query = nullptr;
    KVSLIM_RETURN_IF_ERROR(queryAsFloat32(q, &converted, &query));
    KVSLIM_RETURN_IF_ERROR(store_.append(layer, k, v, n));
    KVSLIM_RETURN_IF_ERROR(attendChecked(layer, query, n, out));
  } catch (const std::bad_alloc&) {
    return Status(ErrorCode::OutOfMemory, "out of host memory in step/prefill");
  }
  (stage == Stage::Prefill ? times_.prefillMs : times_.decodeMs) += millisecondsSince(start);
  return Status::ok();
}

Status KVCache::step(int32_t layer, const HostTensor& q, const HostTensor& k, const HostTensor& v, float* out,
                     size_t outCount) {
  return appendAndAttend(layer, q, k, v, out, outCount, Stage::Decode);
}

Status KVCache::prefill(int32_t layer, const HostTensor& q, const HostTensor& k, const HostTensor& v, float* out,
                        size_t outCount) {
  return appendAndAttend(layer, q, k, v, out, outCount, Stage::Prefill);
}

std::unique_ptr<KVCache> KVCache::fork() const {
  std::unique_ptr<KVCache> child(new KVCache(config_, backend_));
  child->store_ = store_.fork();
  child->times_ = times_;
  child->lastLoadedTokens_ = lastLoadedTokens_;
  return child;
}

CacheStatsData KVCache::stats() const {
  CacheStatsData stats;
  const double elementBytes = double(dtypeBytes(config_.storeType));
  const double rowElements = double(config_.headDim);
  double tokensTotal = 0;
  double pages = 0;
  for (int32_t layer = 0; layer < config_.layers; ++layer) {
    const int64_t tokens = store_.tokens(layer);
    LayerStats layerStats;
    layerStats.tokensKept.assign(size_t(config_.kvHeads), tokens);
    layerStats.bytes = double(tokens) * double(config_.kvHeads) * 2.0 * rowElements * elementBytes;
    stats.kvBytes += layerStats.bytes;
    stats.fullF16Bytes += double(tokens) * double(config_.kvHeads) * 2.0 * rowElements * 2.0;
    tokensTotal += double(tokens);
    pages += double(store_.pageCount(layer));
    stats.layers.push_back(std::move(layerStats));
  }
  stats.tokensSeen = tokensTotal / config_.layers;
  stats.tokensKept = stats.tokensSeen;
  stats.tokensLoaded = lastLoadedTokens_;
  // Page tables: a key and a value pointer per page.
  stats.metaBytes = pages * 2.0 * sizeof(void*);
  stats.allocatedBytes = pages * double(store_.bytesPerPage());
  stats.sharedBytes = double(store_.sharedPageCount()) * double(store_.bytesPerPage());
  stats.times = times_;
  return stats;
}

}  // namespace kvslim
