#include "convert.h"

#include <cmath>

#include "errors.h"

namespace kvslim::napi {

namespace {
[[noreturn]] void fail(Napi::Env env, ErrorCode code, const std::string& message) {
  throwStatus(env, Status(code, message));
}
}  // namespace

DType parseDtype(Napi::Env env, const Napi::Value& value, const char* argument) {
  if (value.IsString()) {
    const std::string name = value.As<Napi::String>();
    if (name == "f32") return DType::F32;
    if (name == "f16") return DType::F16;
    if (name == "bf16") return DType::BF16;
  }
  fail(env, ErrorCode::Dtype, std::string(argument) + " must be 'f32', 'f16' or 'bf16'");
}

HostTensor tensorArg(Napi::Env env, const Napi::Value& value, DType dtype, const char* argument) {
  if (!value.IsTypedArray()) {
    fail(env, ErrorCode::Dtype, std::string(argument) + " must be a Float32Array or Uint16Array");
  }
  Napi::TypedArray array = value.As<Napi::TypedArray>();
  const napi_typedarray_type type = array.TypedArrayType();
  const bool matches = dtype == DType::F32 ? type == napi_float32_array : type == napi_uint16_array;
  if (!matches) {
    fail(env, ErrorCode::Dtype, std::string(argument) + " must be a " +
                                    (dtype == DType::F32 ? "Float32Array for dtype f32" : "Uint16Array for dtype f16/bf16"));
  }
  Napi::ArrayBuffer buffer = array.ArrayBuffer();
  const size_t offset = array.ByteOffset();
  const size_t count = array.ElementLength();
  if (buffer.IsDetached() || offset + count * dtypeBytes(dtype) > buffer.ByteLength()) {
    fail(env, ErrorCode::Shape, std::string(argument) + " views memory outside its buffer (detached?)");
  }
  HostTensor tensor;
  tensor.data = static_cast<const uint8_t*>(buffer.Data()) + offset;
  tensor.dtype = dtype;
  tensor.count = count;
  return tensor;
}

Napi::Float32Array outputArg(Napi::Env env, const Napi::Value& value, size_t count, const char* shape) {
  if (value.IsUndefined() || value.IsNull()) return Napi::Float32Array::New(env, count);
  if (!value.IsTypedArray() || value.As<Napi::TypedArray>().TypedArrayType() != napi_float32_array) {
    fail(env, ErrorCode::Dtype, "out must be a Float32Array");
  }
  Napi::Float32Array out = value.As<Napi::Float32Array>();
  if (out.ElementLength() != count) {
    fail(env, ErrorCode::Shape, "out must hold " + std::to_string(count) + " elements (" + shape + "), but holds " +
                                    std::to_string(out.ElementLength()));
  }
  if (out.ArrayBuffer().IsDetached()) fail(env, ErrorCode::Shape, "out is detached");
  return out;
}

static Napi::Value field(Napi::Env env, const Napi::Object& object, const char* name) {
  if (!object.Has(name)) fail(env, ErrorCode::Option, std::string("missing option ") + name);
  return object.Get(name);
}

int32_t intArg(Napi::Env env, const Napi::Value& value, const char* argument) {
  if (!value.IsNumber()) fail(env, ErrorCode::Option, std::string(argument) + " must be an integer");
  const double number = value.As<Napi::Number>().DoubleValue();
  if (!std::isfinite(number) || std::floor(number) != number || std::fabs(number) > 2147483647.0) {
    fail(env, ErrorCode::Option, std::string(argument) + " must be an integer, but received " + std::to_string(number));
  }
  return int32_t(number);
}

int32_t intArgIn(Napi::Env env, const Napi::Value& value, const char* argument, int32_t min, int32_t max) {
  const int32_t number = intArg(env, value, argument);
  if (number < min || number > max) {
    fail(env, ErrorCode::Option, std::string(argument) + " must be in [" + std::to_string(min) + ", " + std::to_string(max) +
                                     "], but received " + std::to_string(number));
  }
  return number;
}

int32_t intField(Napi::Env env, const Napi::Object& object, const char* name) {
  return intArg(env, field(env, object, name), name);
}

int32_t intFieldIn(Napi::Env env, const Napi::Object& object, const char* name, int32_t min, int32_t max) {
  return intArgIn(env, field(env, object, name), name, min, max);
}

double numberField(Napi::Env env, const Napi::Object& object, const char* name) {
  Napi::Value value = field(env, object, name);
  if (!value.IsNumber()) fail(env, ErrorCode::Option, std::string(name) + " must be a number");
  const double number = value.As<Napi::Number>().DoubleValue();
  if (!std::isfinite(number)) fail(env, ErrorCode::Option, std::string(name) + " must be finite");
  return number;
}

bool boolField(Napi::Env env, const Napi::Object& object, const char* name) {
  Napi::Value value = field(env, object, name);
  if (!value.IsBoolean()) fail(env, ErrorCode::Option, std::string(name) + " must be a boolean");
  return value.As<Napi::Boolean>();
}

std::string stringField(Napi::Env env, const Napi::Object& object, const char* name) {
  Napi::Value value = field(env, object, name);
  if (!value.IsString()) fail(env, ErrorCode::Option, std::string(name) + " must be a string");
  return value.As<Napi::String>();
}

Napi::Buffer<uint8_t> bufferOf(Napi::Env env, std::vector<uint8_t> bytes) {
  auto* owned = new std::vector<uint8_t>(std::move(bytes));
  return Napi::Buffer<uint8_t>::NewOrCopy(env, owned->data(), owned->size(),
                                          [](Napi::Env, uint8_t*, std::vector<uint8_t>* hint) { delete hint; }, owned);
}

}  // namespace kvslim::napi
