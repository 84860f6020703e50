// Registers quantize() / dequantize() on the addon's exports.
#pragma once
#include <napi.h>

namespace kvslim::napi {

void registerKiviOps(Napi::Env env, Napi::Object exports);

}  // namespace kvslim::napi
