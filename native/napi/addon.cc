// Module entry: the functions lib/native.ts calls. Glue only: arguments in, core calls, values out.
#include <napi.h>

#include <cmath>
#include <string>

#include "../core/attention_op.h"
#include "../core/backend.h"
#include "../core/cuda_info.h"
#include "../core/kv_cache.h"
#include "../cpu/probes.h"
#include "../cpu/simd_level.h"
#include "../cpu/thread_pool.h"
#include "addon_data.h"
#include "cache_wrap.h"
#include "convert.h"
#include "errors.h"
#include "key_index_wrap.h"
#include "kivi_ops.h"

namespace kvslim::napi {

namespace {

// 'cpu' | 'cuda' | 'auto' (CUDA when a GPU answers, else CPU).
std::shared_ptr<Backend> backendFor(Napi::Env env, const std::string& device) {
  if (device == "cpu") return cpuBackend();
  if (device == "cuda" || device == "auto") {
    Status why;
    std::shared_ptr<Backend> cuda = cudaBackend(&why);
    if (cuda) return cuda;
    if (device == "auto") return cpuBackend();
    throwStatus(env, Status(ErrorCode::BackendUnavailable, "device 'cuda' was requested but CUDA is unavailable: " + why.message()));
  }
  throwStatus(env, Status(ErrorCode::Option, "device must be 'auto', 'cpu' or 'cuda', but received '" + device + "'"));
}

Napi::Value setErrorFactoryFn(const Napi::CallbackInfo& info) {
  if (!info[0].IsFunction()) throw Napi::TypeError::New(info.Env(), "setErrorFactory expects a function");
  setErrorFactory(info.Env(), info[0].As<Napi::Function>());
  return info.Env().Undefined();
}

Napi::Value simdErrorFn(const Napi::CallbackInfo& info) {
  const Status status = cpu::simdStatus();
  if (status.isOk()) return info.Env().Null();
  return Napi::String::New(info.Env(), status.message());
}

Napi::Value backendsFn(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const cpu::SimdInfo& simd = cpu::simdInfo();
  Napi::Object cpuInfo = Napi::Object::New(env);
  cpuInfo.Set("simd", simd.active);
  cpuInfo.Set("avx2", simd.avx2);
  cpuInfo.Set("avx512", simd.avx512);
  cpuInfo.Set("forced", simd.forcedBy.empty() ? env.Null() : Napi::String::New(env, simd.forcedBy));
  cpuInfo.Set("threads", cpu::globalPoolSize());
  cpuInfo.Set("vendor", simd.vendor);
  cpuInfo.Set("prefetch", simd.prefetchToL1 ? "l1" : "l2");
  const CudaInfo cuda = cudaInfo();
  Napi::Object cudaObject = Napi::Object::New(env);
  cudaObject.Set("built", cuda.built);
  cudaObject.Set("available", cuda.available);
  cudaObject.Set("reason", cuda.reason);
  cudaObject.Set("devices", cuda.devices);
  cudaObject.Set("name", cuda.name);
  cudaObject.Set("computeCapability", std::to_string(cuda.computeMajor) + "." + std::to_string(cuda.computeMinor));
  cudaObject.Set("memoryBytes", double(cuda.memoryBytes));
  cudaObject.Set("runtimeVersion", cuda.runtimeVersion);
  cudaObject.Set("driverVersion", cuda.driverVersion);
  cudaObject.Set("architectures", cuda.architectures);
  Napi::Object result = Napi::Object::New(env);
  result.Set("cpu", cpuInfo);
  result.Set("cuda", cudaObject);
  return result;
}

Napi::Object keptMemoryObject(Napi::Env env, const Backend::KeptMemory& kept) {
  Napi::Object result = Napi::Object::New(env);
  result.Set("pagesMapped", double(kept.pagesMapped));
  result.Set("pagesIdle", double(kept.pagesIdle));
  result.Set("scratch", double(kept.scratch));
  return result;
}

Napi::Value hostMemoryFn(const Napi::CallbackInfo& info) { return keptMemoryObject(info.Env(), cpuBackend()->keptMemory()); }

Napi::Value releaseHostMemoryFn(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), double(cpuBackend()->releaseKept())); }

// Threads a call, a cache or the pool may ask for (lib's bound; 0 where allowed: the whole pool).
constexpr int32_t kMaxThreads = 1024;

