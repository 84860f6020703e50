#include "kv_cache.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <new>
#include <string>

#include "environment.h"
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
  shape.format.keyOutliers = int32_t(std::round(config.kiviOutliers * double(config.kiviGroup) * double(config.headDim)));
  shape.format.valueOutliers = int32_t(std::round(config.kiviOutliers * double(config.headDim)));
  shape.residual = config.kiviResidual;
  const int64_t tokens = std::max<int64_t>(config.pageTokens, 256);
  shape.pageTokens = (tokens + config.kiviGroup - 1) / config.kiviGroup * config.kiviGroup;
  shape.threads = config.threads;
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
  if (!(config.kiviOutliers >= 0.0 && config.kiviOutliers <= 1.0)) {
    return Status(ErrorCode::Option, "policy.store.outliers must be a fraction in [0, 1], but received " +
                                         std::to_string(config.kiviOutliers));
  }
  // Key outliers store a uint16 flat index t * headDim + c within their group.
  if (config.kiviOutliers > 0.0 && int64_t(config.kiviGroup) * int64_t(config.headDim) > 65536) {
    return Status(ErrorCode::Option, "policy.store.outliers needs group * headDim <= 65536 (uint16 outlier indices), but "
                                     "group * headDim = " + std::to_string(int64_t(config.kiviGroup) * config.headDim));
  }
  if (config.kiviPreRope && !(config.rope.theta > 0.0f && std::isfinite(config.rope.theta))) {
    return Status(ErrorCode::Option, "policy.store.preRope needs the cache's rope option (rope.theta > 0)");
  }
  return Status::ok();
}

// KIVI quantizes keys in groups of tokens, so it holds what a policy keeps when the policy stops
// evicting (SnapKV and PyramidKV select once, at prefill, from f16 tokens), evicts one contiguous
// run per head (streaming and duo: a hole the attention skips, KiviStore::setHole), or flags the
// single tokens it evicts until the layer is compacted (H2O, on a backend that masks them).
Status checkKiviSelect(const CacheConfig& config, const Backend& backend) {
  const SelectKind kind = config.select.kind;
  const bool windowed = kind == SelectKind::Streaming || kind == SelectKind::Duo;
  if (kind != SelectKind::SnapKV && kind != SelectKind::PyramidKV && kind != SelectKind::H2O && !windowed) {
    return Status(ErrorCode::Option,
                  "policy.select (" + std::string(selectKindName(kind)) +
                      ") cannot be combined with store 'kivi': only snapkv and pyramidkv (which select once at prefill, "
                      "before the kept tokens are quantized), streaming and duo (whose windows evict one run of tokens per "
                      "head) and h2o (whose evictions attention masks until the layer is compacted) can; a policy that "
                      "loads single tokens anywhere needs a dense store");
  }
  if (kind == SelectKind::H2O && !backend.fusesKiviMass()) {
    return Status(ErrorCode::Option, std::string("policy.select 'h2o' over store 'kivi' needs device 'cpu': the ") +
                                         backend.name() + " backend does not yet mask single quantized tokens");
  }
  if (config.select.cachePositions) {
    return Status(ErrorCode::Option, "policy.select.positions 'cache' cannot be combined with store 'kivi'");
  }
  if (config.kiviPreRope && !windowed) {
    return Status(ErrorCode::Option, "policy.store.preRope cannot be combined with policy.select " +
                                         std::string(selectKindName(kind)) +
                                         ": pre-RoPE keys are rotated by their index in the store, which eviction changes");
  }
  return Status::ok();
}
}  // namespace

KVCache::KVCache(const CacheConfig& config, std::shared_ptr<Backend> backend)
    : config_(config),
      backend_(backend),
      store_(backend, storeShape(config)),
      kivi_(backend, config.storeKind == StoreKind::Kivi ? kiviShape(config) : KiviStoreShape{}),
      kiviOffset_(size_t(config.layers), 0) {}

namespace {

// out = the softmax-weighted mix of two attention results over disjoint token sets, from each
// row's log2 denominator (AttentionArgs::lse).
void mergeByLse(float* out, const float* outLse, const float* other, const float* otherLse, size_t rows, size_t dim) {
  for (size_t r = 0; r < rows; ++r) {
    const float high = std::max(outLse[r], otherLse[r]);
    if (!std::isfinite(high)) continue;  // the row saw nothing in either part
    const float a = std::exp2(outLse[r] - high), b = std::exp2(otherLse[r] - high);
    const float inverse = 1.0f / (a + b);
    float* o = out + r * dim;
    const float* k = other + r * dim;
    for (size_t d = 0; d < dim; ++d) o[d] = (o[d] * a + k[d] * b) * inverse;
  }
}

// Several head views (or single tokens of them) gathered into one view per head with one row
// pointer per token (pageTokens = 1): one attention call over tokens of different segments, no copy.
class GatheredHeads {
 public:
  GatheredHeads(size_t heads, int64_t pageTokens, size_t rowBytes)
      : keys_(heads), values_(heads), views_(heads), pageTokens_(pageTokens), rowBytes_(rowBytes) {}
  // Tokens [first, first + count) of `view` join head h.
  void add(size_t h, const KVHeadView& view, int64_t first, int64_t count) {
    for (int64_t t = first; t < first + count; ++t) {
      const int64_t row = view.firstRow + t;
      const size_t offset = size_t(row % pageTokens_) * rowBytes_;
      keys_[h].push_back(static_cast<const uint8_t*>(view.keyPages[row / pageTokens_]) + offset);
      values_[h].push_back(static_cast<const uint8_t*>(view.valuePages[row / pageTokens_]) + offset);
    }
  }
  // The views (valid while this object lives and no more tokens are added).
  const KVHeadView* views() {
    for (size_t h = 0; h < views_.size(); ++h) {
      views_[h].keyPages = keys_[h].data();
      views_[h].valuePages = values_[h].data();
      views_[h].tokens = int64_t(keys_[h].size());
      views_[h].firstRow = 0;
    }
    return views_.data();
  }

