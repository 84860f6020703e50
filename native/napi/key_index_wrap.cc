#include "key_index_wrap.h"

#include <cmath>
#include <string>

#include "../core/index/page_boxes.h"
#include "convert.h"
#include "errors.h"

namespace kvslim::napi {

namespace {

// A Float32Array holding whole rows of `dim` floats; `rows` receives their count.
const float* rowsArg(Napi::Env env, const Napi::Value& value, int32_t dim, const char* argument, int64_t* rows) {
  if (!value.IsTypedArray() || value.As<Napi::TypedArray>().TypedArrayType() != napi_float32_array) {
    throwStatus(env, Status(ErrorCode::Dtype, std::string(argument) + " must be a Float32Array"));
  }
  Napi::Float32Array array = value.As<Napi::Float32Array>();
  if (array.ArrayBuffer().IsDetached()) throwStatus(env, Status(ErrorCode::Shape, std::string(argument) + " is detached"));
  const size_t length = array.ElementLength();
  if (length % size_t(dim) != 0) {
    throwStatus(env, Status(ErrorCode::Shape, std::string(argument) + " must hold whole rows of dim = " + std::to_string(dim) +
                                                  " floats, but holds " + std::to_string(length)));
  }
  const float* data = array.Data();
  for (size_t i = 0; i < length; ++i) {
    if (!std::isfinite(data[i])) {
      throwStatus(env, Status(ErrorCode::Value, std::string(argument) + " holds a non-finite value at index " + std::to_string(i)));
    }
  }
  *rows = int64_t(length / size_t(dim));
  return data;
}

}  // namespace

IndexOptions parseIndexOptions(Napi::Env env, const Napi::Object& object, const std::string& prefix) {
  IndexOptions options;
  const std::string kind = stringField(env, object, "kind");
  if (kind == "flat") options.kind = IndexKind::Flat;
  else if (kind == "ivf") options.kind = IndexKind::Ivf;
  else if (kind == "graph") options.kind = IndexKind::Graph;
  else throwStatus(env, Status(ErrorCode::Option, prefix + "kind must be 'flat', 'ivf' or 'graph', but received '" + kind + "'"));
  options.dim = intField(env, object, "dim");
  options.lists = intField(env, object, "lists");
  options.probes = intField(env, object, "probes");
  options.degree = intField(env, object, "degree");
  options.beam = intField(env, object, "beam");
  options.neighbors = intField(env, object, "neighbors");
  options.threads = intField(env, object, "threads");
  const int32_t seed = intField(env, object, "seed");
  if (seed < 0) throwStatus(env, Status(ErrorCode::Option, prefix + "seed must be >= 0, but received " + std::to_string(seed)));
  options.seed = uint64_t(seed);
  const Napi::Value halfKeys = object.Get("halfKeys");
  options.halfKeys = halfKeys.IsBoolean() && halfKeys.As<Napi::Boolean>().Value();
  return options;
}

Napi::Function KeyIndexWrap::define(Napi::Env env) {
  return DefineClass(env, "NativeKeyIndex",
                     {InstanceMethod<&KeyIndexWrap::guard<&KeyIndexWrap::add>>("add"),
                      InstanceMethod<&KeyIndexWrap::guard<&KeyIndexWrap::search>>("search"),
                      InstanceMethod<&KeyIndexWrap::guard<&KeyIndexWrap::size>>("size"),
                      InstanceMethod<&KeyIndexWrap::guard<&KeyIndexWrap::bytes>>("bytes"),
                      InstanceMethod<&KeyIndexWrap::guard<&KeyIndexWrap::dispose>>("dispose")});
}

KeyIndexWrap::KeyIndexWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<KeyIndexWrap>(info) {
  guarded(info.Env(), [&] {
    build(info);
    return info.Env().Undefined();
  });
}

void KeyIndexWrap::build(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsObject()) throwStatus(env, Status(ErrorCode::Option, "index options must be an object"));
  const IndexOptions options = parseIndexOptions(env, info[0].As<Napi::Object>(), "");
  std::unique_ptr<KeyIndex> index;
  throwIfError(env, makeKeyIndex(options, &index));
  int64_t keys = 0, queries = 0;
  const float* keyData = rowsArg(env, info[1], options.dim, "keys", &keys);
  const float* queryData = info[2].IsUndefined() ? nullptr : rowsArg(env, info[2], options.dim, "queries", &queries);
  if (keys > int64_t(UINT32_MAX)) throwStatus(env, Status(ErrorCode::Shape, "keys holds more than 2^32 - 1 rows"));
  throwIfError(env, index->build(keyData, keys, queryData, queries));
  index_ = std::move(index);
}

