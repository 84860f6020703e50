#include "kv_cache.h"

#include <algorithm>
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

// KIVI pages hold at least 256 tokens (small records would otherwise mean many tiny pages).
KiviStoreShape kiviShape(const CacheConfig& config) {
  KiviStoreShape shape;
  shape.layers = config.layers;
  shape.kvHeads = config.kvHeads;
  shape.format.bits = config.kiviBits;
  shape.format.group = config.kiviGroup;
  shape.format.headDim = config.headDim;
  shape.residual = config.kiviResidual;
  const int64_t tokens = std::max<int64_t>(config.pageTokens, 256);
  shape.pageTokens = (tokens + config.kiviGroup - 1) / config.kiviGroup * config.kiviGroup;
  return shape;
}

Status checkKivi(const CacheConfig& config) {
  if (config.kiviBits != 2 && config.kiviBits != 4 && config.kiviBits != 8) {
    return Status(ErrorCode::Option, "policy.store.bits must be 2, 4 or 8, but received " + std::to_string(config.kiviBits));
  }
  if (config.kiviGroup <= 0 || config.kiviGroup % 16 != 0 || config.headDim % config.kiviGroup != 0) {
    return Status(ErrorCode::Option, "policy.store.group must be a positive multiple of 16 that divides headDim (" +
                                         std::to_string(config.headDim) + "), but received " +
                                         std::to_string(config.kiviGroup));
  }
  if (config.kiviResidual <= 0 || config.kiviResidual % config.kiviGroup != 0 || config.kiviResidual > (1 << 20)) {
    return Status(ErrorCode::Option, "policy.store.residual must be a positive multiple of group (" +
                                         std::to_string(config.kiviGroup) + ") up to 1048576, but received " +
                                         std::to_string(config.kiviResidual));
  }
  return Status::ok();
}
}  // namespace

KVCache::KVCache(const CacheConfig& config, std::shared_ptr<Backend> backend)
    : config_(config),
      backend_(backend),
      store_(backend, storeShape(config)),
      kivi_(backend, config.storeKind == StoreKind::Kivi ? kiviShape(config) : KiviStoreShape{}) {}

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
  if (config.storeKind == StoreKind::Kivi) {
    KVSLIM_RETURN_IF_ERROR(checkKivi(config));
  } else if (config.storeKind != StoreKind::Dense) {
    return Status(ErrorCode::Option, "unknown store kind");
  }
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
    KVSLIM_RETURN_IF_ERROR(stageTokens(layer, k, v, n));
    return flushLayer(layer);
  } catch (const std::bad_alloc&) {
    return Status(ErrorCode::OutOfMemory, "out of host memory appending " + std::to_string(n) + " tokens");
  }
}

Status KVCache::stageTokens(int32_t layer, const HostTensor& k, const HostTensor& v, int64_t n) {
  return kivi() ? kivi_.stage(layer, k, v, n) : store_.append(layer, k, v, n);
}

Status KVCache::flushLayer(int32_t layer) {
  if (!kivi()) return Status::ok();
  const auto start = std::chrono::steady_clock::now();
  const Status flushed = kivi_.flush(layer);
  times_.compressMs += millisecondsSince(start);
  return flushed;
}

Status KVCache::attendChecked(int32_t layer, const float* q, int64_t n, float* out) {
  const int64_t tokens = this->tokens(layer);
  if (n > tokens) {
    return Status(ErrorCode::Shape, "attend needs at least as many tokens in layer " + std::to_string(layer) +
                                        " as queries (causal), but the layer holds " + std::to_string(tokens) +
                                        " tokens and q holds " + std::to_string(n) + " queries");
  }
  lastLoadedTokens_ = double(tokens);
  if (kivi()) return attendKivi(layer, q, n, out);
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
  return backend_->attention(args);
}

Status KVCache::attendKivi(int32_t layer, const float* q, int64_t n, float* out) {
  std::vector<KiviHeadView> heads(size_t(config_.kvHeads));
  for (int32_t h = 0; h < config_.kvHeads; ++h) heads[size_t(h)] = kivi_.view(layer, h);
  KiviAttentionArgs args;
  args.q = q;
  args.out = out;
  args.n = int32_t(n);
  args.qHeads = config_.qHeads;
  args.kvHeads = config_.kvHeads;
  args.format = kivi_.shape().format;
  args.residual = kivi_.valueRingRows(layer);
  args.keyGroupsPerPage = kivi_.keyGroupsPerPage();
  args.valueTokensPerPage = kivi_.shape().pageTokens;
  args.heads = heads.data();
  args.causal = true;
  args.scale = config_.scale;
  args.threads = config_.threads;
  return backend_->kiviAttention(args);
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
    KVSLIM_RETURN_IF_ERROR(stageTokens(layer, k, v, n));
    // KIVI: the call attends its own tokens at full precision, then they are flushed.
    const Status attended = attendChecked(layer, query, n, out);
    const Status flushed = flushLayer(layer);
    KVSLIM_RETURN_IF_ERROR(attended);
    KVSLIM_RETURN_IF_ERROR(flushed);
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
  child->kivi_ = kivi_.fork();
  child->times_ = times_;
  child->lastLoadedTokens_ = lastLoadedTokens_;
  return child;
}

CacheStatsData KVCache::stats() const {
  CacheStatsData stats;
  const double rowElements = double(config_.headDim);
  const double elementBytes = double(dtypeBytes(config_.storeType));
  double tokensTotal = 0;
  double pages = 0;
  for (int32_t layer = 0; layer < config_.layers; ++layer) {
    const int64_t tokens = this->tokens(layer);
    LayerStats layerStats;
    layerStats.tokensKept.assign(size_t(config_.kvHeads), tokens);
    if (kivi()) {
      const KiviLayerBytes bytes = kivi_.layerBytes(layer);
      layerStats.bytes = bytes.quantized + bytes.residual;
      stats.kvBytes += bytes.quantized;
      stats.residualBytes += bytes.residual;
    } else {
      layerStats.bytes = double(tokens) * double(config_.kvHeads) * 2.0 * rowElements * elementBytes;
      stats.kvBytes += layerStats.bytes;
      pages += double(store_.pageCount(layer));
    }
    stats.fullF16Bytes += double(tokens) * double(config_.kvHeads) * 2.0 * rowElements * 2.0;
    tokensTotal += double(tokens);
    stats.layers.push_back(std::move(layerStats));
  }
  stats.tokensSeen = tokensTotal / config_.layers;
  stats.tokensKept = stats.tokensSeen;
  stats.tokensLoaded = lastLoadedTokens_;
  if (kivi()) {
    // Page tables: a pointer per key page and per value page.
    stats.metaBytes = double(kivi_.pageCount()) * sizeof(void*);
    stats.allocatedBytes = kivi_.allocatedBytes();
    stats.sharedBytes = kivi_.sharedBytes();
  } else {
    // Page tables: a key and a value pointer per page.
    stats.metaBytes = pages * 2.0 * sizeof(void*);
    stats.allocatedBytes = pages * double(store_.bytesPerPage());
    stats.sharedBytes = double(store_.sharedPageCount()) * double(store_.bytesPerPage());
  }
  stats.times = times_;
  return stats;
}

}  // namespace kvslim
