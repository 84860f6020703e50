// Selection policies (DESIGN.md policy.select): which tokens of each layer and kv head stay in the
// cache. A policy acts through PagedStore's eviction primitives (drop the oldest tail tokens, keep
// chosen tail tokens, overwrite a kept slot), so eviction never copies the cache.
#pragma once
#include <algorithm>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "../backend.h"
#include "../index/key_index.h"
#include "../paged_store.h"
#include "../status.h"

namespace kvslim {

enum class SelectKind : int32_t {
  Full = 0, Streaming = 1, SnapKV = 2, PyramidKV = 3, H2O = 4, Duo = 5,
  Quest = 6, Retrieval = 7, ActQKV = 8,  // loading policies: every token stays, each step reads a few
};
enum class Pooling : int32_t { Max = 0, Avg = 1 };

// The kind's name in the API ('full', 'streaming', 'snapkv', ...), and its inverse (false: unknown).
const char* selectKindName(SelectKind kind);
bool selectKindFromName(const std::string& name, SelectKind* kind);

struct SelectConfig {
  SelectKind kind = SelectKind::Full;
  int64_t sink = 4;       // streaming, duo: attention sinks (the first tokens)
  int64_t window = 0;     // streaming, duo: recent tokens; snapkv, pyramidkv: observation window
  int64_t budget = 0;     // snapkv, pyramidkv: tokens kept per kv head (mean over layers); h2o: heavy + recent
  int32_t kernel = 7;     // snapkv, pyramidkv: pooling kernel (odd)
  Pooling pooling = Pooling::Max;
  double beta = 20;       // pyramidkv
  int64_t recent = 0;     // h2o
  std::vector<uint8_t> retrieval;  // duo: [layers * kvHeads], 1 = retrieval head (full cache)
  bool cachePositions = false;     // streaming: sink logits as if the query sat at its cache slot (needs rope)
  // Loading policies (quest, retrieval, actqkv) use sink and window as their static part.
  int64_t pageSize = 16;           // quest: tokens per page
  int64_t pages = 0;               // quest: pages loaded per step (besides the static part)
  IndexOptions index;              // retrieval: the index over the dynamic part (kind, lists, probes, ...)
  int64_t topK = 100;              // retrieval: keys loaded per kv head per step
  int64_t trainQueries = 4096;     // retrieval graph: prefill queries per kv head used to build (sampled)
  int64_t blockSize = 32;          // actqkv: tokens per block
  int64_t blocks = 46;             // actqkv: mean blocks loaded per layer (the global budget is blocks x layers)
  int32_t reprTopK = 4;            // actqkv: keys averaged into a block representative
  int32_t queryWindow = 256;       // actqkv: recent queries forming the probe (c)
  double questionWeight = 4;       // actqkv: lambda, weight of the current query beside the probe
  double temperature = 0.05;       // actqkv: softmax temperature of the block scores for the entropy
};

// What a policy may touch: the store, the backend (for scores) and the cache's shape.
struct SelectContext {
  PagedStore& store;
  Backend& backend;
  int32_t layers;
  int32_t qHeads;
  int32_t kvHeads;
  int32_t headDim;
  float scale;
  int32_t threads;
  // Set for afterAppend when the call's attention also summed each token's mass over its queries
  // (AttentionArgs::mass, [kvHeads, massStride]; a prefill over a head with no kept tokens, on a
  // backend that fuses it): a policy that asked (wantsMass) uses it instead of attentionMass.
  const double* mass = nullptr;
  int64_t massStride = 0;
};

struct LoadPlan;

// What a policy's saved state is checked against on load: the restored dense store and, per
// layer, the tokens of a layer held in the KIVI store (-1: a dense layer).
struct RestoredStores {
  const PagedStore& store;
  std::vector<int64_t> kiviTokens;
  int32_t qHeads = 0;   // the cache's (a loading policy's query state is [qHeads, headDim] per row)
  int32_t threads = 0;  // the cache's thread count (0: the machine's), for indexes built later
};

class SelectPolicy {
 public:
  virtual ~SelectPolicy() = default;
  // After n tokens were appended to a layer, before they attend (a window keeps what this call's
  // queries may see; runs only once the append succeeded, so a rejected call changes nothing).
  virtual Status beforeAttend(SelectContext& context, int32_t layer, int64_t n) { return Status::ok(); }
  // After n tokens were appended and, when q is set, attended by their n queries ([n, qHeads,
  // headDim], unscaled f32). `prefill`: the call was prefill() (SnapKV decides there).
  virtual Status afterAppend(SelectContext& context, int32_t layer, const float* q, int64_t n, bool prefill) = 0;
  // A copy for fork(): the same decisions from here on.
  virtual std::unique_ptr<SelectPolicy> clone() const = 0;
  // True once no later call evicts tokens of this layer (SnapKV and PyramidKV after their one
  // selection): a KIVI store may then quantize what the layer keeps.
  virtual bool settled(int32_t layer) const { return false; }
  // True when afterAppend needs each token's attention mass over the call's queries (H2O): the
  // cache then asks the attention to sum it where the backend can (SelectContext::mass).
  virtual bool wantsMass() const { return false; }
  // Streaming and duo keep, per (layer, kv head), the first `sink` tokens and the last `window`
  // (a call of n tokens keeps attendWindow(window, n) while it attends; trimWindows). False for
  // heads that keep every token (duo's retrieval heads) and for every other policy. A KIVI store
  // holds such a choice as a hole in the head (KiviStore::setHole) instead of evicting from pages.
  virtual bool windowed() const { return false; }
  virtual bool windowOf(int32_t layer, int32_t head, int64_t* sink, int64_t* window) const { return false; }
  // The recent tokens a windowed head keeps while a call of n tokens attends (n = 0: between
  // calls), its own tokens included. Streaming: max(window, n), the reference's evict_for_space,
  // so a block's first queries see fewer than `window` (duo overrides it).
  virtual int64_t attendWindow(int64_t window, int64_t n) const { return std::max(window, n); }