 private:
  std::vector<std::vector<const void*>> keys_, values_;
  std::vector<KVHeadView> views_;
  int64_t pageTokens_;
  size_t rowBytes_;
};

}  // namespace

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
  std::unique_ptr<SelectPolicy> policy;
  KVSLIM_RETURN_IF_ERROR(makeSelectPolicy(config.select, config.layers, config.kvHeads, config.headDim, &policy));
  if (config.select.cachePositions && (config.select.kind != SelectKind::Streaming || !(config.rope.theta > 0.0f))) {
    return Status(ErrorCode::Option, "policy.select.positions 'cache' needs a streaming policy and the cache's rope option");
  }
  if (config.headDim % 2 != 0 && config.rope.theta > 0.0f) return Status(ErrorCode::Option, "rope needs an even headDim");
  if (policy && config.storeKind == StoreKind::Kivi) KVSLIM_RETURN_IF_ERROR(checkKiviSelect(config, *backend));
  CacheConfig resolved = config;
  if (resolved.scale == 0.0f) resolved.scale = 1.0f / std::sqrt(float(config.headDim));
  out->reset(new KVCache(resolved, std::move(backend)));
  if (policy && policy->loads()) (*out)->loaded_.resize(size_t(config.layers) * size_t(config.kvHeads));
  // A policy that selects before quantizing keeps each layer dense until it settles; window
  // policies leave holes in a KIVI layer from its first token.
  if (policy && config.storeKind == StoreKind::Kivi && !policy->windowed()) {
    (*out)->kiviOffset_.assign(size_t(config.layers), -1);
    (*out)->kiviPositions_.resize(size_t(config.layers) * size_t(config.kvHeads));
  }
  (*out)->policy_ = std::move(policy);
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

Status KVCache::truncate(int32_t layer, int64_t tokens) {
  KVSLIM_RETURN_IF_ERROR(checkLayer(layer));
  if (policy_ || config_.storeKind != StoreKind::Dense) {
    return Status(ErrorCode::Option,
                  "truncate needs policy.select 'full' and a dense store (f32, f16 or bf16): this cache's select is '" +
                      std::string(selectKindName(config_.select.kind)) + "'" +
                      (config_.storeKind == StoreKind::Kivi ? " over store 'kivi'" : "") +
                      ", whose state (evictions, indexes, quantized groups) already holds the newest tokens; fork the "
                      "cache before the tokens instead and drop the fork");
  }
  if (tokens < 0 || tokens > this->tokens(layer)) {
    return Status(ErrorCode::Shape, "tokens must be in [0, " + std::to_string(this->tokens(layer)) + "] (layer " +
                                        std::to_string(layer) + "'s tokens), but received " + std::to_string(tokens));
  }
  store_.truncate(layer, tokens);
  return Status::ok();
}

Status KVCache::append(int32_t layer, const HostTensor& k, const HostTensor& v) {
  KVSLIM_RETURN_IF_ERROR(checkLayer(layer));
  int64_t n = 0;
  KVSLIM_RETURN_IF_ERROR(checkKV(k, v, &n));
  try {
    KVSLIM_RETURN_IF_ERROR(stageTokens(layer, k, v, n));
    KVSLIM_RETURN_IF_ERROR(flushLayer(layer));
    return afterAttend(layer, nullptr, n, false);
  } catch (const std::bad_alloc&) {
    return Status(ErrorCode::OutOfMemory, "out of host memory appending " + std::to_string(n) + " tokens");
  }
}

Status KVCache::stageTokens(int32_t layer, const HostTensor& k, const HostTensor& v, int64_t n) {
  if (inKivi(layer)) {
    KVSLIM_RETURN_IF_ERROR(kivi_.stage(layer, k, v, n));
    return growHoles(layer, n);
  }
  KVSLIM_RETURN_IF_ERROR(store_.append(layer, k, v, n));
  if (!policy_) return Status::ok();
  SelectContext context = selectContext();
  return policy_->beforeAttend(context, layer, n);
}

SelectContext KVCache::selectContext() {
  return SelectContext{store_, *backend_, config_.layers, config_.qHeads, config_.kvHeads, config_.headDim, config_.scale,
                       config_.threads};
}

