#include "cache_wrap.h"

#include <algorithm>
#include <string>
#include <unordered_set>
#include <vector>

#include "addon_data.h"
#include "async_ops.h"
#include "convert.h"
#include "errors.h"

namespace kvslim::napi {

namespace {
// Holds the busy flag for the length of one synchronous call.
class BusyGuard {
 public:
  BusyGuard(Napi::Env env, KVCache& cache) : cache_(cache) {
    if (!cache.tryEnter()) {
      throwStatus(env, Status(ErrorCode::Busy, "the cache is running an async call; await it before calling again"));
    }
  }
  ~BusyGuard() { cache_.leave(); }

 private:
  KVCache& cache_;
};

}  // namespace

Napi::Function CacheWrap::define(Napi::Env env) {
  return DefineClass(env, "NativeCache",
                     {InstanceMethod<&CacheWrap::guard<&CacheWrap::append>>("append"),
                      InstanceMethod<&CacheWrap::guard<&CacheWrap::attend>>("attend"),
                      InstanceMethod<&CacheWrap::guard<&CacheWrap::step>>("step"),
                      InstanceMethod<&CacheWrap::guard<&CacheWrap::prefill>>("prefill"),
                      InstanceMethod<&CacheWrap::guard<&CacheWrap::attendAsync>>("attendAsync"),
                      InstanceMethod<&CacheWrap::guard<&CacheWrap::stepAsync>>("stepAsync"),
                      InstanceMethod<&CacheWrap::guard<&CacheWrap::prefillAsync>>("prefillAsync"),
                      InstanceMethod<&CacheWrap::guard<&CacheWrap::fork>>("fork"),
                      InstanceMethod<&CacheWrap::guard<&CacheWrap::stats>>("stats"),
                      InstanceMethod<&CacheWrap::guard<&CacheWrap::save>>("save"),
                      InstanceMethod<&CacheWrap::guard<&CacheWrap::saveAsync>>("saveAsync"),
                      InstanceMethod<&CacheWrap::guard<&CacheWrap::tokens>>("tokens"),
                      InstanceMethod<&CacheWrap::guard<&CacheWrap::truncate>>("truncate"),
                      InstanceMethod<&CacheWrap::guard<&CacheWrap::positions>>("positions"),
                      InstanceMethod<&CacheWrap::guard<&CacheWrap::config>>("config"),
                      InstanceMethod<&CacheWrap::guard<&CacheWrap::dispose>>("dispose")});
}

Napi::Object CacheWrap::wrap(Napi::Env env, std::unique_ptr<KVCache> cache) {
  Napi::External<KVCache> external = Napi::External<KVCache>::New(env, cache.get());
  Napi::Object object = addonData(env).cacheConstructor.New({external});
  cache.release();  // now owned by the wrapper
  return object;
}

CacheWrap::CacheWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<CacheWrap>(info) {
  if (info.Length() != 1 || !info[0].IsExternal()) {
    throwStatus(info.Env(), Status(ErrorCode::Option, "NativeCache is created by createCache(), not with new"));
  }
  cache_.reset(info[0].As<Napi::External<KVCache>>().Data());
}

KVCache& CacheWrap::live(Napi::Env env) {
  if (!cache_) throwStatus(env, Status(ErrorCode::Disposed, "the cache was disposed"));
  return *cache_;
}

Napi::Value CacheWrap::append(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  KVCache& cache = live(env);
  const int32_t layer = intArg(env, info[0], "layer");
  const DType dtype = parseDtype(env, info[3], "dtype");
  const HostTensor k = tensorArg(env, info[1], dtype, "k");
  const HostTensor v = tensorArg(env, info[2], dtype, "v");
  BusyGuard guard(env, cache);
  throwIfError(env, cache.append(layer, k, v));
  return env.Undefined();
}

Napi::Value CacheWrap::attend(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  KVCache& cache = live(env);
  const int32_t layer = intArg(env, info[0], "layer");
  const HostTensor q = tensorArg(env, info[1], parseDtype(env, info[2], "dtype"), "q");
  Napi::Float32Array out = outputArg(env, info[3], q.count);
  BusyGuard guard(env, cache);
  throwIfError(env, cache.attend(layer, q, out.Data(), out.ElementLength()));
  return out;
}

namespace {
// The arguments (layer, q, k, v, dtype, out?) of step, prefill and stepBatch, from info[first] on.
struct StepArgs {
  int32_t layer;
  HostTensor q, k, v;
  Napi::Float32Array out;
};
StepArgs stepArgs(const Napi::CallbackInfo& info, size_t first) {
  Napi::Env env = info.Env();
  StepArgs args;
  args.layer = intArg(env, info[first], "layer");
  const DType dtype = parseDtype(env, info[first + 4], "dtype");
  args.q = tensorArg(env, info[first + 1], dtype, "q");
  args.k = tensorArg(env, info[first + 2], dtype, "k");
  args.v = tensorArg(env, info[first + 3], dtype, "v");
  args.out = outputArg(env, info[first + 5], args.q.count);
  return args;
}
}  // namespace

// step and prefill take the same arguments and differ in the stage they are timed as.
Napi::Value CacheWrap::appendAndAttend(const Napi::CallbackInfo& info, CacheOp op) {
  Napi::Env env = info.Env();
  KVCache& cache = live(env);
  StepArgs a = stepArgs(info, 0);
  BusyGuard guard(env, cache);
  const Status status = op == CacheOp::Prefill ? cache.prefill(a.layer, a.q, a.k, a.v, a.out.Data(), a.out.ElementLength())
                                               : cache.step(a.layer, a.q, a.k, a.v, a.out.Data(), a.out.ElementLength());
  throwIfError(env, status);
  return a.out;
}

// stepBatch's caches (info[0]: an array of NativeCache, each live).
static std::vector<KVCache*> batchCaches(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsArray()) throwStatus(env, Status(ErrorCode::Option, "stepBatch expects an array of caches"));
  const Napi::Array list = info[0].As<Napi::Array>();
  const Napi::FunctionReference& constructor = addonData(env).cacheConstructor;
  std::vector<KVCache*> caches;
  for (uint32_t i = 0; i < list.Length(); ++i) {
    const Napi::Value item = list.Get(i);
    if (!item.IsObject() || !item.As<Napi::Object>().InstanceOf(constructor.Value())) {
      throwStatus(env, Status(ErrorCode::Option, "caches[" + std::to_string(i) + "] is not a cache"));
    }
    caches.push_back(&CacheWrap::Unwrap(item.As<Napi::Object>())->live(env));
  }
  return caches;
}

