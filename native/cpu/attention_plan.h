// Shared set-up of the CPU attention drivers: which query rows read which kv head, and where
// each row's causal window ends.
#pragma once
#include <cstdint>
#include <vector>

#include "../core/attention_args.h"

namespace kvslim::cpu {

constexpr float kLog2e = 1.4426950408889634f;

// Rows of kv head h are ordered (position i, group member g): row = i * group + g reads query
// head h * group + g at position i.
struct RowLayout {
  int32_t group;        // qHeads / kvHeads
  int64_t rowsPerHead;  // n * group

  explicit RowLayout(const AttentionArgs& args)
      : group(args.qHeads / args.kvHeads), rowsPerHead(int64_t(args.n) * (args.qHeads / args.kvHeads)) {}
  int32_t position(int64_t row) const { return int32_t(row / group); }
  int32_t queryHead(int32_t kvHead, int64_t row) const { return kvHead * group + int32_t(row % group); }
  // Index of the row's query vector in q / out ([n, qHeads, headDim]), in units of headDim.
  int64_t queryIndex(const AttentionArgs& args, int32_t kvHead, int64_t row) const {
    return int64_t(position(row)) * args.qHeads + queryHead(kvHead, row);
  }
};

// Last key a query at `position` may attend in a head holding `tokens` keys.
inline int64_t lastToken(const AttentionArgs& args, int64_t tokens, int32_t position) {
  return args.causal ? tokens - args.n + position : tokens - 1;
}

void attentionDecode(const AttentionArgs& args);   // few rows per kv head: reads pages directly
void attentionPrefill(const AttentionArgs& args);  // many rows: converts key chunks, tiles rows

}  // namespace kvslim::cpu
