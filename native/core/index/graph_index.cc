// Attention-aware proximity graph for maximum-inner-product search (RoarGraph, as RetrievalAttention
// uses it; methods/retrieval-attention.md, "Algorithm" steps 2-3). Decode queries sit far from the
// key cloud, so key-key proximity alone leads a greedy search astray; the edges here come from the
// prefill queries instead: keys that are top keys of the same query are linked.
//
// Choices:
// - Build: exact top-`neighbors` keys per training query (blocked so a block of keys stays in cache
//   while a block of queries scores it, split over threads). Each query's best key is a hub linked
//   both ways to the query's other top keys (RoarGraph's projection), and each of those is also
//   linked both ways to the keys ranked within kRankWindow of it: out-of-distribution queries share
//   a few hubs, and with the star alone most keys hang off a handful of saturated hub lists.
// - Pruning to `degree`: candidates ranked by how many queries produced the pair, then by inner
//   product; a candidate c is occluded when a kept neighbour s is nearer to it than the node is
//   (L2, the RNG rule; it beat the inner-product form s.c > node.c on shifted queries, where a
//   large-norm s occludes nearly everything). Occluded candidates fill the free slots last.
// - Reachability is guaranteed by a spanning tree: every key but the entry has a parent whose edge
//   to it is never pruned. After projection a BFS from the entry sets the parents; every key it
//   misses is inserted as add() inserts, except that its reverse edges only take free slots (many
//   keys no query ranks high would otherwise push the query-derived edges out).
// - Insertion: search with the key as the query, link it to the best found (pruned), parent = the
//   best found key with a free slot (else one that can drop an unprotected edge), reverse edges
//   re-prune full lists. Keys are searched in parallel batches on the frozen graph, then linked.
// - Entry: the key that is the best key of the most training queries (the busiest hub).
// - No training queries: a seeded sample of the keys plays the queries (K->K); keys outside every
//   sampled top list are then inserted.
// - Search: best-first beam search with a sorted candidate list of `beam` entries; the unvisited
//   neighbours of an expanded key are scored in one maxDotGather. Visited marks are per thread.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <mutex>
#include <new>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "../byte_io.h"
#include "../vector_ops.h"
#include "key_index.h"
#include "key_rows.h"
#include "split_mix.h"

namespace kvslim {

namespace {

constexpr uint32_t kNone = UINT32_MAX;
constexpr int64_t kKeyBlock = 1024;        // keys per cache block in the exact kNN (512 KB at dim 128)
constexpr int64_t kQueryBlock = 16;        // queries sharing one key block
constexpr int64_t kRankWindow = 4;         // a query's top keys also link to the keys ranked this close
constexpr int64_t kMinInsertBeam = 32;    // candidate list of an insertion search
// Keys searched at once on the frozen graph, in parallel, before they are linked one by one. They
// do not see each other, which costs little recall; fixed so the graph never depends on threads.
constexpr int64_t kInsertBatch = 128;
constexpr int64_t kInsertSeeds = 16;        // landmarks an insertion search starts from (queries: sqrt(n))
constexpr int64_t kSelfQueriesMin = 4096;  // K->K fallback: at least this many keys play the queries
constexpr int64_t kSelfQueriesDivisor = 8; // ... or one key in this many

int resolveThreads(int32_t requested) {
  const int threads = requested > 0 ? requested : int(std::thread::hardware_concurrency());
  return std::max(threads, 1);
}

// Runs body(begin, end) over chunks of [0, count) handed out dynamically to `threads` threads (the
// chunks differ in cost). If a thread cannot be started, the others take its share. The first
// exception a chunk throws (bad_alloc) is rethrown here once all threads are done.
template <class Body>
void parallelChunks(int64_t count, int threads, int64_t chunk, const Body& body) {
  std::atomic<int64_t> next{0};
  std::exception_ptr failure;
  std::mutex failureMutex;
  auto worker = [&] {
    try {
      for (int64_t begin = next.fetch_add(chunk); begin < count; begin = next.fetch_add(chunk))
        body(begin, std::min(count, begin + chunk));
    } catch (...) {
      next = count;  // the others stop at their next chunk
      std::lock_guard<std::mutex> lock(failureMutex);
      if (!failure) failure = std::current_exception();
    }
  };
  std::vector<std::thread> workers;
  for (int t = 1; t < threads && int64_t(t) * chunk < count; ++t) {
    try {
      workers.emplace_back(worker);
    } catch (const std::system_error&) {
      break;
    }
  }
  worker();
  for (std::thread& thread : workers) thread.join();
  if (failure) std::rethrow_exception(failure);
}

struct Scored {
  float score;
  uint32_t id;
};

inline bool better(const Scored& a, const Scored& b) { return a.score > b.score || (a.score == b.score && a.id < b.id); }

// Visited marks of one search: a stamp per key, new stamp per search, so nothing is cleared.
// thread_local keeps concurrent const searches apart.
class VisitedMarks {
 public:
  void begin(size_t count) {
    if (stamps_.size() < count) stamps_.resize(count, 0);
    if (++stamp_ == 0) {  // wrapped: old stamps could collide
      std::fill(stamps_.begin(), stamps_.end(), 0);
      stamp_ = 1;
    }
  }
  // True the first time `id` is seen in this search.
  bool visit(uint32_t id) {
    if (stamps_[id] == stamp_) return false;
    stamps_[id] = stamp_;
    return true;
  }

