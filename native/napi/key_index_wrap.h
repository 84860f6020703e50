// The JS-side handle of a core KeyIndex (class NativeKeyIndex, used only by lib/key-index.ts), and
// the parsing of index options shared with policy.select 'retrieval'.
#pragma once
#include <napi.h>

#include <memory>

#include "../core/index/key_index.h"
#include "errors.h"

namespace kvslim::napi {

// kind ('flat' | 'ivf' | 'graph'), dim, lists, probes, degree, beam, neighbors, threads, seed:
// every field present (lib/ applied the defaults); names in errors are prefixed with `prefix`.
IndexOptions parseIndexOptions(Napi::Env env, const Napi::Object& object, const std::string& prefix);

// pageBounds(dim, pageSize, keys, queries): Quest's upper bound of every page of keys (core/index/page_boxes.h).
Napi::Value pageBoundsFn(const Napi::CallbackInfo& info);

class KeyIndexWrap : public Napi::ObjectWrap<KeyIndexWrap> {
 public:
  static Napi::Function define(Napi::Env env);
  // new NativeKeyIndex(options, keys: Float32Array, queries: Float32Array | undefined)
  explicit KeyIndexWrap(const Napi::CallbackInfo& info);

 private:
  // A method's callback: Method under guarded() (errors.h).
  template <Napi::Value (KeyIndexWrap::*Method)(const Napi::CallbackInfo&)>
  Napi::Value guard(const Napi::CallbackInfo& info) {
    return guarded(info.Env(), [&] { return (this->*Method)(info); });
  }
  // The constructor's work: the index built over the given keys.
  void build(const Napi::CallbackInfo& info);
  KeyIndex& live(Napi::Env env);
  Napi::Value add(const Napi::CallbackInfo& info);
  Napi::Value search(const Napi::CallbackInfo& info);
  Napi::Value size(const Napi::CallbackInfo& info);
  Napi::Value bytes(const Napi::CallbackInfo& info);
  Napi::Value dispose(const Napi::CallbackInfo& info);

  std::unique_ptr<KeyIndex> index_;
};

}  // namespace kvslim::napi