Napi::Value CacheWrap::stepBatchAsync(const Napi::CallbackInfo& info) {
  std::vector<KVCache*> caches = batchCaches(info);
  StepArgs a = stepArgs(info, 1);
  return queueStepBatch(info, std::move(caches), a.layer, a.q, a.k, a.v, a.out);
}

Napi::Value CacheWrap::stepBatch(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::vector<KVCache*> caches = batchCaches(info);
  StepArgs a = stepArgs(info, 1);
  // Every cache entered for the call; the guards leave them on every path (a duplicate is refused
  // by stepBatch, so a cache is entered once).
  std::vector<std::unique_ptr<BusyGuard>> guards;
  std::unordered_set<KVCache*> entered;
  for (KVCache* cache : caches) {
    if (entered.insert(cache).second) guards.push_back(std::make_unique<BusyGuard>(env, *cache));
  }
  throwIfError(env, KVCache::stepBatch(caches, a.layer, a.q, a.k, a.v, a.out.Data(), a.out.ElementLength()));
  return a.out;
}

Napi::Value CacheWrap::step(const Napi::CallbackInfo& info) { return appendAndAttend(info, CacheOp::Step); }
Napi::Value CacheWrap::prefill(const Napi::CallbackInfo& info) { return appendAndAttend(info, CacheOp::Prefill); }

Napi::Value CacheWrap::attendAsync(const Napi::CallbackInfo& info) {
  return queueCacheOp(info, live(info.Env()), CacheOp::Attend);
}
Napi::Value CacheWrap::stepAsync(const Napi::CallbackInfo& info) {
  return queueCacheOp(info, live(info.Env()), CacheOp::Step);
}
Napi::Value CacheWrap::prefillAsync(const Napi::CallbackInfo& info) {
  return queueCacheOp(info, live(info.Env()), CacheOp::Prefill);
}

