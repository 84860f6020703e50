// A KV cache for one sequence: paged storage per layer and kv head, attention through a backend,
// copy-on-write forks, and the counters behind stats().
#pragma once
#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

#include "backend.h"
#include "cache_config.h"
#include "cache_stats.h"
#include "kivi_store.h"
#include "paged_store.h"
#include "status.h"
#include "tensor_convert.h"

namespace kvslim {

class KVCache {
 public:
  // Validates the config (C++ repeats what lib/ checked).
  static Status create(const CacheConfig& config, std::shared_ptr<Backend> backend, std::unique_ptr<KVCache>* out);

  const CacheConfig& config() const { return config_; }
  // Tokens appended to a layer so far (a selection policy may keep fewer).
  int64_t tokens(int32_t layer) const {
    return inKivi(layer) ? kivi_.tokens(layer) + kiviOffset_[size_t(layer)] : store_.tokens(layer);
  }
  // The kept tokens of one kv head, as absolute positions in ascending order.
  std::vector<int64_t> keptPositions(int32_t layer, int32_t head) const;
  // The tokens the last attention call of a layer read in one kv head (ascending positions): all
  // of them, unless a loading policy (quest, retrieval, actqkv) chose.
  std::vector<int64_t> loadedPositions(int32_t layer, int32_t head) const;

  // k, v: [n, kvHeads, headDim]. All-or-nothing.
  Status append(int32_t layer, const HostTensor& k, const HostTensor& v);
  // q: [n, qHeads, headDim]; out: n * qHeads * headDim floats. Causal over the layer's tokens.
  Status attend(int32_t layer, const HostTensor& q, float* out, size_t outCount);
  // append + attend; q is checked before anything is appended.
  Status step(int32_t layer, const HostTensor& q, const HostTensor& k, const HostTensor& v, float* out,
              size_t outCount);
  // One decode step of each cache of a batch (kv_cache_batch.cc): caches[i] steps with token i
  // of q [n, qHeads, headDim], k, v [n, kvHeads, headDim] into row i of out, as its step() would.
  // Every input is checked first (distinct caches of one shape and device, finite values), so a
  // refused batch changes no cache; the caller has entered every cache (tryEnter).
  static Status stepBatch(const std::vector<KVCache*>& caches, int32_t layer, const HostTensor& q, const HostTensor& k,
                          const HostTensor& v, float* out, size_t outCount);
  // Like step, timed as prefill (the generation stage).
  Status prefill(int32_t layer, const HostTensor& q, const HostTensor& k, const HostTensor& v, float* out,
                 size_t outCount);

  // Drops the newest tokens of one layer, down to `tokens` (a speculative step's rejected drafts).
  // Only without a selection policy and over a dense store, whose state is the tokens themselves.
  Status truncate(int32_t layer, int64_t tokens);

  // Shares every page copy-on-write; counters start from this cache's values.
  std::unique_ptr<KVCache> fork() const;
  CacheStatsData stats() const;

  // Serialization (cache_serialize.cc).
  Status save(std::vector<uint8_t>* out) const;
  static Status load(const uint8_t* data, size_t size, std::shared_ptr<Backend> backend, int32_t threads,
                     std::unique_ptr<KVCache>* out);

  // Guards against overlapping calls (an async call in flight and a sync call from JS).
  bool tryEnter() { return !busy_.exchange(true); }
  void leave() { busy_.store(false); }