Napi::Value setThreadsFn(const Napi::CallbackInfo& info) {
  cpu::setGlobalPoolSize(intArgIn(info.Env(), info[0], "threads", 1, kMaxThreads));
  return info.Env().Undefined();
}

// The stateless ops' scale (0: 1 / sqrt(headDim)), as createCache checks it.
float scaleField(Napi::Env env, const Napi::Object& options) {
  const double scale = numberField(env, options, "scale");
  if (scale < 0) throwStatus(env, Status(ErrorCode::Option, "scale must be >= 0 (0: 1 / sqrt(headDim)), but received " + std::to_string(scale)));
  return float(scale);
}

Napi::Value attentionFn(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsObject()) throwStatus(env, Status(ErrorCode::Option, "attention expects an options object"));
  Napi::Object options = info[0].As<Napi::Object>();
  const DType dtype = parseDtype(env, options.Get("dtype"), "dtype");
  AttentionOp op;
  op.q = tensorArg(env, options.Get("q"), dtype, "q");
  op.k = tensorArg(env, options.Get("k"), dtype, "k");
  op.v = tensorArg(env, options.Get("v"), dtype, "v");
  op.qHeads = intField(env, options, "qHeads");
  op.kvHeads = intField(env, options, "kvHeads");
  op.headDim = intField(env, options, "headDim");
  op.causal = boolField(env, options, "causal");
  op.scale = scaleField(env, options);
  op.threads = intFieldIn(env, options, "threads", 0, kMaxThreads);
  std::shared_ptr<Backend> backend = backendFor(env, stringField(env, options, "device"));
  Napi::Float32Array out = outputArg(env, options.Get("out"), op.q.count);
  throwIfError(env, runAttention(*backend, op, out.Data(), out.ElementLength()));
  return out;
}

// The select options lib/cache.ts passes (every field present; lib checked the values, core checks again).
SelectConfig parseSelect(Napi::Env env, const Napi::Value& value) {
  SelectConfig select;
  if (value.IsUndefined()) return select;
  if (!value.IsObject()) throwStatus(env, Status(ErrorCode::Option, "select must be an object"));
  Napi::Object object = value.As<Napi::Object>();
  const std::string kind = stringField(env, object, "kind");
  const bool known = selectKindFromName(kind, &select.kind);
  if (!known) throwStatus(env, Status(ErrorCode::Option, "policy.select.kind '" + kind + "' is unknown"));
  if (select.kind == SelectKind::Full) return select;
  auto integer = [&](const char* name) {
    const double number = numberField(env, object, name);
    if (number < 0 || number > 1099511627776.0 || double(int64_t(number)) != number) {
      throwStatus(env, Status(ErrorCode::Option, std::string("policy.select.") + name + " must be a non-negative integer"));
    }
    return int64_t(number);
  };
  select.sink = integer("sink");
  select.window = integer("window");
  select.budget = integer("budget");
  select.kernel = int32_t(std::min<int64_t>(integer("kernel"), 1 << 20));
  select.recent = integer("recent");
  select.beta = numberField(env, object, "beta");
  const std::string pooling = stringField(env, object, "pooling");
  if (pooling != "max" && pooling != "avg") throwStatus(env, Status(ErrorCode::Option, "policy.select.pooling must be 'max' or 'avg'"));
  select.pooling = pooling == "max" ? Pooling::Max : Pooling::Avg;
  select.cachePositions = boolField(env, object, "cachePositions");
  Napi::Value retrieval = object.Get("retrieval");
  if (!retrieval.IsTypedArray() || retrieval.As<Napi::TypedArray>().TypedArrayType() != napi_uint8_array) {
    throwStatus(env, Status(ErrorCode::Option, "policy.select retrieval mask must be a Uint8Array"));
  }
  Napi::Uint8Array mask = retrieval.As<Napi::Uint8Array>();
  select.retrieval.assign(mask.Data(), mask.Data() + mask.ElementLength());
  // Loading policies.
  select.pageSize = integer("pageSize");
  select.pages = integer("pages");
  select.topK = integer("topK");
  select.trainQueries = integer("trainQueries");
  select.blockSize = integer("blockSize");
  select.blocks = integer("blocks");
  select.reprTopK = int32_t(std::min<int64_t>(integer("reprTopK"), 1 << 20));
  select.queryWindow = int32_t(std::min<int64_t>(integer("queryWindow"), 1 << 20));
  select.questionWeight = numberField(env, object, "questionWeight");
  select.temperature = numberField(env, object, "temperature");
  Napi::Value index = object.Get("index");
  if (!index.IsObject()) throwStatus(env, Status(ErrorCode::Option, "policy.select.index must be an object"));
  select.index = parseIndexOptions(env, index.As<Napi::Object>(), "policy.select.index.");
  return select;
}

