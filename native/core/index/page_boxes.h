// Quest's page metadata (methods/retrieval-attention.md, Baselines): keys in pages of `pageSize`,
// each summarised by its per-channel minimum and maximum. The upper bound of a page for a query,
// sum_i max(q_i * min_i, q_i * max_i), is never below the page's best q.k.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

namespace kvslim {

class PageBoxes {
 public:
  PageBoxes(int32_t dim, int64_t pageSize) : dim_(dim), pageSize_(pageSize) {}
  // Appends `count` keys ([count, dim]); the last page may stay partial and grows.
  void add(const float* keys, int64_t count);
  // out[p] = max over the query rows ([rows, dim]) of page p's upper bound.
  void bounds(const float* queries, int32_t rows, std::vector<float>* out) const;
  int64_t pages() const { return int64_t(lo_.size() / size_t(dim_)); }
  int64_t keys() const { return keys_; }
  size_t bytes() const { return (lo_.size() + hi_.size()) * sizeof(float); }

 private:
  int32_t dim_;
  int64_t pageSize_;
  int64_t keys_ = 0;
  std::vector<float> lo_, hi_;  // [pages, dim]
};

}  // namespace kvslim
