// KIVI storage (methods/kivi.md): per layer and kv head, key groups quantized per channel, value
// tokens quantized per token, and the full-precision (f16) residual: the keys since the last
// flush (a buffer that empties at `residual` tokens) and the last `residual` values (a ring).
//
// An append first stages its tokens in the residual, so the attention of that call sees them at
// full precision (prefill attention is exact, a decode step attends its own token unquantized);
// flush() then quantizes what the canonical state no longer holds in f16: keys at multiples of
// `residual` absolute tokens, values older than the last `residual`. Between calls the state is
// therefore the same for any chunking of the same tokens.
//
// Quantized records sit in pages shared copy-on-write by forks, like PagedStore's.
//
// Window policies (streaming, duo's streaming heads) evict through a per-head hole: tokens
// [holeBegin, holeEnd) leave the head's kept set (attention masks them, kivi_format.h) while
// positions stay absolute. A page (pageTokens tokens of key groups or of value tokens) is released
// once it is full and wholly inside the hole, and its entry leaves the page table; the hole only
// grows, so the released pages are one run [firstReleased, firstReleased + count), a function of
// the hole and the quantized counts (saved caches omit their records).
#pragma once
#include <algorithm>
#include <cstdint>
#include <memory>
#include <vector>

#include "backend.h"
#include "kivi_format.h"
#include "paged_store.h"
#include "status.h"
#include "tensor_convert.h"

namespace kvslim {

struct KiviStoreShape {
  int32_t layers = 0;
  int32_t kvHeads = 0;
  KiviFormat format;
  int64_t residual = 128;  // R: a multiple of format.group
  int64_t pageTokens = 256;  // tokens per key page and per value page; a multiple of format.group
  int32_t threads = 0;       // host threads quantizing heads in parallel (0: the backend's all)
};

// Byte counts of one layer, summed over kv heads.
struct KiviLayerBytes {
  double quantized = 0;  // codes + scales + mins (+ outliers, 4 bytes each) of flushed tokens
  double residual = 0;   // f16 rows held (not capacity)
};

class KiviStore {
 public:
  KiviStore(std::shared_ptr<Backend> backend, const KiviStoreShape& shape);

  // Stages n tokens (k, v: [n, kvHeads, headDim]) in the f16 residual. All-or-nothing.
  Status stage(int32_t layer, const HostTensor& k, const HostTensor& v, int64_t n);
  // Quantizes what the canonical state keeps no longer in f16. On failure (out of memory) the
  // layer keeps more rows in f16; it stays consistent and the next flush retries.
  Status flush(int32_t layer);
  // The quantized counts a flush leaves a layer of `tokens` tokens at: keys in whole residuals,
  // values all but the last `residual` (the canonical state; load checks saved heads against it).
  struct QuantizedCounts {
    int64_t keys, values;
  };
  QuantizedCounts flushedCounts(int64_t tokens) const {
    return {tokens / shape_.residual * shape_.residual, std::max<int64_t>(0, tokens - shape_.residual)};
  }

  KiviStore fork() const { return *this; }

  // Grows the hole of one head to [begin, end) (begin fixed once the hole is non-empty, end never
  // smaller) and releases the pages it now covers.
  Status setHole(int32_t layer, int32_t head, int64_t begin, int64_t end);
  struct Hole {
    int64_t begin = 0, end = 0;
    int64_t size() const { return end - begin; }
  };
  Hole hole(int32_t layer, int32_t h) const { return head(layer, h).hole; }
  // The pages of a list whose records cover `quantized` tokens that the hole releases: the run
  // [firstReleased(hole), firstReleased(hole) + releasedPages(hole, quantized)).
  int64_t firstReleased(const Hole& hole) const { return (hole.begin + shape_.pageTokens - 1) / shape_.pageTokens; }
  int64_t releasedPages(const Hole& hole, int64_t quantized) const {
    if (hole.size() == 0) return 0;
    const int64_t end = std::min(hole.end, quantized) / shape_.pageTokens;
    return std::max<int64_t>(0, end - firstReleased(hole));
  }
  KiviHeadView view(int32_t layer, int32_t head) const;
  int64_t tokens(int32_t layer) const { return layerTokens_[size_t(layer)]; }
  const KiviStoreShape& shape() const { return shape_; }
  int64_t keyGroupsPerPage() const { return shape_.pageTokens / shape_.format.group; }
  int64_t valueRingRows(int32_t layer) const { return head(layer, 0).values.capacity; }

  KiviLayerBytes layerBytes(int32_t layer) const;
  double allocatedBytes() const;
  double sharedBytes() const;
  size_t pageCount() const;