Napi::Value attentionScoresFn(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsObject()) throwStatus(env, Status(ErrorCode::Option, "attentionScores expects an options object"));
  Napi::Object options = info[0].As<Napi::Object>();
  const DType dtype = parseDtype(env, options.Get("dtype"), "dtype");
  ScoresOp op;
  op.q = tensorArg(env, options.Get("q"), dtype, "q");
  op.k = tensorArg(env, options.Get("k"), dtype, "k");
  op.qHeads = intField(env, options, "qHeads");
  op.kvHeads = intField(env, options, "kvHeads");
  op.headDim = intField(env, options, "headDim");
  op.kvHead = intField(env, options, "kvHead");
  op.scale = scaleField(env, options);
  op.threads = intFieldIn(env, options, "threads", 0, kMaxThreads);
  std::shared_ptr<Backend> backend = backendFor(env, stringField(env, options, "device"));
  const double count = numberField(env, options, "outCount");
  if (count < 1 || count > 4.0e9) throwStatus(env, Status(ErrorCode::Shape, "outCount must be in [1, 4e9], but received " + std::to_string(count)));
  if (std::floor(count) != count) throwStatus(env, Status(ErrorCode::Shape, "outCount must be an integer, but received " + std::to_string(count)));
  Napi::Float32Array out = outputArg(env, options.Get("out"), size_t(count), "n x heads x T");
  throwIfError(env, runScores(*backend, op, out.Data(), out.ElementLength()));
  return out;
}

Napi::Value createCacheFn(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsObject()) throwStatus(env, Status(ErrorCode::Option, "createCache expects an options object"));
  Napi::Object options = info[0].As<Napi::Object>();
  CacheConfig config;
  config.layers = intField(env, options, "layers");
  config.qHeads = intField(env, options, "qHeads");
  config.kvHeads = intField(env, options, "kvHeads");
  config.headDim = intField(env, options, "headDim");
  config.storeType = parseDtype(env, options.Get("store"), "store");
  const std::string storeKind = stringField(env, options, "storeKind");
  if (storeKind == "kivi") {
    config.storeKind = StoreKind::Kivi;
    config.kiviBits = intField(env, options, "kiviBits");
    config.kiviGroup = intField(env, options, "kiviGroup");
    config.kiviResidual = intField(env, options, "kiviResidual");
    config.kiviOutliers = numberField(env, options, "kiviOutliers");
    config.kiviPreRope = boolField(env, options, "kiviPreRope");
  } else if (storeKind != "dense") {
    throwStatus(env, Status(ErrorCode::Option, "storeKind must be 'dense' or 'kivi'"));
  }
  config.select = parseSelect(env, options.Get("select"));
  config.rope.theta = float(numberField(env, options, "ropeTheta"));
  const std::string ropeStyle = stringField(env, options, "ropeStyle");
  if (ropeStyle != "adjacent" && ropeStyle != "half") {
    throwStatus(env, Status(ErrorCode::Option, "ropeStyle must be 'adjacent' or 'half', but received '" + ropeStyle + "'"));
  }
  config.rope.style = ropeStyle == "half" ? RopeStyle::Half : RopeStyle::Adjacent;
  config.pageTokens = intField(env, options, "pageTokens");
  config.scale = float(numberField(env, options, "scale"));
  config.threads = intFieldIn(env, options, "threads", 0, kMaxThreads);
  std::unique_ptr<KVCache> cache;
  throwIfError(env, KVCache::create(config, backendFor(env, stringField(env, options, "device")), &cache));
  return CacheWrap::wrap(env, std::move(cache));
}

// loadCache / loadCacheAsync arguments: (bytes: Uint8Array, device, threads).
Napi::Uint8Array loadBytesArg(Napi::Env env, const Napi::Value& value) {
  if (!value.IsTypedArray() || value.As<Napi::TypedArray>().TypedArrayType() != napi_uint8_array) {
    throwStatus(env, Status(ErrorCode::Option, "load expects a Buffer or Uint8Array"));
  }
  return value.As<Napi::Uint8Array>();
}