Status KVCache::growHoles(int32_t layer, int64_t n) {
  if (!policy_ || !policy_->windowed()) return Status::ok();
  const int64_t tokens = kivi_.tokens(layer);
  for (int32_t h = 0; h < config_.kvHeads; ++h) {
    int64_t sink = 0, window = 0;
    if (!policy_->windowOf(layer, h, &sink, &window)) continue;
    const int64_t end = tokens - policy_->attendWindow(window, n);
    if (end > sink) KVSLIM_RETURN_IF_ERROR(kivi_.setHole(layer, h, sink, end));
  }
  return Status::ok();
}

int64_t KVCache::kiviKept(int32_t layer, int32_t head) const {
  return kivi_.tokens(layer) - kivi_.hole(layer, head).size() - (policy_ ? policy_->evictedCount(layer) : 0);
}

Status KVCache::afterAttend(int32_t layer, const float* q, int64_t n, bool prefill) {
  if (!policy_) return Status::ok();
  if (inKivi(layer)) {
    // A KIVI layer is settled, a window policy's (its windows shrink back to `window`) or H2O's
    // (it flags what it evicts, and compactKivi drops the flagged rows: compactionDue).
    const auto start = std::chrono::steady_clock::now();
    Status status = growHoles(layer, 0);
    if (status.isOk() && policy_->evictsInKivi()) {
      std::vector<double> mass;
      if (massLayer_ == layer && q != nullptr) mass.swap(mass_);
      massLayer_ = -1;
      const int64_t tokens = kivi_.tokens(layer);
      status = policy_->afterAppendKivi(layer, tokens, mass.empty() ? nullptr : mass.data(),
                                        mass.empty() ? 0 : int64_t(mass.size()) / config_.kvHeads);
      if (status.isOk() && compactionDue(layer, n)) status = compactKivi(layer);
    }
    times_.compressMs += millisecondsSince(start);
    return status;
  }
  const auto start = std::chrono::steady_clock::now();
  SelectContext context = selectContext();
  std::vector<double> mass;  // the attention's mass, consumed by this call
  if (massLayer_ == layer && q != nullptr) {
    mass.swap(mass_);
    context.mass = mass.data();
    context.massStride = int64_t(mass.size()) / config_.kvHeads;
  }
  massLayer_ = -1;
  Status status = policy_->afterAppend(context, layer, q, n, prefill);
  // KIVI: the layer moves once the policy has settled it, or when decoding starts (SnapKV selects
  // at prefill only, so a layer decoded before any prefill keeps every token). H2O goes on over
  // KIVI from its first call with queries, so the quantization lands in the prefill, not in the
  // first decode step.
  const bool moves = policy_->settled(layer) || (q != nullptr && (!prefill || policy_->evictsInKivi()));
  if (status.isOk() && kivi() && moves) status = moveToKivi(layer);
  // A loading policy's work after an append is indexing.
  (policy_->loads() ? times_.indexBuildMs : times_.compressMs) += millisecondsSince(start);
  return status;
}

std::vector<int64_t> KVCache::keptPositions(int32_t layer, int32_t head) const {
  std::vector<int64_t> positions;
  if (inKivi(layer)) {
    if (!kiviPositions_.empty()) positions = kiviPositions_[size_t(layer) * size_t(config_.kvHeads) + size_t(head)];
    const KiviStore::Hole hole = kivi_.hole(layer, head);
    for (int64_t t = int64_t(positions.size()); t < kivi_.tokens(layer); ++t) {
      if (t < hole.begin || t >= hole.end) positions.push_back(t + kiviOffset_[size_t(layer)]);
    }
    // H2O's flagged tokens (a policy without holes: positions[t] is KIVI index t).
    const std::vector<uint8_t>* evicted = policy_ ? policy_->evictedFlags(layer, head) : nullptr;
    if (evicted != nullptr) {
      size_t kept = 0;
      for (size_t t = 0; t < positions.size(); ++t) {
        if (t >= evicted->size() || (*evicted)[t] == 0) positions[kept++] = positions[t];
      }
      positions.resize(kept);
    }
    return positions;
  }
  positions = store_.keptPositions(layer, head);
  for (int64_t t = 0; t < store_.tailTokens(layer, head); ++t) positions.push_back(store_.tailFirstPosition(layer, head) + t);
  std::sort(positions.begin(), positions.end());
  return positions;
}

std::vector<int64_t> KVCache::loadedPositions(int32_t layer, int32_t head) const {
  if (!loaded_.empty()) {
    const std::vector<int64_t>& loaded = loaded_[size_t(layer) * size_t(config_.kvHeads) + size_t(head)];
    if (!loaded.empty()) return loaded;
  }
  return keptPositions(layer, head);
}

Status KVCache::flushLayer(int32_t layer) {
  if (!inKivi(layer)) return Status::ok();
  const auto start = std::chrono::steady_clock::now();
  const Status flushed = kivi_.flush(layer);
  times_.compressMs += millisecondsSince(start);
  return flushed;
}

