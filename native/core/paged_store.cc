#include "paged_store.h"

#include <algorithm>
#include <string>

namespace kvslim {

PagedStore::PagedStore(std::shared_ptr<Backend> backend, const PagedStoreShape& shape)
    : backend_(std::move(backend)),
      shape_(shape),
      pageBytes_(2 * size_t(shape.pageTokens) * size_t(shape.headDim) * dtypeBytes(shape.storeType)),
      heads_(size_t(shape.layers) * size_t(shape.kvHeads)),
      layerTokens_(size_t(shape.layers), 0) {}

size_t PagedStore::pageCount(int32_t layer) const {
  size_t count = 0;
  for (int32_t h = 0; h < shape_.kvHeads; ++h) count += head(layer, h).pages.size();
  return count;
}

size_t PagedStore::sharedPageCount() const {
  size_t count = 0;
  for (const HeadPages& pages : heads_)
    for (const auto& page : pages.pages) count += page.use_count() > 1 ? 1 : 0;
  return count;
}

KVHeadView PagedStore::view(int32_t layer, int32_t h) const {
  const HeadPages& pages = head(layer, h);
  KVHeadView headView;
  headView.keyPages = pages.keyPointers.data();
  headView.valuePages = pages.valuePointers.data();
  headView.tokens = layerTokens_[size_t(layer)];
  return headView;
}

Status PagedStore::newPage(std::shared_ptr<Page>* out) {
  void* memory = backend_->allocate(pageBytes_);
  if (memory == nullptr) {
    return Status(ErrorCode::OutOfMemory, "could not allocate a KV page of " +
                                              std::to_string(pageBytes_) + " bytes on " + backend_->name());
  }
  *out = std::make_shared<Page>(backend_, memory);
  return Status::ok();
}

Status PagedStore::append(int32_t layer, const HostTensor& k, const HostTensor& v, int64_t n) {
  const int32_t kvHeads = shape_.kvHeads;
  const size_t rowElements = size_t(shape_.headDim);
  const size_t rowBytes = rowElements * dtypeBytes(shape_.storeType);
  const size_t partBytes = pageBytes_ / 2;
  const int64_t before = layerTokens_[size_t(layer)];
  const int64_t pageTokens = shape_.pageTokens;

  // Convert and check everything before touching the store, so a NaN leaves it unchanged.
  // Staging is head-major ([kvHeads, n, headDim]) so each page receives one contiguous upload.
  // Grow-only per-thread staging up to kKeepStagingBytes: a fresh multi-megabyte buffer per
  // append would be mapped and page-faulted on every call. Larger appends (long prompts) use a
  // buffer of their own, freed when they return.
  constexpr size_t kKeepStagingBytes = size_t(64) << 20;
  thread_local std::vector<uint8_t> keptKeys, keptValues;
  std::vector<uint8_t> ownKeys, ownValues;
  const size_t stagingBytes = size_t(n) * size_t(kvHeads) * rowBytes;
  const bool keep = stagingBytes <= kKeepStagingBytes;
  std::vector<uint8_t>& keys = keep ? keptKeys : ownKeys;
  std::vector<uint8_t>& values = keep ? keptValues : ownValues;
  if (keys.size() < stagingBytes) {
    keys.resize(stagingBytes);
    values.resize(stagingBytes);
  }
  for (int64_t t = 0; t < n; ++t) {
    for (int32_t h = 0; h < kvHeads; ++h) {
      const size_t first = (size_t(t) * size_t(kvHeads) + size_t(h)) * rowElements;
      const size_t staged = (size_t(h) * size_t(n) + size_t(t)) * rowBytes;
      KVSLIM_RETURN_IF_ERROR(convertChecked(k, first, rowElements, keys.data() + staged, shape_.storeType, "k"));
      KVSLIM_RETURN_IF_ERROR(convertChecked(v, first, rowElements, values.data() + staged, shape_.storeType, "v"));
    }
  }

  // Build the new page tables aside; swap them in only when every allocation and copy succeeded.
  std::vector<HeadPages> updated;
  updated.reserve(size_t(kvHeads));
  for (int32_t h = 0; h < kvHeads; ++h) {
    const HeadPages& current = head(layer, h);
    // Decide before copying the table: the copy itself holds one more reference to every page.
    const bool lastPageShared = !current.pages.empty() && current.pages.back().use_count() > 1;
    HeadPages pages = current;
    int64_t token = before;
    int64_t written = 0;
    while (written < n) {
      const int64_t row = token % pageTokens;
      if (row == 0) {
        std::shared_ptr<Page> page;
        KVSLIM_RETURN_IF_ERROR(newPage(&page));
        pages.pages.push_back(std::move(page));
      } else if (written == 0 && lastPageShared) {
        // Copy-on-write: a fork still reads this page's rows, and will write its own tail.
        std::shared_ptr<Page> copy;
        KVSLIM_RETURN_IF_ERROR(newPage(&copy));
        KVSLIM_RETURN_IF_ERROR(backend_->copy(copy->memory(), pages.pages.back()->memory(), pageBytes_));
        pages.pages.back() = std::move(copy);
      }
      const int64_t rows = std::min(pageTokens - row, n - written);
      uint8_t* base = static_cast<uint8_t*>(pages.pages.back()->memory());
      const size_t src = (size_t(h) * size_t(n) + size_t(written)) * rowBytes;
      const size_t dst = size_t(row) * rowBytes;
      KVSLIM_RETURN_IF_ERROR(backend_->upload(base + dst, keys.data() + src, size_t(rows) * rowBytes));
      KVSLIM_RETURN_IF_ERROR(backend_->upload(base + partBytes + dst, values.data() + src, size_t(rows) * rowBytes));
      written += rows;
      token += rows;
    }
    pages.keyPointers.clear();
    pages.valuePointers.clear();
    for (const auto& page : pages.pages) {
      pages.keyPointers.push_back(page->memory());
      pages.valuePointers.push_back(static_cast<const uint8_t*>(page->memory()) + partBytes);
    }
    updated.push_back(std::move(pages));
  }
  for (int32_t h = 0; h < kvHeads; ++h) head(layer, h) = std::move(updated[size_t(h)]);
  layerTokens_[size_t(layer)] = before + n;
  return Status::ok();
}

Status PagedStore::readRows(int32_t layer, int32_t h, int64_t first, int64_t count, void* keysOut,
                            void* valuesOut) const {
  const HeadPages& pages = head(layer, h);
  const size_t rowBytes = size_t(shape_.headDim) * dtypeBytes(shape_.storeType);
  const size_t partBytes = pageBytes_ / 2;
  for (int64_t t = first; t < first + count; ++t) {
    const uint8_t* base = static_cast<const uint8_t*>(pages.pages[size_t(t / shape_.pageTokens)]->memory());
    const size_t offset = size_t(t % shape_.pageTokens) * rowBytes;
    const size_t outOffset = size_t(t - first) * rowBytes;
    KVSLIM_RETURN_IF_ERROR(backend_->download(static_cast<uint8_t*>(keysOut) + outOffset, base + offset, rowBytes));
    KVSLIM_RETURN_IF_ERROR(
        backend_->download(static_cast<uint8_t*>(valuesOut) + outOffset, base + partBytes + offset, rowBytes));
  }
  return Status::ok();
}

}  // namespace kvslim