Napi::Value CacheWrap::fork(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  KVCache& cache = live(env);
  BusyGuard guard(env, cache);
  return wrap(env, cache.fork());
}

Napi::Value CacheWrap::tokens(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  KVCache& cache = live(env);
  BusyGuard guard(env, cache);  // an async call's worker may be appending to the layer
  const int32_t layer = intArg(env, info[0], "layer");
  if (layer < 0 || layer >= cache.config().layers) {
    throwStatus(env, Status(ErrorCode::Shape, "layer must be in [0, " + std::to_string(cache.config().layers - 1) + "]"));
  }
  return Napi::Number::New(env, double(cache.tokens(layer)));
}

Napi::Value CacheWrap::truncate(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  KVCache& cache = live(env);
  const int32_t layer = intArg(env, info[0], "layer");
  const int32_t tokens = intArg(env, info[1], "tokens");
  BusyGuard guard(env, cache);
  throwIfError(env, cache.truncate(layer, tokens));
  return env.Undefined();
}

Napi::Value CacheWrap::positions(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  KVCache& cache = live(env);
  BusyGuard guard(env, cache);
  const int32_t layer = intArg(env, info[0], "layer");
  const int32_t head = intArg(env, info[1], "kvHead");
  if (layer < 0 || layer >= cache.config().layers || head < 0 || head >= cache.config().kvHeads) {
    throwStatus(env, Status(ErrorCode::Shape, "layer or kvHead out of range"));
  }
  // positions(layer, kvHead, loaded): the kept tokens, or those the last attention call read.
  const bool loaded = info[2].IsBoolean() && info[2].As<Napi::Boolean>().Value();
  const std::vector<int64_t> positions = loaded ? cache.loadedPositions(layer, head) : cache.keptPositions(layer, head);
  Napi::Float64Array out = Napi::Float64Array::New(env, positions.size());
  for (size_t i = 0; i < positions.size(); ++i) out[i] = double(positions[i]);
  return out;
}

// The shape and store of the cache: what KVCache.load() needs to describe a loaded cache in JS.
Napi::Value CacheWrap::config(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const CacheConfig& config = live(env).config();
  Napi::Object result = Napi::Object::New(env);
  result.Set("layers", config.layers);
  result.Set("qHeads", config.qHeads);
  result.Set("kvHeads", config.kvHeads);
  result.Set("headDim", config.headDim);
  result.Set("store", config.storeType == DType::F32 ? "f32" : config.storeType == DType::F16 ? "f16" : "bf16");
  result.Set("pageTokens", double(config.pageTokens));
  result.Set("storeKind", config.storeKind == StoreKind::Kivi ? "kivi" : "dense");
  result.Set("kiviBits", config.kiviBits);
  result.Set("kiviGroup", config.kiviGroup);
  result.Set("kiviResidual", double(config.kiviResidual));
  result.Set("kiviOutliers", config.kiviOutliers);
  result.Set("kiviPreRope", config.kiviPreRope);
  result.Set("ropeTheta", config.rope.theta);
  result.Set("ropeStyle", config.rope.style == RopeStyle::Half ? "half" : "adjacent");
  result.Set("scale", config.scale);
  // The policy travels with save() / load(); its options, for the JS side of a loaded cache.
  const SelectConfig& s = config.select;
  if (s.kind != SelectKind::Full) {
    Napi::Object select = Napi::Object::New(env);
    select.Set("kind", selectKindName(s.kind));
    if (s.kind == SelectKind::SnapKV || s.kind == SelectKind::PyramidKV || s.kind == SelectKind::H2O) {
      select.Set("budget", double(s.budget));
    } else {
      select.Set("sink", double(s.sink));
    }
    if (s.kind != SelectKind::H2O) select.Set("window", double(s.window));
    if (s.kind == SelectKind::Streaming) {
      select.Set("positions", s.cachePositions ? "cache" : "absolute");
    } else if (s.kind == SelectKind::SnapKV || s.kind == SelectKind::PyramidKV) {
      select.Set("kernel", s.kernel);
      select.Set("pooling", s.pooling == Pooling::Max ? "max" : "avg");
      if (s.kind == SelectKind::PyramidKV) select.Set("beta", s.beta);
    } else if (s.kind == SelectKind::H2O) {
      select.Set("recent", double(s.recent));
    } else if (s.kind == SelectKind::Duo) {
      Napi::Uint8Array heads = Napi::Uint8Array::New(env, s.retrieval.size());
      std::copy(s.retrieval.begin(), s.retrieval.end(), heads.Data());
      select.Set("heads", heads);
    } else if (s.kind == SelectKind::Quest) {
      select.Set("pageSize", double(s.pageSize));
      select.Set("pages", double(s.pages));
    } else if (s.kind == SelectKind::Retrieval) {
      select.Set("index", s.index.kind == IndexKind::Flat ? "flat" : s.index.kind == IndexKind::Ivf ? "ivf" : "graph");
      select.Set("topK", double(s.topK));
      select.Set("trainQueries", double(s.trainQueries));
      select.Set("lists", s.index.lists);
      select.Set("probes", s.index.probes);
      select.Set("degree", s.index.degree);
      select.Set("beam", s.index.beam);
      select.Set("neighbors", s.index.neighbors);
      select.Set("threads", s.index.threads);
      select.Set("seed", double(s.index.seed));
    } else {
      select.Set("blockSize", double(s.blockSize));
      select.Set("blocks", double(s.blocks));
      select.Set("reprTopK", s.reprTopK);
      select.Set("queryWindow", s.queryWindow);
      select.Set("questionWeight", s.questionWeight);
      select.Set("temperature", s.temperature);
    }
    result.Set("select", select);
  }
  return result;
}