Status KVCache::attendChecked(int32_t layer, const float* q, int64_t n, float* out, Call call) {
  massLayer_ = -1;
  const int64_t tokens = this->tokens(layer);
  if (n > tokens) {
    return Status(ErrorCode::Shape, "attend needs at least as many tokens in layer " + std::to_string(layer) +
                                        " as queries (causal), but the layer holds " + std::to_string(tokens) +
                                        " tokens and q holds " + std::to_string(n) + " queries");
  }
  if (inKivi(layer)) {
    double kept = 0;
    for (int32_t h = 0; h < config_.kvHeads; ++h) {
      // A window policy's queries must lie after its hole (as over a dense store, below).
      const KiviStore::Hole hole = kivi_.hole(layer, h);
      const int64_t recent = tokens - hole.end;
      if (hole.size() > 0 && recent < n) {
        return Status(ErrorCode::Shape, "q holds " + std::to_string(n) + " queries, but the selection policy keeps only the last " +
                                            std::to_string(recent) + " tokens of layer " + std::to_string(layer) +
                                            " in order (the queries must be among them)");
      }
      kept += double(kiviKept(layer, h));
    }
    lastLoadedTokens_ = kept / config_.kvHeads;
    return attendKivi(layer, q, n, out, call);
  }
  if (policy_ && policy_->loads()) {
    bool done = false;
    if (call != Call::Prefill) KVSLIM_RETURN_IF_ERROR(attendLoaded(layer, q, n, out, &done));
    if (done) return Status::ok();
    for (int32_t h = 0; h < config_.kvHeads; ++h) loaded_[size_t(layer) * size_t(config_.kvHeads) + size_t(h)].clear();
  }
  // Tail tokens attend causally; kept tokens (older than every tail token) are seen by every
  // query, so the queries must all lie in the tail.
  std::vector<KVHeadView> tails(size_t(config_.kvHeads)), kept(size_t(config_.kvHeads));
  bool anyKept = false;
  double loaded = 0;
  for (int32_t h = 0; h < config_.kvHeads; ++h) {
    tails[size_t(h)] = store_.tailView(layer, h);
    kept[size_t(h)] = store_.keptView(layer, h);
    anyKept = anyKept || kept[size_t(h)].tokens > 0;
    loaded += double(tails[size_t(h)].tokens + kept[size_t(h)].tokens);
    if (tails[size_t(h)].tokens < n) {
      return Status(ErrorCode::Shape, "q holds " + std::to_string(n) + " queries, but the selection policy keeps only the last " +
                                          std::to_string(tails[size_t(h)].tokens) + " tokens of layer " + std::to_string(layer) +
                                          " in order (the queries must be among them)");
    }
  }
  lastLoadedTokens_ = loaded / config_.kvHeads;
  AttentionArgs args = denseArgs(q, n, out, tails.data());
  // H2O: the attention sums each token's mass from the scores it computes anyway, where the
  // backend can in one call; otherwise H2O asks attentionMass.
  const int32_t massLayer = call != Call::Read && policy_ && policy_->wantsMass() && backend_->fusesMass() ? layer : -1;
  if (!anyKept) return attendOnce(args, massLayer);
  // Tail (causal) and kept segment (older than every query), merged by log-sum-exp.
  std::vector<float> rotated;
  const float* keptQ = q;
  if (config_.select.cachePositions) {
    // StreamingLLM 'cache' positions: the sinks see query i as if it sat at its cache slot
    // C = kept + (tail - n + i) instead of its absolute position P = tokens - n + i.
    const size_t dim = size_t(config_.headDim);
    const int32_t group = config_.qHeads / config_.kvHeads;
    rotated.assign(q, q + size_t(n) * size_t(config_.qHeads) * dim);
    for (int64_t i = 0; i < n; ++i) {
      for (int32_t h = 0; h < config_.qHeads; ++h) {
        const KVHeadView& tail = tails[size_t(h / group)];
        const double slot = double(kept[size_t(h / group)].tokens + tail.tokens - n + i);
        const double position = double(tokens - n + i);
        rotateRow(rotated.data() + (size_t(i) * size_t(config_.qHeads) + size_t(h)) * dim, config_.headDim, slot - position,
                  config_.rope);
      }
    }
    keptQ = rotated.data();
  }
  return attendMerged(args, kept.data(), config_.pageTokens, keptQ, massLayer);
}

Status KVCache::attendOnce(AttentionArgs args, int32_t massLayer) {
  if (massLayer >= 0) {
    // Kept (older) tokens first, then the rest: AttentionArgs::mass.
    int64_t stride = 0;
    for (int32_t h = 0; h < args.kvHeads; ++h) {
      stride = std::max(stride, args.heads[h].tokens + (args.olderHeads != nullptr ? args.olderHeads[h].tokens : 0));
    }
    mass_.assign(size_t(args.kvHeads) * size_t(stride), 0.0);
    args.mass = mass_.data();
    args.massStride = stride;
  }
  KVSLIM_RETURN_IF_ERROR(backend_->attention(args));
  if (massLayer >= 0) massLayer_ = massLayer;
  return Status::ok();
}

