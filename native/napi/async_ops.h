// Cache calls run off the event loop (AsyncWorker). The JS arrays a call reads and writes are
// referenced until it ends, and the cache is marked busy so no other call can overlap it.
#pragma once
#include <napi.h>

#include <memory>
#include <vector>

#include "../core/kv_cache.h"

namespace kvslim::napi {

enum class CacheOp { Attend, Step, Prefill };

// Arguments as the sync methods take them: (layer, q, [k, v,] dtype). Returns a Promise of the
// output Float32Array. Enters the cache (ERR_BUSY while another async call runs).
Napi::Value queueCacheOp(const Napi::CallbackInfo& info, KVCache& cache, CacheOp op);

// save() off the event loop: a Promise of the Buffer. Enters the cache (ERR_BUSY while another
// async call runs); `holder` (the wrapper) is referenced until the call ends.
Napi::Value queueSave(Napi::Env env, const Napi::Object& holder, KVCache& cache);

// KVCache::stepBatch off the event loop: a Promise of `out`. Enters every cache (ERR_BUSY, and
// none entered, while one runs another async call); the call's arrays are referenced until it ends.
Napi::Value queueStepBatch(const Napi::CallbackInfo& info, std::vector<KVCache*> caches, int32_t layer, HostTensor q, HostTensor k,
                           HostTensor v, Napi::Float32Array out);

// KVCache::load() off the event loop: a Promise of a NativeCache. `bytes` is referenced until the
// call ends (the caller must not change it meanwhile).
Napi::Value queueLoad(Napi::Env env, const Napi::Uint8Array& bytes, std::shared_ptr<Backend> backend, int32_t threads);

}  // namespace kvslim::napi