  // H2O over a KIVI store. At its first call with queries (prefill or step) a layer moves into the
  // store, its tokens in position order becoming KIVI indexes 0..; from then on the policy evicts
  // by flagging indexes (evictedFlags: attention masks them) instead of removing rows, and the
  // cache drops the flagged rows when it compacts the layer. Every kv head of a layer flags as
  // many tokens.
  virtual bool evictsInKivi() const { return false; }
  // The move: per kv head, the dense store's tokens in KIVI index order (kept slot s as s, tail
  // token j as keptTokens + j).
  virtual Status enterKivi(int32_t layer, const std::vector<std::vector<int64_t>>& order) { return Status::ok(); }
  // After a call left the KIVI layer holding `tokens` tokens; mass (or null: an append without
  // queries) as SelectContext::mass, per KIVI index.
  virtual Status afterAppendKivi(int32_t layer, int64_t tokens, const double* mass, int64_t massStride) {
    return Status::ok();
  }
  // One flag per KIVI index of the layer up to its tokens after the last afterAppendKivi (null: none).
  virtual const std::vector<uint8_t>* evictedFlags(int32_t layer, int32_t head) const { return nullptr; }
  virtual int64_t evictedCount(int32_t layer) const { return 0; }
  // The cache dropped the flagged rows of a KIVI layer: the indexes close up.
  virtual void compactKivi(int32_t layer) {}

  // save()/load(): the policy's state beyond the store (SnapKV's decided layers, H2O's scores, a
  // loading policy's indexes) as flat bytes; loadState checks them against the restored stores
  // (ERR_CORRUPT on any mismatch). saveState may read backend memory (ActQKV's representatives).
  virtual Status saveState(int32_t layers, std::vector<uint8_t>* out) const { return Status::ok(); }
  virtual Status loadState(const uint8_t* data, size_t size, const RestoredStores& restored, int32_t layers) {
    return size == 0 ? Status::ok() : Status(ErrorCode::Corrupt, "cannot load cache: unexpected policy state");
  }

