// Size checks that C++ repeats even though lib/ validated first: a typed array can lie.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

#include "status.h"

namespace kvslim {

inline Status expectPositive(const char* name, int64_t value) {
  if (value > 0) return Status::ok();
  return Status(ErrorCode::Option, std::string(name) + " must be a positive integer, but received " + std::to_string(value));
}

inline Status expectCount(const char* name, size_t actual, size_t expected, const char* shape) {
  if (actual == expected) return Status::ok();
  return Status(ErrorCode::Shape, std::string(name) + " must hold " + std::to_string(expected) + " elements " + shape +
                                      ", but holds " + std::to_string(actual));
}

// Heads, group divisibility and head size, shared by the stateless op and the cache.
inline Status checkHeads(int64_t qHeads, int64_t kvHeads, int64_t headDim) {
  KVSLIM_RETURN_IF_ERROR(expectPositive("qHeads", qHeads));
  KVSLIM_RETURN_IF_ERROR(expectPositive("kvHeads", kvHeads));
  KVSLIM_RETURN_IF_ERROR(expectPositive("headDim", headDim));
  if (qHeads % kvHeads != 0) {
    return Status(ErrorCode::Option, "qHeads must be a multiple of kvHeads, but received qHeads=" +
                                         std::to_string(qHeads) + ", kvHeads=" + std::to_string(kvHeads));
  }
  if (headDim > 1024) {
    return Status(ErrorCode::Option, "headDim must be at most 1024, but received " + std::to_string(headDim));
  }
  return Status::ok();
}

}  // namespace kvslim
