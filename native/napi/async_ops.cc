#include "async_ops.h"

#include <string>

#include "convert.h"
#include "errors.h"

namespace kvslim::napi {

namespace {

class CacheOpWorker final : public Napi::AsyncWorker {
 public:
  CacheOpWorker(Napi::Env env, KVCache& cache, CacheOp op, int32_t layer, HostTensor q, HostTensor k, HostTensor v,
                Napi::Float32Array out)
      : Napi::AsyncWorker(env, "kvslim.cache"),
        deferred_(Napi::Promise::Deferred::New(env)),
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

  Napi::Promise promise() const { return deferred_.Promise(); }

  void Execute() override {
    switch (op_) {
      case CacheOp::Attend: status_ = cache_.attend(layer_, q_, outData_, outCount_); break;
      case CacheOp::Step: status_ = cache_.step(layer_, q_, k_, v_, outData_, outCount_); break;
      case CacheOp::Prefill: status_ = cache_.prefill(layer_, q_, k_, v_, outData_, outCount_); break;
    }
  }

  void OnOK() override {
    cache_.leave();
    Napi::Env env = Env();
    if (status_.isOk()) {
      deferred_.Resolve(out_.Value());
    } else {
      deferred_.Reject(makeError(env, status_));
    }
  }

  void OnError(const Napi::Error& error) override {
    cache_.leave();
    deferred_.Reject(error.Value());
  }

 private:
  Napi::Promise::Deferred deferred_;
  KVCache& cache_;
  CacheOp op_;
  int32_t layer_;
  HostTensor q_, k_, v_;
  float* outData_;
  size_t outCount_;
  Status status_;
  Napi::Reference<Napi::Float32Array> out_;
  Napi::ObjectReference holder_;
  std::vector<Napi::ObjectReference> arrays_;
};

}  // namespace

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
  if (!cache.tryEnter()) {
    throwStatus(env, Status(ErrorCode::Busy, "the cache is running another async call; calls on one cache run in order "
                                             "through the KVCache wrapper"));
  }
  auto* worker = new CacheOpWorker(env, cache, op, layer, q, k, v, out);  // deleted by node-addon-api
  worker->hold(info);
  Napi::Promise promise = worker->promise();
  worker->Queue();
  return promise;
}

}  // namespace kvslim::napi
