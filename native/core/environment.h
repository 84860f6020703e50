// Integer settings read from the environment (test hooks such as KVSLIM_PREFILL_HEAD_FLOATS).
#pragma once
#include <cstdint>
#include <cstdlib>

namespace kvslim {

// The integer in environment variable `name`, or `fallback` when it is unset, not a whole
// integer, or below `minimum`. Callers read it once (a static), so it is set before first use.
inline int64_t environmentInteger(const char* name, int64_t fallback, int64_t minimum) {
  const char* text = std::getenv(name);
  if (text == nullptr || *text == '\0') return fallback;
  char* end = nullptr;
  const long long value = std::strtoll(text, &end, 10);
  return *end == '\0' && value >= minimum ? int64_t(value) : fallback;
}

}  // namespace kvslim
