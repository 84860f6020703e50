// H2O heavy hitters (methods/snapkv.md, H2O): per kv head, every token accumulates the attention
// probability it receives from every query that sees it (prefill rows, then each decode row;
// summed over the query heads of the kv head). The cache keeps the `recent` newest tokens plus
// `budget - recent` heavy hitters: a token leaving the recent window replaces the kept token with
// the smallest accumulated score when its own is larger (ties keep the older token), or is evicted.
// The mass comes from the call's own attention scores where the backend sums it within that one
// call (SelectContext::mass; on the CPU every decode call, and every prefill over heads without
// kept tokens; on CUDA every call over heads without kept tokens, from the call's lse); otherwise
// from attentionMass, a separate op.
//
// Over a KIVI store (policy.store 'kivi') a layer stays dense until its first call with queries
// (its prompt's prefill, or a step), then moves into the store in position order
// (KVCache::moveToKivi). The same rule goes on deciding, on the mass of the quantized attention:
// a token evicted after the move is flagged (attention masks it) and its row stays quantized
// until the cache compacts the layer (KVCache::compactKivi).
#include <algorithm>
#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include "../byte_io.h"
#include "select_policy.h"

namespace kvslim {

namespace {

// The slot a candidate meets: the lowest score, then the oldest position.
size_t lowestSlot(const std::vector<double>& scores, const std::vector<int64_t>& positions) {
  size_t lowest = 0;
  for (size_t s = 1; s < scores.size(); ++s) {
    if (scores[s] < scores[lowest] || (scores[s] == scores[lowest] && positions[s] < positions[lowest])) lowest = s;
  }
  return lowest;
}

// The heavy-hitter rule on scores alone. Slots (scores, positions of their tokens) hold the heavy
// set; candidates (scores[first, end), candidate i at position firstPosition + i, newer than every
// slot) replace the lowest slot (lowest score, then oldest) when their score is larger. Returns
// per slot the candidate that holds it at the end (-1: its own token still does); the slots'
// scores follow. One candidate (a decode step) scans for the lowest slot; more use a heap (a
// prompt's prefill sends thousands of candidates past a large heavy set).
std::vector<int64_t> replaceLowest(std::vector<double>* slotScores, const std::vector<int64_t>& positions,
                                   const std::function<double(int64_t)>& candidate, int64_t firstPosition, int64_t first,
                                   int64_t end) {
  std::vector<double>& scores = *slotScores;
  std::vector<int64_t> winner(scores.size(), -1);
  if (scores.empty() || first >= end) return winner;
  if (end - first == 1) {
    const size_t lowest = lowestSlot(scores, positions);
    const double score = candidate(first);
    if (score > scores[lowest]) {
      scores[lowest] = score;
      winner[lowest] = first;
    }
    return winner;
  }
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
  for (size_t s = 0; s < scores.size(); ++s) heap.push_back({scores[s], positions[s], int64_t(s)});
  std::make_heap(heap.begin(), heap.end(), above);
  for (int64_t i = first; i < end; ++i) {
    const double score = candidate(i);
    const Slot lowest = heap.front();
    if (score > lowest.score) {
      const size_t slot = size_t(lowest.slot);
      winner[slot] = i;
      scores[slot] = score;
      std::pop_heap(heap.begin(), heap.end(), above);
      heap.back() = {score, firstPosition + i, lowest.slot};
      std::push_heap(heap.begin(), heap.end(), above);
    }
  }
  return winner;
}

// A head's tail scores, oldest first: a vector whose front advances as tokens leave (compacted
// once half of it is behind the front), so a call's mass adds over contiguous doubles.
class TailScores {
 public:
  size_t size() const { return values_.size() - front_; }
  double& operator[](size_t i) { return values_[front_ + i]; }
  double operator[](size_t i) const { return values_[front_ + i]; }
  double* data() { return values_.data() + front_; }
  const double* begin() const { return values_.data() + front_; }
  const double* end() const { return values_.data() + values_.size(); }
  void resize(size_t count) { values_.resize(front_ + count, 0.0); }
  void push_back(double score) { values_.push_back(score); }
  void dropFront(size_t count) {
    front_ += count;
    if (front_ > values_.size() / 2) {
      values_.erase(values_.begin(), values_.begin() + std::ptrdiff_t(front_));
      front_ = 0;
    }
  }

