// Paged KV storage: per layer and kv head, a list of fixed-size token pages.
// Pages are shared between forks (copy-on-write), so a fork costs one page table, and later
// policies can drop, load or index whole pages without copying the cache.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "attention_args.h"
#include "backend.h"
#include "status.h"
#include "tensor_convert.h"

namespace kvslim {

// One page: keys then values, each pageTokens x headDim elements, in backend memory.
class Page {
 public:
  Page(std::shared_ptr<Backend> backend, void* memory) : backend_(std::move(backend)), memory_(memory) {}
  ~Page() { backend_->release(memory_); }
  Page(const Page&) = delete;
  Page& operator=(const Page&) = delete;
  void* memory() const { return memory_; }

 private:
  std::shared_ptr<Backend> backend_;
  void* memory_;
};

struct PagedStoreShape {
  int32_t layers = 0;
  int32_t kvHeads = 0;
  int32_t headDim = 0;
  DType storeType = DType::F16;
  int64_t pageTokens = 64;
};

class PagedStore {
 public:
  PagedStore(std::shared_ptr<Backend> backend, const PagedStoreShape& shape);

  // Appends n tokens to one layer. k and v are [n, kvHeads, headDim] user tensors.
  // All-or-nothing: on error the store is unchanged.
  Status append(int32_t layer, const HostTensor& k, const HostTensor& v, int64_t n);

  // A new store sharing every page with this one; either side copies a shared page before writing.
  PagedStore fork() const { return *this; }

  KVHeadView view(int32_t layer, int32_t head) const;
  int64_t tokens(int32_t layer) const { return layerTokens_[size_t(layer)]; }
  const PagedStoreShape& shape() const { return shape_; }
  size_t bytesPerPage() const { return pageBytes_; }
  size_t pageCount(int32_t layer) const;
  // Pages of this store that other stores also hold.
  size_t sharedPageCount() const;

  // Reads one kv head's rows [first, first + count) back to host memory in store dtype
  // (keys then values, each count x headDim). Used by save().
  Status readRows(int32_t layer, int32_t head, int64_t first, int64_t count, void* keysOut,
                  void* valuesOut) const;

 private:
  struct HeadPages {
    std::vector<std::shared_ptr<Page>> pages;
    std::vector<const void*> keyPointers;
    std::vector<const void*> valuePointers;
  };
  HeadPages& head(int32_t layer, int32_t h) { return heads_[size_t(layer) * size_t(shape_.kvHeads) + size_t(h)]; }
  const HeadPages& head(int32_t layer, int32_t h) const {
    return heads_[size_t(layer) * size_t(shape_.kvHeads) + size_t(h)];
  }
  Status newPage(std::shared_ptr<Page>* out);

  std::shared_ptr<Backend> backend_;
  PagedStoreShape shape_;
  size_t pageBytes_ = 0;
  std::vector<HeadPages> heads_;
  std::vector<int64_t> layerTokens_;
};

}  // namespace kvslim
