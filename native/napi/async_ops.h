// Cache calls run off the event loop (AsyncWorker). The JS arrays a call reads and writes are
// referenced until it ends, and the cache is marked busy so no other call can overlap it.
#pragma once
#include <napi.h>

#include "../core/kv_cache.h"

namespace kvslim::napi {

enum class CacheOp { Attend, Step, Prefill };

// Arguments as the sync methods take them: (layer, q, [k, v,] dtype). Returns a Promise of the
// output Float32Array; the cache must already be entered (tryEnter) by the caller.
Napi::Value queueCacheOp(const Napi::CallbackInfo& info, KVCache& cache, CacheOp op);

}  // namespace kvslim::napi
