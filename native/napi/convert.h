// Reading JS arguments into core views. Every typed array is checked for its element type against
// the dtype it claims, and only its real byte length is ever used.
#pragma once
#include <napi.h>

#include <string>
#include <vector>

#include "../core/dtype.h"
#include "../core/tensor_convert.h"

namespace kvslim::napi {

// 'f32' | 'f16' | 'bf16'; anything else is ERR_DTYPE naming `argument`.
DType parseDtype(Napi::Env env, const Napi::Value& value, const char* argument);

// A Float32Array (f32) or Uint16Array (f16 / bf16) matching `dtype`.
HostTensor tensorArg(Napi::Env env, const Napi::Value& value, DType dtype, const char* argument);

// The output array: `value` when it is a Float32Array of exactly `count` elements (reused by the
// caller across calls), a new one when it is undefined; anything else is an error naming `out`.
Napi::Float32Array outputArg(Napi::Env env, const Napi::Value& value, size_t count, const char* shape = "n x qHeads x headDim");

// Required fields of an options object, with type checks.
int32_t intField(Napi::Env env, const Napi::Object& object, const char* name);
int32_t intFieldIn(Napi::Env env, const Napi::Object& object, const char* name, int32_t min, int32_t max);
double numberField(Napi::Env env, const Napi::Object& object, const char* name);
bool boolField(Napi::Env env, const Napi::Object& object, const char* name);
std::string stringField(Napi::Env env, const Napi::Object& object, const char* name);
int32_t intArg(Napi::Env env, const Napi::Value& value, const char* argument);
// intArg within [min, max] (ERR_OPTION naming the argument and the range).
int32_t intArgIn(Napi::Env env, const Napi::Value& value, const char* argument, int32_t min, int32_t max);

// A Buffer over `bytes` without copying them (freed with the Buffer), or a copy where the runtime
// allows no external buffers.
Napi::Buffer<uint8_t> bufferOf(Napi::Env env, std::vector<uint8_t> bytes);

}  // namespace kvslim::napi