 private:
  std::vector<double> values_;
  size_t front_ = 0;
};

class H2OPolicy final : public SelectPolicy {
 public:
  H2OPolicy(const SelectConfig& config, int32_t layers, int32_t kvHeads)
      : heavy_(config.budget - config.recent), recent_(config.recent), kvHeads_(kvHeads),
        scores_(size_t(layers) * size_t(kvHeads)), kivi_(size_t(layers) * size_t(kvHeads)),
        kiviLayer_(size_t(layers), 0), evicted_(size_t(layers), 0) {}

  // The call's mass is added to every head's scores and each head finds its lowest heavy hitter
  // on the host threads (a decode step: 2 x budget doubles a head), then the store changes head
  // by head.
  Status afterAppend(SelectContext& context, int32_t layer, const float* q, int64_t n, bool) override {
    const bool scored = q != nullptr && n > 0;
    const double* mass = context.mass;
    int64_t massStride = context.massStride;
    std::vector<double> separate;
    if (scored && mass == nullptr) {
      // The backend did not sum the call's mass within its attention: attentionMass per head (a
      // backend op, so not on the host threads).
      for (int32_t h = 0; h < kvHeads_; ++h) {
        massStride = std::max(massStride, context.store.keptTokens(layer, h) + context.store.tailTokens(layer, h));
      }
      separate.assign(size_t(kvHeads_) * size_t(massStride), 0.0);
      for (int32_t h = 0; h < kvHeads_; ++h) {
        // The call's rows summed per token by the backend: no rows x tokens matrix, however long the prefill.
        const std::vector<float> rows = groupRows(q, n, context.qHeads, context.kvHeads, h, context.headDim);
        AttentionMassArgs args;
        KVSLIM_RETURN_IF_ERROR(headMassArgs(context, layer, h, rows.data(), n, 0, &args));
        args.columns = context.store.keptTokens(layer, h) + context.store.tailTokens(layer, h);
        args.out = separate.data() + size_t(h) * size_t(massStride);
        KVSLIM_RETURN_IF_ERROR(context.backend.attentionMass(args));
      }
      mass = separate.data();
    }
    std::vector<int64_t> lowest(size_t(kvHeads_), -1);
    KVSLIM_RETURN_IF_ERROR(forEachHeadOnHost(context.backend, kvHeads_, context.threads, [&](int32_t h) {
      HeadScores& scores = scores_[size_t(layer) * size_t(kvHeads_) + size_t(h)];
      scores.tail.resize(size_t(context.store.tailTokens(layer, h)));
      const size_t kept = scores.kept.size();
      if (int64_t(kept) != context.store.keptTokens(layer, h)) {
        return Status(ErrorCode::Internal, "h2o: the scores of kv head " + std::to_string(h) + " do not match its kept tokens");
      }
      if (scored) {
        // Kept token j is column j, tail token j column kept + j.
        if (int64_t(kept + scores.tail.size()) > massStride) {
          return Status(ErrorCode::Internal, "h2o: the attention mass of kv head " + std::to_string(h) + " is too short");
        }
        const double* columns = mass + size_t(h) * size_t(massStride);
        for (size_t j = 0; j < kept; ++j) scores.kept[j] += columns[j];
        double* tail = scores.tail.data();
        for (size_t j = 0; j < scores.tail.size(); ++j) tail[j] += columns[kept + j];
      }
      // A decode step's one candidate against a full heavy set: the lowest slot (lowest score,
      // then oldest), as replaceLowest finds it.
      if (int64_t(scores.tail.size()) - recent_ == 1 && int64_t(kept) >= heavy_ && kept > 0) {
        lowest[size_t(h)] = int64_t(lowestSlot(scores.kept, context.store.keptPositions(layer, h)));
      }
      return Status::ok();
    }));
    for (int32_t h = 0; h < kvHeads_; ++h) {
      HeadScores& scores = scores_[size_t(layer) * size_t(kvHeads_) + size_t(h)];
      KVSLIM_RETURN_IF_ERROR(lowest[size_t(h)] >= 0 ? replaceOne(context.store, layer, h, size_t(lowest[size_t(h)]), &scores)
                                                    : evict(context.store, layer, h, &scores));
    }
    return Status::ok();
  }

  std::unique_ptr<SelectPolicy> clone() const override { return std::make_unique<H2OPolicy>(*this); }
  bool wantsMass() const override { return true; }

  bool evictsInKivi() const override { return true; }