Status KVCache::attendMerged(AttentionArgs first, const KVHeadView* older, int64_t olderPageTokens, const float* olderQ,
                             int32_t massLayer) {
  first.olderHeads = older;
  first.olderPageTokens = olderPageTokens;
  first.olderQ = olderQ;
  // Asked with the mass when the call wants it: a backend may join some calls only with it.
  AttentionArgs asked = first;
  double probe = 0;  // joinsOlder reads no memory: any non-null address says "with the mass"
  if (massLayer >= 0) asked.mass = &probe;
  if (backend_->joinsOlder(asked)) return attendOnce(first, massLayer);
  first.olderHeads = nullptr;
  first.olderQ = nullptr;
  if (massLayer >= 0 && olderQ == first.q && olderPageTokens == first.pageTokens && first.causal) {
    // H2O on a backend that sums the mass within one call but does not join (CUDA): the older
    // tokens, then the others, as one view of row pointers. Older tokens precede every query, so
    // the causal mask shows them to every row, as the merge would; the mass columns come in
    // the order attendOnce promises. One call instead of two and a separate mass op per kv head.
    const size_t heads = size_t(first.kvHeads);
    GatheredHeads joined(heads, first.pageTokens, size_t(first.rowStride) * dtypeBytes(first.kvType));
    for (size_t h = 0; h < heads; ++h) {
      joined.add(h, older[h], 0, older[h].tokens);
      joined.add(h, first.heads[h], 0, first.heads[h].tokens);
    }
    first.heads = joined.views();
    first.pageTokens = 1;
    return attendOnce(first, massLayer);
  }
  const size_t rows = size_t(first.n) * size_t(first.qHeads);
  const size_t dim = size_t(first.headDim);
  std::vector<float> firstLse(rows), olderOut(rows * dim), olderLse(rows);
  first.lse = firstLse.data();
  KVSLIM_RETURN_IF_ERROR(backend_->attention(first));
  AttentionArgs second = first;
  second.q = olderQ;
  second.heads = older;
  second.pageTokens = olderPageTokens;
  second.causal = false;
  second.out = olderOut.data();
  second.lse = olderLse.data();
  KVSLIM_RETURN_IF_ERROR(backend_->attention(second));
  mergeByLse(first.out, firstLse.data(), olderOut.data(), olderLse.data(), rows, dim);
  return Status::ok();
}

AttentionArgs KVCache::denseArgs(const float* q, int64_t n, float* out, const KVHeadView* heads) const {
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
  args.heads = heads;
  args.causal = true;
  args.scale = config_.scale;
  args.threads = config_.threads;
  return args;
}

Status KVCache::attendLoaded(int32_t layer, const float* q, int64_t n, float* out, bool* done) {
  *done = false;
  const int64_t tokens = store_.tokens(layer);
  const auto start = std::chrono::steady_clock::now();
  LoadPlan plan;
  SelectContext context = selectContext();
  KVSLIM_RETURN_IF_ERROR(policy_->planLoad(context, layer, q, n, &plan));
  times_.indexBuildMs += plan.indexMs;
  times_.retrieveMs += millisecondsSince(start) - plan.indexMs;
  // Dense when everything is static or the queries reach outside the window.
  if (plan.tokens.empty() || tokens <= plan.sink + plan.window || n > plan.window) return Status::ok();
  const int32_t kvHeads = config_.kvHeads;
  // The window as a suffix of each tail; sinks and loaded tokens gathered by row pointers.
  const size_t heads = static_cast<size_t>(kvHeads);
  std::vector<KVHeadView> windows(heads);
  GatheredHeads gathered(heads, config_.pageTokens, size_t(config_.headDim) * dtypeBytes(config_.storeType));
  double loadedTotal = 0;
  for (int32_t h = 0; h < kvHeads; ++h) {
    const KVHeadView tail = store_.tailView(layer, h);
    if (tail.tokens != tokens) return Status(ErrorCode::Internal, "a loading policy found evicted tokens");
    windows[size_t(h)] = store_.tailRange(layer, h, tokens - plan.window, plan.window);
    std::vector<int64_t>& positions = loaded_[size_t(layer) * size_t(kvHeads) + size_t(h)];
    positions.clear();
    for (int64_t t = 0; t < plan.sink; ++t) positions.push_back(t);
    int64_t previous = plan.sink - 1;
    for (const int64_t t : plan.tokens[size_t(h)]) {
      if (t <= previous || t >= tokens - plan.window) {
        return Status(ErrorCode::Internal, "a loading policy chose token " + std::to_string(t) + " outside the dynamic part or twice");
      }
      positions.push_back(t);
      previous = t;
    }
    for (const int64_t t : positions) gathered.add(size_t(h), tail, t, 1);
    loadedTotal += double(positions.size() + size_t(plan.window));
    for (int64_t t = tokens - plan.window; t < tokens; ++t) positions.push_back(t);
  }
  lastLoadedTokens_ = loadedTotal / kvHeads;
  KVSLIM_RETURN_IF_ERROR(attendMerged(denseArgs(q, n, out, windows.data()), gathered.views(), 1, q));
  *done = true;
  return Status::ok();
}

