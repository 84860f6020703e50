// An index's own copy of its keys, [rows, dim], row i = id i: f32, or f16 when the keys come from
// an f16 cache. There f32 -> f16 is exact (the keys were f16 to begin with) and the kernels widen
// f16 exactly, so every score is the same as over the f32 copy, in half the bytes.
#pragma once
#include <algorithm>
#include <cstdint>
#include <vector>

#include "../dtype.h"
#include "../vector_ops.h"

namespace kvslim {

// Reserves at least `needed`, doubling, so that one-key-at-a-time adds stay amortised O(1).
template <class T>
void reserveGeometric(std::vector<T>* values, size_t needed) {
  if (needed > values->capacity()) values->reserve(std::max(needed, 2 * values->capacity()));
}

class KeyRows {
 public:
  explicit KeyRows(int32_t dim = 0, bool half = false) : dim_(dim), half_(half) {}

  int64_t rows() const { return rows_; }
  size_t bytes() const { return half_ ? halves_.size() * sizeof(uint16_t) : floats_.size() * sizeof(float); }

  // Room for `rows` keys, growing geometrically (one key at a time stays amortised O(1)).
  void reserve(size_t rows) {
    if (half_) reserveGeometric(&halves_, rows * size_t(dim_));
    else reserveGeometric(&floats_, rows * size_t(dim_));
  }
  void append(const float* keys, int64_t n) {
    const size_t count = size_t(n) * size_t(dim_);
    if (half_) {
      reserve(size_t(rows_ + n));
      for (size_t i = 0; i < count; ++i) halves_.push_back(floatToF16(keys[i]));
    } else {
      floats_.insert(floats_.end(), keys, keys + count);
    }
    rows_ += n;
  }
  void truncate(int64_t rows) {
    rows_ = rows;
    halves_.resize(half_ ? size_t(rows) * size_t(dim_) : 0);
    floats_.resize(half_ ? 0 : size_t(rows) * size_t(dim_));
  }

  // Key `id` as f32 into out[dim] (a key used as a query).
  void row(uint32_t id, float* out) const {
    const size_t at = size_t(id) * size_t(dim_);
    if (half_) {
      for (int32_t i = 0; i < dim_; ++i) out[i] = f16ToFloat(halves_[at + size_t(i)]);
    } else {
      std::copy(floats_.begin() + at, floats_.begin() + at + size_t(dim_), out);
    }
  }
  // out[i] = max over the query rows of q.key(first + i), i < count.
  void maxDots(const float* queries, int32_t rows, int64_t first, int64_t count, float* out) const {
    hostVectorOps().maxDot(queries, rows, dim_, at(first), count, out);
  }
  // out[r * count + i] = q_r.key(first + i): every pair.
  void dots(const float* queries, int32_t rows, int64_t first, int64_t count, float* out) const {
    hostVectorOps().dotMatrix(queries, rows, dim_, at(first), count, out);
  }
  // out[i] = max over the query rows of q.key(ids[i]).
  void gather(const float* queries, int32_t rows, const uint32_t* ids, int64_t count, float* out) const {
    hostVectorOps().maxDotGather(queries, rows, dim_, at(0), ids, count, out);
  }

 private:
  KeyData at(int64_t first) const {
    const size_t offset = size_t(first) * size_t(dim_);
    return half_ ? KeyData(halves_.data() + offset) : KeyData(floats_.data() + offset);
  }

  int32_t dim_ = 0;
  bool half_ = false;
  int64_t rows_ = 0;
  std::vector<float> floats_;
  std::vector<uint16_t> halves_;
};

}  // namespace kvslim