 private:
  std::vector<uint32_t> stamps_;
  uint32_t stamp_ = 0;
};

VisitedMarks& threadVisitedMarks() {
  static thread_local VisitedMarks marks;
  return marks;
}

// Exact top-`count` keys by inner product for each query, best first: lists [queryCount, count].
void exactTopKeys(const KeyRows& keys, int64_t n, const float* queries, int64_t queryCount, int32_t dim, int64_t count,
                  int threads, std::vector<uint32_t>* lists) {
  lists->assign(size_t(queryCount) * size_t(count), 0);
  parallelChunks(queryCount, threads, kQueryBlock, [&](int64_t begin, int64_t end) {
    const int64_t rows = end - begin;
    // Per query: kept candidates and the score a new key must beat once 2 * count are kept.
    std::vector<std::vector<Scored>> kept(static_cast<size_t>(rows));
    std::vector<float> threshold(static_cast<size_t>(rows), -INFINITY);
    std::vector<float> scores(static_cast<size_t>(rows * kKeyBlock));
    auto shrink = [count](std::vector<Scored>& candidates) {
      std::nth_element(candidates.begin(), candidates.begin() + (count - 1), candidates.end(), better);
      candidates.resize(size_t(count));
    };
    for (int64_t block = 0; block < n; block += kKeyBlock) {
      const int64_t length = std::min(kKeyBlock, n - block);
      keys.dots(queries + begin * dim, int32_t(rows), block, length, scores.data());
      for (int64_t r = 0; r < rows; ++r) {
        const float* row = scores.data() + r * length;
        std::vector<Scored>& candidates = kept[size_t(r)];
        for (int64_t j = 0; j < length; ++j) {
          if (row[j] < threshold[size_t(r)]) continue;
          candidates.push_back({row[j], uint32_t(block + j)});
          if (int64_t(candidates.size()) >= 2 * count) {
            shrink(candidates);
            threshold[size_t(r)] = candidates[size_t(count - 1)].score;
          }
        }
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      std::vector<Scored>& candidates = kept[size_t(r)];
      if (int64_t(candidates.size()) > count) shrink(candidates);
      std::sort(candidates.begin(), candidates.end(), better);
      for (int64_t j = 0; j < count; ++j) (*lists)[size_t((begin + r) * count + j)] = candidates[size_t(j)].id;
    }
  });
}

class GraphIndex final : public KeyIndex {
 public:
  explicit GraphIndex(const IndexOptions& options) : options_(options), keys_(options.dim, options.halfKeys) {}

  Status build(const float* keys, int64_t n, const float* queries, int64_t queryCount) override {
    KVSLIM_RETURN_IF_ERROR(checkKeys(keys, n, 0, options_));
    if (queryCount < 0) return Status(ErrorCode::Shape, "query count must be >= 0, but is " + std::to_string(queryCount));
    if (queryCount > 0 && queries == nullptr)
      return Status(ErrorCode::Shape, "queries is null but the query count is " + std::to_string(queryCount));
    try {
      GraphIndex built(options_);  // built aside, so a failed build leaves this index as it was
      built.buildFrom(keys, n, queries, queryCount);
      *this = std::move(built);
    } catch (const std::bad_alloc&) {
      return Status(ErrorCode::OutOfMemory, "out of host memory building a graph index of " + std::to_string(n) + " keys");
    }
    return Status::ok();
  }

  Status add(const float* keys, int64_t n) override {
    if (count_ == 0) return build(keys, n, nullptr, 0);
    KVSLIM_RETURN_IF_ERROR(checkKeys(keys, n, count_, options_));
    if (n == 0) return Status::ok();
    const int64_t before = count_;
    try {
      appendKeys(keys, n);
      std::vector<uint32_t> batch;
      for (int64_t first = before; first < count_; first += kInsertBatch) {
        batch.clear();
        for (int64_t i = first; i < std::min(count_, first + kInsertBatch); ++i) batch.push_back(uint32_t(i));
        std::vector<std::vector<Scored>> found = findNeighbors(batch);
        for (size_t i = 0; i < batch.size(); ++i) link(batch[i], found[i], true);
      }
    } catch (const std::bad_alloc&) {
      removeFrom(before);
      return Status(ErrorCode::OutOfMemory, "out of host memory adding " + std::to_string(n) + " keys to a graph index");
    }
    return Status::ok();
  }

  void searchKeys(const float* queries, int32_t rows, int64_t k, const SearchOptions& options,
                  SearchResult* out) const override {
    if (k >= count_) {  // every key, exactly
      exactSearch(queries, rows, keys_, count_, out);
      return;
    }
    const int64_t beam = options.beam > 0 ? options.beam : options_.beam > 0 ? options_.beam : std::max<int64_t>(2 * k, 64);
    std::vector<Scored> found;
    out->scanned = beamSearch(queries, rows, std::max(beam, k), seedCount(), &found);
    found.resize(size_t(std::min<int64_t>(k, int64_t(found.size()))));
    out->ids.resize(found.size());
    out->scores.resize(found.size());
    for (size_t i = 0; i < found.size(); ++i) out->ids[i] = found[i].id, out->scores[i] = found[i].score;
  }

  int64_t size() const override { return count_; }

  size_t bytes() const override {
    return keys_.bytes() + norms_.size() * sizeof(float) +
           (links_.size() + linkCounts_.size() + parents_.size()) * sizeof(uint32_t);
  }

  std::unique_ptr<KeyIndex> clone() const override { return std::make_unique<GraphIndex>(*this); }
  const IndexOptions& options() const override { return options_; }

  // Structure: i32 degree, u32 entry, u32 out-degree [count], u32 links [count, degree] (kNone
  // past each key's out-degree), u32 parent [count] (kNone: none). The norms follow from the keys.
  void saveStructure(std::vector<uint8_t>* out) const override {
    ByteWriter writer(out);
    writer.put(options_.degree);
    writer.put(entry_);
    writer.putArray(linkCounts_.data(), size_t(count_));
    writer.putArray(links_.data(), size_t(count_) * size_t(options_.degree));
    writer.putArray(parents_.data(), size_t(count_));
  }

  Status restore(const float* keys, int64_t n, const uint8_t* data, size_t size) override {
    const auto corrupt = [](const std::string& what) { return Status(ErrorCode::Corrupt, "cannot load cache: a graph index's " + what); };
    KVSLIM_RETURN_IF_ERROR(checkKeys(keys, n, 0, options_));
    ByteReader reader(data, size);
    int32_t degree = 0;
    uint32_t entry = 0;
    if (!reader.get(&degree) || !reader.get(&entry)) return corrupt("structure is truncated");
    if (degree != options_.degree) return corrupt("degree differs from the policy's");
    if (n > 0 ? entry >= uint64_t(n) : entry != 0) return corrupt("entry is out of range");
    try {
      GraphIndex restored(options_);
      restored.appendKeys(keys, n);
      std::vector<uint32_t> counts, links, parents;
      if (!reader.getArray(&counts, uint64_t(n)) || !reader.getArray(&links, uint64_t(n) * uint64_t(degree)) ||
          !reader.getArray(&parents, uint64_t(n)) || !reader.done()) {
        return corrupt("structure is truncated or too long");
      }
      for (int64_t node = 0; node < n; ++node) {
        const uint32_t count = counts[size_t(node)];
        if (count > uint32_t(degree)) return corrupt("out-degree exceeds the degree");
        const uint32_t* own = links.data() + size_t(node) * size_t(degree);
        for (int32_t j = 0; j < degree; ++j) {
          if (uint32_t(j) < count ? own[j] >= uint64_t(n) : own[j] != kNone) return corrupt("link is out of range");
        }
        const uint32_t parent = parents[size_t(node)];
        if (parent != kNone && parent >= uint64_t(n)) return corrupt("parent is out of range");
      }
      // Into appendKeys' arrays, which keep a build's spare capacity for the decode appends.
      std::copy(counts.begin(), counts.end(), restored.linkCounts_.begin());
      std::copy(links.begin(), links.end(), restored.links_.begin());
      std::copy(parents.begin(), parents.end(), restored.parents_.begin());
      restored.entry_ = entry;
      *this = std::move(restored);
    } catch (const std::bad_alloc&) {
      return Status(ErrorCode::OutOfMemory, "out of host memory restoring a graph index of " + std::to_string(n) + " keys");
    }
    return Status::ok();
  }

 private:
  // Key `id` as an f32 query row.
  std::vector<float> key(uint32_t id) const {
    std::vector<float> row(static_cast<size_t>(options_.dim));
    keys_.row(id, row.data());
    return row;
  }
  uint32_t* linksOf(uint32_t id) { return links_.data() + size_t(id) * size_t(options_.degree); }
  const uint32_t* linksOf(uint32_t id) const { return links_.data() + size_t(id) * size_t(options_.degree); }

  // Reserves everything first, so a failure leaves the index as it was. A build reserves half as
  // much again: decode appends a key at a time right after prefill, and growing an exactly sized
  // index would copy all of it (hundreds of ms at 32K keys x 8 heads) in the first decode step.
  // Untouched capacity of these large allocations is address space, not memory.
  void appendKeys(const float* keys, int64_t n) {
    const size_t total = size_t(count_ + n);
    const size_t room = count_ == 0 ? total + total / 2 : total;
    keys_.reserve(room);
    reserveGeometric(&links_, room * size_t(options_.degree));
    reserveGeometric(&linkCounts_, room);
    reserveGeometric(&parents_, room);
    reserveGeometric(&norms_, room);
    keys_.append(keys, n);
    links_.resize(total * size_t(options_.degree), kNone);
    linkCounts_.resize(total, 0);
    parents_.resize(total, kNone);
    norms_.resize(total);
    for (int64_t i = count_; i < int64_t(total); ++i)
      keys_.maxDots(key(uint32_t(i)).data(), 1, i, 1, &norms_[size_t(i)]);
    count_ += n;
  }

  // Undoes a failed add(): drops keys from `first` on and every edge to them. Edges between older
  // keys that an insertion pruned stay pruned, which the spanning tree makes harmless.
  void removeFrom(int64_t first) {
    for (uint32_t node = 0; node < uint32_t(first); ++node) {
      uint32_t* links = linksOf(node);
      uint32_t* end = std::remove_if(links, links + linkCounts_[node], [first](uint32_t id) { return id >= uint32_t(first); });
      std::fill(end, links + options_.degree, kNone);
      linkCounts_[node] = uint32_t(end - links);
    }
    keys_.truncate(first);
    links_.resize(size_t(first) * size_t(options_.degree));
    linkCounts_.resize(size_t(first));
    parents_.resize(size_t(first));
    norms_.resize(size_t(first));
    count_ = first;
  }

  void buildFrom(const float* keys, int64_t n, const float* queries, int64_t queryCount) {
    appendKeys(keys, n);
    if (n == 0) return;
    const int32_t dim = options_.dim;
    std::vector<float> selfQueries;
    if (queryCount == 0) {
      queryCount = std::min(n, std::max(kSelfQueriesMin, n / kSelfQueriesDivisor));
      selfQueries.resize(size_t(queryCount) * size_t(dim));
      SplitMix64 random(options_.seed);
      for (int64_t i = 0; i < queryCount; ++i) {
        const int64_t row = queryCount == n ? i : int64_t(random.below(uint64_t(n)));
        keys_.row(uint32_t(row), selfQueries.data() + size_t(i) * dim);  // as stored (f16-rounded keys)
      }
      queries = selfQueries.data();
    }
    const int threads = resolveThreads(options_.threads);
    const int64_t perQuery = std::min<int64_t>(options_.neighbors, n);
    std::vector<uint32_t> lists;
    exactTopKeys(keys_, n, queries, queryCount, dim, perQuery, threads, &lists);
    project(lists, queryCount, perQuery, threads);
    connect();
  }

  // Bipartite query->key lists to key-key edges (RoarGraph's projection), pruned to `degree`.
  void project(const std::vector<uint32_t>& lists, int64_t queryCount, int64_t perQuery, int threads) {
    std::vector<std::vector<uint32_t>> candidates(static_cast<size_t>(count_));
    std::vector<uint32_t> hubCounts(static_cast<size_t>(count_), 0);
    for (int64_t q = 0; q < queryCount; ++q) {
      const uint32_t* list = lists.data() + size_t(q * perQuery);
      const uint32_t hub = list[0];
      ++hubCounts[hub];
      for (int64_t j = 1; j < perQuery; ++j) {
        candidates[hub].push_back(list[j]);
        candidates[list[j]].push_back(hub);
      }
      for (int64_t j = 1; j < perQuery; ++j)
        for (int64_t t = 1; t <= kRankWindow && j + t < perQuery; ++t) {
          candidates[list[j]].push_back(list[j + t]);
          candidates[list[j + t]].push_back(list[j]);
        }
    }
    parallelChunks(count_, threads, 256, [&](int64_t begin, int64_t end) {
      std::vector<uint32_t> ids, counts;
      std::vector<float> scores;
      for (int64_t node = begin; node < end; ++node) {
        std::vector<uint32_t>& pool = candidates[size_t(node)];
        if (pool.empty()) continue;
        std::sort(pool.begin(), pool.end());
        ids.clear();
        counts.clear();
        for (uint32_t id : pool) {
          if (!ids.empty() && ids.back() == id) {
            ++counts.back();
          } else {
            ids.push_back(id);
            counts.push_back(1);
          }
        }
        std::vector<uint32_t>().swap(pool);  // release as we go: the pools are the build's peak memory
        scores.resize(ids.size());
        keys_.gather(key(uint32_t(node)).data(), 1, ids.data(), int64_t(ids.size()), scores.data());
        std::vector<size_t> order(ids.size());
        for (size_t i = 0; i < order.size(); ++i) order[i] = i;
        std::sort(order.begin(), order.end(), [&](size_t a, size_t b) {
          if (counts[a] != counts[b]) return counts[a] > counts[b];
          return better({scores[a], ids[a]}, {scores[b], ids[b]});
        });
        std::vector<Scored> ranked(order.size());
        for (size_t i = 0; i < order.size(); ++i) ranked[i] = {scores[order[i]], ids[order[i]]};
        selectLinks(uint32_t(node), ranked, 0);
      }
    });
    entry_ = uint32_t(std::max_element(hubCounts.begin(), hubCounts.end()) - hubCounts.begin());
  }

  // Writes node's links: the first `keep` of `ranked` unconditionally (protected children), then
  // the rest in order, skipping occluded candidates first and using them only to fill free slots.
  void selectLinks(uint32_t node, const std::vector<Scored>& ranked, size_t keep) {
    const size_t degree = size_t(options_.degree);
    std::vector<uint32_t> chosen;
    std::vector<Scored> occluded;
    std::vector<float> dots(degree);
    chosen.reserve(degree);
    for (size_t i = 0; i < ranked.size() && chosen.size() < degree; ++i) {
      const Scored& candidate = ranked[i];
      if (candidate.id == node) continue;
      if (i >= keep && !chosen.empty()) {
        keys_.gather(key(candidate.id).data(), 1, chosen.data(), int64_t(chosen.size()), dots.data());
        // Occluded when a kept s is nearer: |s - c|^2 < |node - c|^2, i.e. |s|^2 - 2 s.c < |node|^2 - 2 node.c.
        const float nodeDistance = norms_[node] - 2 * candidate.score;
        bool isOccluded = false;
        for (size_t s = 0; s < chosen.size() && !isOccluded; ++s) isOccluded = norms_[chosen[s]] - 2 * dots[s] < nodeDistance;
        if (isOccluded) {
          occluded.push_back(candidate);
          continue;
        }
      }
      chosen.push_back(candidate.id);
    }
    for (size_t i = 0; i < occluded.size() && chosen.size() < degree; ++i) chosen.push_back(occluded[i].id);
    std::copy(chosen.begin(), chosen.end(), linksOf(node));
    std::fill(linksOf(node) + chosen.size(), linksOf(node) + degree, kNone);
    linkCounts_[node] = uint32_t(chosen.size());
  }

  // Sets the spanning-tree parents by BFS from the entry, inserting every key it misses.
  void connect() {
    std::vector<uint8_t> reached(static_cast<size_t>(count_), 0);
    std::vector<uint32_t> frontier;
    auto spread = [&](uint32_t from) {
      frontier.assign(1, from);
      reached[from] = 1;
      for (size_t head = 0; head < frontier.size(); ++head) {
        const uint32_t node = frontier[head];
        const uint32_t* links = linksOf(node);
        for (uint32_t i = 0; i < linkCounts_[node]; ++i) {
          if (reached[links[i]]) continue;
          reached[links[i]] = 1;
          parents_[links[i]] = node;
          frontier.push_back(links[i]);
        }
      }
    };
    spread(entry_);
    std::vector<uint32_t> batch;
    uint32_t next = 0;
    while (true) {
      batch.clear();
      for (; next < uint32_t(count_) && int64_t(batch.size()) < kInsertBatch; ++next)
        if (!reached[next]) batch.push_back(next);
      if (batch.empty()) break;
      std::vector<std::vector<Scored>> found = findNeighbors(batch);
      for (size_t i = 0; i < batch.size(); ++i) {
        if (reached[batch[i]]) continue;  // an earlier key of the batch linked to it
        link(batch[i], found[i], false);
        spread(batch[i]);
      }
    }
  }

  // Per key of `nodes`: the best keys the graph search with it as the query finds, best first.
  std::vector<std::vector<Scored>> findNeighbors(const std::vector<uint32_t>& nodes) const {
    const int64_t beam = std::max<int64_t>(kMinInsertBeam, options_.beam);
    std::vector<std::vector<Scored>> found(nodes.size());
    parallelChunks(int64_t(nodes.size()), resolveThreads(options_.threads), 4, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        beamSearch(key(nodes[size_t(i)]).data(), 1, beam, kInsertSeeds, &found[size_t(i)]);
        const uint32_t node = nodes[size_t(i)];
        std::vector<Scored>& list = found[size_t(i)];
        list.erase(std::remove_if(list.begin(), list.end(), [node](const Scored& s) { return s.id == node; }), list.end());
      }
    });
    return found;
  }

