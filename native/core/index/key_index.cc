#include "key_index.h"

#include <algorithm>
#include <cmath>
#include <new>
#include <numeric>
#include <string>

#include "../dtype.h"
#include "../vector_ops.h"
#include "key_rows.h"

namespace kvslim {

namespace {
Status optionError(const std::string& message) { return Status(ErrorCode::Option, "index." + message); }
}  // namespace

Status makeKeyIndex(const IndexOptions& options, std::unique_ptr<KeyIndex>* out) {
  out->reset();
  if (options.dim < 1 || options.dim > 4096) return optionError("dim must be in [1, 4096], but is " + std::to_string(options.dim));
  if (options.lists < 0 || options.lists > (1 << 24)) return optionError("lists must be an integer in [0, 2^24]");
  if (options.probes < 0) return optionError("probes must be an integer >= 0");
  if (options.degree < 2 || options.degree > 1024) return optionError("degree must be in [2, 1024], but is " + std::to_string(options.degree));
  if (options.beam < 0 || options.beam > (1 << 20)) return optionError("beam must be an integer in [0, 2^20]");
  if (options.neighbors < 1 || options.neighbors > 4096) return optionError("neighbors must be in [1, 4096]");
  if (options.threads < 0) return optionError("threads must be an integer >= 0");
  if (options.halfKeys && options.kind == IndexKind::Flat) return optionError("f16 keys are kept by the ivf and graph indexes only");
  switch (options.kind) {
    case IndexKind::Flat: *out = makeFlatIndex(options); return Status::ok();
    case IndexKind::Ivf: *out = makeIvfIndex(options); return Status::ok();
    case IndexKind::Graph: *out = makeGraphIndex(options); return Status::ok();
  }
  return optionError("kind is unknown");
}

Status KeyIndex::search(const float* queries, int32_t rows, int64_t k, const SearchOptions& options, SearchResult* out) const {
  if (queries == nullptr || rows < 1) return Status(ErrorCode::Shape, "search needs at least one query row");
  if (k < 0) return Status(ErrorCode::Shape, "k must be >= 0, but is " + std::to_string(k));
  out->ids.clear();
  out->scores.clear();
  out->scanned = 0;
  if (size() == 0 || k == 0) return Status::ok();
  try {
    searchKeys(queries, rows, k, options, out);
  } catch (const std::bad_alloc&) {
    out->ids.clear();
    out->scores.clear();
    out->scanned = 0;
    return Status(ErrorCode::OutOfMemory, "out of host memory searching an index of " + std::to_string(size()) + " keys");
  }
  return Status::ok();
}

Status KeyIndex::restore(const float* keys, int64_t n, const uint8_t* data, size_t size) {
  if (size != 0) return Status(ErrorCode::Corrupt, "cannot load cache: a flat index has no saved structure");
  return build(keys, n, nullptr, 0);
}

Status KeyIndex::checkKeys(const float* keys, int64_t n, int64_t existing, const IndexOptions& options) {
  if (n < 0) return Status(ErrorCode::Shape, "key count must be >= 0, but is " + std::to_string(n));
  if (n > 0 && keys == nullptr) return Status(ErrorCode::Shape, "keys is null but the key count is " + std::to_string(n));
  if (existing + n > int64_t(UINT32_MAX)) return Status(ErrorCode::Shape, "the index would hold more than 2^32 - 1 keys");
  if (options.halfKeys) {
    // An f16 copy must stay finite: an infinite key would make scores NaN and break every ranking.
    const size_t count = size_t(n) * size_t(options.dim);
    for (size_t i = 0; i < count; ++i) {
      if ((floatToF16(keys[i]) & 0x7c00) == 0x7c00) {
        return Status(ErrorCode::Value, "keys hold " + std::to_string(keys[i]) + " (key " + std::to_string(i / size_t(options.dim)) +
                                            "), outside the f16 range of an index with f16 keys");
      }
    }
  }
  return Status::ok();
}

void topK(const float* scores, int64_t count, int64_t k, std::vector<uint32_t>* ids) {
  k = std::max<int64_t>(0, std::min(k, count));
  // (score, id) ordered best first: higher score, then lower id.
  auto better = [scores](uint32_t a, uint32_t b) { return scores[a] > scores[b] || (scores[a] == scores[b] && a < b); };
  ids->clear();
  if (k == 0) return;
  // One pass with a heap of the k best so far (its top is the worst of them): most scores are
  // rejected by one comparison, O(count) for the small k of retrieval over long scans. Ids arrive
  // ascending, so an equal score never displaces an earlier id.
  ids->reserve(size_t(k));
  for (int64_t i = 0; i < k; ++i) ids->push_back(uint32_t(i));
  std::make_heap(ids->begin(), ids->end(), better);
  for (int64_t i = k; i < count; ++i) {
    if (!(scores[i] > scores[ids->front()])) continue;
    std::pop_heap(ids->begin(), ids->end(), better);
    ids->back() = uint32_t(i);
    std::push_heap(ids->begin(), ids->end(), better);
  }
  std::sort_heap(ids->begin(), ids->end(), better);
}

void topKAscending(const float* scores, int64_t count, int64_t k, std::vector<uint32_t>* ids, int64_t* out) {
  topK(scores, count, k, ids);
  std::sort(ids->begin(), ids->end());
  for (int64_t i = 0; i < k; ++i) out[i] = i < int64_t(ids->size()) ? int64_t((*ids)[size_t(i)]) : -1;
}

void topPositions(const double* scores, int64_t count, int64_t k, int64_t* out) {
  std::vector<int64_t> order(static_cast<size_t>(count));
  std::iota(order.begin(), order.end(), 0);
  const auto value = [scores](int64_t i) { return std::isnan(scores[i]) ? -INFINITY : scores[i]; };
  const auto before = [&](int64_t a, int64_t b) { return value(a) > value(b) || (value(a) == value(b) && a < b); };
  std::nth_element(order.begin(), order.begin() + k, order.end(), before);
  std::sort(order.begin(), order.begin() + k);
  std::copy(order.begin(), order.begin() + k, out);
}

namespace {
// The top k of every key's score, with their scores.
void keepBest(const std::vector<float>& scores, int64_t k, SearchResult* out) {
  const int64_t count = int64_t(scores.size());
  topK(scores.data(), count, k, &out->ids);
  out->scores.resize(out->ids.size());
  for (size_t i = 0; i < out->ids.size(); ++i) out->scores[i] = scores[out->ids[i]];
  out->scanned = count;
}
}  // namespace

void exactSearch(const float* queries, int32_t rows, int32_t dim, const float* keys, int64_t count, int64_t k,
                 SearchResult* out) {
  std::vector<float> scores(static_cast<size_t>(count));
  hostVectorOps().maxDot(queries, rows, dim, keys, count, scores.data());
  keepBest(scores, k, out);
}

void exactSearch(const float* queries, int32_t rows, const KeyRows& keys, int64_t k, SearchResult* out) {
  std::vector<float> scores(static_cast<size_t>(keys.rows()));
  keys.maxDots(queries, rows, 0, keys.rows(), scores.data());
  keepBest(scores, k, out);
}

}  // namespace kvslim
