// IVF-Flat for maximum inner product (the Faiss "IVF" baseline of methods/retrieval-attention.md):
// k-means partitions the keys into lists; a search scores the centroids with the query rows,
// scans the keys of the best `probes` lists exactly and returns their top-k.
//
// Choices:
// - Clustering and assignment use L2 distance, as Faiss IVF does for its coarse quantizer. Inner-
//   product assignment would send most keys to the few largest-norm centroids (a big centroid wins
//   q.c for almost any x), leaving a handful of huge lists; L2 keeps the cells compact, and the
//   search still ranks lists by q.c (MIPS, nothing normalised).
// - k-means: Faiss-style random init from a deterministic sample of at most 64 * lists keys,
//   kKMeansIterations Lloyd iterations, empty clusters re-seeded by splitting the largest one.
//   Every result depends only on options.seed, never on the thread count.
// - Keys are stored reordered, contiguous per list, so a probe is one maxDot over the list; ids
//   map positions back to insertion order. No insertion-order copy is kept.
// - SearchResult::scanned counts keys scored in the probed lists; the centroid scores (lists of
//   them, about 4 * sqrt(n)) are not counted, as in Faiss's ndis.
// - add() assigns new keys to the nearest existing centroid without retraining; rebuild to
//   re-cluster after the key distribution has moved.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
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

constexpr int kKMeansIterations = 10;      // Faiss's IVF training default
constexpr int64_t kSamplePerList = 64;     // k-means sample cap per centroid (Faiss warns above 256)
constexpr int64_t kKeysPerThread = 256;    // below this much work per thread, threads cost more than they save
constexpr double kSplitEpsilon = 1.0 / 1024.0;


// `count` distinct values of [0, range), ascending (ascending keeps the sampled rows in memory order).
std::vector<int64_t> sampleWithoutReplacement(int64_t range, int64_t count, SplitMix64& random) {
  std::vector<int64_t> pool(static_cast<size_t>(range));
  for (int64_t i = 0; i < range; ++i) pool[size_t(i)] = i;
  for (int64_t i = 0; i < count; ++i) std::swap(pool[size_t(i)], pool[size_t(i + int64_t(random.below(uint64_t(range - i))))]);
  pool.resize(size_t(count));
  std::sort(pool.begin(), pool.end());
  return pool;
}

int resolveThreads(int32_t requested, int64_t work) {
  int threads = requested > 0 ? requested : int(std::thread::hardware_concurrency());
  threads = std::max(threads, 1);
  return int(std::max<int64_t>(1, std::min<int64_t>(threads, work / kKeysPerThread)));
}

// Runs body(thread, begin, end) over `threads` contiguous slices of [0, count). If a thread cannot
// be started, the calling thread runs that slice itself, so the work is always done.
template <class Body>
void parallelSlices(int64_t count, int threads, const Body& body) {
  std::vector<std::thread> workers;
  workers.reserve(size_t(threads));  // a throwing push_back with threads running would terminate
  const int64_t slice = (count + threads - 1) / threads;
  for (int t = 1; t < threads; ++t) {
    const int64_t begin = std::min(count, t * slice), end = std::min(count, begin + slice);
    try {
      workers.emplace_back([&body, t, begin, end] { body(t, begin, end); });
    } catch (const std::system_error&) {
      body(t, begin, end);
    }
  }
  body(0, 0, std::min(count, slice));
  for (std::thread& worker : workers) worker.join();
}

// Keys scored against the centroids together (one register-tiled dot-matrix call).
constexpr int64_t kAssignRows = 4;