  // Links `node` to the keys found for it: they become its links, one of them its parent
  // (protected edge), the others link back when their pruning keeps it (or, without mayEvict,
  // when they have a free slot).
  void link(uint32_t node, const std::vector<Scored>& found, bool mayEvict) {
    // Own links: the found keys and whatever it had, protected children first.
    std::vector<Scored> ranked = found;
    const uint32_t* own = linksOf(node);
    std::vector<uint32_t> existing(own, own + linkCounts_[node]);
    std::vector<float> scores(existing.size());
    keys_.gather(key(node).data(), 1, existing.data(), int64_t(existing.size()), scores.data());
    for (size_t i = 0; i < existing.size(); ++i) {
      const bool known = std::any_of(found.begin(), found.end(), [&](const Scored& s) { return s.id == existing[i]; });
      if (!known) ranked.push_back({scores[i], existing[i]});
    }
    std::sort(ranked.begin(), ranked.end(), better);
    const size_t keep = protectChildren(node, &ranked);
    selectLinks(node, ranked, keep);

    // Parent: a found key with a free slot if there is one, so that no edge is lost.
    bool attached = parents_[node] != kNone || node == entry_;
    for (int pass = 0; pass < 2 && !attached; ++pass) {
      for (size_t i = 0; i < found.size() && !attached; ++i) {
        if (linkTo(found[i].id, node, true, pass == 1)) {
          parents_[node] = found[i].id;
          attached = true;
        }
      }
    }
    // The search found no key able to take a protected child: any leaf of the tree can.
    for (uint32_t other = 0; !attached && other < uint32_t(count_); ++other) {
      if (other != node && (parents_[other] != kNone || other == entry_) && linkTo(other, node, true, true)) {
        parents_[node] = other;
        attached = true;
      }
    }
    const uint32_t* links = linksOf(node);
    for (uint32_t i = 0; i < linkCounts_[node]; ++i)
      if (links[i] != parents_[node]) linkTo(links[i], node, false, mayEvict);
  }