KeyIndex& KeyIndexWrap::live(Napi::Env env) {
  if (!index_) throwStatus(env, Status(ErrorCode::Disposed, "the index was disposed"));
  return *index_;
}

Napi::Value KeyIndexWrap::add(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  KeyIndex& index = live(env);
  int64_t rows = 0;
  const float* keys = rowsArg(env, info[0], index.options().dim, "keys", &rows);
  if (index.size() + rows > int64_t(UINT32_MAX)) throwStatus(env, Status(ErrorCode::Shape, "the index would hold more than 2^32 - 1 keys"));
  throwIfError(env, index.add(keys, rows));
  return env.Undefined();
}

Napi::Value KeyIndexWrap::search(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  KeyIndex& index = live(env);
  int64_t rows = 0;
  const float* queries = rowsArg(env, info[0], index.options().dim, "queries", &rows);
  if (rows < 1 || rows > 1024) throwStatus(env, Status(ErrorCode::Shape, "queries must hold 1 to 1024 rows, but holds " + std::to_string(rows)));
  const int32_t k = intArg(env, info[1], "k");
  if (k < 1) throwStatus(env, Status(ErrorCode::Option, "k must be a positive integer"));
  SearchOptions options;
  options.probes = intArg(env, info[2], "probes");
  options.beam = intArg(env, info[3], "beam");
  if (options.probes < 0 || options.beam < 0) throwStatus(env, Status(ErrorCode::Option, "probes and beam must be integers >= 0"));
  SearchResult result;
  throwIfError(env, index.search(queries, int32_t(rows), k, options, &result));
  Napi::Uint32Array ids = Napi::Uint32Array::New(env, result.ids.size());
  Napi::Float32Array scores = Napi::Float32Array::New(env, result.scores.size());
  std::copy(result.ids.begin(), result.ids.end(), ids.Data());
  std::copy(result.scores.begin(), result.scores.end(), scores.Data());
  Napi::Object out = Napi::Object::New(env);
  out.Set("ids", ids);
  out.Set("scores", scores);
  out.Set("scanned", double(result.scanned));
  return out;
}

Napi::Value KeyIndexWrap::size(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), double(live(info.Env()).size())); }
Napi::Value KeyIndexWrap::bytes(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), double(live(info.Env()).bytes())); }
Napi::Value KeyIndexWrap::dispose(const Napi::CallbackInfo& info) {
  index_.reset();
  return info.Env().Undefined();
}

Napi::Value pageBoundsFn(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const int32_t dim = intArgIn(env, info[0], "dim", 1, 4096);
  const int32_t pageSize = intArg(env, info[1], "pageSize");
  if (pageSize < 1) throwStatus(env, Status(ErrorCode::Option, "pageSize must be a positive integer"));
  int64_t keys = 0, rows = 0;
  const float* keyData = rowsArg(env, info[2], dim, "keys", &keys);
  const float* queries = rowsArg(env, info[3], dim, "queries", &rows);
  if (rows < 1 || rows > 1024) throwStatus(env, Status(ErrorCode::Shape, "queries must hold 1 to 1024 rows"));
  PageBoxes boxes(dim, pageSize);
  boxes.add(keyData, keys);
  std::vector<float> bounds;
  boxes.bounds(queries, int32_t(rows), &bounds);
  Napi::Float32Array out = Napi::Float32Array::New(env, bounds.size());
  std::copy(bounds.begin(), bounds.end(), out.Data());
  return out;
}

}  // namespace kvslim::napi