// Nearest centroid by L2: argmin |x - c|^2 = argmax (x.c - |c|^2 / 2); ties to the lower centroid.
// scratch holds kAssignRows * lists floats per thread.
void assignNearest(const float* keys, int64_t count, int32_t dim, const float* centroids, const float* halfNorms,
                   int32_t lists, int threads, float* scratch, uint32_t* nearest) {
  const VectorOps& ops = hostVectorOps();
  parallelSlices(count, threads, [&](int thread, int64_t begin, int64_t end) {
    float* dots = scratch + size_t(thread) * size_t(kAssignRows) * size_t(lists);
    for (int64_t first = begin; first < end; first += kAssignRows) {
      const int64_t rows = std::min(kAssignRows, end - first);
      ops.dotMatrix(keys + first * dim, int32_t(rows), dim, centroids, lists, dots);
      for (int64_t r = 0; r < rows; ++r) {
        const float* row = dots + r * lists;
        int32_t best = 0;
        float bestValue = row[0] - halfNorms[0];
        for (int32_t c = 1; c < lists; ++c) {
          const float value = row[c] - halfNorms[c];
          if (value > bestValue) bestValue = value, best = c;
        }
        nearest[first + r] = uint32_t(best);
      }
    }
  });
}

void computeHalfNorms(const float* centroids, int32_t lists, int32_t dim, std::vector<float>* halfNorms) {
  halfNorms->resize(size_t(lists));
  for (int32_t c = 0; c < lists; ++c) {
    double sum = 0;
    for (int32_t j = 0; j < dim; ++j) sum += double(centroids[size_t(c) * dim + j]) * centroids[size_t(c) * dim + j];
    (*halfNorms)[size_t(c)] = float(0.5 * sum);
  }
}

// Lloyd's k-means on [count, dim] points; centroids receives [lists, dim].
void trainCentroids(const float* points, int64_t count, int32_t dim, int32_t lists, SplitMix64& random, int threads,
                    std::vector<float>* centroids) {
  const size_t rowFloats = size_t(dim);
  centroids->assign(size_t(lists) * rowFloats, 0.0f);
  const std::vector<int64_t> seeds = sampleWithoutReplacement(count, lists, random);
  for (int32_t c = 0; c < lists; ++c)
    std::memcpy(centroids->data() + size_t(c) * rowFloats, points + seeds[size_t(c)] * dim, rowFloats * sizeof(float));

  std::vector<float> halfNorms, scratch(size_t(threads) * size_t(kAssignRows) * size_t(lists));
  std::vector<uint32_t> assignment(size_t(count), UINT32_MAX), previous;
  std::vector<double> sums(size_t(lists) * rowFloats);
  std::vector<int64_t> members(static_cast<size_t>(lists));
  for (int iteration = 0; iteration < kKMeansIterations; ++iteration) {
    computeHalfNorms(centroids->data(), lists, dim, &halfNorms);
    previous = assignment;
    assignNearest(points, count, dim, centroids->data(), halfNorms.data(), lists, threads, scratch.data(), assignment.data());
    if (assignment == previous) break;  // converged: the means below would not move

    // Sequential sums keep the result independent of the thread count; this is O(count * dim),
    // small next to the O(count * lists * dim) assignment.
    std::fill(sums.begin(), sums.end(), 0.0);
    std::fill(members.begin(), members.end(), 0);
    for (int64_t i = 0; i < count; ++i) {
      const uint32_t c = assignment[size_t(i)];
      ++members[c];
      double* sum = sums.data() + size_t(c) * rowFloats;
      const float* point = points + i * dim;
      for (int32_t j = 0; j < dim; ++j) sum[j] += point[j];
    }
    for (int32_t c = 0; c < lists; ++c) {
      if (members[size_t(c)] == 0) continue;
      float* centroid = centroids->data() + size_t(c) * rowFloats;
      const double* sum = sums.data() + size_t(c) * rowFloats;
      for (int32_t j = 0; j < dim; ++j) centroid[j] = float(sum[j] / double(members[size_t(c)]));
    }
    // An empty cluster takes half of the largest one (Faiss's split: the two copies are pushed
    // apart by +-epsilon per channel, so the next assignment divides its points).
    for (int32_t c = 0; c < lists; ++c) {
      if (members[size_t(c)] != 0) continue;
      const int32_t largest = int32_t(std::max_element(members.begin(), members.end()) - members.begin());
      if (members[size_t(largest)] < 2) break;  // nothing left to split
      float* empty = centroids->data() + size_t(c) * rowFloats;
      float* donor = centroids->data() + size_t(largest) * rowFloats;
      for (int32_t j = 0; j < dim; ++j) {
        const double sign = (j % 2 == 0) ? 1.0 : -1.0;
        empty[j] = float(donor[j] * (1.0 + sign * kSplitEpsilon));
        donor[j] = float(donor[j] * (1.0 - sign * kSplitEpsilon));
      }
      members[size_t(c)] = members[size_t(largest)] / 2;
      members[size_t(largest)] -= members[size_t(c)];
    }
  }
}