 private:
  KVCache(const CacheConfig& config, std::shared_ptr<Backend> backend);
  // Version 6 (eviction policies): the policy, its state, and each layer's kept tokens; version 7
  // also each KIVI head's hole (window policies over KIVI).
  Status saveEvicting(std::vector<uint8_t>* out) const;
  static Status loadEvicting(const uint8_t* data, size_t size, size_t offset, CacheConfig config,
                             std::shared_ptr<Backend> backend, std::unique_ptr<KVCache>* out, bool holes);
  static Status loadKivi(const uint8_t* data, size_t size, size_t offset, const CacheConfig& config,
                         std::shared_ptr<Backend> backend, std::unique_ptr<KVCache>* out);
  bool kivi() const { return config_.storeKind == StoreKind::Kivi; }
  // A window policy over the KIVI store: its layers hold holes (saved as format version 7).
  bool kiviHoles() const { return kivi() && policy_ && policy_->windowed(); }
  // Whether a layer's tokens live in the KIVI store (always, unless a selection policy has not
  // settled the layer yet: until then they stay in f16 in store_, where the policy selects).
  bool inKivi(int32_t layer) const { return kivi() && kiviOffset_[size_t(layer)] >= 0; }
  // Moves what store_ keeps of a layer into the KIVI store (quantized by its flush rules).
  Status moveToKivi(int32_t layer);
  // H2O over the KIVI store: drops the tokens the policy flagged from a layer, requantizing what
  // stays, when compactionDue after a call of n tokens.
  Status compactKivi(int32_t layer);
  bool compactionDue(int32_t layer, int64_t n) const;
  Status checkLayer(int32_t layer) const;
  Status checkKV(const HostTensor& k, const HostTensor& v, int64_t* n) const;
  Status checkQuery(const HostTensor& q, size_t outCount, int64_t* n) const;
  // What an attention call is. attend() only reads (it changes nothing, so it computes no H2O
  // mass); a decode step and a prefill append first, and the policy scores their queries after
  // (H2O adds their attention mass, computed by the call).
  enum class Call { Read, Decode, Prefill };
  // The attention of checked queries.
  Status attendChecked(int32_t layer, const float* q, int64_t n, float* out, Call call);
  // A loading policy's call: static part + loaded tokens, merged by log-sum-exp. *done is false
  // when the policy attends this call densely (prefill, or queries outside the window).
  Status attendLoaded(int32_t layer, const float* q, int64_t n, float* out, bool* done);
  Status attendKivi(int32_t layer, const float* q, int64_t n, float* out, Call call);
  // A window policy over the KIVI store: each windowed head's hole grows to [sink, tokens -
  // attendWindow(window, n)) (n: the call's tokens before it attends, 0 after).
  Status growHoles(int32_t layer, int64_t n);
  // Tokens a KIVI head keeps: all but its hole.
  int64_t kiviKept(int32_t layer, int32_t head) const;
  // out = attention over two disjoint token sets: `first` (its args as given, causal) and `older`
  // heads (tokens older than every query, so non-causal; queries olderQ, pages of olderPageTokens),
  // in one backend call when the backend joins them (Backend::joinsOlder), else two merged by
  // log-sum-exp. massLayer >= 0: as attendOnce; a backend that does not join gets both segments
  // as one view of row pointers instead, so that one call sums the mass.
  Status attendMerged(AttentionArgs first, const KVHeadView* older, int64_t olderPageTokens, const float* olderQ,
                      int32_t massLayer = -1);
  // One backend call; with massLayer >= 0 it also sums H2O's mass into mass_ for afterAttend.
  Status attendOnce(AttentionArgs args, int32_t massLayer);
  // Causal attention args of n queries over dense pages viewed by `heads` ([kvHeads]).
  AttentionArgs denseArgs(const float* q, int64_t n, float* out, const KVHeadView* heads) const;
  // Adds n tokens to a layer; a KIVI store keeps them in f16 until flushLayer().
  Status stageTokens(int32_t layer, const HostTensor& k, const HostTensor& v, int64_t n);
  Status flushLayer(int32_t layer);
  SelectContext selectContext();
  // The selection policy after n tokens attended (q may be null for a plain append).
  Status afterAttend(int32_t layer, const float* q, int64_t n, bool prefill);
  Status appendAndAttend(int32_t layer, const HostTensor& q, const HostTensor& k, const HostTensor& v, float* out,
                         size_t outCount, Call call);

  CacheConfig config_;
  std::shared_ptr<Backend> backend_;
  PagedStore store_;  // dense stores
  KiviStore kivi_;    // KIVI stores
  // KIVI under a selection policy (snapkv, pyramidkv), per layer: -1 until the layer moved to
  // kivi_, then the tokens evicted before the move (absolute position = KIVI index + offset for
  // tokens appended after it); 0 for every layer without a policy.
  std::vector<int64_t> kiviOffset_;
  std::vector<std::vector<int64_t>> kiviPositions_;  // [layers * kvHeads]: positions of the moved tokens
  std::unique_ptr<SelectPolicy> policy_;  // null for select 'full'
  StageTimes times_;
  double lastLoadedTokens_ = 0;
  std::vector<std::vector<int64_t>> loaded_;  // [layers * kvHeads]: positions a loading policy read; empty = all
  // The attention mass of the last prefill (AttentionArgs::mass, [kvHeads, tokens of the longest
  // head]) for the policy's afterAppend of layer massLayer_; -1 when there is none.
  std::vector<double> mass_;
  int32_t massLayer_ = -1;
  std::atomic<bool> busy_{false};
};

}  // namespace kvslim
