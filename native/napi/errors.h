// Turning core Status values into KVSlimError instances. lib/ hands its error class's factory to
// the addon at load (setErrorFactory), so C++ never invents its own error type.
#pragma once
#include <napi.h>

#include "../core/status.h"

namespace kvslim::napi {

void setErrorFactory(const Napi::Function& factory);
// A KVSlimError for the status (code + message).
Napi::Value makeError(Napi::Env env, const Status& status);
// Throws the status as a JS exception (C++ exceptions are enabled: NAPI_CPP_EXCEPTIONS).
[[noreturn]] void throwStatus(Napi::Env env, const Status& status);
inline void throwIfError(Napi::Env env, const Status& status) {
  if (!status.isOk()) throwStatus(env, status);
}

}  // namespace kvslim::napi