struct InvertedList {
  std::vector<uint32_t> ids;  // insertion-order ids, ascending
  KeyRows keys;               // [ids.size(), dim], contiguous for one maxDot per probe (f16 over an f16 cache)
};

class IvfIndex final : public KeyIndex {
 public:
  explicit IvfIndex(const IndexOptions& options) : options_(options), requestedLists_(options.lists) {}

  Status build(const float* keys, int64_t n, const float* /*queries*/, int64_t /*queryCount*/) override {
    KVSLIM_RETURN_IF_ERROR(checkKeys(keys, n, 0, options_));
    try {
      IvfIndex built(options_);  // built aside, so a failed build leaves this index as it was
      built.requestedLists_ = requestedLists_;
      built.buildFrom(keys, n);
      *this = std::move(built);
    } catch (const std::bad_alloc&) {
      return Status(ErrorCode::OutOfMemory, "out of host memory building an ivf index of " + std::to_string(n) + " keys");
    }
    return Status::ok();
  }

  Status add(const float* keys, int64_t n) override {
    if (lists_.empty()) return build(keys, n, nullptr, 0);
    KVSLIM_RETURN_IF_ERROR(checkKeys(keys, n, count_, options_));
    if (n == 0) return Status::ok();
    try {
      append(keys, n);  // allocates everything before it changes anything, so a failure leaves the index as it was
    } catch (const std::bad_alloc&) {
      return Status(ErrorCode::OutOfMemory, "out of host memory adding " + std::to_string(n) + " keys to an ivf index");
    }
    return Status::ok();
  }

  void searchKeys(const float* queries, int32_t rows, int64_t k, const SearchOptions& options,
                  SearchResult* out) const override {
    searchLists(queries, rows, k, options, out);
  }

  int64_t size() const override { return count_; }

  size_t bytes() const override {
    size_t total = (centroids_.size() + halfNorms_.size()) * sizeof(float);
    for (const InvertedList& list : lists_) total += list.keys.bytes() + list.ids.size() * sizeof(uint32_t);
    return total;
  }

  std::unique_ptr<KeyIndex> clone() const override { return std::make_unique<IvfIndex>(*this); }
  const IndexOptions& options() const override { return options_; }

  // Structure: i32 requested lists, i32 lists (0: empty), f32 centroids [lists, dim], u32 list of
  // each key [count]. Each key's list is saved, not assigned again: assignment by a centroid dot
  // product could round a near tie the other way in a batch of another size.
  void saveStructure(std::vector<uint8_t>* out) const override {
    ByteWriter writer(out);
    writer.put(requestedLists_);
    writer.put(int32_t(lists_.size()));
    writer.putArray(centroids_);
    std::vector<uint32_t> listOf(size_t(count_), 0);
    for (size_t c = 0; c < lists_.size(); ++c)
      for (const uint32_t id : lists_[c].ids) listOf[id] = uint32_t(c);
    writer.putArray(listOf);
  }