// Their device, a string (threads are checked here too: KVCache::load would call a negative one ERR_CORRUPT).
std::shared_ptr<Backend> loadDeviceArg(Napi::Env env, const Napi::Value& value) {
  if (!value.IsString()) throwStatus(env, Status(ErrorCode::Option, "device must be 'auto', 'cpu' or 'cuda'"));
  return backendFor(env, value.As<Napi::String>());
}

Napi::Value loadCacheFn(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Uint8Array bytes = loadBytesArg(env, info[0]);
  std::shared_ptr<Backend> backend = loadDeviceArg(env, info[1]);
  const int32_t threads = intArgIn(env, info[2], "threads", 0, kMaxThreads);
  std::unique_ptr<KVCache> cache;
  throwIfError(env, KVCache::load(bytes.Data(), bytes.ElementLength(), backend, threads, &cache));
  return CacheWrap::wrap(env, std::move(cache));
}

Napi::Value loadCacheAsyncFn(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Uint8Array bytes = loadBytesArg(env, info[0]);
  std::shared_ptr<Backend> backend = loadDeviceArg(env, info[1]);
  return queueLoad(env, bytes, std::move(backend), intArgIn(env, info[2], "threads", 0, kMaxThreads));
}

// The probes' threads (0: the whole pool) and repeats are in lib's probeMachine ranges: a repeats
// of 2^31 - 1 would hold the JS thread for hours.
Napi::Value probeBandwidthFn(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const int32_t megabytes = intArgIn(env, info[0], "megabytes", 1, 65536);
  const int32_t threads = intArgIn(env, info[1], "threads", 0, kMaxThreads), repeats = intArgIn(env, info[2], "repeats", 1, 100);
  return Napi::Number::New(env, cpu::measureReadBandwidth(size_t(megabytes) << 20, threads, repeats));
}

Napi::Value probeFmaPeakFn(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const int32_t threads = intArgIn(env, info[0], "threads", 0, kMaxThreads), repeats = intArgIn(env, info[1], "repeats", 1, 100);
  return Napi::Number::New(env, cpu::measureFmaPeak(threads, repeats));
}

}  // namespace

Napi::Object init(Napi::Env env, Napi::Object exports) {
  auto* data = new AddonData();
  data->cacheConstructor = Napi::Persistent(CacheWrap::define(env));
  env.SetInstanceData<AddonData>(data);
  exports.Set("setErrorFactory", Napi::Function::New(env, guardedFn<setErrorFactoryFn>));
  exports.Set("simdError", Napi::Function::New(env, guardedFn<simdErrorFn>));
  exports.Set("backends", Napi::Function::New(env, guardedFn<backendsFn>));
  exports.Set("setThreads", Napi::Function::New(env, guardedFn<setThreadsFn>));
  exports.Set("hostMemory", Napi::Function::New(env, guardedFn<hostMemoryFn>));
  exports.Set("releaseHostMemory", Napi::Function::New(env, guardedFn<releaseHostMemoryFn>));
  exports.Set("attention", Napi::Function::New(env, guardedFn<attentionFn>));
  exports.Set("attentionScores", Napi::Function::New(env, guardedFn<attentionScoresFn>));
  exports.Set("createCache", Napi::Function::New(env, guardedFn<createCacheFn>));
  exports.Set("loadCache", Napi::Function::New(env, guardedFn<loadCacheFn>));
  exports.Set("loadCacheAsync", Napi::Function::New(env, guardedFn<loadCacheAsyncFn>));
  exports.Set("stepBatch", Napi::Function::New(env, guardedFn<CacheWrap::stepBatch>));
  exports.Set("stepBatchAsync", Napi::Function::New(env, guardedFn<CacheWrap::stepBatchAsync>));
  exports.Set("probeBandwidth", Napi::Function::New(env, guardedFn<probeBandwidthFn>));
  exports.Set("probeFmaPeak", Napi::Function::New(env, guardedFn<probeFmaPeakFn>));
  exports.Set("NativeKeyIndex", KeyIndexWrap::define(env));
  exports.Set("pageBounds", Napi::Function::New(env, guardedFn<pageBoundsFn>));
  registerKiviOps(env, exports);
  return exports;
}

}  // namespace kvslim::napi

static Napi::Object InitKvslim(Napi::Env env, Napi::Object exports) { return kvslim::napi::init(env, exports); }
NODE_API_MODULE(kvslim, InitKvslim)