Status KVCache::moveToKivi(int32_t layer) {
  const int32_t kvHeads = config_.kvHeads;
  const int64_t count = store_.keptTokens(layer, 0) + store_.tailTokens(layer, 0);
  for (int32_t h = 1; h < kvHeads; ++h) {
    if (store_.keptTokens(layer, h) + store_.tailTokens(layer, h) != count) {
      return Status(ErrorCode::Internal, "a KIVI store needs as many kept tokens in every kv head of a layer");
    }
  }
  // Each head's kept rows, in position order (kept slots need not be: H2O overwrites them), become
  // the image a KIVI layer of `count` tokens holds after its flush, built straight from the rows:
  // no f16 staging of the whole layer first. order[h][i]: the store index (kept slots, then the
  // tail) of KIVI index i.
  std::vector<std::vector<int64_t>> order(static_cast<size_t>(kvHeads));
  for (int32_t h = 0; h < kvHeads; ++h) {
    const std::vector<int64_t>& kept = store_.keptPositions(layer, h);
    std::vector<int64_t>& indexes = order[size_t(h)];
    for (int64_t i = 0; i < count; ++i) indexes.push_back(i);
    std::stable_sort(indexes.begin(), indexes.begin() + std::ptrdiff_t(kept.size()),
                     [&](int64_t a, int64_t b) { return kept[size_t(a)] < kept[size_t(b)]; });
  }
  std::vector<KiviStore::HeadImage> images(static_cast<size_t>(kvHeads));
  std::vector<Status> built(static_cast<size_t>(kvHeads));
  backend_->hostParallel(kvHeads, config_.threads, [&](int64_t task) {
    const int32_t h = int32_t(task);
    try {
      const size_t elements = size_t(count) * size_t(config_.headDim);
      const size_t rowBytes = size_t(config_.headDim) * dtypeBytes(config_.storeType);
      const int64_t kept = store_.keptTokens(layer, h), tail = store_.tailTokens(layer, h);
      std::vector<uint8_t> keys(size_t(count) * rowBytes), values(keys.size());
      std::vector<uint16_t> keyHalves(elements), valueHalves(elements);
      Status status = store_.readKeptRows(layer, h, 0, kept, keys.data(), values.data());
      if (status.isOk()) {
        status = store_.readRows(layer, h, 0, tail, keys.data() + size_t(kept) * rowBytes, values.data() + size_t(kept) * rowBytes);
      }
      const size_t dim = size_t(config_.headDim);
      for (int64_t i = 0; i < count && status.isOk(); ++i) {
        const size_t from = size_t(order[size_t(h)][size_t(i)]);
        status = convertChecked(HostTensor{keys.data(), config_.storeType, elements}, from * dim, dim,
                                keyHalves.data() + size_t(i) * dim, DType::F16, "stored keys");
        if (status.isOk()) {
          status = convertChecked(HostTensor{values.data(), config_.storeType, elements}, from * dim, dim,
                                  valueHalves.data() + size_t(i) * dim, DType::F16, "stored values");
        }
      }
      if (status.isOk()) status = kivi_.imageOf(keyHalves.data(), valueHalves.data(), count, &images[size_t(h)]);
      built[size_t(h)] = status;
    } catch (const std::bad_alloc&) {
      built[size_t(h)] = Status(ErrorCode::OutOfMemory, "out of host memory moving a layer into the KIVI store");
    }
  });
  for (const Status& status : built) KVSLIM_RETURN_IF_ERROR(status);
  for (int32_t h = 0; h < kvHeads; ++h) KVSLIM_RETURN_IF_ERROR(kivi_.writeHead(layer, h, count, images[size_t(h)]));
  kiviOffset_[size_t(layer)] = store_.tokens(layer) - count;
  for (int32_t h = 0; h < kvHeads; ++h) {
    std::vector<int64_t> stored = store_.keptPositions(layer, h);
    for (int64_t t = 0; t < store_.tailTokens(layer, h); ++t) stored.push_back(store_.tailFirstPosition(layer, h) + t);
    std::vector<int64_t>& positions = kiviPositions_[size_t(layer) * size_t(kvHeads) + size_t(h)];
    positions.clear();
    for (const int64_t i : order[size_t(h)]) positions.push_back(stored[size_t(i)]);
  }
  store_.clearLayer(layer);
  return policy_->enterKivi(layer, order);
}

// A compaction requantizes a whole layer, so it waits for many flags: at most due = max(residual,
// budget / 8) per head, and from due / 2 at the first multiple of due / 2 tokens past the layer's
// phase (layer x (due / 2) / layers). One decode step per token flags one token per head, so the
// layers compact in turn, a few per step, instead of all in the same step.
bool KVCache::compactionDue(int32_t layer, int64_t n) const {
  const int64_t flagged = policy_->evictedCount(layer);
  const int64_t due = std::max<int64_t>(config_.kiviResidual, config_.select.budget / 8);
  const int64_t period = std::max<int64_t>(1, due / 2);
  const int64_t phase = int64_t(layer) * period / config_.layers;
  const int64_t after = tokens(layer) + phase, before = after - n;
  return flagged >= due || (flagged >= period && after / period > before / period);
}

