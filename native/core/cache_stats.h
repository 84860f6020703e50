// Counters a cache keeps for stats(): token counts, bytes by part, time per lifecycle stage.
#pragma once
#include <cstdint>
#include <vector>

namespace kvslim {

struct StageTimes {
  double prefillMs = 0;     // generation: attention during prefill()
  double compressMs = 0;    // eviction / quantization decisions
  double indexBuildMs = 0;  // building retrieval indexes
  double retrieveMs = 0;    // loading: choosing which tokens a step reads
  double decodeMs = 0;      // attention during attend() / step()
};

struct LayerStats {
  std::vector<int64_t> tokensKept;  // per kv head
  double bytes = 0;
};

struct CacheStatsData {
  double tokensSeen = 0;    // mean over layers
  double tokensKept = 0;    // mean over layers x kv heads
  double tokensLoaded = 0;  // mean over layers x kv heads, of the last attention call
  double kvBytes = 0;       // K and V of kept tokens, as stored
  double residualBytes = 0;
  double indexBytes = 0;
  double summaryBytes = 0;
  double metaBytes = 0;     // page tables
  double fullF16Bytes = 0;  // the same tokens in a plain f16 cache
  double allocatedBytes = 0;  // page memory reserved (whole pages), shared pages included
  double sharedBytes = 0;     // page memory this cache shares with forks
  StageTimes times;
  std::vector<LayerStats> layers;
};

}  // namespace kvslim
