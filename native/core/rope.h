// Rotary position embedding of query rows (the engine's `rope` option). StreamingLLM's 'cache'
// positions rotate a query by the difference between its cache slot and its absolute position
// for the sink logits (methods/streaming.md): rotations compose, so no key is ever re-rotated.
#pragma once
#include <cmath>
#include <cstdint>

namespace kvslim {

enum class RopeStyle : int32_t { Adjacent = 0, Half = 1 };  // pairs (2i, 2i+1) or (i, i + headDim/2)

struct RopeConfig {
  float theta = 0.0f;  // 0: the cache has no RoPE
  RopeStyle style = RopeStyle::Adjacent;
};

// Rotates one row of headDim values by `delta` positions: pair i turns by delta * theta^(-2i/headDim).
inline void rotateRow(float* x, int32_t headDim, double delta, const RopeConfig& rope) {
  const int32_t pairs = headDim / 2;
  for (int32_t i = 0; i < pairs; ++i) {
    const double angle = delta * std::pow(double(rope.theta), -2.0 * i / headDim);
    const float c = float(std::cos(angle)), s = float(std::sin(angle));
    const int32_t a = rope.style == RopeStyle::Adjacent ? 2 * i : i;
    const int32_t b = rope.style == RopeStyle::Adjacent ? 2 * i + 1 : i + pairs;
    const float xa = x[a], xb = x[b];
    x[a] = xa * c - xb * s;
    x[b] = xa * s + xb * c;
  }
}

}  // namespace kvslim