Napi::Value CacheWrap::stats(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  KVCache& cache = live(env);
  BusyGuard guard(env, cache);
  const CacheStatsData data = cache.stats();
  Napi::Object tokens = Napi::Object::New(env);
  tokens.Set("seen", data.tokensSeen);
  tokens.Set("kept", data.tokensKept);
  tokens.Set("loaded", data.tokensLoaded);
  Napi::Object bytes = Napi::Object::New(env);
  bytes.Set("kv", data.kvBytes);
  bytes.Set("residual", data.residualBytes);
  bytes.Set("index", data.indexBytes);
  bytes.Set("summary", data.summaryBytes);
  bytes.Set("meta", data.metaBytes);
  bytes.Set("fullF16", data.fullF16Bytes);
  bytes.Set("allocated", data.allocatedBytes);
  bytes.Set("shared", data.sharedBytes);
  Napi::Object times = Napi::Object::New(env);
  times.Set("prefill", data.times.prefillMs);
  times.Set("compress", data.times.compressMs);
  times.Set("indexBuild", data.times.indexBuildMs);
  times.Set("retrieve", data.times.retrieveMs);
  times.Set("decode", data.times.decodeMs);
  Napi::Array layers = Napi::Array::New(env, data.layers.size());
  for (size_t i = 0; i < data.layers.size(); ++i) {
    Napi::Object layer = Napi::Object::New(env);
    Napi::Array kept = Napi::Array::New(env, data.layers[i].tokensKept.size());
    for (size_t h = 0; h < data.layers[i].tokensKept.size(); ++h) kept.Set(uint32_t(h), double(data.layers[i].tokensKept[h]));
    layer.Set("tokensKept", kept);
    layer.Set("bytes", data.layers[i].bytes);
    layers.Set(uint32_t(i), layer);
  }
  Napi::Object result = Napi::Object::New(env);
  result.Set("tokens", tokens);
  result.Set("bytes", bytes);
  result.Set("timeMs", times);
  result.Set("layers", layers);
  return result;
}

Napi::Value CacheWrap::save(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  KVCache& cache = live(env);
  BusyGuard guard(env, cache);
  std::vector<uint8_t> bytes;
  throwIfError(env, cache.save(&bytes));
  return bufferOf(env, std::move(bytes));
}

Napi::Value CacheWrap::saveAsync(const Napi::CallbackInfo& info) {
  return queueSave(info.Env(), info.This().As<Napi::Object>(), live(info.Env()));
}

Napi::Value CacheWrap::dispose(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!cache_) return env.Undefined();  // disposing twice is harmless
  if (!cache_->tryEnter()) {
    throwStatus(env, Status(ErrorCode::Busy, "the cache is running an async call; await it before dispose()"));
  }
  cache_.reset();  // entered, so no call can be using it
  return env.Undefined();
}

}  // namespace kvslim::napi
