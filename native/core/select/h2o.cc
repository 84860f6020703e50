// H2O heavy hitters (methods/snapkv.md, H2O): per kv head, every token accumulates the attention
// probability it receives from every query that sees it (prefill rows, then each decode row;
// summed over the query heads of the kv head). The cache keeps the `recent` newest tokens plus
// `budget - recent` heavy hitters: a token leaving the recent window replaces the kept token with
// the smallest accumulated score when its own is larger (ties keep the older token), or is evicted.
// The mass comes from the call's own attention scores where the backend sums it within that one
// call (SelectContext::mass; on the CPU every decode call, and every prefill over heads without
// kept tokens); otherwise from attentionMass, a second read of the keys.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <deque>
#include <string>
#include <vector>

#include "select_policy.h"

namespace kvslim {

namespace {

class H2OPolicy final : public SelectPolicy {
 public:
  H2OPolicy(const SelectConfig& config, int32_t layers, int32_t kvHeads)
      : heavy_(config.budget - config.recent), recent_(config.recent), kvHeads_(kvHeads),
        scores_(size_t(layers) * size_t(kvHeads)) {}

  Status afterAppend(SelectContext& context, int32_t layer, const float* q, int64_t n, bool) override {
    std::vector<double> mass;
    for (int32_t h = 0; h < kvHeads_; ++h) {
      HeadScores& scores = scores_[size_t(layer) * size_t(kvHeads_) + size_t(h)];
      scores.tail.resize(size_t(context.store.tailTokens(layer, h)), 0.0);
      if (int64_t(scores.kept.size()) != context.store.keptTokens(layer, h)) {
        return Status(ErrorCode::Internal, "h2o: the scores of kv head " + std::to_string(h) + " do not match its kept tokens");
      }
      if (q != nullptr && n > 0 && context.mass != nullptr) {
        // Summed by the call's attention: kept token j is column j, tail token j column kept + j.
        const size_t kept = scores.kept.size();
        if (int64_t(kept + scores.tail.size()) > context.massStride) {
          return Status(ErrorCode::Internal, "h2o: the attention mass of kv head " + std::to_string(h) + " is too short");
        }
        const double* columns = context.mass + size_t(h) * size_t(context.massStride);
        for (size_t j = 0; j < kept; ++j) scores.kept[j] += columns[j];
        for (size_t j = 0; j < scores.tail.size(); ++j) scores.tail[j] += columns[kept + j];
      } else if (q != nullptr && n > 0) {
        // The call's rows summed per token by the backend: no rows x tokens matrix, however long the prefill.
        const std::vector<float> rows = groupRows(q, n, context.qHeads, context.kvHeads, h, context.headDim);
        AttentionMassArgs args;
        KVSLIM_RETURN_IF_ERROR(headMassArgs(context, layer, h, rows.data(), n, 0, &args));
        const size_t kept = scores.kept.size();
        mass.resize(kept + scores.tail.size());
        args.columns = int64_t(mass.size());
        args.out = mass.data();
        KVSLIM_RETURN_IF_ERROR(context.backend.attentionMass(args));
        for (size_t j = 0; j < kept; ++j) scores.kept[j] += mass[j];
        for (size_t j = 0; j < scores.tail.size(); ++j) scores.tail[j] += mass[kept + j];
      }
      KVSLIM_RETURN_IF_ERROR(evict(context.store, layer, h, &scores));
    }
    return Status::ok();
  }

  std::unique_ptr<SelectPolicy> clone() const override { return std::make_unique<H2OPolicy>(*this); }
  bool wantsMass() const override { return true; }

  // State: per layer and kv head, u64 kept then kept scores, u64 tail then tail scores (f64).
  void saveState(int32_t, std::vector<uint8_t>* out) const override {
    auto put = [out](const auto& value) {
      const auto* bytes = reinterpret_cast<const uint8_t*>(&value);
      out->insert(out->end(), bytes, bytes + sizeof(value));
    };
    for (const HeadScores& scores : scores_) {
      put(uint64_t(scores.kept.size()));
      for (const double score : scores.kept) put(score);
      put(uint64_t(scores.tail.size()));
      for (const double score : scores.tail) put(score);
    }
  }
  Status loadState(const uint8_t* data, size_t size, const PagedStore& store, int32_t layers) override {
    const auto corrupt = [](const std::string& what) { return Status(ErrorCode::Corrupt, "cannot load cache: " + what); };
    size_t offset = 0;
    auto take = [&](auto* value) {
      if (size - offset < sizeof(*value)) return false;
      std::memcpy(value, data + offset, sizeof(*value));
      offset += sizeof(*value);
      return true;
    };
    std::vector<HeadScores> loaded(scores_.size());
    for (size_t i = 0; i < loaded.size(); ++i) {
      const int32_t layer = int32_t(i / size_t(kvHeads_)), h = int32_t(i % size_t(kvHeads_));
      if (layer >= layers) return corrupt("the h2o state has more heads than the cache");
      uint64_t count = 0;
      for (const bool kept : {true, false}) {
        if (!take(&count)) return corrupt("the h2o state is truncated");
        const int64_t expected = kept ? store.keptTokens(layer, h) : store.tailTokens(layer, h);
        if (count != uint64_t(expected)) return corrupt("the h2o scores do not match the kept tokens");
        for (uint64_t j = 0; j < count; ++j) {
          double score = 0;
          if (!take(&score)) return corrupt("the h2o state is truncated");
          if (!(score >= 0.0) || !std::isfinite(score)) return corrupt("an h2o score is negative or not finite");
          if (kept) {
            loaded[i].kept.push_back(score);
          } else {
            loaded[i].tail.push_back(score);
          }
        }
      }
    }
    if (offset != size) return corrupt("the h2o state has trailing bytes");
    scores_ = std::move(loaded);
    return Status::ok();
  }