  Status enterKivi(int32_t layer, const std::vector<std::vector<int64_t>>& order) override {
    for (int32_t h = 0; h < kvHeads_; ++h) {
      HeadScores& dense = scores_[size_t(layer) * size_t(kvHeads_) + size_t(h)];
      KiviHead& head = kivi_[size_t(layer) * size_t(kvHeads_) + size_t(h)];
      const size_t kept = dense.kept.size();
      head.scores.clear();
      for (const int64_t i : order[size_t(h)]) {
        if (i < 0 || size_t(i) >= kept + dense.tail.size()) return Status(ErrorCode::Internal, "h2o: a moved token is out of range");
        head.scores.push_back(size_t(i) < kept ? dense.kept[size_t(i)] : dense.tail[size_t(i) - kept]);
      }
      head.evicted.assign(head.scores.size(), 0);
      dense = HeadScores();
    }
    kiviLayer_[size_t(layer)] = 1;
    evicted_[size_t(layer)] = 0;
    return Status::ok();
  }

  // Indexes below tokens - recent have left the recent window: each is a heavy hitter or flagged.
  Status afterAppendKivi(int32_t layer, int64_t tokens, const double* mass, int64_t massStride) override {
    int64_t flagged = -1;
    for (int32_t h = 0; h < kvHeads_; ++h) {
      KiviHead& head = kivi_[size_t(layer) * size_t(kvHeads_) + size_t(h)];
      const int64_t before = int64_t(head.scores.size());
      if (tokens < before || (mass != nullptr && massStride < tokens)) {
        return Status(ErrorCode::Internal, "h2o: the KIVI layer's tokens or mass do not match its scores");
      }
      const int64_t decided = std::max<int64_t>(0, before - recent_), deciding = std::max<int64_t>(0, tokens - recent_);
      head.scores.resize(size_t(tokens), 0.0);
      head.evicted.resize(size_t(tokens), 0);
      if (mass != nullptr) {
        const double* columns = mass + size_t(h) * size_t(massStride);
        for (int64_t t = 0; t < tokens; ++t) head.scores[size_t(t)] += columns[t];
      }
      const int64_t live = decided - evicted_[size_t(layer)];  // heavy hitters held (flags are equal per head)
      if (deciding - decided == 1 && live >= heavy_ && live > 0) {
        // One candidate (a decode step) against a full heavy set: a scan for the lowest, as
        // replaceLowest does, without building the slot lists.
        int64_t lowest = -1;
        for (int64_t t = 0; t < decided; ++t) {
          if (head.evicted[size_t(t)] == 0 && (lowest < 0 || head.scores[size_t(t)] < head.scores[size_t(lowest)])) lowest = t;
        }
        head.evicted[size_t(head.scores[size_t(decided)] > head.scores[size_t(lowest)] ? lowest : decided)] = 1;
        if (flagged >= 0 && flagged != 1) return Status(ErrorCode::Internal, "h2o: kv heads of a KIVI layer evicted unequally");
        flagged = 1;
        continue;
      }
      // The heavy set: unflagged indexes that left the window, filled up to `heavy` by candidates.
      std::vector<double> slotScores;
      std::vector<int64_t> slots;
      for (int64_t t = 0; t < decided; ++t) {
        if (head.evicted[size_t(t)] == 0) {
          slots.push_back(t);
          slotScores.push_back(head.scores[size_t(t)]);
        }
      }
      int64_t next = decided;
      for (; next < deciding && int64_t(slots.size()) < heavy_; ++next) {
        slots.push_back(next);
        slotScores.push_back(head.scores[size_t(next)]);
      }
      // Index order is position order: a slot's position is its index.
      const std::vector<int64_t> winner = replaceLowest(
          &slotScores, slots, [&](int64_t t) { return head.scores[size_t(t)]; }, 0, next, deciding);
      for (int64_t t = next; t < deciding; ++t) head.evicted[size_t(t)] = 1;
      for (size_t s = 0; s < slots.size(); ++s) {
        if (winner[s] < 0) continue;
        head.evicted[size_t(slots[s])] = 1;
        head.evicted[size_t(winner[s])] = 0;
      }
      const int64_t count = deciding - next;
      if (flagged >= 0 && count != flagged) return Status(ErrorCode::Internal, "h2o: kv heads of a KIVI layer evicted unequally");
      flagged = count;
    }
    evicted_[size_t(layer)] += std::max<int64_t>(0, flagged);
    return Status::ok();
  }

