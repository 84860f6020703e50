// Shape and storage choices of a KVCache, fixed at construction.
#pragma once
#include <cstdint>

#include "dtype.h"
#include "rope.h"
#include "select/select_policy.h"

namespace kvslim {

enum class StoreKind : int32_t { Dense = 0, Kivi = 1 };

struct CacheConfig {
  int32_t layers = 0;
  int32_t qHeads = 0;
  int32_t kvHeads = 0;
  int32_t headDim = 0;
  DType storeType = DType::F16;      // dense stores
  StoreKind storeKind = StoreKind::Dense;
  int32_t kiviBits = 2;              // KIVI stores (methods/kivi.md)
  int32_t kiviGroup = 32;
  int64_t kiviResidual = 128;
  double kiviOutliers = 0.0;         // dense-and-sparse fraction per vector (kivi_format.h); 0 = off
  bool kiviPreRope = false;          // keys appended pre-RoPE, rotated in attention (needs rope)
  SelectConfig select;               // which tokens stay (select/select_policy.h)
  RopeConfig rope;                   // the model's RoPE, when a policy needs it
  int64_t pageTokens = 64;
  float scale = 0.0f;   // 0 = 1 / sqrt(headDim)
  int32_t threads = 0;  // 0 = the whole pool
};

}  // namespace kvslim