  // Moves node's protected children (keys whose parent is node) to the front; returns their count.
  size_t protectChildren(uint32_t node, std::vector<Scored>* ranked) const {
    auto child = std::stable_partition(ranked->begin(), ranked->end(), [&](const Scored& s) { return parents_[s.id] == node; });
    return size_t(child - ranked->begin());
  }

  // Adds the edge from -> to, re-pruning from's links when they are full. A protected edge must
  // survive: false when from's links are all protected children already.
  bool linkTo(uint32_t from, uint32_t to, bool isProtected, bool mayEvict) {
    uint32_t* links = linksOf(from);
    const uint32_t count = linkCounts_[from];
    if (std::find(links, links + count, to) != links + count) return true;
    if (count < uint32_t(options_.degree)) {
      links[count] = to;
      linkCounts_[from] = count + 1;
      return true;
    }
    if (!mayEvict) return false;
    std::vector<uint32_t> ids(links, links + count);
    ids.push_back(to);
    std::vector<float> scores(ids.size());
    keys_.gather(key(from).data(), 1, ids.data(), int64_t(ids.size()), scores.data());
    std::vector<Scored> ranked(ids.size());
    for (size_t i = 0; i < ids.size(); ++i) ranked[i] = {scores[i], ids[i]};
    std::sort(ranked.begin(), ranked.end(), better);
    if (isProtected) {
      // The new child goes first among the protected ones.
      std::stable_partition(ranked.begin(), ranked.end(), [to](const Scored& s) { return s.id == to; });
      const size_t keep = 1 + size_t(std::stable_partition(ranked.begin() + 1, ranked.end(),
                                                           [&](const Scored& s) { return parents_[s.id] == from; }) -
                                     (ranked.begin() + 1));
      if (keep > size_t(options_.degree)) return false;
      selectLinks(from, ranked, keep);
      return true;
    }
    selectLinks(from, ranked, protectChildren(from, &ranked));
    return true;
  }