  const std::vector<uint8_t>* evictedFlags(int32_t layer, int32_t head) const override {
    if (kiviLayer_[size_t(layer)] == 0) return nullptr;
    return &kivi_[size_t(layer) * size_t(kvHeads_) + size_t(head)].evicted;
  }
  int64_t evictedCount(int32_t layer) const override { return evicted_[size_t(layer)]; }

  void compactKivi(int32_t layer) override {
    for (int32_t h = 0; h < kvHeads_; ++h) {
      KiviHead& head = kivi_[size_t(layer) * size_t(kvHeads_) + size_t(h)];
      size_t kept = 0;
      for (size_t t = 0; t < head.scores.size(); ++t) {
        if (head.evicted[t] == 0) head.scores[kept++] = head.scores[t];
      }
      head.scores.resize(kept);
      head.evicted.assign(kept, 0);
    }
    evicted_[size_t(layer)] = 0;
  }

  // State, per layer and kv head: a dense layer's u64 kept, kept scores, u64 tail, tail scores;
  // a KIVI layer's u64 tokens, scores per index, u64 flagged, the flagged indexes (u64,
  // ascending). Scores are f64.
  Status saveState(int32_t, std::vector<uint8_t>* out) const override {
    ByteWriter writer(out);
    for (size_t i = 0; i < scores_.size(); ++i) {
      if (kiviLayer_[i / size_t(kvHeads_)] != 0) {
        const KiviHead& head = kivi_[i];
        writer.putArray(head.scores);
        writer.put(uint64_t(std::count(head.evicted.begin(), head.evicted.end(), uint8_t(1))));
        for (size_t t = 0; t < head.evicted.size(); ++t) {
          if (head.evicted[t] != 0) writer.put(uint64_t(t));
        }
        continue;
      }
      const HeadScores& scores = scores_[i];
      writer.putArray(scores.kept);
      writer.put(uint64_t(scores.tail.size()));
      for (const double score : scores.tail) writer.put(score);
    }
    return Status::ok();
  }
  Status loadState(const uint8_t* data, size_t size, const RestoredStores& restored, int32_t layers) override {
    const auto corrupt = [](const std::string& what) { return Status(ErrorCode::Corrupt, "cannot load cache: " + what); };
    ByteReader reader(data, size);
    auto take = [&](auto* value) { return reader.get(value); };
    auto takeScore = [&](double* score) {
      if (!take(score)) return corrupt("the h2o state is truncated");
      if (!(*score >= 0.0) || !std::isfinite(*score)) return corrupt("an h2o score is negative or not finite");
      return Status::ok();
    };
    std::vector<HeadScores> loaded(scores_.size());
    std::vector<KiviHead> loadedKivi(kivi_.size());
    std::vector<uint8_t> kiviLayer(kiviLayer_.size(), 0);
    std::vector<int64_t> evicted(evicted_.size(), 0);
    for (size_t i = 0; i < loaded.size(); ++i) {
      const int32_t layer = int32_t(i / size_t(kvHeads_)), h = int32_t(i % size_t(kvHeads_));
      if (layer >= layers) return corrupt("the h2o state has more heads than the cache");
      uint64_t count = 0;
      const int64_t kiviTokens = restored.kiviTokens[size_t(layer)];
      if (kiviTokens >= 0) {
        KiviHead& head = loadedKivi[i];
        if (!take(&count)) return corrupt("the h2o state is truncated");
        if (count != uint64_t(kiviTokens)) return corrupt("the h2o scores do not match the KIVI layer's tokens");
        head.scores.resize(size_t(count));
        for (double& score : head.scores) KVSLIM_RETURN_IF_ERROR(takeScore(&score));
        head.evicted.assign(size_t(count), 0);
        // Flagged: distinct, ascending, out of the recent window, as many in every head of the layer.
        uint64_t flagged = 0;
        if (!take(&flagged) || flagged > count) return corrupt("the h2o eviction flags are truncated or too many");
        const int64_t decided = std::max<int64_t>(0, kiviTokens - recent_);
        int64_t previous = -1;
        for (uint64_t j = 0; j < flagged; ++j) {
          uint64_t t = 0;
          if (!take(&t)) return corrupt("the h2o state is truncated");
          if (int64_t(t) <= previous || int64_t(t) >= decided) return corrupt("an h2o eviction flag is out of order or range");
          head.evicted[size_t(t)] = 1;
          previous = int64_t(t);
        }
        if (h > 0 && evicted[size_t(layer)] != int64_t(flagged)) return corrupt("the kv heads of a KIVI layer flag unequally");
        if (decided - int64_t(flagged) > heavy_) return corrupt("an h2o KIVI head keeps more heavy hitters than its budget");
        evicted[size_t(layer)] = int64_t(flagged);
        kiviLayer[size_t(layer)] = 1;
        continue;
      }
      for (const bool kept : {true, false}) {
        if (!take(&count)) return corrupt("the h2o state is truncated");
        const int64_t expected = kept ? restored.store.keptTokens(layer, h) : restored.store.tailTokens(layer, h);
        if (count != uint64_t(expected)) return corrupt("the h2o scores do not match the kept tokens");
        for (uint64_t j = 0; j < count; ++j) {
          double score = 0;
          KVSLIM_RETURN_IF_ERROR(takeScore(&score));
          if (kept) {
            loaded[i].kept.push_back(score);
          } else {
            loaded[i].tail.push_back(score);
          }
        }
      }
    }
    if (!reader.done()) return corrupt("the h2o state has trailing bytes");
    scores_ = std::move(loaded);
    kivi_ = std::move(loadedKivi);
    kiviLayer_ = std::move(kiviLayer);
    evicted_ = std::move(evicted);
    return Status::ok();
  }