  // Serialization: one head's state as flat bytes (save), and its inverse (load, sizes checked
  // by the caller from the token count).
  struct HeadImage {
    int64_t quantizedKeys = 0, quantizedValues = 0;
    Hole hole;
    // The records of the pages the hole has not released, in token order (all of them without a
    // hole: quantizedKeys / group key group records and quantizedValues value token records).
    std::vector<uint8_t> keyRecords, valueRecords;
    std::vector<uint16_t> keyRows, valueRows;       // f16 residual, oldest first
  };
  Status readHead(int32_t layer, int32_t head, HeadImage* out) const;
  // The image of a head that received these n f16 rows (keys, values [n, headDim]) into an empty
  // layer, as its flush leaves it: key groups below floor(n / R) * R and values below n - R
  // quantized, the rest f16. Host work only (thread-safe); writeHead() then installs it.
  // With `keep` (an image without a hole whose first keepTokens tokens are these rows' first
  // keepTokens, as attention read them): the records both images hold for those tokens are copied
  // from it instead of requantized from their own dequantized rows.
  Status imageOf(const uint16_t* keys, const uint16_t* values, int64_t n, HeadImage* out, const HeadImage* keep = nullptr,
                 int64_t keepTokens = 0) const;
  Status writeHead(int32_t layer, int32_t head, int64_t tokens, const HeadImage& image);
  // The inverse of imageOf for an image of `tokens` tokens without a hole: f16 rows [tokens,
  // headDim] of the keys and values as attention reads them (dequantized records, outlier deltas
  // added, rounded to f16; the residual rows as held). Host work only (thread-safe).
  Status rowsOf(const HeadImage& image, int64_t tokens, uint16_t* keys, uint16_t* values) const;
  // Records an image holds under its hole: key group records and value token records.
  int64_t heldKeyGroups(const Hole& hole, int64_t quantizedKeys) const;
  int64_t heldValueTokens(const Hole& hole, int64_t quantizedValues) const;

 private:
  // f16 rows in backend memory plus their host mirror (flushes and save read the mirror, so a
  // GPU cache never downloads). Row i of the buffer's tokens is at (start + i) % capacity; the key
  // buffer keeps start == 0 (dropping rows moves the rest to the front), the value ring advances it.
  // Every head of a layer has the same counts and capacities.
  struct Residual {
    bool ring = false;
    std::shared_ptr<Page> device;
    std::shared_ptr<std::vector<uint16_t>> host;
    int64_t capacity = 0;
    int64_t start = 0;
    int64_t count = 0;
  };
  struct HeadState {
    std::vector<std::shared_ptr<Page>> keyPages, valuePages;
    std::vector<const void*> keyPointers, valuePointers;
    int64_t quantizedKeys = 0, quantizedValues = 0;
    Residual keys, values;
    Hole hole;
    int64_t releasedKeyPages = 0, releasedValuePages = 0;  // entries gone from keyPages / valuePages
  };
  HeadState& head(int32_t layer, int32_t h) { return heads_[size_t(layer) * size_t(shape_.kvHeads) + size_t(h)]; }
  const HeadState& head(int32_t layer, int32_t h) const {
    return heads_[size_t(layer) * size_t(shape_.kvHeads) + size_t(h)];
  }
  Status newPage(size_t bytes, std::shared_ptr<Page>* out);
  // stage() after its checks: f16 rows, head-major ([kvHeads, n, headDim]).
  Status stageRows(int32_t layer, const uint16_t* keys, const uint16_t* values, int64_t n);
  // The records of one head's rows that the next flush quantizes (key groups up to keysQuantized
  // tokens, value tokens up to valuesQuantized), from the host mirrors; thread-safe.
  Status quantizeHead(const HeadState& state, int64_t keysQuantized, int64_t valuesQuantized,
                      std::vector<uint8_t>* keyRecords, std::vector<uint8_t>* valueRecords) const;
  // Makes room for `extra` more rows (growing or un-sharing the buffer); rows keep their order.
  Status reserve(Residual* residual, int64_t extra);
  Status pushRows(Residual* residual, const uint16_t* rows, int64_t count);
  Status dropOldest(Residual* residual, int64_t count);
  void shrink(Residual* residual);
  // Appends `count` records to a page list, copying a shared partially filled last page first.
  Status appendRecords(std::vector<std::shared_ptr<Page>>* pages, int64_t first, int64_t perPage,
                       size_t recordBytes, const uint8_t* records, int64_t count);
  Status readRecords(const std::vector<std::shared_ptr<Page>>& pages, const Hole& hole, int64_t quantized,
                     int64_t perPage, size_t recordBytes, int64_t released, std::vector<uint8_t>* records) const;
  Status writeRecords(std::vector<std::shared_ptr<Page>>* pages, const Hole& hole, int64_t quantized, int64_t perPage,
                      size_t recordBytes, const std::vector<uint8_t>& records);
  static void refreshPointers(HeadState* state);
  // Drops the pages the hole now covers from the page tables; forks keep their own references.
  void releaseHole(HeadState* state) const;
  // Of `total` records written to a list covering `quantized` tokens (`perPage` per page), those
  // in pages the hole has not released.
  int64_t heldRecords(const Hole& hole, int64_t quantized, int64_t perPage, int64_t total) const;
  const uint16_t* hostRow(const Residual& residual, int64_t i) const;

  std::shared_ptr<Backend> backend_;
  KiviStoreShape shape_;
  std::vector<HeadState> heads_;
  std::vector<int64_t> layerTokens_;
};

}  // namespace kvslim