Status KVCache::compactKivi(int32_t layer) {
  const int32_t kvHeads = config_.kvHeads;
  const int64_t tokens = kivi_.tokens(layer);
  const int64_t count = tokens - policy_->evictedCount(layer);
  // Each head's unflagged rows, as attention reads them, become the image of a layer of `count`
  // tokens by the flush rules. Records of the tokens before the head's first flag (whose indexes
  // do not change) are copied; the rest are requantized from their dequantized rows: a value record
  // (per token) gets back its codes, keys regroup with other survivors.
  std::vector<KiviStore::HeadImage> images(static_cast<size_t>(kvHeads));
  std::vector<Status> built(static_cast<size_t>(kvHeads));
  backend_->hostParallel(kvHeads, config_.threads, [&](int64_t task) {
    const int32_t h = int32_t(task);
    try {
      const std::vector<uint8_t>* evicted = policy_->evictedFlags(layer, h);
      const size_t dim = size_t(config_.headDim);
      std::vector<uint16_t> keys(size_t(tokens) * dim), values(keys.size());
      KiviStore::HeadImage image;
      Status status = kivi_.readHead(layer, h, &image);
      if (status.isOk()) status = kivi_.rowsOf(image, tokens, keys.data(), values.data());
      if (status.isOk() && (evicted == nullptr || int64_t(evicted->size()) != tokens)) {
        status = Status(ErrorCode::Internal, "h2o's eviction flags do not cover the KIVI layer");
      }
      // Tokens before the head's first flag keep their indexes: their records are copied.
      int64_t unflagged = 0;
      while (status.isOk() && unflagged < tokens && (*evicted)[size_t(unflagged)] == 0) ++unflagged;
      int64_t kept = 0;
      for (int64_t t = 0; t < tokens && status.isOk(); ++t) {
        if ((*evicted)[size_t(t)] != 0) continue;
        std::copy_n(keys.begin() + std::ptrdiff_t(size_t(t) * dim), dim, keys.begin() + std::ptrdiff_t(size_t(kept) * dim));
        std::copy_n(values.begin() + std::ptrdiff_t(size_t(t) * dim), dim, values.begin() + std::ptrdiff_t(size_t(kept) * dim));
        ++kept;
      }
      if (status.isOk() && kept != count) status = Status(ErrorCode::Internal, "h2o flagged unequal counts in a KIVI layer");
      if (status.isOk()) status = kivi_.imageOf(keys.data(), values.data(), count, &images[size_t(h)], &image, unflagged);
      built[size_t(h)] = status;
    } catch (const std::bad_alloc&) {
      built[size_t(h)] = Status(ErrorCode::OutOfMemory, "out of host memory compacting a KIVI layer");
    }
  });
  for (const Status& status : built) KVSLIM_RETURN_IF_ERROR(status);
  // Positions follow: every unflagged token's, in index order.
  std::vector<std::vector<int64_t>> positions(static_cast<size_t>(kvHeads));
  for (int32_t h = 0; h < kvHeads; ++h) positions[size_t(h)] = keptPositions(layer, h);
  for (int32_t h = 0; h < kvHeads; ++h) KVSLIM_RETURN_IF_ERROR(kivi_.writeHead(layer, h, count, images[size_t(h)]));
  kiviOffset_[size_t(layer)] += tokens - count;
  for (int32_t h = 0; h < kvHeads; ++h) kiviPositions_[size_t(layer) * size_t(kvHeads) + size_t(h)] = std::move(positions[size_t(h)]);
  policy_->compactKivi(layer);
  return Status::ok();
}

Status KVCache::attendKivi(int32_t layer, const float* q, int64_t n, float* out, Call call) {
  std::vector<KiviHeadView> heads(size_t(config_.kvHeads));
  const bool evicting = policy_ && policy_->evictsInKivi();
  for (int32_t h = 0; h < config_.kvHeads; ++h) {
    heads[size_t(h)] = kivi_.view(layer, h);
    const std::vector<uint8_t>* evicted = evicting ? policy_->evictedFlags(layer, h) : nullptr;
    if (evicted != nullptr && !evicted->empty()) {
      heads[size_t(h)].evicted = evicted->data();
      heads[size_t(h)].evictedTokens = int64_t(evicted->size());
    }
  }
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
  args.preRope = config_.kiviPreRope;
  if (args.preRope) args.rope = config_.rope;
  if (!evicting || call == Call::Read) return backend_->kiviAttention(args);
  // H2O: the call's mass, in query chunks whose captured scores (rows x tokens floats) stay
  // within 64 MiB; query i of a chunk sees what query first + i of the call sees.
  // KVSLIM_KIVI_MASS_FLOATS (read once) replaces the budget: tests chunk short prompts with a small one.
  static const int64_t captureFloats = environmentInteger("KVSLIM_KIVI_MASS_FLOATS", int64_t(1) << 24, 1);
  const int64_t tokens = kivi_.tokens(layer);
  const int64_t chunk = std::max<int64_t>(1, captureFloats / std::max<int64_t>(1, int64_t(config_.qHeads) * tokens));
  mass_.assign(size_t(config_.kvHeads) * size_t(tokens), 0.0);
  std::vector<double> part(chunk < n ? mass_.size() : 0);
  const size_t row = size_t(config_.qHeads) * size_t(config_.headDim);
  for (int64_t first = 0; first < n; first += chunk) {
    const int64_t count = std::min(chunk, n - first);
    KiviAttentionArgs call = args;
    std::vector<KiviHeadView> seen = heads;
    for (KiviHeadView& head : seen) head.tokens = tokens - (n - first - count);
    call.heads = seen.data();
    call.q = q + size_t(first) * row;
    call.out = out + size_t(first) * row;
    call.n = int32_t(count);
    call.mass = part.empty() ? mass_.data() : part.data();
    call.massStride = tokens;
    KVSLIM_RETURN_IF_ERROR(backend_->kiviAttention(call));
    if (!part.empty()) {
      // A chunk's mass covers its heads' tokens only; the rest of each row is stale: add per head.
      for (int32_t h = 0; h < config_.kvHeads; ++h) {
        for (int64_t t = 0; t < seen[size_t(h)].tokens; ++t) mass_[size_t(h) * size_t(tokens) + size_t(t)] += part[size_t(h) * size_t(tokens) + size_t(t)];
      }
    }
  }
  massLayer_ = layer;
  return Status::ok();
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
    KVSLIM_RETURN_IF_ERROR(attendChecked(layer, query, n, out, Call::Read));
  } catch (const std::bad_alloc&) {
    return Status(ErrorCode::OutOfMemory, "out of host memory in attend");
  }
  times_.decodeMs += millisecondsSince(start);
  return Status::ok();
}