 private:
  struct HeadScores {
    std::vector<double> kept;  // per kept slot
    std::deque<double> tail;   // per tail token, oldest first
  };

  // The candidates leave the tail oldest first. A full heavy set loses its lowest token (lowest
  // score, then oldest) to a candidate with a larger score. The decisions are made on the scores
  // first (the lowest from a heap: a prompt's prefill sends thousands of candidates past a large
  // heavy set), then applied to the store at once: the free slots filled in one copy, each
  // replaced slot overwritten once with its last winner, the candidates dropped together.
  Status evict(PagedStore& store, int32_t layer, int32_t h, HeadScores* scores) {
    const int64_t leaving = store.tailTokens(layer, h) - recent_;
    if (leaving <= 0) return Status::ok();
    const int64_t fill = std::max<int64_t>(0, std::min<int64_t>(leaving, heavy_ - int64_t(scores->kept.size())));
    std::vector<int64_t> filled;
    for (int64_t i = 0; i < fill; ++i) filled.push_back(i);
    if (fill > 0) KVSLIM_RETURN_IF_ERROR(store.keepTailRows(layer, h, filled));
    for (int64_t i = 0; i < fill; ++i) scores->kept.push_back(scores->tail[size_t(i)]);

    if (leaving - fill == 1 && !scores->kept.empty()) {
      // One candidate (a decode step) meets only the lowest slot: a scan finds it (the heap below
      // would cost twice that to build). The same rule: lowest score, then lowest position.
      const std::vector<int64_t>& positions = store.keptPositions(layer, h);
      size_t lowest = 0;
      for (size_t s = 1; s < scores->kept.size(); ++s) {
        const double a = scores->kept[s], b = scores->kept[lowest];
        if (a < b || (a == b && positions[s] < positions[lowest])) lowest = s;
      }
      const double candidate = scores->tail[size_t(fill)];
      if (candidate > scores->kept[lowest]) {
        scores->kept[lowest] = candidate;
        KVSLIM_RETURN_IF_ERROR(store.overwriteKept(layer, h, int64_t(lowest), fill));
      }
    } else {
      struct Slot {
        double score;
        int64_t position;
        int64_t slot;
      };
      // std heaps keep the largest on top: "larger" here is lower, so the top is the lowest.
      const auto above = [](const Slot& a, const Slot& b) {
        return a.score > b.score || (a.score == b.score && a.position > b.position);
      };
      std::vector<Slot> heap;
      std::vector<int64_t> winner(scores->kept.size(), -1);  // per slot: the tail index it ends with
      const int64_t firstPosition = store.tailFirstPosition(layer, h);
      for (int64_t i = fill; i < leaving; ++i) {
        const double candidate = scores->tail[size_t(i)];
        if (heap.empty()) {
          const std::vector<int64_t>& positions = store.keptPositions(layer, h);
          for (size_t s = 0; s < scores->kept.size(); ++s) heap.push_back({scores->kept[s], positions[s], int64_t(s)});
          std::make_heap(heap.begin(), heap.end(), above);
          if (heap.empty()) break;  // no heavy slots: every candidate goes
        }
        const Slot lowest = heap.front();
        if (candidate > lowest.score) {
          winner[size_t(lowest.slot)] = i;
          scores->kept[size_t(lowest.slot)] = candidate;
          std::pop_heap(heap.begin(), heap.end(), above);
          heap.back() = {candidate, firstPosition + i, lowest.slot};
          std::push_heap(heap.begin(), heap.end(), above);
        }
      }
      for (size_t s = 0; s < winner.size(); ++s) {
        if (winner[s] >= 0) KVSLIM_RETURN_IF_ERROR(store.overwriteKept(layer, h, int64_t(s), winner[s]));
      }
    }
    store.dropTailFront(layer, h, leaving);
    scores->tail.erase(scores->tail.begin(), scores->tail.begin() + std::ptrdiff_t(leaving));
    return Status::ok();
  }

  int64_t heavy_;
  int64_t recent_;
  int32_t kvHeads_;
  std::vector<HeadScores> scores_;  // [layers * kvHeads]
};

}  // namespace

std::unique_ptr<SelectPolicy> makeH2OPolicy(const SelectConfig& config, int32_t layers, int32_t kvHeads) {
  return std::make_unique<H2OPolicy>(config, layers, kvHeads);
}

}  // namespace kvslim
