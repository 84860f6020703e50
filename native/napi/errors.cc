#include "errors.h"

namespace kvslim::napi {

namespace {
Napi::FunctionReference& factory() {
  static Napi::FunctionReference reference;
  return reference;
}
}  // namespace

void setErrorFactory(const Napi::Function& fn) {
  factory() = Napi::Persistent(fn);
  factory().SuppressDestruct();
}

Napi::Value makeError(Napi::Env env, const Status& status) {
  const char* code = errorCodeName(status.code());
  if (factory().IsEmpty()) {
    Napi::Error error = Napi::Error::New(env, status.message());
    error.Set("code", Napi::String::New(env, code));
    return error.Value();
  }
  return factory().Call({Napi::String::New(env, code), Napi::String::New(env, status.message())});
}

void throwStatus(Napi::Env env, const Status& status) {
  throw Napi::Error(env, makeError(env, status));
}

}  // namespace kvslim::napi
