// Turning core Status values into KVSlimError instances. lib/ hands its error class's factory to
// the addon at load (setErrorFactory), so C++ never invents its own error type. The factory is
// per environment: each worker thread that loads kvslim has its own.
#pragma once
#include <napi.h>

#include "../core/status.h"

namespace kvslim::napi {

void setErrorFactory(Napi::Env env, const Napi::Function& factory);
// A KVSlimError for the status (code + message).
Napi::Value makeError(Napi::Env env, const Status& status);
// Throws the status as a JS exception (C++ exceptions are enabled: NAPI_CPP_EXCEPTIONS).
[[noreturn]] void throwStatus(Napi::Env env, const Status& status);
inline void throwIfError(Napi::Env env, const Status& status) {
  if (!status.isOk()) throwStatus(env, status);
}

}  // namespace kvslim::napi
