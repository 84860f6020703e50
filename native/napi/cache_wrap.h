// The JS-side handle of a core KVCache (class NativeCache, used only by lib/native.ts).
#pragma once
#include <napi.h>

#include <memory>

#include "../core/kv_cache.h"
#include "async_ops.h"
#include "errors.h"

namespace kvslim::napi {

class CacheWrap : public Napi::ObjectWrap<CacheWrap> {
 public:
  static Napi::Function define(Napi::Env env);
  // A new NativeCache owning `cache`.
  static Napi::Object wrap(Napi::Env env, std::unique_ptr<KVCache> cache);

  explicit CacheWrap(const Napi::CallbackInfo& info);

  // The cache, or ERR_DISPOSED.
  KVCache& live(Napi::Env env);

  // stepBatch(caches: NativeCache[], layer, q, k, v, dtype, out?): KVCache::stepBatch over the
  // caches (each entered for the call: ERR_BUSY while one runs an async call).
  static Napi::Value stepBatch(const Napi::CallbackInfo& info);
  // The same off the event loop (a Promise of out).
  static Napi::Value stepBatchAsync(const Napi::CallbackInfo& info);

 private:
  // A method's callback: Method under guarded() (errors.h).
  template <Napi::Value (CacheWrap::*Method)(const Napi::CallbackInfo&)>
  Napi::Value guard(const Napi::CallbackInfo& info) {
    return guarded(info.Env(), [&] { return (this->*Method)(info); });
  }
  Napi::Value append(const Napi::CallbackInfo& info);
  Napi::Value attend(const Napi::CallbackInfo& info);
  Napi::Value appendAndAttend(const Napi::CallbackInfo& info, CacheOp op);
  Napi::Value step(const Napi::CallbackInfo& info);
  Napi::Value prefill(const Napi::CallbackInfo& info);
  Napi::Value attendAsync(const Napi::CallbackInfo& info);
  Napi::Value stepAsync(const Napi::CallbackInfo& info);
  Napi::Value prefillAsync(const Napi::CallbackInfo& info);
  Napi::Value fork(const Napi::CallbackInfo& info);
  Napi::Value stats(const Napi::CallbackInfo& info);
  Napi::Value save(const Napi::CallbackInfo& info);
  Napi::Value saveAsync(const Napi::CallbackInfo& info);
  Napi::Value tokens(const Napi::CallbackInfo& info);
  Napi::Value truncate(const Napi::CallbackInfo& info);
  Napi::Value positions(const Napi::CallbackInfo& info);
  Napi::Value config(const Napi::CallbackInfo& info);
  Napi::Value dispose(const Napi::CallbackInfo& info);

  std::unique_ptr<KVCache> cache_;
};

}  // namespace kvslim::napi
