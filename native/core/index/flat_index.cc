// Exact maximum-inner-product search: every key is scored on every search. It is the recall
// reference for the approximate indexes and the "Flat" baseline of methods/retrieval-attention.md.
#include <algorithm>
#include <cstdint>
#include <new>
#include <string>
#include <vector>

#include "key_index.h"

namespace kvslim {

namespace {

class FlatIndex final : public KeyIndex {
 public:
  explicit FlatIndex(const IndexOptions& options) : options_(options) {}

  // Training queries only shape the graph index; an exact scan has no structure to shape.
  Status build(const float* keys, int64_t n, const float* /*queries*/, int64_t /*queryCount*/) override {
    KVSLIM_RETURN_IF_ERROR(checkKeys(keys, n, 0, options_));
    try {
      keys_.assign(keys, keys + n * options_.dim);
    } catch (const std::bad_alloc&) {
      keys_.clear();
      count_ = 0;
      return Status(ErrorCode::OutOfMemory, "out of host memory for a flat index of " + std::to_string(n) + " keys");
    }
    count_ = n;
    return Status::ok();
  }

  Status add(const float* keys, int64_t n) override {
    KVSLIM_RETURN_IF_ERROR(checkKeys(keys, n, count_, options_));
    try {
      keys_.insert(keys_.end(), keys, keys + n * options_.dim);
    } catch (const std::bad_alloc&) {
      keys_.resize(size_t(count_) * size_t(options_.dim));  // insert may have failed half way
      return Status(ErrorCode::OutOfMemory, "out of host memory adding " + std::to_string(n) + " keys to a flat index");
    }
    count_ += n;
    return Status::ok();
  }

  void searchKeys(const float* queries, int32_t rows, int64_t k, const SearchOptions& /*options*/,
                  SearchResult* out) const override {
    exactSearch(queries, rows, options_.dim, keys_.data(), count_, k, out);
  }

  int64_t size() const override { return count_; }
  size_t bytes() const override { return keys_.size() * sizeof(float); }
  std::unique_ptr<KeyIndex> clone() const override { return std::make_unique<FlatIndex>(*this); }
  const IndexOptions& options() const override { return options_; }

 private:
  IndexOptions options_;
  std::vector<float> keys_;  // [count_, dim], row i is id i
  int64_t count_ = 0;
};

}  // namespace

std::unique_ptr<KeyIndex> makeFlatIndex(const IndexOptions& options) { return std::make_unique<FlatIndex>(options); }

}  // namespace kvslim
