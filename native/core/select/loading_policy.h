// The shared part of the loading policies (quest, retrieval, actqkv; methods/retrieval-attention.md):
// nothing is evicted; the first `sink` tokens and the last `window` are the static part, attended
// exactly; the tokens between them (the dynamic part) enter the policy's index as they leave the
// window, and each decode call loads the few the policy chooses.
#pragma once
#include <cstdint>
#include <functional>
#include <vector>

#include "../byte_io.h"
#include "select_policy.h"

namespace kvslim {

class LoadingPolicy : public SelectPolicy {
 public:
  LoadingPolicy(int64_t sink, int64_t window, int32_t layers, int32_t kvHeads)
      : sink_(sink), window_(window), kvHeads_(kvHeads), indexed_(size_t(layers) * size_t(kvHeads), sink) {}
  bool loads() const override { return true; }
  // A prefill call indexes the tokens that left the window, with its queries (graph training);
  // tokens appended otherwise are indexed at the next decode call.
  Status afterAppend(SelectContext& context, int32_t layer, const float* q, int64_t n, bool prefill) override;
  // Catches the index up (tokens appended since), then lets choose() pick per kv head.
  Status planLoad(SelectContext& context, int32_t layer, const float* q, int64_t n, LoadPlan* plan) override;

 protected:
  // Adds tokens [first, first + count) of one head to its index. keys: their f32 keys [count,
  // headDim] when needsKeys(), else empty. q, n: the prefill call's queries (null otherwise).
  virtual Status index(SelectContext& context, int32_t layer, int32_t head, int64_t first, int64_t count,
                       const std::vector<float>& keys, const float* q, int64_t n) = 0;
  virtual bool needsKeys() const { return true; }
  // index() and choose() touch only this policy's host state (no backend calls), so kv heads may
  // run them in parallel on the backend's host threads.
  virtual bool hostOnly() const { return true; }
  // Ascending positions in [sink, dynamicEnd) that one kv head loads for the group's query rows
  // ([rows, headDim], ordered (position, member)).
  virtual Status choose(SelectContext& context, int32_t layer, int32_t head, const std::vector<float>& rows,
                        int64_t dynamicEnd, std::vector<int64_t>* tokens) = 0;
  // Fills plan->tokens ([kvHeads], set empty) for a layer whose dynamic part is [sink, dynamicEnd)
  // and not empty. By default choose() per kv head; a policy whose backend op serves every head at
  // once overrides it.
  virtual Status chooseLayer(SelectContext& context, int32_t layer, const float* q, int64_t n, int64_t dynamicEnd, LoadPlan* plan);
  // Every kv head's query rows, head after head ([kvHeads, n * group, headDim], groupRows order),
  // and their count per kv head (below 2^31: the backend ops take it as int32).
  Status layerRows(const SelectContext& context, const float* q, int64_t n, std::vector<float>* rows, int32_t* rowsPerHead) const;
  // body(h) for every kv head: in parallel when hostOnly(); the first error wins.
  Status forEachHead(SelectContext& context, const std::function<Status(int32_t)>& body);
  // Brings one layer's indexes up to date; q, n as in index(). By default head by head through
  // index(); a policy whose backend op serves every head at once (quest) overrides it.
  virtual Status catchUp(SelectContext& context, int32_t layer, const float* q, int64_t n);
  int64_t dynamicEnd(const SelectContext& context, int32_t layer) const;
  // save()/load() of what every loading policy holds: how far each head's index reaches (i64
  // per (layer, kv head)). loadIndexed takes each back only in [sink, max(sink, tokens - window)]
  // of its restored layer.
  void saveIndexed(ByteWriter* writer) const;
  Status loadIndexed(ByteReader* reader, const RestoredStores& restored);

  int64_t sink_, window_;
  int32_t kvHeads_;
  std::vector<int64_t> indexed_;  // [layers * kvHeads]: tokens [sink, indexed) are in the index
};

}  // namespace kvslim
