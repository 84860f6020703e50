#include "errors.h"

#include "addon_data.h"

namespace kvslim::napi {

void setErrorFactory(Napi::Env env, const Napi::Function& fn) { addonData(env).errorFactory = Napi::Persistent(fn); }

Napi::Value makeError(Napi::Env env, const Status& status) {
  const char* code = errorCodeName(status.code());
  Napi::FunctionReference& factory = addonData(env).errorFactory;
  if (factory.IsEmpty()) {
    Napi::Error error = Napi::Error::New(env, status.message());
    error.Set("code", Napi::String::New(env, code));
    return error.Value();
  }
  return factory.Call({Napi::String::New(env, code), Napi::String::New(env, status.message())});
}

void throwStatus(Napi::Env env, const Status& status) {
  throw Napi::Error(env, makeError(env, status));
}

}  // namespace kvslim::napi
