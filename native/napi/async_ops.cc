#include "async_ops.h"

#include <algorithm>
#include <new>
#include <string>
#include <vector>

#include "cache_wrap.h"
#include "convert.h"
#include "errors.h"

namespace kvslim::napi {

namespace {

// A worker that settles a promise: Execute() sets status_; the promise resolves with result()
// when it is ok and rejects with its KVSlimError otherwise. `entered`: the caches the caller
// entered (tryEnter) for the call, left when it ends.
class PromiseWorker : public Napi::AsyncWorker {
 public:
  PromiseWorker(Napi::Env env, const char* name, std::vector<KVCache*> entered)
      : Napi::AsyncWorker(env, name), deferred_(Napi::Promise::Deferred::New(env)), entered_(std::move(entered)) {}
  Napi::Promise promise() const { return deferred_.Promise(); }

 protected:
  // The resolved value (on the JS thread, once Execute() succeeded).
  virtual Napi::Value result(Napi::Env env) = 0;
  Status status_;

 private:
  void OnOK() override {
    leave();
    if (status_.isOk()) {
      deferred_.Resolve(result(Env()));
    } else {
      deferred_.Reject(makeError(Env(), status_));
    }
  }
  // Execute() turns its failures into status_; node-addon-api routes here a std::exception that
  // escaped it (a bug), rejected as guarded() throws one on the JS thread.
  void OnError(const Napi::Error& error) override {
    leave();
    deferred_.Reject(makeError(Env(), escapedException(error.Message())));
  }
  void leave() {
    for (KVCache* cache : entered_) cache->leave();
  }

  Napi::Promise::Deferred deferred_;
  std::vector<KVCache*> entered_;
};

class CacheOpWorker final : public PromiseWorker {
 public:
  CacheOpWorker(Napi::Env env, KVCache& cache, CacheOp op, int32_t layer, HostTensor q, HostTensor k, HostTensor v,
                Napi::Float32Array out)
      : PromiseWorker(env, "kvslim.cache", {&cache}),
        cache_(cache),
        op_(op),
        layer_(layer),
        q_(q),
        k_(k),
        v_(v),
        outData_(out.Data()),
        outCount_(out.ElementLength()) {
    out_ = Napi::Persistent(out);
  }

  // Keeps the wrapper (and so the cache) and every array alive until the call ends.
  void hold(const Napi::CallbackInfo& info) {
    holder_ = Napi::Persistent(info.This().As<Napi::Object>());
    for (size_t i = 1; i < info.Length(); ++i) {
      if (info[i].IsObject()) arrays_.push_back(Napi::Persistent(info[i].As<Napi::Object>()));
    }
  }

  void Execute() override {
    switch (op_) {
      case CacheOp::Attend: status_ = cache_.attend(layer_, q_, outData_, outCount_); break;
      case CacheOp::Step: status_ = cache_.step(layer_, q_, k_, v_, outData_, outCount_); break;
      case CacheOp::Prefill: status_ = cache_.prefill(layer_, q_, k_, v_, outData_, outCount_); break;
    }
  }

 private:
  Napi::Value result(Napi::Env) override { return out_.Value(); }

  KVCache& cache_;
  CacheOp op_;
  int32_t layer_;
  HostTensor q_, k_, v_;
  float* outData_;
  size_t outCount_;
  Napi::Reference<Napi::Float32Array> out_;
  Napi::ObjectReference holder_;
  std::vector<Napi::ObjectReference> arrays_;
};

// save() on a worker thread; the Buffer takes the bytes without a copy.
class SaveWorker final : public PromiseWorker {
 public:
  SaveWorker(Napi::Env env, const Napi::Object& holder, KVCache& cache) : PromiseWorker(env, "kvslim.save", {&cache}), cache_(cache) {
    holder_ = Napi::Persistent(holder);
  }
  void Execute() override {
    try {
      status_ = cache_.save(&bytes_);
    } catch (const std::bad_alloc&) {
      status_ = Status(ErrorCode::OutOfMemory, "out of host memory in save()");
    }
  }

 private:
  Napi::Value result(Napi::Env env) override { return bufferOf(env, std::move(bytes_)); }

  KVCache& cache_;
  Napi::ObjectReference holder_;
  std::vector<uint8_t> bytes_;
};

// KVCache::load() on a worker thread, over the caller's bytes (referenced until it ends).
class LoadWorker final : public PromiseWorker {
 public:
  LoadWorker(Napi::Env env, const Napi::Uint8Array& bytes, std::shared_ptr<Backend> backend, int32_t threads)
      : PromiseWorker(env, "kvslim.load", {}),
        data_(bytes.Data()),
        size_(bytes.ElementLength()),
        backend_(std::move(backend)),
        threads_(threads) {
    bytes_ = Napi::Persistent(static_cast<Napi::Object>(bytes));
  }
  void Execute() override {
    try {
      status_ = KVCache::load(data_, size_, backend_, threads_, &cache_);
    } catch (const std::bad_alloc&) {
      status_ = Status(ErrorCode::OutOfMemory, "out of host memory in load()");
    }
  }

