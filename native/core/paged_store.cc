#include "paged_store.h"

#include <algorithm>
#include <cstddef>
#include <string>
#include <utility>

namespace kvslim {

PagedStore::PagedStore(std::shared_ptr<Backend> backend, const PagedStoreShape& shape)
    : backend_(std::move(backend)),
      shape_(shape),
      pageBytes_(2 * size_t(shape.pageTokens) * size_t(shape.headDim) * dtypeBytes(shape.storeType)),
      heads_(size_t(shape.layers) * size_t(shape.kvHeads)),
      layerTokens_(size_t(shape.layers), 0) {}

size_t PagedStore::pageCount(int32_t layer) const {
  size_t count = 0;
  for (int32_t h = 0; h < shape_.kvHeads; ++h) count += head(layer, h).tail.pages.size() + head(layer, h).kept.pages.size();
  return count;
}

size_t PagedStore::sharedPageCount() const {
  size_t count = 0;
  for (const HeadPages& pages : heads_) {
    for (const Segment* segment : {&pages.tail, &pages.kept})
      for (const auto& page : segment->pages) count += page.use_count() > 1 ? 1 : 0;
  }
  return count;
}

KVHeadView PagedStore::viewOf(const Segment& segment) const {
  KVHeadView headView;
  headView.keyPages = segment.keyPointers.data();
  headView.valuePages = segment.valuePointers.data();
  headView.tokens = segment.count;
  headView.firstRow = segment.firstRow;
  return headView;
}

KVHeadView PagedStore::tailView(int32_t layer, int32_t h) const { return viewOf(head(layer, h).tail); }
KVHeadView PagedStore::keptView(int32_t layer, int32_t h) const { return viewOf(head(layer, h).kept); }

KVHeadView PagedStore::tailRange(int32_t layer, int32_t h, int64_t first, int64_t count) const {
  const KVHeadView tail = tailView(layer, h);
  const int64_t row = tail.firstRow + first;
  KVHeadView range;
  range.keyPages = tail.keyPages + row / shape_.pageTokens;
  range.valuePages = tail.valuePages + row / shape_.pageTokens;
  range.firstRow = row % shape_.pageTokens;
  range.tokens = count;
  return range;
}

void PagedStore::refreshPointers(Segment* segment, size_t partBytes) {
  segment->keyPointers.clear();
  segment->valuePointers.clear();
  for (const auto& page : segment->pages) {
    segment->keyPointers.push_back(page->memory());
    segment->valuePointers.push_back(static_cast<const uint8_t*>(page->memory()) + partBytes);
  }
}

void PagedStore::dropTailFront(int32_t layer, int32_t h, int64_t count) {
  Segment& tail = head(layer, h).tail;
  count = std::min(count, tail.count);
  if (count <= 0) return;
  tail.firstRow += count;
  tail.count -= count;
  const int64_t pageTokens = shape_.pageTokens;
  size_t dropPages = size_t(tail.firstRow / pageTokens);
  if (tail.count == 0) dropPages = tail.pages.size();
  tail.pages.erase(tail.pages.begin(), tail.pages.begin() + std::ptrdiff_t(std::min(dropPages, tail.pages.size())));
  tail.firstRow = tail.count == 0 ? 0 : tail.firstRow % pageTokens;
  refreshPointers(&tail, pageBytes_ / 2);
}

Status PagedStore::ownPage(Segment* segment, size_t index) {
  if (segment->pages[index].use_count() <= 1) return Status::ok();
  std::shared_ptr<Page> copy;
  KVSLIM_RETURN_IF_ERROR(newPage(&copy));
  KVSLIM_RETURN_IF_ERROR(backend_->copy(copy->memory(), segment->pages[index]->memory(), pageBytes_));
  segment->pages[index] = std::move(copy);
  return Status::ok();
}

Status PagedStore::copyRows(const Segment& src, int64_t srcRow, Segment* dst, int64_t count, std::vector<DeviceCopy>* copies) {
  const int64_t pageTokens = shape_.pageTokens;
  const size_t rowBytes = size_t(shape_.headDim) * dtypeBytes(shape_.storeType);
  const size_t partBytes = pageBytes_ / 2;
  int64_t done = 0;
  while (done < count) {
    const int64_t dstRow = dst->firstRow + dst->count;
    if (dstRow % pageTokens == 0 && size_t(dstRow / pageTokens) == dst->pages.size()) {
      std::shared_ptr<Page> page;
      KVSLIM_RETURN_IF_ERROR(newPage(&page));
      dst->pages.push_back(std::move(page));
    } else {
      KVSLIM_RETURN_IF_ERROR(ownPage(dst, size_t(dstRow / pageTokens)));
    }
    const int64_t from = srcRow + done;
    // One run: rows that stay inside one source page and one destination page.
    const int64_t run = std::min({count - done, pageTokens - from % pageTokens, pageTokens - dstRow % pageTokens});
    const uint8_t* in = static_cast<const uint8_t*>(src.pages[size_t(from / pageTokens)]->memory()) +
                        size_t(from % pageTokens) * rowBytes;
    uint8_t* out = static_cast<uint8_t*>(dst->pages[size_t(dstRow / pageTokens)]->memory()) +
                   size_t(dstRow % pageTokens) * rowBytes;
    // Queued, not copied: a page is owned before its first queued write, and ownPage's copy of a
    // shared page reads a page that no queued copy writes.
    copies->push_back(DeviceCopy{out, in, size_t(run) * rowBytes});
    copies->push_back(DeviceCopy{out + partBytes, in + partBytes, size_t(run) * rowBytes});
    dst->count += run;
    done += run;
  }
  return Status::ok();
}

Status PagedStore::keepTailRows(int32_t layer, int32_t h, const std::vector<int64_t>& tailIndices) {
  HeadPages& pages = head(layer, h);
  // Built aside: on failure the head is unchanged.
  Segment kept = pages.kept;
  std::vector<int64_t> positions = pages.positions;
  std::vector<DeviceCopy> copies;
  const int64_t first = tailFirstPosition(layer, h);
  for (size_t i = 0; i < tailIndices.size();) {
    // Consecutive indices copy as one run.
    size_t j = i + 1;
    while (j < tailIndices.size() && tailIndices[j] == tailIndices[j - 1] + 1) ++j;
    const int64_t begin = tailIndices[i];
    const int64_t count = int64_t(j - i);
    if (begin < 0 || begin + count > pages.tail.count) return Status(ErrorCode::Internal, "keepTailRows: index out of range");
    KVSLIM_RETURN_IF_ERROR(copyRows(pages.tail, pages.tail.firstRow + begin, &kept, count, &copies));
    for (int64_t t = 0; t < count; ++t) positions.push_back(first + begin + t);
    i = j;
  }
  KVSLIM_RETURN_IF_ERROR(backend_->copyRuns(copies.data(), int64_t(copies.size())));
  refreshPointers(&kept, pageBytes_ / 2);
  pages.kept = std::move(kept);
  pages.positions = std::move(positions);
  return Status::ok();
}

Status PagedStore::overwriteKept(int32_t layer, int32_t h, int64_t firstSlot, const int64_t* tailIndexOfSlot,
                                 int64_t count) {
  HeadPages& pages = head(layer, h);
  if (firstSlot < 0 || count < 0 || firstSlot + count > pages.kept.count) {
    return Status(ErrorCode::Internal, "overwriteKept: slots out of range");
  }
  for (int64_t s = 0; s < count; ++s) {
    if (tailIndexOfSlot[s] >= pages.tail.count) return Status(ErrorCode::Internal, "overwriteKept: index out of range");
  }
  const int64_t pageTokens = shape_.pageTokens;
  const size_t rowBytes = size_t(shape_.headDim) * dtypeBytes(shape_.storeType);
  const size_t partBytes = pageBytes_ / 2;
  const int64_t first = tailFirstPosition(layer, h);
  // Every page written is owned before the copies are queued (as keepTailRows), then one copyRuns.
  std::vector<DeviceCopy> copies;
  for (int64_t s = 0; s < count; ++s) {
    const int64_t tailIndex = tailIndexOfSlot[s];
    if (tailIndex < 0) continue;
    const int64_t row = pages.kept.firstRow + firstSlot + s;
    KVSLIM_RETURN_IF_ERROR(ownPage(&pages.kept, size_t(row / pageTokens)));
    const int64_t from = pages.tail.firstRow + tailIndex;
    const uint8_t* in = static_cast<const uint8_t*>(pages.tail.pages[size_t(from / pageTokens)]->memory()) +
                        size_t(from % pageTokens) * rowBytes;
    uint8_t* out = static_cast<uint8_t*>(pages.kept.pages[size_t(row / pageTokens)]->memory()) + size_t(row % pageTokens) * rowBytes;
    copies.push_back(DeviceCopy{out, in, rowBytes});
    copies.push_back(DeviceCopy{out + partBytes, in + partBytes, rowBytes});
  }
  refreshPointers(&pages.kept, partBytes);
  KVSLIM_RETURN_IF_ERROR(backend_->copyRuns(copies.data(), int64_t(copies.size())));
  for (int64_t s = 0; s < count; ++s) {
    if (tailIndexOfSlot[s] >= 0) pages.positions[size_t(firstSlot + s)] = first + tailIndexOfSlot[s];
  }
  return Status::ok();
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
  std::vector<Segment> updated;
  updated.reserve(size_t(kvHeads));
  for (int32_t h = 0; h < kvHeads; ++h) {
    const Segment& current = head(layer, h).tail;
    // Decide before copying the table: the copy itself holds one more reference to every page.
    const bool lastPageShared = !current.pages.empty() && current.pages.back().use_count() > 1;
    Segment pages = current;
    int64_t token = current.firstRow + current.count;  // the next page row
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
    pages.count += n;
    refreshPointers(&pages, partBytes);
    updated.push_back(std::move(pages));
  }
  for (int32_t h = 0; h < kvHeads; ++h) head(layer, h).tail = std::move(updated[size_t(h)]);
  layerTokens_[size_t(layer)] = before + n;
  return Status::ok();
}

Status PagedStore::readRows(int32_t layer, int32_t h, int64_t first, int64_t count, void* keysOut,
                            void* valuesOut) const {
  return readSegment(head(layer, h).tail, first, count, keysOut, valuesOut);
}

Status PagedStore::keyRuns(int32_t layer, int32_t h, int64_t first, int64_t count, std::vector<DeviceRun>* runs) const {
  return segmentRuns(head(layer, h).tail, first, count, 0, runs);
}

Status PagedStore::readKeptRows(int32_t layer, int32_t h, int64_t first, int64_t count, void* keysOut,
                                void* valuesOut) const {
  return readSegment(head(layer, h).kept, first, count, keysOut, valuesOut);
}

// Rows [first, first + count) of a segment as one run per page they touch, `part` bytes into
// each page (0: keys, pageBytes_ / 2: values).
Status PagedStore::segmentRuns(const Segment& pages, int64_t first, int64_t count, size_t part, std::vector<DeviceRun>* runs) const {
  if (first < 0 || count < 0 || first + count > pages.count) return Status(ErrorCode::Internal, "readRows: rows out of range");
  first += pages.firstRow;
  const size_t rowBytes = size_t(shape_.headDim) * dtypeBytes(shape_.storeType);
  for (int64_t t = first; t < first + count;) {
    const int64_t run = std::min(first + count - t, shape_.pageTokens - t % shape_.pageTokens);
    const uint8_t* base = static_cast<const uint8_t*>(pages.pages[size_t(t / shape_.pageTokens)]->memory()) + part;
    runs->push_back({base + size_t(t % shape_.pageTokens) * rowBytes, size_t(run) * rowBytes});
    t += run;
  }
  return Status::ok();
}

// One download per run of rows within a page (no device staging: save() reads whole heads).
Status PagedStore::readSegment(const Segment& pages, int64_t first, int64_t count, void* keysOut, void* valuesOut) const {
  for (const auto& [part, out] : {std::pair<size_t, void*>{0, keysOut}, {pageBytes_ / 2, valuesOut}}) {
    if (out == nullptr) continue;
    std::vector<DeviceRun> runs;
    KVSLIM_RETURN_IF_ERROR(segmentRuns(pages, first, count, part, &runs));
    auto* into = static_cast<uint8_t*>(out);
    for (const DeviceRun& run : runs) {
      KVSLIM_RETURN_IF_ERROR(backend_->download(into, run.source, run.bytes));
      into += run.bytes;
    }
  }
  return Status::ok();
}

Status PagedStore::uploadRows(Segment* segment, const uint8_t* keys, const uint8_t* values, int64_t count) {
  const size_t rowBytes = size_t(shape_.headDim) * dtypeBytes(shape_.storeType);
  const size_t partBytes = pageBytes_ / 2;
  for (int64_t done = 0; done < count;) {
    const int64_t row = segment->firstRow + segment->count;
    if (row % shape_.pageTokens == 0 && size_t(row / shape_.pageTokens) == segment->pages.size()) {
      std::shared_ptr<Page> page;
      KVSLIM_RETURN_IF_ERROR(newPage(&page));
      segment->pages.push_back(std::move(page));
    }
    const int64_t run = std::min(count - done, shape_.pageTokens - row % shape_.pageTokens);
    uint8_t* base = static_cast<uint8_t*>(segment->pages[size_t(row / shape_.pageTokens)]->memory()) +
                    size_t(row % shape_.pageTokens) * rowBytes;
    KVSLIM_RETURN_IF_ERROR(backend_->upload(base, keys + size_t(done) * rowBytes, size_t(run) * rowBytes));
    KVSLIM_RETURN_IF_ERROR(backend_->upload(base + partBytes, values + size_t(done) * rowBytes, size_t(run) * rowBytes));
    segment->count += run;
    done += run;
  }
  refreshPointers(segment, partBytes);
  return Status::ok();
}

Status PagedStore::restoreHead(int32_t layer, int32_t h, const uint8_t* keptKeys, const uint8_t* keptValues,
                               std::vector<int64_t> positions, const uint8_t* tailKeys, const uint8_t* tailValues,
                               int64_t tail) {
  HeadPages pages;
  KVSLIM_RETURN_IF_ERROR(uploadRows(&pages.kept, keptKeys, keptValues, int64_t(positions.size())));
  KVSLIM_RETURN_IF_ERROR(uploadRows(&pages.tail, tailKeys, tailValues, tail));
  pages.positions = std::move(positions);
  head(layer, h) = std::move(pages);
  return Status::ok();
}

void PagedStore::truncate(int32_t layer, int64_t tokens) {
  const int64_t drop = layerTokens_[size_t(layer)] - tokens;
  for (int32_t h = 0; h < shape_.kvHeads; ++h) {
    Segment& tail = head(layer, h).tail;
    tail.count -= drop;
    const int64_t end = tail.firstRow + tail.count;  // the pages up to the new end stay
    tail.pages.resize(size_t((end + shape_.pageTokens - 1) / shape_.pageTokens));
    refreshPointers(&tail, pageBytes_ / 2);
  }
  layerTokens_[size_t(layer)] = tokens;
}

void PagedStore::clearLayer(int32_t layer) {
  for (int32_t h = 0; h < shape_.kvHeads; ++h) head(layer, h) = HeadPages{};
}

}  // namespace kvslim