  // Loading policies (quest, retrieval, actqkv): nothing is evicted; a call whose queries all lie in
  // the recent window attends the static part (sinks + window) exactly and the tokens the policy
  // loads from the rest, merged by log-sum-exp. afterAppend maintains the index.
  virtual bool loads() const { return false; }
  // Fills plan->tokens (per kv head, ascending positions in [plan->sink, tokens - plan->window))
  // for n queries q ([n, qHeads, headDim], unscaled) of a layer.
  virtual Status planLoad(SelectContext& context, int32_t layer, const float* q, int64_t n, LoadPlan* plan) {
    return Status::ok();
  }
  virtual size_t indexBytes() const { return 0; }
};

// What one attention call of a loading policy reads, per kv head.
struct LoadPlan {
  int64_t sink = 0;    // static: the first `sink` tokens
  int64_t window = 0;  // static: the last `window` tokens
  std::vector<std::vector<int64_t>> tokens;  // [kvHeads]: positions loaded from the dynamic part
  double indexMs = 0;  // of the planning, time spent indexing tokens that arrived since the last call
};

// Streaming and duo: every call trims the windowed heads (windowOf) to their sinks and window,
// before it attends (keeping the call's own tokens) and after (trimWindows).
class WindowPolicy : public SelectPolicy {
 public:
  Status beforeAttend(SelectContext& context, int32_t layer, int64_t n) override;
  Status afterAppend(SelectContext& context, int32_t layer, const float*, int64_t, bool) override;
  bool windowed() const override { return true; }
};

// Checks the config against the cache shape (ERR_OPTION naming the option) and builds the policy;
// `out` stays empty for 'full'.
Status makeSelectPolicy(const SelectConfig& config, int32_t layers, int32_t kvHeads, int32_t headDim,
                        std::unique_ptr<SelectPolicy>* out);

// Policies, one file each.
std::unique_ptr<SelectPolicy> makeStreamingPolicy(const SelectConfig& config);
std::unique_ptr<SelectPolicy> makeSnapKVPolicy(const SelectConfig& config);  // snapkv and pyramidkv
std::unique_ptr<SelectPolicy> makeH2OPolicy(const SelectConfig& config, int32_t layers, int32_t kvHeads);
std::unique_ptr<SelectPolicy> makeDuoPolicy(const SelectConfig& config, int32_t kvHeads);
std::unique_ptr<SelectPolicy> makeQuestPolicy(const SelectConfig& config, int32_t layers, int32_t kvHeads, int32_t headDim);
std::unique_ptr<SelectPolicy> makeRetrievalPolicy(const SelectConfig& config, int32_t layers, int32_t kvHeads);
std::unique_ptr<SelectPolicy> makeActQKVPolicy(const SelectConfig& config, int32_t layers, int32_t kvHeads, int32_t headDim);

// The query rows of one kv head's group, ordered (position i, member g): [n * group, headDim].
std::vector<float> groupRows(const float* q, int64_t n, int32_t qHeads, int32_t kvHeads, int32_t head, int32_t headDim);

// Shared by the loading policies: f32 copies of one kv head's keys [first, first + count) (keys as
// stored, so an index sees exactly what attention reads), appended to *out.
Status readKeys(const PagedStore& store, int32_t layer, int32_t head, int64_t first, int64_t count, std::vector<float>* out);

// Shared by streaming and duo: keeps the sinks and the last `keep` tail tokens of one head
// (tail tokens at positions below `sink` become kept sinks instead of being evicted).
Status trimWindow(PagedStore& store, int32_t layer, int32_t head, int64_t sink, int64_t keep);
// Every windowed head of a layer (windowOf) trimmed to its sinks and the last
// attendWindow(window, n) tokens: n = the call's tokens before it attends, 0 after.
Status trimWindows(SelectContext& context, const SelectPolicy& policy, int32_t layer, int64_t n);

// body(h) for every kv head on the backend's host threads (Backend::hostParallel: host work on
// one head's state; the store may be read, not changed), out of memory included; the first error.
Status forEachHeadOnHost(Backend& backend, int32_t kvHeads, int32_t threads, const std::function<Status(int32_t)>& body);

// The attention mass op (Backend::attentionMass) over one kv head's kept then tail tokens for
// query rows built by groupRows() ([n * group, headDim]); query i is the tail token
// tail - after - n + i. The caller sets columns, pooling, kernel and out.
Status headMassArgs(const SelectContext& context, int32_t layer, int32_t head, const float* rows, int64_t n, int64_t after,
                    AttentionMassArgs* args);

}  // namespace kvslim
