// quantize() / dequantize(): the stateless KIVI ops (core/kivi_ops.h) as JS functions.
#include "kivi_ops.h"

#include <cstring>
#include <type_traits>

#include "../core/kivi_ops.h"
#include "convert.h"
#include "errors.h"

namespace kvslim::napi {

namespace {

QuantAxis parseAxis(Napi::Env env, const Napi::Object& options) {
  const std::string axis = stringField(env, options, "axis");
  if (axis == "channel") return QuantAxis::Channel;
  if (axis == "token") return QuantAxis::Token;
  throwStatus(env, Status(ErrorCode::Option, "axis must be 'channel' or 'token', but received '" + axis + "'"));
}

template <typename Array, typename T>
void copyInto(Napi::Env env, const Napi::Value& value, const char* name, std::vector<T>* out) {
  constexpr bool isCodes = std::is_same<T, uint32_t>::value;
  const napi_typedarray_type expected = isCodes ? napi_uint32_array : napi_float32_array;
  if (!value.IsTypedArray() || value.As<Napi::TypedArray>().TypedArrayType() != expected) {
    throwStatus(env, Status(ErrorCode::Dtype, std::string(name) + " must be a " + (isCodes ? "Uint32Array" : "Float32Array")));
  }
  Array array = value.As<Array>();
  if (array.ArrayBuffer().IsDetached()) throwStatus(env, Status(ErrorCode::Shape, std::string(name) + " is detached"));
  out->resize(array.ElementLength());
  if (!out->empty()) std::memcpy(out->data(), array.Data(), out->size() * sizeof(T));
}

template <typename Array, typename T>
Array toArray(Napi::Env env, const std::vector<T>& values) {
  Array array = Array::New(env, values.size());
  if (!values.empty()) std::memcpy(array.Data(), values.data(), values.size() * sizeof(T));
  return array;
}

Napi::Value quantizeFn(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsObject()) throwStatus(env, Status(ErrorCode::Option, "quantize expects an options object"));
  Napi::Object options = info[0].As<Napi::Object>();
  const DType dtype = parseDtype(env, options.Get("dtype"), "dtype");
  const HostTensor x = tensorArg(env, options.Get("x"), dtype, "x");
  QuantizedMatrix q;
  throwIfError(env, quantizeMatrix(x, intField(env, options, "channels"), parseAxis(env, options),
                                   intField(env, options, "bits"), intField(env, options, "group"), &q));
  Napi::Object result = Napi::Object::New(env);
  result.Set("tokens", double(q.tokens));
  result.Set("codes", toArray<Napi::Uint32Array>(env, q.codes));
  result.Set("scales", toArray<Napi::Float32Array>(env, q.scales));
  result.Set("zeros", toArray<Napi::Float32Array>(env, q.mins));
  return result;
}

Napi::Value dequantizeFn(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsObject()) throwStatus(env, Status(ErrorCode::Option, "dequantize expects a quantized tensor"));
  Napi::Object options = info[0].As<Napi::Object>();
  QuantizedMatrix q;
  q.axis = parseAxis(env, options);
  q.bits = intField(env, options, "bits");
  q.group = intField(env, options, "group");
  q.channels = intField(env, options, "channels");
  const double tokens = numberField(env, options, "tokens");
  if (tokens < 1 || tokens > 9.0e15 || double(int64_t(tokens)) != tokens) {
    throwStatus(env, Status(ErrorCode::Option, "tokens must be a positive integer"));
  }
  q.tokens = int64_t(tokens);
  copyInto<Napi::Uint32Array>(env, options.Get("codes"), "codes", &q.codes);
  copyInto<Napi::Float32Array>(env, options.Get("scales"), "scales", &q.scales);
  copyInto<Napi::Float32Array>(env, options.Get("zeros"), "zeros", &q.mins);
  std::vector<float> out;
  throwIfError(env, dequantizeMatrix(q, &out));
  return toArray<Napi::Float32Array>(env, out);
}

}  // namespace

void registerKiviOps(Napi::Env env, Napi::Object exports) {
  exports.Set("quantize", Napi::Function::New(env, guardedFn<quantizeFn>));
  exports.Set("dequantize", Napi::Function::New(env, guardedFn<dequantizeFn>));
}

}  // namespace kvslim::napi