Status KVCache::appendAndAttend(int32_t layer, const HostTensor& q, const HostTensor& k, const HostTensor& v,
                                float* out, size_t outCount, Call call) {
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
    const Status attended = attendChecked(layer, query, n, out, call);
    const Status flushed = flushLayer(layer);
    KVSLIM_RETURN_IF_ERROR(attended);
    KVSLIM_RETURN_IF_ERROR(flushed);
    KVSLIM_RETURN_IF_ERROR(afterAttend(layer, query, n, call == Call::Prefill));
  } catch (const std::bad_alloc&) {
    return Status(ErrorCode::OutOfMemory, "out of host memory in step/prefill");
  }
  (call == Call::Prefill ? times_.prefillMs : times_.decodeMs) += millisecondsSince(start);
  return Status::ok();
}

Status KVCache::step(int32_t layer, const HostTensor& q, const HostTensor& k, const HostTensor& v, float* out,
                     size_t outCount) {
  return appendAndAttend(layer, q, k, v, out, outCount, Call::Decode);
}

Status KVCache::prefill(int32_t layer, const HostTensor& q, const HostTensor& k, const HostTensor& v, float* out,
                        size_t outCount) {
  return appendAndAttend(layer, q, k, v, out, outCount, Call::Prefill);
}

std::unique_ptr<KVCache> KVCache::fork() const {
  std::unique_ptr<KVCache> child(new KVCache(config_, backend_));
  child->store_ = store_.fork();
  child->kivi_ = kivi_.fork();
  if (policy_) child->policy_ = policy_->clone();
  child->times_ = times_;
  child->lastLoadedTokens_ = lastLoadedTokens_;
  child->loaded_ = loaded_;
  child->kiviOffset_ = kiviOffset_;
  child->kiviPositions_ = kiviPositions_;
  return child;
}

CacheStatsData KVCache::stats() const {
  CacheStatsData stats;
  const double rowElements = double(config_.headDim);
  const double elementBytes = double(dtypeBytes(config_.storeType));
  double tokensTotal = 0;
  double keptTotal = 0;  // mean over kv heads, summed over layers
  double pages = 0;
  for (int32_t layer = 0; layer < config_.layers; ++layer) {
    const int64_t tokens = this->tokens(layer);
    LayerStats layerStats;
    layerStats.tokensKept.assign(size_t(config_.kvHeads), tokens);
    if (inKivi(layer)) {
      const KiviLayerBytes bytes = kivi_.layerBytes(layer);
      double kept = 0;
      for (int32_t h = 0; h < config_.kvHeads; ++h) {
        layerStats.tokensKept[size_t(h)] = kiviKept(layer, h);
        kept += double(layerStats.tokensKept[size_t(h)]);
      }
      layerStats.bytes = bytes.quantized + bytes.residual;
      stats.kvBytes += bytes.quantized;
      stats.residualBytes += bytes.residual;
      keptTotal += kept / config_.kvHeads;
    } else {
      double kept = 0;
      for (int32_t h = 0; h < config_.kvHeads; ++h) {
        layerStats.tokensKept[size_t(h)] = store_.keptTokens(layer, h) + store_.tailTokens(layer, h);
        kept += double(layerStats.tokensKept[size_t(h)]);
      }
      layerStats.bytes = kept * 2.0 * rowElements * elementBytes;
      stats.kvBytes += layerStats.bytes;
      keptTotal += kept / config_.kvHeads;
      pages += double(store_.pageCount(layer));
    }
    stats.fullF16Bytes += double(tokens) * double(config_.kvHeads) * 2.0 * rowElements * 2.0;
    tokensTotal += double(tokens);
    stats.layers.push_back(std::move(layerStats));
  }
  stats.tokensSeen = tokensTotal / config_.layers;
  stats.tokensKept = keptTotal / config_.layers;
  stats.tokensLoaded = lastLoadedTokens_;
  // Page tables: a key and a value pointer per dense page, a pointer per KIVI key or value page.
  // (A KIVI cache holds dense pages only for layers a selection policy has not settled yet.)
  stats.metaBytes = pages * 2.0 * sizeof(void*) + double(kivi_.pageCount()) * sizeof(void*);
  stats.allocatedBytes = pages * double(store_.bytesPerPage()) + kivi_.allocatedBytes();
  stats.sharedBytes = double(store_.sharedPageCount()) * double(store_.bytesPerPage()) + kivi_.sharedBytes();
  stats.times = times_;
  if (policy_) stats.indexBytes = double(policy_->indexBytes());
  return stats;
}

}  // namespace kvslim