 private:
  Napi::Value result(Napi::Env env) override { return CacheWrap::wrap(env, std::move(cache_)); }

  const uint8_t* data_;
  size_t size_;
  std::shared_ptr<Backend> backend_;
  int32_t threads_;
  Napi::ObjectReference bytes_;
  std::unique_ptr<KVCache> cache_;
};

// KVCache::stepBatch on a worker thread; every cache entered, every array referenced until it ends.
class BatchWorker final : public PromiseWorker {
 public:
  BatchWorker(Napi::Env env, const Napi::CallbackInfo& info, std::vector<KVCache*> entered, std::vector<KVCache*> caches, int32_t layer,
              HostTensor q, HostTensor k, HostTensor v, Napi::Float32Array out)
      : PromiseWorker(env, "kvslim.stepBatch", std::move(entered)), caches_(std::move(caches)), layer_(layer), q_(q), k_(k), v_(v),
        outData_(out.Data()), outCount_(out.ElementLength()) {
    out_ = Napi::Persistent(out);
    for (size_t i = 0; i < info.Length(); ++i) {
      if (info[i].IsObject()) held_.push_back(Napi::Persistent(info[i].As<Napi::Object>()));
    }
  }
  void Execute() override { status_ = KVCache::stepBatch(caches_, layer_, q_, k_, v_, outData_, outCount_); }

 private:
  Napi::Value result(Napi::Env) override { return out_.Value(); }

  std::vector<KVCache*> caches_;
  int32_t layer_;
  HostTensor q_, k_, v_;
  float* outData_;
  size_t outCount_;
  Napi::Reference<Napi::Float32Array> out_;
  std::vector<Napi::ObjectReference> held_;  // the caches' array (so their wrappers) and the tensors
};

// Marks the cache busy for an async call (ERR_BUSY while another one runs).
void enterAsync(Napi::Env env, KVCache& cache) {
  if (!cache.tryEnter()) {
    throwStatus(env, Status(ErrorCode::Busy, "the cache is running another async call; calls on one cache run in order "
                                             "through the KVCache wrapper"));
  }
}

}  // namespace

Napi::Value queueSave(Napi::Env env, const Napi::Object& holder, KVCache& cache) {
  enterAsync(env, cache);
  auto* worker = new SaveWorker(env, holder, cache);  // deleted by node-addon-api
  Napi::Promise promise = worker->promise();
  worker->Queue();
  return promise;
}

Napi::Value queueLoad(Napi::Env env, const Napi::Uint8Array& bytes, std::shared_ptr<Backend> backend, int32_t threads) {
  auto* worker = new LoadWorker(env, bytes, std::move(backend), threads);  // deleted by node-addon-api
  Napi::Promise promise = worker->promise();
  worker->Queue();
  return promise;
}

Napi::Value queueStepBatch(const Napi::CallbackInfo& info, std::vector<KVCache*> caches, int32_t layer, HostTensor q, HostTensor k,
                           HostTensor v, Napi::Float32Array out) {
  Napi::Env env = info.Env();
  // Every cache entered, or none: a busy one leaves those entered before it.
  std::vector<KVCache*> entered;
  for (KVCache* cache : caches) {
    if (std::find(entered.begin(), entered.end(), cache) != entered.end()) continue;  // a duplicate: stepBatch refuses it
    if (!cache->tryEnter()) {
      for (KVCache* done : entered) done->leave();
      throwStatus(env, Status(ErrorCode::Busy, "a cache of the batch is running another async call"));
    }
    entered.push_back(cache);
  }
  auto* worker = new BatchWorker(env, info, std::move(entered), std::move(caches), layer, q, k, v, out);  // deleted by node-addon-api
  Napi::Promise promise = worker->promise();
  worker->Queue();
  return promise;
}

Napi::Value queueCacheOp(const Napi::CallbackInfo& info, KVCache& cache, CacheOp op) {
  Napi::Env env = info.Env();
  const bool withKV = op != CacheOp::Attend;
  const int32_t layer = intArg(env, info[0], "layer");
  const DType dtype = parseDtype(env, info[withKV ? 4 : 2], "dtype");
  const HostTensor q = tensorArg(env, info[1], dtype, "q");
  HostTensor k, v;
  if (withKV) {
    k = tensorArg(env, info[2], dtype, "k");
    v = tensorArg(env, info[3], dtype, "v");
  }
  Napi::Float32Array out = outputArg(env, info[withKV ? 5 : 3], q.count);
  enterAsync(env, cache);
  auto* worker = new CacheOpWorker(env, cache, op, layer, q, k, v, out);  // deleted by node-addon-api
  worker->hold(info);
  Napi::Promise promise = worker->promise();
  worker->Queue();
  return promise;
}

}  // namespace kvslim::napi
