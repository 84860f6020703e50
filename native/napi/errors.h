// Turning core Status values into KVSlimError instances. lib/ hands its error class's factory to
// the addon at load (setErrorFactory), so C++ never invents its own error type. The factory is
// per environment: each worker thread that loads kvslim has its own.
#pragma once
#include <napi.h>

#include <exception>
#include <new>
#include <string>

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

// The ERR_INTERNAL status of a C++ exception that escaped the core (the core reports failures as
// Status, so such an exception is a bug); `what` is its message.
inline Status escapedException(const std::string& what) {
  return Status(ErrorCode::Internal, "internal error (a C++ exception): " + what);
}

// call() with a C++ exception that escaped the core turned into a KVSlimError (escapedException;
// ERR_OUT_OF_MEMORY for std::bad_alloc). node-addon-api passes on only Napi::Error; anything else
// reaching N-API would abort the process.
template <class Call>
Napi::Value guarded(Napi::Env env, const Call& call) {
  try {
    return call();
  } catch (const Napi::Error&) {
    throw;
  } catch (const std::bad_alloc&) {
    throwStatus(env, Status(ErrorCode::OutOfMemory, "out of host memory"));
  } catch (const std::exception& error) {
    throwStatus(env, escapedException(error.what()));
  }
}

// A JS function's callback: Fn under guarded().
template <Napi::Value (*Fn)(const Napi::CallbackInfo&)>
Napi::Value guardedFn(const Napi::CallbackInfo& info) {
  return guarded(info.Env(), [&] { return Fn(info); });
}

}  // namespace kvslim::napi
