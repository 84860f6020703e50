// Approximate maximum-inner-product search over the keys of one kv head (methods/retrieval-attention.md).
// A KeyIndex owns a host copy of its keys (key_rows.h: f32, or f16 for ivf/graph over f16 keys); ids
// are insertion order (0, 1, ...). A search scores a key by the best of a group of query rows (GQA:
// one search per kv head, never per query head).
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "../status.h"

namespace kvslim {

enum class IndexKind : int32_t { Flat = 0, Ivf = 1, Graph = 2 };

struct IndexOptions {
  IndexKind kind = IndexKind::Flat;
  int32_t dim = 0;
  int32_t lists = 0;       // ivf: k-means lists; 0 = about 4 * sqrt(keys) at build
  int32_t probes = 0;      // ivf: lists scanned per search; 0 = lists / 16 (at least 1)
  int32_t degree = 32;     // graph: out-degree cap M
  int32_t beam = 0;        // graph: candidate list L; 0 = max(2k, 64)
  int32_t neighbors = 100; // graph: Nq, exact top keys linked per training query
  int32_t threads = 0;     // build threads; 0 = the machine's
  uint64_t seed = 1;
  bool halfKeys = false;   // ivf, graph: keep the keys as f16 (set when they come from an f16 cache: exact)
};

// Per-search overrides (0 = the index's option).
struct SearchOptions {
  int32_t probes = 0;
  int32_t beam = 0;
};

struct SearchResult {
  std::vector<uint32_t> ids;  // best first
  std::vector<float> scores;  // max over the query rows of q.k, same order
  int64_t scanned = 0;        // keys whose score was computed
};

class KeyIndex {
 public:
  virtual ~KeyIndex() = default;
  // Replaces the contents with keys [n, dim]. Training queries [queryCount, dim] (the prefill
  // queries of the kv head's group) shape the graph index; flat and ivf ignore them.
  virtual Status build(const float* keys, int64_t n, const float* queries, int64_t queryCount) = 0;
  // Appends keys [n, dim] (ids continue from size()); an empty index is built from them.
  virtual Status add(const float* keys, int64_t n) = 0;
  // Top-k ids by max over the query rows ([rows, dim]) of q.k, best first; fewer when the index holds fewer.
  // Thread-safe (const): kv heads search in parallel. Checks the arguments, then searchKeys().
  Status search(const float* queries, int32_t rows, int64_t k, const SearchOptions& options, SearchResult* out) const;
  virtual int64_t size() const = 0;
  virtual size_t bytes() const = 0;  // keys plus structure, host memory
  virtual std::unique_ptr<KeyIndex> clone() const = 0;
  virtual const IndexOptions& options() const = 0;
  // save()/load(): what a search depends on beyond the keys (ivf: the centroids and each key's
  // list; graph: the links, the spanning-tree parents and the entry), as flat bytes. The flat
  // index has none.
  virtual void saveStructure(std::vector<uint8_t>* out) const {}
  // Makes this empty index the one saveStructure() described, over its keys [n, dim] (ids 0..n-1
  // as they were): the same searches, the same later adds. ERR_CORRUPT when the bytes do not
  // describe an index of n keys (nothing a search or add reads is left unchecked).
  virtual Status restore(const float* keys, int64_t n, const uint8_t* data, size_t size);

 protected:
  // search() once its arguments hold (queries set, rows >= 1, k >= 1, the index not empty); out
  // arrives empty. May throw std::bad_alloc (search() reports it).
  virtual void searchKeys(const float* queries, int32_t rows, int64_t k, const SearchOptions& options,
                          SearchResult* out) const = 0;
  // ERR_SHAPE unless keys holds n >= 0 rows and the index stays below 2^32 ids (uint32) with `existing`.
  // With options.halfKeys, ERR_VALUE for a key outside the f16 range.
  static Status checkKeys(const float* keys, int64_t n, int64_t existing, const IndexOptions& options);
};

// Checks the options (ERR_OPTION naming the field) and makes an empty index.
Status makeKeyIndex(const IndexOptions& options, std::unique_ptr<KeyIndex>* out);

// One file each (index/flat_index.cc, ivf_index.cc, graph_index.cc).
std::unique_ptr<KeyIndex> makeFlatIndex(const IndexOptions& options);
std::unique_ptr<KeyIndex> makeIvfIndex(const IndexOptions& options);
std::unique_ptr<KeyIndex> makeGraphIndex(const IndexOptions& options);

// The k best of scores[0..count) (ids = positions), best first, ties to the lower id.
void topK(const float* scores, int64_t count, int64_t k, std::vector<uint32_t>* ids);
// topK's choice ascending into out[0..k): min(k, count) positions, then -1 (the backends' top
// pages and top keys); ids is the caller's scratch.
void topKAscending(const float* scores, int64_t count, int64_t k, std::vector<uint32_t>* ids, int64_t* out);
// The k (in [0, count]) highest of scores[0..count) into out, ascending: ties to the lower
// position, a NaN score ranks last (SnapKV's choice, AttentionMassArgs::chosen).
void topPositions(const double* scores, int64_t count, int64_t k, int64_t* out);

// Exact top-k of `count` contiguous keys ([count, dim], ids = rows) by max over the query rows:
// every key scored (the flat index, and any index asked for all its keys).
void exactSearch(const float* queries, int32_t rows, int32_t dim, const float* keys, int64_t count, int64_t k,
                 SearchResult* out);
// The same over an index's key copy (key_rows.h).
class KeyRows;
void exactSearch(const float* queries, int32_t rows, const KeyRows& keys, int64_t k, SearchResult* out);

}  // namespace kvslim