  // Best-first search from the entry; `found` receives the best `beam` keys seen, best first.
  // Returns the number of keys scored.
  // Landmarks a query search starts from: about sqrt(n).
  int64_t seedCount() const { return std::max<int64_t>(16, int64_t(std::sqrt(double(count_)))); }

  int64_t beamSearch(const float* queries, int32_t rows, int64_t beam, int64_t seedKeys, std::vector<Scored>* found) const {
    struct Entry {
      Scored scored;
      bool expanded;
    };
    VisitedMarks& visited = threadVisitedMarks();
    visited.begin(size_t(count_));
    std::vector<Entry> pool;
    pool.reserve(size_t(beam) + 1024);
    std::vector<uint32_t> batch(static_cast<size_t>(options_.degree));
    std::vector<float> scores(static_cast<size_t>(options_.degree));

    // Seeds: the entry hub and an even sample of `seedKeys` keys. A query far from the hub's
    // region starts near its own instead of crossing the graph, and graphs whose edges are local
    // (keys as training queries) stay searchable.
    std::vector<uint32_t> seeds{entry_};
    visited.visit(entry_);
    const int64_t landmarks = std::min<int64_t>(count_, seedKeys);
    for (int64_t i = 0; i < landmarks; ++i) {
      const uint32_t id = uint32_t(i * count_ / landmarks);
      if (visited.visit(id)) seeds.push_back(id);
    }
    std::vector<float> seedScores(seeds.size());
    keys_.gather(queries, rows, seeds.data(), int64_t(seeds.size()), seedScores.data());
    for (size_t i = 0; i < seeds.size(); ++i) pool.push_back({{seedScores[i], seeds[i]}, false});
    std::sort(pool.begin(), pool.end(), [](const Entry& a, const Entry& b) { return better(a.scored, b.scored); });
    if (int64_t(pool.size()) > beam) pool.resize(size_t(beam));
    int64_t scanned = int64_t(seeds.size());
    size_t cursor = 0;  // first unexpanded entry of pool
    while (cursor < pool.size()) {
      pool[cursor].expanded = true;
      const uint32_t node = pool[cursor].scored.id;
      const uint32_t* links = linksOf(node);
      size_t fresh = 0;
      for (uint32_t i = 0; i < linkCounts_[node]; ++i)
        if (visited.visit(links[i])) batch[fresh++] = links[i];
      keys_.gather(queries, rows, batch.data(), int64_t(fresh), scores.data());
      scanned += int64_t(fresh);
      size_t lowest = pool.size();
      for (size_t i = 0; i < fresh; ++i) {
        const Scored candidate{scores[i], batch[i]};
        if (int64_t(pool.size()) == beam && !better(candidate, pool.back().scored)) continue;
        auto at = std::upper_bound(pool.begin(), pool.end(), candidate,
                                   [](const Scored& c, const Entry& e) { return better(c, e.scored); });
        lowest = std::min(lowest, size_t(at - pool.begin()));
        pool.insert(at, {candidate, false});
        if (int64_t(pool.size()) > beam) pool.pop_back();
      }
      cursor = std::min(cursor + 1, lowest);
      while (cursor < pool.size() && pool[cursor].expanded) ++cursor;
    }
    found->resize(pool.size());
    for (size_t i = 0; i < pool.size(); ++i) (*found)[i] = pool[i].scored;
    return scanned;
  }


  IndexOptions options_;
  KeyRows keys_;                      // [count_, dim], row i is id i (f16 over an f16 cache)
  std::vector<uint32_t> links_;       // [count_, degree] out-edges, the first linkCounts_[i] valid
  std::vector<uint32_t> linkCounts_;  // out-degree per key
  std::vector<uint32_t> parents_;     // spanning-tree parent per key (its protected in-edge); kNone for the entry
  std::vector<float> norms_;          // |k|^2 per key, for the occlusion rule
  uint32_t entry_ = 0;
  int64_t count_ = 0;
};

}  // namespace

std::unique_ptr<KeyIndex> makeGraphIndex(const IndexOptions& options) { return std::make_unique<GraphIndex>(options); }

}  // namespace kvslim
