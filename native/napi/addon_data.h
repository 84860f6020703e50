// Per-environment state of the addon (worker threads each load their own copy).
#pragma once
#include <napi.h>

namespace kvslim::napi {

struct AddonData {
  Napi::FunctionReference cacheConstructor;
  Napi::FunctionReference errorFactory;  // builds KVSlimError instances (set by lib/native.ts)
};

inline AddonData& addonData(Napi::Env env) { return *env.GetInstanceData<AddonData>(); }

}  // namespace kvslim::napi
