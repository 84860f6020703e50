// splitmix64: a tiny seedable generator, identical on every platform (std distributions are
// not), for the indexes' sampling.
#pragma once
#include <cstdint>

namespace kvslim {

class SplitMix64 {
 public:
  explicit SplitMix64(uint64_t seed) : state_(seed) {}
  uint64_t next() {
    uint64_t z = (state_ += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  uint64_t below(uint64_t bound) { return next() % bound; }  // bias ~bound/2^64, irrelevant here

 private:
  uint64_t state_;
};

}  // namespace kvslim