 private:
  struct HeadScores {
    std::vector<double> kept;  // per kept slot
    TailScores tail;           // per tail token, oldest first
  };
  // A head of a layer in the KIVI store: per KIVI index, its score and whether it was evicted.
  struct KiviHead {
    std::vector<double> scores;
    std::vector<uint8_t> evicted;
  };

  // The candidates leave the tail oldest first and fill the free heavy slots, then meet the
  // lowest ones (replaceLowest). The decisions are made on the scores first, then applied to the
  // store at once: the free slots filled in one copy, each replaced slot overwritten once with
  // its last winner, the candidates dropped together.
  Status evict(PagedStore& store, int32_t layer, int32_t h, HeadScores* scores) {
    const int64_t leaving = store.tailTokens(layer, h) - recent_;
    if (leaving <= 0) return Status::ok();
    const int64_t fill = std::max<int64_t>(0, std::min<int64_t>(leaving, heavy_ - int64_t(scores->kept.size())));
    std::vector<int64_t> filled;
    for (int64_t i = 0; i < fill; ++i) filled.push_back(i);
    if (fill > 0) KVSLIM_RETURN_IF_ERROR(store.keepTailRows(layer, h, filled));
    for (int64_t i = 0; i < fill; ++i) scores->kept.push_back(scores->tail[size_t(i)]);
    const std::vector<int64_t> winner = replaceLowest(
        &scores->kept, store.keptPositions(layer, h), [&](int64_t i) { return scores->tail[size_t(i)]; },
        store.tailFirstPosition(layer, h), fill, leaving);
    KVSLIM_RETURN_IF_ERROR(store.overwriteKept(layer, h, 0, winner.data(), int64_t(winner.size())));
    store.dropTailFront(layer, h, leaving);
    scores->tail.dropFront(size_t(leaving));
    return Status::ok();
  }

  // The oldest tail token leaves: it replaces kept slot `lowest` when its score is larger.
  Status replaceOne(PagedStore& store, int32_t layer, int32_t h, size_t lowest, HeadScores* scores) {
    if (scores->tail[0] > scores->kept[lowest]) {
      const int64_t oldestTailToken = 0;
      KVSLIM_RETURN_IF_ERROR(store.overwriteKept(layer, h, int64_t(lowest), &oldestTailToken, 1));
      scores->kept[lowest] = scores->tail[0];
    }
    store.dropTailFront(layer, h, 1);
    scores->tail.dropFront(1);
    return Status::ok();
  }

  int64_t heavy_;
  int64_t recent_;
  int32_t kvHeads_;
  std::vector<HeadScores> scores_;  // [layers * kvHeads], dense layers
  std::vector<KiviHead> kivi_;      // [layers * kvHeads], layers in the KIVI store
  std::vector<uint8_t> kiviLayer_;  // [layers]: 1 once the layer moved into the KIVI store
  std::vector<int64_t> evicted_;    // [layers]: flagged indexes per kv head since the last compaction
};

}  // namespace

std::unique_ptr<SelectPolicy> makeH2OPolicy(const SelectConfig& config, int32_t layers, int32_t kvHeads) {
  return std::make_unique<H2OPolicy>(config, layers, kvHeads);
}

}  // namespace kvslim