  Status restore(const float* keys, int64_t n, const uint8_t* data, size_t size) override {
    const auto corrupt = [](const std::string& what) { return Status(ErrorCode::Corrupt, "cannot load cache: an ivf index's " + what); };
    KVSLIM_RETURN_IF_ERROR(checkKeys(keys, n, 0, options_));
    ByteReader reader(data, size);
    int32_t requested = 0, lists = 0;
    if (!reader.get(&requested) || !reader.get(&lists)) return corrupt("structure is truncated");
    if (requested < 0 || requested > (1 << 24) || requested != requestedLists_) return corrupt("requested list count differs from the policy's");
    if (lists < 0 || lists > n || (lists == 0) != (n == 0)) return corrupt("list count is out of range");
    try {
      IvfIndex restored(options_);
      restored.requestedLists_ = requested;
      restored.options_.lists = lists == 0 ? requested : lists;
      std::vector<uint32_t> listOf;
      if (!reader.getArray(&restored.centroids_, uint64_t(lists) * uint64_t(options_.dim)) || !reader.getArray(&listOf, uint64_t(n)) ||
          !reader.done()) {
        return corrupt("structure is truncated or too long");
      }
      for (const float value : restored.centroids_) {
        if (!std::isfinite(value)) return corrupt("centroid is not finite");
      }
      for (const uint32_t c : listOf) {
        if (c >= uint32_t(lists)) return corrupt("key list is out of range");
      }
      if (lists > 0) {
        computeHalfNorms(restored.centroids_.data(), lists, options_.dim, &restored.halfNorms_);
        restored.lists_.assign(size_t(lists), InvertedList{{}, KeyRows(options_.dim, options_.halfKeys)});
        for (int64_t i = 0; i < n; ++i) {
          InvertedList& list = restored.lists_[listOf[size_t(i)]];
          list.ids.push_back(uint32_t(i));
          list.keys.append(keys + i * options_.dim, 1);
        }
        restored.count_ = n;
      }
      *this = std::move(restored);
    } catch (const std::bad_alloc&) {
      return Status(ErrorCode::OutOfMemory, "out of host memory restoring an ivf index of " + std::to_string(n) + " keys");
    }
    return Status::ok();
  }

 private:
  // lists = 0 means round(4 * sqrt(n)); never more lists than keys (an empty list is pure overhead).
  int32_t resolveLists(int64_t n) const {
    int64_t lists = requestedLists_ > 0 ? requestedLists_ : int64_t(std::llround(4.0 * std::sqrt(double(n))));
    return int32_t(std::max<int64_t>(1, std::min<int64_t>(lists, n)));
  }

  void buildFrom(const float* keys, int64_t n) {
    const int32_t dim = options_.dim;
    centroids_.clear();
    halfNorms_.clear();
    lists_.clear();
    count_ = 0;
    options_.lists = requestedLists_;
    if (n == 0) return;  // stays empty; the next add() builds

    const int32_t lists = resolveLists(n);
    options_.lists = lists;
    SplitMix64 random(options_.seed);
    const int64_t sampleCount = std::min<int64_t>(n, kSamplePerList * int64_t(lists));
    const int threads = resolveThreads(options_.threads, sampleCount);
    if (sampleCount == n) {
      trainCentroids(keys, n, dim, lists, random, threads, &centroids_);
    } else {
      std::vector<float> sample(size_t(sampleCount) * size_t(dim));
      const std::vector<int64_t> rows = sampleWithoutReplacement(n, sampleCount, random);
      for (int64_t i = 0; i < sampleCount; ++i)
        std::memcpy(sample.data() + size_t(i) * dim, keys + rows[size_t(i)] * dim, size_t(dim) * sizeof(float));
      trainCentroids(sample.data(), sampleCount, dim, lists, random, threads, &centroids_);
    }
    computeHalfNorms(centroids_.data(), lists, dim, &halfNorms_);
    lists_.assign(size_t(lists), InvertedList{{}, KeyRows(options_.dim, options_.halfKeys)});
    append(keys, n);
  }

  // Assigns keys to their nearest centroids and appends them with ids from count_ on.
  void append(const float* keys, int64_t n) {
    const int32_t dim = options_.dim;
    const int32_t lists = int32_t(lists_.size());
    const int threads = resolveThreads(options_.threads, n);
    std::vector<float> scratch(size_t(threads) * size_t(kAssignRows) * size_t(lists));
    std::vector<uint32_t> nearest(static_cast<size_t>(n));
    assignNearest(keys, n, dim, centroids_.data(), halfNorms_.data(), lists, threads, scratch.data(), nearest.data());

    std::vector<int64_t> incoming(size_t(lists), 0);
    for (uint32_t c : nearest) ++incoming[c];
    for (int32_t c = 0; c < lists; ++c) {
      InvertedList& list = lists_[size_t(c)];
      reserveGeometric(&list.ids, list.ids.size() + size_t(incoming[size_t(c)]));
      list.keys.reserve(list.ids.size() + size_t(incoming[size_t(c)]));
    }
    for (int64_t i = 0; i < n; ++i) {
      InvertedList& list = lists_[nearest[size_t(i)]];
      list.ids.push_back(uint32_t(count_ + i));
      list.keys.append(keys + i * dim, 1);
    }
    count_ += n;
  }

