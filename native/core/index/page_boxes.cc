#include "page_boxes.h"

#include <algorithm>

#include "../vector_ops.h"

namespace kvslim {

void PageBoxes::add(const float* keys, int64_t count) {
  const size_t dim = size_t(dim_);
  for (int64_t i = 0; i < count; ++i, ++keys_) {
    const float* key = keys + size_t(i) * dim;
    if (keys_ % pageSize_ == 0) {  // a new page starts with this key
      lo_.insert(lo_.end(), key, key + dim);
      hi_.insert(hi_.end(), key, key + dim);
      continue;
    }
    float* lo = lo_.data() + lo_.size() - dim;
    float* hi = hi_.data() + hi_.size() - dim;
    for (size_t d = 0; d < dim; ++d) {
      lo[d] = std::min(lo[d], key[d]);
      hi[d] = std::max(hi[d], key[d]);
    }
  }
}

void PageBoxes::bounds(const float* queries, int32_t rows, std::vector<float>* out) const {
  out->resize(size_t(pages()));
  hostVectorOps().boxBound(queries, rows, dim_, lo_.data(), hi_.data(), pages(), out->data());
}

}  // namespace kvslim
