// Paged KV storage: per layer and kv head, fixed-size token pages in backend memory.
// Pages are shared between forks (copy-on-write), so a fork costs one page table, and policies
// drop, keep or overwrite tokens without copying the cache.
//
// Each head holds two segments:
// - the tail: the newest tokens, contiguous in position (the last `tailTokens` of the layer), in
//   pages whose first `firstRow` rows are evicted (a window advances without copying);
// - the kept segment: older tokens a selection policy kept (sinks, SnapKV picks, heavy hitters),
//   each with its absolute position. Positions are never renumbered.
// Without a policy everything is tail.
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

  // Appends n tokens to the tail of every head of one layer. k and v are [n, kvHeads, headDim]
  // user tensors. All-or-nothing: on error the store is unchanged.
  Status append(int32_t layer, const HostTensor& k, const HostTensor& v, int64_t n);

  // A new store sharing every page with this one; either side copies a shared page before writing.
  PagedStore fork() const { return *this; }

  KVHeadView tailView(int32_t layer, int32_t head) const;
  KVHeadView keptView(int32_t layer, int32_t head) const;
  // Tail tokens [first, first + count) of one head, as a view into the same pages (no copy).
  KVHeadView tailRange(int32_t layer, int32_t head, int64_t first, int64_t count) const;
  int64_t tokens(int32_t layer) const { return layerTokens_[size_t(layer)]; }  // appended so far
  int64_t tailTokens(int32_t layer, int32_t h) const { return head(layer, h).tail.count; }
  int64_t keptTokens(int32_t layer, int32_t h) const { return head(layer, h).kept.count; }
  // Absolute positions: kept slot i holds keptPositions()[i]; tail token t is tailFirstPosition() + t.
  const std::vector<int64_t>& keptPositions(int32_t layer, int32_t h) const { return head(layer, h).positions; }
  int64_t tailFirstPosition(int32_t layer, int32_t h) const { return tokens(layer) - tailTokens(layer, h); }

  // Eviction primitives for selection policies (core/select/).
  // Evicts the `count` oldest tail tokens.
  void dropTailFront(int32_t layer, int32_t h, int64_t count);
  // Copies the tail tokens at these indices (ascending) to the end of the kept segment.
  Status keepTailRows(int32_t layer, int32_t h, const std::vector<int64_t>& tailIndices);
  // Overwrites kept slot firstSlot + s, for s < count, with tail token tailIndexOfSlot[s] (its key,
  // value and position) where that is >= 0, in one copyRuns; the other slots stay.
  Status overwriteKept(int32_t layer, int32_t h, int64_t firstSlot, const int64_t* tailIndexOfSlot, int64_t count);

  const PagedStoreShape& shape() const { return shape_; }
  size_t bytesPerPage() const { return pageBytes_; }
  size_t pageCount(int32_t layer) const;
  // Pages of this store that other stores also hold.
  size_t sharedPageCount() const;

  // Reads one kv head's tail rows [first, first + count) back to host memory in store dtype
  // (keys then values, each count x headDim; valuesOut may be null). Used by save() and the indexes.
  Status readRows(int32_t layer, int32_t head, int64_t first, int64_t count, void* keysOut,
                  void* valuesOut) const;
  // Where one kv head's tail key rows [first, first + count) lie in backend memory: one run per
  // page they touch, appended to runs in row order (for Backend::gather).
  Status keyRuns(int32_t layer, int32_t head, int64_t first, int64_t count, std::vector<DeviceRun>* runs) const;
  // The same for kept slots [first, first + count).
  Status readKeptRows(int32_t layer, int32_t head, int64_t first, int64_t count, void* keysOut,
                      void* valuesOut) const;
  // load(): rebuilds one head from saved rows in store dtype (host memory): the kept slots with
  // their positions, then the tail (the layer's last `tail` tokens, once restoreTokens set the
  // count). The head's old pages are released.
  Status restoreHead(int32_t layer, int32_t h, const uint8_t* keptKeys, const uint8_t* keptValues,
                     std::vector<int64_t> positions, const uint8_t* tailKeys, const uint8_t* tailValues, int64_t tail);
  void restoreTokens(int32_t layer, int64_t tokens) { layerTokens_[size_t(layer)] = tokens; }
  // Drops a layer's newest tokens, down to `tokens` (0 <= tokens <= tokens(layer), and every
  // head's tail holds the dropped ones: the caller checks). Pages past the new end leave the page
  // tables; the last one, when a fork shares it, is copied by the next append, as ever.
  void truncate(int32_t layer, int64_t tokens);
  // Releases every token of a layer (its pages go once no fork holds them); tokens() stays the
  // count appended so far. Used when a KIVI store takes the layer over (kv_cache.cc).
  void clearLayer(int32_t layer);

 private:
  struct Segment {
    std::vector<std::shared_ptr<Page>> pages;
    std::vector<const void*> keyPointers;
    std::vector<const void*> valuePointers;
    int64_t firstRow = 0;  // evicted rows at the start of the first page
    int64_t count = 0;
  };
  struct HeadPages {
    Segment tail;
    Segment kept;
    std::vector<int64_t> positions;  // of the kept slots
  };
  HeadPages& head(int32_t layer, int32_t h) { return heads_[size_t(layer) * size_t(shape_.kvHeads) + size_t(h)]; }
  const HeadPages& head(int32_t layer, int32_t h) const {
    return heads_[size_t(layer) * size_t(shape_.kvHeads) + size_t(h)];
  }
  Status newPage(std::shared_ptr<Page>* out);
  // Makes page `index` of a segment private (copy-on-write) before a write into it.
  Status ownPage(Segment* segment, size_t index);
  // Appends `count` rows from src (rows srcRow..) to the end of dst: allocates and owns dst's pages
  // now, and adds the copies (runs within pages, keys and values) to `copies` for one copyRuns.
  Status copyRows(const Segment& src, int64_t srcRow, Segment* dst, int64_t count, std::vector<DeviceCopy>* copies);
  static void refreshPointers(Segment* segment, size_t partBytes);
  // Appends `count` host rows (keys, values in store dtype) to the end of a segment.
  Status uploadRows(Segment* segment, const uint8_t* keys, const uint8_t* values, int64_t count);
  Status segmentRuns(const Segment& pages, int64_t first, int64_t count, size_t part, std::vector<DeviceRun>* runs) const;
  Status readSegment(const Segment& pages, int64_t first, int64_t count, void* keysOut, void* valuesOut) const;
  KVHeadView viewOf(const Segment& segment) const;

  std::shared_ptr<Backend> backend_;
  PagedStoreShape shape_;
  size_t pageBytes_ = 0;
  std::vector<HeadPages> heads_;
  std::vector<int64_t> layerTokens_;
};

}  // namespace kvslim