  void searchLists(const float* queries, int32_t rows, int64_t k, const SearchOptions& options, SearchResult* out) const {
    const VectorOps& ops = hostVectorOps();
    const int32_t dim = options_.dim;
    const int32_t lists = int32_t(lists_.size());
    int32_t probes = options.probes > 0 ? options.probes : options_.probes > 0 ? options_.probes : std::max(1, lists / 16);
    probes = std::min(probes, lists);

    std::vector<float> centroidScores(static_cast<size_t>(lists));
    ops.maxDot(queries, rows, dim, centroids_.data(), lists, centroidScores.data());
    // Lists in centroid order: the first `probes`, then more until k keys are candidates (a caller
    // asking for k keys gets k whenever the index holds them).
    std::vector<uint32_t> order;
    topK(centroidScores.data(), lists, lists, &order);
    std::vector<uint32_t> probed;
    int64_t candidates = 0;
    for (uint32_t c : order) {
      if (int32_t(probed.size()) >= probes && candidates >= k) break;
      probed.push_back(c);
      candidates += int64_t(lists_[c].ids.size());
    }
    std::vector<float> scores(static_cast<size_t>(candidates));
    std::vector<uint32_t> ids(static_cast<size_t>(candidates));
    int64_t offset = 0;
    for (uint32_t c : probed) {
      const InvertedList& list = lists_[c];
      const int64_t length = int64_t(list.ids.size());
      if (length == 0) continue;
      list.keys.maxDots(queries, rows, 0, length, scores.data() + offset);
      std::copy(list.ids.begin(), list.ids.end(), ids.begin() + offset);
      offset += length;
    }
    out->scanned = candidates;
    selectBest(scores, ids, k, out);
  }

  // Exact top-k of the candidates with ties to the lower id, like the flat index. topK breaks ties by
  // position, and positions follow probe order, so the keys tied with the k-th score are re-picked by id.
  static void selectBest(const std::vector<float>& scores, const std::vector<uint32_t>& ids, int64_t k, SearchResult* out) {
    std::vector<uint32_t> positions;
    topK(scores.data(), int64_t(scores.size()), k, &positions);
    if (positions.empty()) return;
    const float kthScore = scores[positions.back()];
    size_t above = 0;
    for (uint32_t p : positions) above += scores[p] > kthScore ? 1 : 0;
    std::vector<uint32_t> tied;
    for (size_t p = 0; p < scores.size(); ++p)
      if (scores[p] == kthScore) tied.push_back(ids[p]);
    std::sort(tied.begin(), tied.end());
    tied.resize(std::min(tied.size(), positions.size() - above));
    // Scores of the chosen ids, then best first with ties to the lower id.
    std::vector<std::pair<float, uint32_t>> best;
    best.reserve(positions.size());
    for (uint32_t p : positions)
      if (scores[p] > kthScore) best.emplace_back(scores[p], ids[p]);
    for (uint32_t id : tied) best.emplace_back(kthScore, id);
    std::sort(best.begin(), best.end(), [](const std::pair<float, uint32_t>& a, const std::pair<float, uint32_t>& b) {
      return a.first > b.first || (a.first == b.first && a.second < b.second);
    });
    out->ids.resize(best.size());
    out->scores.resize(best.size());
    for (size_t i = 0; i < best.size(); ++i) out->scores[i] = best[i].first, out->ids[i] = best[i].second;
  }

  IndexOptions options_;          // as given, with lists resolved at build
  int32_t requestedLists_ = 0;    // the caller's lists (0 = automatic), re-resolved on every build
  std::vector<float> centroids_;  // [lists, dim]
  std::vector<float> halfNorms_;  // |c|^2 / 2 per centroid, for L2 assignment in add()
  std::vector<InvertedList> lists_;
  int64_t count_ = 0;
};

}  // namespace

std::unique_ptr<KeyIndex> makeIvfIndex(const IndexOptions& options) { return std::make_unique<IvfIndex>(options); }

}  // namespace kvslim
