// Attention kernels written once over a vector type V (VecScalar, VecAvx2, VecAvx512) and
// compiled once per instruction set. No STL in here: an inline STL instantiation compiled with
// AVX-512 flags could be merged by the linker into code that must run on any CPU.

inline float scalarExp2(float x) { return x < -126.0f ? 0.0f : std::exp2(x); }

// Stored dtype is a template parameter so the hot loops carry no per-load switch.
template <class V, DType T>
inline typename V::R loadRow(const void* row, int offset) {
  if constexpr (T == DType::F16) return V::loadF16(static_cast<const uint16_t*>(row) + offset);
  else if constexpr (T == DType::BF16) return V::loadBF16(static_cast<const uint16_t*>(row) + offset);
  else return V::load(static_cast<const float*>(row) + offset);
}

template <DType T>
inline float loadScalar(const void* row, int offset) {
  if constexpr (T == DType::F16) return f16ToFloat(static_cast<const uint16_t*>(row)[offset]);
  else if constexpr (T == DType::BF16) return bf16ToFloat(static_cast<const uint16_t*>(row)[offset]);
  else return static_cast<const float*>(row)[offset];
}

// Asks for rows of the next block while this one computes: decode is a pure stream, and one
// thread's demand misses alone reach only a fraction of the memory bandwidth.
// always_inline: see prefetchBlockAhead (GCC deletes the calls of an out-of-line prefetch helper).
__attribute__((always_inline)) inline void prefetchRows(const uint8_t* const* rows, int32_t count, size_t rowBytes, bool toL1) {
  for (int32_t j = 0; j < count; ++j)
    for (size_t offset = 0; offset < rowBytes; offset += 64) prefetchStream(rows[j] + offset, toL1);
}

// Online softmax over a block of `count` scores per row: updates max/sum, rescales the row's
// accumulator, and leaves 2^(s - max) in place of the scores.
template <class V>
inline void softmaxBlock(float* scores, int32_t stride, int32_t rows, int32_t count, SoftmaxState& state,
                         int32_t accDim, int32_t accStride) {
  for (int32_t r = 0; r < rows; ++r) {
    float* s = scores + r * stride;
    float blockMax = kNoScoreYet;
    int32_t first = 0;
    if (count >= V::W) {
      typename V::R vmax = V::load(s);
      for (first = V::W; first + V::W <= count; first += V::W) vmax = V::max(vmax, V::load(s + first));
      blockMax = V::reduceMax(vmax);
      blockMax = blockMax > kNoScoreYet ? blockMax : kNoScoreYet;
    }
    for (int32_t j = first; j < count; ++j) blockMax = s[j] > blockMax ? s[j] : blockMax;
    const float oldMax = state.max[r];
    const float newMax = blockMax > oldMax ? blockMax : oldMax;
    const typename V::R negMax = V::set1(-newMax);
    typename V::R vsum = V::zero();
    int32_t j = 0;
    for (; j + V::W <= count; j += V::W) {
      typename V::R p = V::exp2(V::add(V::load(s + j), negMax));
      V::store(s + j, p);
      vsum = V::add(vsum, p);
    }
    float sum = V::reduceAdd(vsum);
    for (; j < count; ++j) {
      s[j] = scalarExp2(s[j] - newMax);
      sum += s[j];
    }
    if (newMax != oldMax) {
      const float alpha = scalarExp2(oldMax - newMax);
      state.sum[r] *= alpha;
      float* acc = state.acc + r * accStride;
      for (int32_t d = 0; d < accDim; ++d) acc[d] *= alpha;
      state.max[r] = newMax;
    }
    state.sum[r] += sum;
  }
}

// ---------------------------------------------------------------------------------------------
// Decode: few rows, keys read once from their pages in stored dtype (memory-bound).

constexpr int32_t kDecodeBlock = 32;

// acc[r, d] += sum over the block's tokens j of p(r, j) * v_j[d] for PASS chunks of d from
// `first` on (a compile-time count: with a run-time one GCC may keep the accumulators in memory,
// storing all of them every token). passChunks < PASS steps down to that count.
template <class V, DType T, int ROWS, int PASS>
inline void valuePass(int32_t passChunks, const float* probs, int32_t probsStride, const uint8_t* const* valueRows,
                      int32_t count, float* acc, int32_t dim, int32_t first) {
  using R = typename V::R;
  if constexpr (PASS > 1) {
    if (passChunks < PASS) {
      valuePass<V, T, ROWS, PASS - 1>(passChunks, probs, probsStride, valueRows, count, acc, dim, first);
      return;
    }
  }
  R out[PASS][ROWS];
  for (int32_t c = 0; c < PASS; ++c)
    for (int32_t r = 0; r < ROWS; ++r) out[c][r] = V::load(acc + r * dim + first + c * V::W);
  for (int32_t j = 0; j < count; ++j) {
    R p[ROWS];
    for (int32_t r = 0; r < ROWS; ++r) p[r] = V::set1(probs[r * probsStride + j]);
    for (int32_t c = 0; c < PASS; ++c) {
      const R v = loadRow<V, T>(valueRows[j], first + c * V::W);
      for (int32_t r = 0; r < ROWS; ++r) out[c][r] = V::fmadd(p[r], v, out[c][r]);
    }
  }
  for (int32_t c = 0; c < PASS; ++c)
    for (int32_t r = 0; r < ROWS; ++r) V::store(acc + r * dim + first + c * V::W, out[c][r]);
}

template <class V, DType T, int ROWS>
void decodeRangeRows(const DecodeRange& range) {
  using R = typename V::R;
  // Register budget: ROWS x TOKENS score accumulators, CHUNKS x ROWS value accumulators.
  constexpr int32_t TOKENS = V::kDotAccumulators / ROWS > 0 ? V::kDotAccumulators / ROWS : 1;
  constexpr int32_t CHUNKS = V::kDotAccumulators / ROWS > 0 ? V::kDotAccumulators / ROWS : 1;
  static_assert(V::kDotAccumulators >= ROWS, "one score accumulator per row at least");
  const int32_t dim = range.headDim;
  const int32_t chunks = dim / V::W;
  const int32_t tailBegin = chunks * V::W;
  const size_t strideBytes = size_t(range.rowStride) * (T == DType::F32 ? 4 : 2);
  const size_t rowBytes = size_t(dim) * (T == DType::F32 ? 4 : 2);
  const bool toL1 = streamPrefetchToL1();
  SoftmaxState state = range.state;
  for (int32_t r = 0; r < ROWS; ++r) {
    state.max[r] = kNoScoreYet;
    state.sum[r] = 0.0f;
    for (int32_t d = 0; d < dim; ++d) state.acc[r * dim + d] = 0.0f;
  }
  int64_t lastOfAll = range.lastToken[0], firstLast = range.lastToken[0];
  for (int32_t r = 1; r < ROWS; ++r) {
    lastOfAll = range.lastToken[r] > lastOfAll ? range.lastToken[r] : lastOfAll;
    firstLast = range.lastToken[r] < firstLast ? range.lastToken[r] : firstLast;
  }
  const int64_t end = range.tokenEnd < lastOfAll + 1 ? range.tokenEnd : lastOfAll + 1;

  // Padded by a score group: the last group of a block may run past kDecodeBlock.
  constexpr int32_t SCORE_STRIDE = kDecodeBlock + V::kDotAccumulators;
  float scores[ROWS][SCORE_STRIDE];
  // Row pointers of this block and the next (double-buffered so the next can be prefetched).
  const uint8_t* rowPointers[2][2][kDecodeBlock];
  int64_t page = range.tokenBegin / range.pageTokens;
  int64_t slot = range.tokenBegin % range.pageTokens;
  // Page walk without a division per token.
  auto walk = [&](int64_t blockBegin, const uint8_t** keyRows, const uint8_t** valueRows) {
    const int32_t count = int32_t(end - blockBegin < kDecodeBlock ? end - blockBegin : kDecodeBlock);
    for (int32_t j = 0; j < count; ++j) {
      keyRows[j] = static_cast<const uint8_t*>(range.keyPages[page]) + size_t(slot) * strideBytes;
      valueRows[j] = static_cast<const uint8_t*>(range.valuePages[page]) + size_t(slot) * strideBytes;
      if (++slot == range.pageTokens) { slot = 0; ++page; }
    }
    return count;
  };
  int32_t nextCount = range.tokenBegin < end ? walk(range.tokenBegin, rowPointers[0][0], rowPointers[0][1]) : 0;
  int32_t buffer = 0;
  for (int64_t blockBegin = range.tokenBegin; blockBegin < end; blockBegin += kDecodeBlock) {
    const int32_t count = nextCount;
    const uint8_t* const* keyRows = rowPointers[buffer][0];
    const uint8_t* const* valueRows = rowPointers[buffer][1];
    buffer ^= 1;
    const uint8_t* const* nextKeyRows = rowPointers[buffer][0];
    const uint8_t* const* nextValueRows = rowPointers[buffer][1];
    nextCount = blockBegin + kDecodeBlock < end ? walk(blockBegin + kDecodeBlock, rowPointers[buffer][0], rowPointers[buffer][1]) : 0;
    // Scores of TOKENS tokens x ROWS rows at a time: independent FMA chains, each key chunk
    // loaded once for all rows, and the horizontal sums done together by reduceMany.
    for (int32_t j0 = 0; j0 < count; j0 += TOKENS) {
      R partial[V::kDotAccumulators];
      for (int32_t a = 0; a < V::kDotAccumulators; ++a) partial[a] = V::zero();
      const int32_t tokens = count - j0 < TOKENS ? count - j0 : TOKENS;
      // Prefetch the same tokens of the next block, spread over the loop so the misses in
      // flight stay within what the core can track.
      if (j0 < nextCount) {
        const int32_t ahead = nextCount - j0 < TOKENS ? nextCount - j0 : TOKENS;
        prefetchRows(nextKeyRows + j0, ahead, rowBytes, toL1);
        prefetchRows(nextValueRows + j0, ahead, rowBytes, toL1);
      }
      // A short last group repeats its first token (its partial sums are ignored): the chunk loop
      // stays branch-free with the row pointers in registers.
      const uint8_t* groupRows[TOKENS];
      for (int32_t t = 0; t < TOKENS; ++t) groupRows[t] = keyRows[j0 + (t < tokens ? t : 0)];
      for (int32_t c = 0; c < chunks; ++c) {
        R q[ROWS];
        for (int32_t r = 0; r < ROWS; ++r) q[r] = V::load(range.q + r * dim + c * V::W);
        for (int32_t t = 0; t < TOKENS; ++t) {
          const R k = loadRow<V, T>(groupRows[t], c * V::W);
          for (int32_t r = 0; r < ROWS; ++r) partial[r * TOKENS + t] = V::fmadd(q[r], k, partial[r * TOKENS + t]);
        }
      }
      float sums[V::kDotAccumulators];
      V::reduceMany(partial, sums);
      // All TOKENS copied (a short last group's extra ones land in the padding): a fixed-count
      // copy the compiler turns into a few moves, where a per-score loop cost 10% of the kernel.
      for (int32_t r = 0; r < ROWS; ++r)
        for (int32_t t = 0; t < TOKENS; ++t) scores[r][j0 + t] = sums[r * TOKENS + t];
    }
    if (tailBegin < dim) {
      for (int32_t r = 0; r < ROWS; ++r)
        for (int32_t j = 0; j < count; ++j) {
          float score = scores[r][j];
          for (int32_t d = tailBegin; d < dim; ++d) score += range.q[r * dim + d] * loadScalar<T>(keyRows[j], d);
          scores[r][j] = score;
        }
    }
    // Only a block that reaches past some row's causal end needs masking.
    if (blockBegin + count - 1 > firstLast) {
      for (int32_t r = 0; r < ROWS; ++r)
        for (int32_t j = 0; j < count; ++j)
          if (blockBegin + j > range.lastToken[r]) scores[r][j] = -__builtin_inff();
    }
    if (range.scoresOut != nullptr) {
      float* out = range.scoresOut + (blockBegin - range.tokenBegin);
      for (int32_t r = 0; r < ROWS; ++r)
        for (int32_t j = 0; j < count; ++j) out[r * range.scoresStride + j] = scores[r][j];
    }
    softmaxBlock<V>(&scores[0][0], SCORE_STRIDE, ROWS, count, state, dim, dim);
    // Values: CHUNKS chunks x ROWS rows of accumulators per pass, so the FMA chains run in parallel.
    for (int32_t c0 = 0; c0 < chunks; c0 += CHUNKS) {
      const int32_t passChunks = chunks - c0 < CHUNKS ? chunks - c0 : CHUNKS;
      valuePass<V, T, ROWS, CHUNKS>(passChunks, &scores[0][0], SCORE_STRIDE, valueRows, count, state.acc, dim, c0 * V::W);
    }
    for (int32_t d = tailBegin; d < dim; ++d) {
      for (int32_t j = 0; j < count; ++j) {
        const float v = loadScalar<T>(valueRows[j], d);
        for (int32_t r = 0; r < ROWS; ++r) state.acc[r * dim + d] += scores[r][j] * v;
      }
    }
  }
}

template <class V, DType T>
void decodeRangeOfType(const DecodeRange& range) {
  // Row counts are compile-time so the per-row accumulators stay in registers.
  switch (range.rows) {
    case 1: decodeRangeRows<V, T, 1>(range); break;
    case 2: decodeRangeRows<V, T, 2>(range); break;
    case 3: decodeRangeRows<V, T, 3>(range); break;
    case 4: decodeRangeRows<V, T, 4>(range); break;
    case 5: decodeRangeRows<V, T, 5>(range); break;
    case 6: decodeRangeRows<V, T, 6>(range); break;
    case 7: decodeRangeRows<V, T, 7>(range); break;
    default: decodeRangeRows<V, T, 8>(range); break;
  }
}

template <class V>
void decodeRange(const DecodeRange& range) {
  switch (range.kvType) {
    case DType::F16: decodeRangeOfType<V, DType::F16>(range); break;
    case DType::BF16: decodeRangeOfType<V, DType::BF16>(range); break;
    default: decodeRangeOfType<V, DType::F32>(range); break;
  }
}

// ---------------------------------------------------------------------------------------------
// Attention mass of a finished prefill tile (MassTile), block by block.

// A tile's row weights for massBlocks: each row's final normaliser exp2(-finalMax) / finalSum,
// times exp2 of the running max its current block's probabilities were made with.
struct MassWeights {
  float max[kMaxPrefillRows];
  float weight[kMaxPrefillRows];
  int64_t end;     // past the tile's last key
  int64_t blocks;  // blocks up to end
};

template <class V>
MassWeights massWeights(const MassTile& tile) {
  constexpr int32_t BLOCK = 2 * V::W;
  MassWeights w;
  int64_t end = 0;
  for (int32_t r = 0; r < tile.rows; ++r) {
    end = tile.lastToken[r] + 1 > end ? tile.lastToken[r] + 1 : end;
    w.max[r] = tile.finalMax[r];
    w.weight[r] = float(1.0 / double(tile.finalSum[r]));
  }
  w.end = end;
  w.blocks = (end + BLOCK - 1) / BLOCK;
  return w;
}

// Rows [rowBegin, rowEnd) of a tile's block `block` into `sums` (the block's keys, f32): the full
// rows through registers (two sets for alternate rows so two FMA chains run), a row that sees part
// of the block through `sums` directly. A row's weight is computed again only when its running max
// moved (rarely, after the first blocks), so each row must meet its blocks in order.
template <class V>
inline void massRows(const MassTile& tile, MassWeights& w, int64_t block, int32_t rowBegin, int32_t rowEnd, float* sums) {
  using R = typename V::R;
  constexpr int32_t BLOCK = 2 * V::W;
  const int64_t blockBegin = block * BLOCK;
  const float* slab = tile.probs + size_t(block) * size_t(tile.blockStride);
  const float* maxes = tile.blockMax + size_t(block) * size_t(tile.rowsPadded);
  R even0 = V::zero(), even1 = V::zero(), odd0 = V::zero(), odd1 = V::zero();
  for (int32_t r = rowBegin; r < rowEnd; ++r) {
    const int64_t seen = tile.lastToken[r] + 1 - blockBegin;
    if (seen <= 0) continue;
    if (maxes[r] != w.max[r]) {
      w.max[r] = maxes[r];
      w.weight[r] = float(std::exp2(double(maxes[r]) - double(tile.finalMax[r])) / double(tile.finalSum[r]));
    }
    const float* p = slab + size_t(r) * BLOCK;
    if (seen >= BLOCK) {
      const R weight = V::set1(w.weight[r]);
      if (r % 2 == 0) {
        even0 = V::fmadd(V::load(p), weight, even0);
        even1 = V::fmadd(V::load(p + V::W), weight, even1);
      } else {
        odd0 = V::fmadd(V::load(p), weight, odd0);
        odd1 = V::fmadd(V::load(p + V::W), weight, odd1);
      }
    } else {
      for (int32_t j = 0; j < seen; ++j) sums[j] += p[j] * w.weight[r];
    }
  }
  V::store(sums, V::add(V::add(even0, odd0), V::load(sums)));
  V::store(sums + V::W, V::add(V::add(even1, odd1), V::load(sums + V::W)));
}

// A block's sums into the tile's double columns.
template <class V>
inline void massFlush(const MassTile& tile, const MassWeights& w, int64_t block, const float* sums) {
  constexpr int32_t BLOCK = 2 * V::W;
  const int64_t blockBegin = block * BLOCK;
  const int32_t count = w.end - blockBegin < BLOCK ? int32_t(w.end - blockBegin) : BLOCK;
  for (int32_t j = 0; j < count; ++j) tile.out[blockBegin + j] += double(sums[j]);
}

// Blocks [from, to) of a tile's mass, every row of a block before the next block.
template <class V>
void massBlocks(const MassTile& tile, MassWeights& w, int64_t from, int64_t to) {
  constexpr int32_t BLOCK = 2 * V::W;
  for (int64_t block = from; block < to; ++block) {
    alignas(64) float sums[BLOCK] = {};
    massRows<V>(tile, w, block, 0, tile.rows, sums);
    massFlush<V>(tile, w, block, sums);
  }
}

template <class V>
void massTile(const MassTile& tile) {
  MassWeights w = massWeights<V>(tile);
  massBlocks<V>(tile, w, 0, w.blocks);
}

// ---------------------------------------------------------------------------------------------
// Prefill: register tiles of kPrefillRows rows x 2 vectors of keys (compute-bound, GEMM-like).

// Lines of key block `aheadBegin` (transposed keys and values, and with the capture the pending
// mass's slab of it) into L2, subTile's share of them: each register tile of a block issues a
// few, so the next-but-one block is in L2 when the kernel gets there. The L2 streamer alone left
// the first register tile of every block waiting on its keys (a 32K prompt on one thread: 8%
// faster; the pending slab read back from memory made H2O's capture 15% slower than the plain
// kernel, 7% with its prefetch).
// always_inline: GCC finds a function whose only effect is prefetching "const" and deletes
// its calls unless they were inlined before that analysis.
template <class V, bool CAPTURE>
__attribute__((always_inline)) inline void prefetchBlockAhead(const PrefillTile& tile, const MassWeights& pending, int64_t aheadBegin, int32_t subTile) {
  constexpr int32_t BLOCK = 2 * V::W;
  const int32_t subTiles = (tile.rows + V::kPrefillRows - 1) / V::kPrefillRows;
  if (aheadBegin < tile.keyEnd) {
    const size_t dim = size_t(tile.paddedDim);
    const float* keys = tile.keysTransposed + size_t(aheadBegin / BLOCK) * dim * BLOCK;
    const float* values = tile.values + size_t(aheadBegin) * dim;
    const int64_t lines = int64_t(dim) * BLOCK / 16;  // keys and values have as many
    const int64_t each = (lines + subTiles - 1) / subTiles;
    const int64_t to = (subTile + 1) * each < lines ? (subTile + 1) * each : lines;
    for (int64_t l = subTile * each; l < to; ++l) {
      prefetchL2(keys + l * 16);
      prefetchL2(values + l * 16);
    }
  }
  if (CAPTURE && tile.pending != nullptr && aheadBegin / BLOCK < pending.blocks) {
    const float* slab = tile.pending->probs + size_t(aheadBegin / BLOCK) * size_t(tile.pending->blockStride);
    const int64_t lines = tile.pending->blockStride / 16;
    const int64_t each = (lines + subTiles - 1) / subTiles;
    const int64_t to = (subTile + 1) * each < lines ? (subTile + 1) * each : lines;
    for (int64_t l = subTile * each; l < to; ++l) prefetchL2(slab + l * 16);
  }
}

// The prefill register tile's halves over one block of 2W keys, for RR rows (q rows dim apart;
// rows past the real ones are zeros or padding and their results unused).
// Scores: s0[r], s1[r] = q_r . keys of the block (transposed: channel d at keys + d * 2W).
template <class V, int32_t RR>
inline void tileScores(const float* q, const float* keys, int32_t dim, typename V::R* s0, typename V::R* s1) {
  using R = typename V::R;
  constexpr int32_t BLOCK = 2 * V::W;
  R a0[RR], a1[RR];
  for (int32_t r = 0; r < RR; ++r) { a0[r] = V::zero(); a1[r] = V::zero(); }
  for (int32_t d = 0; d < dim; ++d) {
    const R k0 = V::load(keys + d * BLOCK);
    const R k1 = V::load(keys + d * BLOCK + V::W);
    for (int32_t r = 0; r < RR; ++r) {
      const R qd = V::set1(q[r * dim + d]);
      a0[r] = V::fmadd(qd, k0, a0[r]);
      a1[r] = V::fmadd(qd, k1, a1[r]);
    }
  }
  for (int32_t r = 0; r < RR; ++r) { s0[r] = a0[r]; s1[r] = a1[r]; }
}

// Values: acc[r] += sum over the block's keys j of p(r, j) v_j for the first `rows` of RR rows
// (probabilities at probs + r * 2W, values as rows of dim floats).
template <class V, int32_t RR>
inline void tileValues(const float* probs, const float* values, int32_t dim, int32_t rows, float* acc) {
  using R = typename V::R;
  constexpr int32_t BLOCK = 2 * V::W;
  // Two value chunks per pass: 2 x RR independent FMA chains hide the FMA latency.
  int32_t c = 0;
  for (; c + 2 * V::W <= dim; c += 2 * V::W) {
    R out0[RR], out1[RR];
    for (int32_t r = 0; r < RR; ++r) {
      out0[r] = r < rows ? V::load(acc + r * dim + c) : V::zero();
      out1[r] = r < rows ? V::load(acc + r * dim + c + V::W) : V::zero();
    }
    for (int32_t j = 0; j < BLOCK; ++j) {
      const R v0 = V::load(values + size_t(j) * size_t(dim) + c);
      const R v1 = V::load(values + size_t(j) * size_t(dim) + c + V::W);
      for (int32_t r = 0; r < RR; ++r) {
        const R p = V::set1(probs[r * BLOCK + j]);
        out0[r] = V::fmadd(p, v0, out0[r]);
        out1[r] = V::fmadd(p, v1, out1[r]);
      }
    }
    for (int32_t r = 0; r < rows; ++r) {
      V::store(acc + r * dim + c, out0[r]);
      V::store(acc + r * dim + c + V::W, out1[r]);
    }
  }
  for (; c < dim; c += V::W) {
    R out[RR];
    for (int32_t r = 0; r < RR; ++r) out[r] = r < rows ? V::load(acc + r * dim + c) : V::zero();
    for (int32_t j = 0; j < BLOCK; ++j) {
      const R v = V::load(values + size_t(j) * size_t(dim) + c);
      for (int32_t r = 0; r < RR; ++r) out[r] = V::fmadd(V::set1(probs[r * BLOCK + j]), v, out[r]);
    }
    for (int32_t r = 0; r < rows; ++r) V::store(acc + r * dim + c, out[r]);
  }
}

// CAPTURE (attention mass): each block's probabilities are also copied to its slab of tile.probs
// once softmax has made them. They are made in the L1 scratch all the same: past 4K-8K keys a
// tile's slab is out of L2, and softmax's stores and reloads there stalled the kernel (a 16K
// prompt on one thread: +17% over the plain prefill, +12% with the copy). The pending mass reads
// each slab block (prefetched) just before the copy overwrites it, so the copy's stores hit: each
// register tile sums the pending rows of its own slab rows first, scalar work that the core runs
// beside the FMAs (summed in one piece before each block, it cost the FMAs its time).
template <class V, bool CAPTURE>
void prefillTileRows(const PrefillTile& tile) {
  using R = typename V::R;
  constexpr int32_t ROWS = V::kPrefillRows;
  constexpr int32_t BLOCK = 2 * V::W;
  const int32_t dim = tile.paddedDim;
  // tile.aheadLines, a share per (block, register tile) step.
  const int64_t steps = (tile.keyEnd - tile.keyBegin + BLOCK - 1) / BLOCK * ((tile.rows + ROWS - 1) / ROWS);
  const int64_t aheadEach = steps > 0 ? (tile.aheadCount + steps - 1) / steps : 0;
  // The tiled decode's next slice streams from memory as a decode's keys do (the L1 hint on AMD:
  // 5 queries over 64K tokens 9% faster there).
  const bool aheadToL1 = tile.aheadCount > 0 && streamPrefetchToL1();
  int64_t aheadNext = 0;
  MassWeights pending{};  // read only behind tile.pending
  int64_t pendingBlock = 0;  // the pending mass's next block
  if (CAPTURE && tile.pending != nullptr) pending = massWeights<V>(*tile.pending);
  // Key block outside, register tiles of ROWS rows inside: each block of keys and values (f32,
  // a few KiB) is read from L1 by every sub-tile instead of streaming the chunk once per 8 rows.
  for (int64_t blockBegin = tile.keyBegin; blockBegin < tile.keyEnd; blockBegin += BLOCK) {
    const int64_t block = blockBegin / BLOCK;
    // The pending mass's blocks before this one (none when the tile starts at key 0), then this
    // one's rows, shared among the register tiles below.
    const bool massHere = CAPTURE && tile.pending != nullptr && block < pending.blocks;
    alignas(64) float massSums[BLOCK];
    if (massHere) {
      if (pendingBlock < block) massBlocks<V>(*tile.pending, pending, pendingBlock, block);
      for (int32_t j = 0; j < BLOCK; ++j) massSums[j] = 0.0f;
    }
    const float* keys = tile.keysTransposed + size_t(block) * size_t(dim) * BLOCK;
    const float* values = tile.values + size_t(blockBegin) * size_t(dim);
    // Every block is whole, the keys past tile.keyEnd masked like any key past a row's last: a
    // partial last block (its length set by the tile's last row) took its tail through scalar exp2
    // and sums, so a row's bits depended on the tile it was in, and so on the thread count.
    constexpr int32_t count = BLOCK;
    for (int32_t first = 0; first < tile.rows; first += ROWS) {
      const int64_t aheadEnd = aheadNext + aheadEach < tile.aheadCount ? aheadNext + aheadEach : tile.aheadCount;
      for (; aheadNext < aheadEnd; ++aheadNext) prefetchStream(tile.aheadLines[aheadNext], aheadToL1);
      if (massHere) {
        // The pending rows whose slab this register tile is about to overwrite (the last register
        // tile: every row left): scalar work that runs beside the kernel's FMAs.
        const int32_t pendingRows = tile.pending->rows;
        const int32_t to = first + ROWS >= tile.rows || first + ROWS > pendingRows ? pendingRows : first + ROWS;
        if (first < to) massRows<V>(*tile.pending, pending, block, first, to, massSums);
      }
      const int32_t rows = tile.rows - first < ROWS ? tile.rows - first : ROWS;
      const int64_t* lastToken = tile.lastToken + first;
      int64_t lastOfSubTile = lastToken[0];
      for (int32_t r = 1; r < rows; ++r) lastOfSubTile = lastToken[r] > lastOfSubTile ? lastToken[r] : lastOfSubTile;
      if (lastOfSubTile < blockBegin) continue;  // causal: these rows end before this block
      const float* q = tile.q + size_t(first) * size_t(dim);
      float* scores = tile.scratch;
      SoftmaxState state = {tile.state.max + first, tile.state.sum + first, tile.state.acc + size_t(first) * size_t(dim)};
      // A last register tile of at most half the rows (a tiled decode's 20 rows: 8 + 8 + 4) runs
      // half-height: the same arithmetic per row, none for rows that are not there.
      const bool half = rows <= ROWS / 2;
      R s0[ROWS], s1[ROWS];
      if (half) {
        tileScores<V, ROWS / 2>(q, keys, dim, s0, s1);
      } else {
        tileScores<V, ROWS>(q, keys, dim, s0, s1);
      }
      prefetchBlockAhead<V, CAPTURE>(tile, pending, blockBegin + 2 * BLOCK, first / ROWS);
      for (int32_t r = 0; r < rows; ++r) {
        float* s = scores + r * BLOCK;
        V::store(s, s0[r]);
        V::store(s + V::W, s1[r]);
        if (blockBegin + count - 1 > lastToken[r])
          for (int32_t j = 0; j < count; ++j)
            if (blockBegin + j > lastToken[r]) s[j] = -__builtin_inff();
      }
      softmaxBlock<V>(scores, BLOCK, rows, count, state, dim, dim);
      if (CAPTURE) {
        float* slab = tile.probs + size_t(block) * size_t(tile.probsBlockStride) + size_t(first) * BLOCK;
        for (int32_t i = 0; i < rows * BLOCK; i += V::W) V::store(slab + i, V::load(scores + i));
        for (int32_t r = 0; r < rows; ++r) tile.blockMax[size_t(block) * size_t(tile.blockMaxStride) + size_t(first + r)] = state.max[r];
      }
      if (half) {
        tileValues<V, ROWS / 2>(scores, values, dim, rows, state.acc);
      } else {
        tileValues<V, ROWS>(scores, values, dim, rows, state.acc);
      }
    }
    if (massHere) {
      massFlush<V>(*tile.pending, pending, block, massSums);
      pendingBlock = block + 1;
    }
  }
  if (CAPTURE && tile.pending != nullptr) massBlocks<V>(*tile.pending, pending, pendingBlock, pending.blocks);
}

template <class V>
void prefillTile(const PrefillTile& tile) {
  if (tile.probs != nullptr) {
    prefillTileRows<V, true>(tile);
  } else {
    prefillTileRows<V, false>(tile);
  }
}

// ---------------------------------------------------------------------------------------------
// Machine-limit probes, run by the bench in the same process as the kernels they judge.

template <class V>
float streamSum(const float* data, size_t count) {
  using R = typename V::R;
  R a0 = V::zero(), a1 = V::zero(), a2 = V::zero(), a3 = V::zero();
  size_t i = 0;
  for (; i + 4 * V::W <= count; i += 4 * V::W) {
    a0 = V::add(a0, V::load(data + i));
    a1 = V::add(a1, V::load(data + i + V::W));
    a2 = V::add(a2, V::load(data + i + 2 * V::W));
    a3 = V::add(a3, V::load(data + i + 3 * V::W));
  }
  float sum = V::reduceAdd(V::add(V::add(a0, a1), V::add(a2, a3)));
  for (; i < count; ++i) sum += data[i];
  return sum;
}

template <class V>
double fmaBurn(int64_t iterations, float seed) {
  using R = typename V::R;
  constexpr int kChains = 12;  // enough independent chains to cover FMA latency x throughput
  R acc[kChains];
  for (int c = 0; c < kChains; ++c) acc[c] = V::set1(seed * float(c + 1));
  const R a = V::set1(0.999999f), b = V::set1(1e-7f);
  for (int64_t i = 0; i < iterations; ++i) {
    for (int c = 0; c < kChains; ++c) acc[c] = V::fmadd(acc[c], a, b);
  }
  R total = acc[0];
  for (int c = 1; c < kChains; ++c) total = V::add(total, acc[c]);
  volatile float sink = V::reduceAdd(total);
  (void)sink;
  return double(iterations) * kChains * V::W * 2.0;
}

template <class V, DType T>
void toFloat32Of(const void* src, float* dst, int32_t count) {
  int32_t i = 0;
  for (; i + V::W <= count; i += V::W) V::store(dst + i, loadRow<V, T>(src, i));
  for (; i < count; ++i) dst[i] = loadScalar<T>(src, i);
}

template <class V>
void toFloat32(const void* src, DType type, float* dst, int32_t count) {
  switch (type) {
    case DType::F16: toFloat32Of<V, DType::F16>(src, dst, count); break;
    case DType::BF16: toFloat32Of<V, DType::BF16>(src, dst, count); break;
    default: toFloat32Of<V, DType::F32>(src, dst, count); break;
  }
}

// One block of 2W keys (row pointers in stored dtype) as the prefill kernel reads them: channel d
// of key j at out[d * 2W + j], for d < dim (channels up to paddedDim are the caller's padding).
// W x W squares are transposed in registers: a scalar scatter of every element cost as much as
// the prefill kernel's math in a decode slice.
template <class V, DType T>
void transposeKeyBlockOf(const void* const* rows, int32_t dim, float* out) {
  using R = typename V::R;
  constexpr int32_t BLOCK = 2 * V::W;
  const int32_t chunks = dim / V::W;
  for (int32_t c = 0; c < chunks; ++c) {
    for (int32_t half = 0; half < 2; ++half) {
      R square[V::W];
      for (int32_t i = 0; i < V::W; ++i) square[i] = loadRow<V, T>(rows[half * V::W + i], c * V::W);
      V::transpose(square);
      for (int32_t i = 0; i < V::W; ++i) V::store(out + size_t(c * V::W + i) * BLOCK + half * V::W, square[i]);
    }
  }
  for (int32_t d = chunks * V::W; d < dim; ++d)
    for (int32_t j = 0; j < BLOCK; ++j) out[size_t(d) * BLOCK + j] = loadScalar<T>(rows[j], d);
}

template <class V>
void transposeKeyBlock(const void* const* rows, DType type, int32_t dim, float* out) {
  switch (type) {
    case DType::F16: transposeKeyBlockOf<V, DType::F16>(rows, dim, out); break;
    case DType::BF16: transposeKeyBlockOf<V, DType::BF16>(rows, dim, out); break;
    default: transposeKeyBlockOf<V, DType::F32>(rows, dim, out); break;
  }
}

// ---------------------------------------------------------------------------------------------
// Scores for selection policies: plain dot products, each key row loaded once for all rows.

// The prefill register tile's score half: ROWS rows x two vectors of keys per step, every key
// block read from L1 by each sub-tile of rows.
template <class V>
void scoreTile(const ScoreTile& tile) {
  using R = typename V::R;
  constexpr int32_t ROWS = V::kPrefillRows;
  constexpr int32_t BLOCK = 2 * V::W;
  const int32_t dim = tile.paddedDim;
  for (int64_t blockBegin = 0; blockBegin < tile.keyEnd; blockBegin += BLOCK) {
    const float* keys = tile.keysTransposed + size_t(blockBegin / BLOCK) * size_t(dim) * BLOCK;
    for (int32_t first = 0; first < tile.rows; first += ROWS) {
      const int32_t rows = tile.rows - first < ROWS ? tile.rows - first : ROWS;
      const float* q = tile.q + size_t(first) * size_t(dim);
      // As in prefillTileRows: a last register tile of at most half the rows runs half-height.
      R s0[ROWS], s1[ROWS];
      if (rows <= ROWS / 2) {
        tileScores<V, ROWS / 2>(q, keys, dim, s0, s1);
      } else {
        tileScores<V, ROWS>(q, keys, dim, s0, s1);
      }
      for (int32_t r = 0; r < rows; ++r) {
        float* out = tile.out + size_t(first + r) * size_t(tile.outStride) + size_t(blockBegin);
        V::store(out, s0[r]);
        V::store(out + V::W, s1[r]);
      }
    }
  }
}

constexpr int64_t kScoreAhead = 32;  // rows of prefetch distance

// Scores of ROWS rows against TOKENS keys at a time: each key chunk loaded once for all rows, the
// horizontal sums of all ROWS x TOKENS accumulators done together by reduceMany (as in decode).
template <class V, DType T, int ROWS>
void scoreRangeRows(const ScoreRange& range) {
  using R = typename V::R;
  constexpr int32_t TOKENS = V::kDotAccumulators / ROWS > 0 ? V::kDotAccumulators / ROWS : 1;
  const int32_t dim = range.headDim;
  const int32_t chunks = dim / V::W;
  const int32_t tailBegin = chunks * V::W;
  const size_t strideBytes = size_t(range.rowStride) * (T == DType::F32 ? 4 : 2);
  const size_t rowBytes = size_t(dim) * (T == DType::F32 ? 4 : 2);
  const bool toL1 = streamPrefetchToL1();
  int64_t page = range.rowBegin / range.pageTokens;
  int64_t slot = range.rowBegin % range.pageTokens;
  // A second walk kScoreAhead rows ahead prefetches: the keys stream from memory, and page
  // boundaries stop the hardware prefetcher (as in decode).
  const int64_t aheadBegin = range.rowBegin + kScoreAhead < range.rowEnd ? range.rowBegin + kScoreAhead : range.rowEnd;
  int64_t aheadPage = aheadBegin / range.pageTokens;
  int64_t aheadSlot = aheadBegin % range.pageTokens;
  int64_t ahead = aheadBegin;
  for (int64_t row0 = range.rowBegin; row0 < range.rowEnd; row0 += TOKENS) {
    const int32_t tokens = int32_t(range.rowEnd - row0 < TOKENS ? range.rowEnd - row0 : TOKENS);
    for (int32_t t = 0; range.prefetch && t < TOKENS && ahead < range.rowEnd; ++t, ++ahead) {
      const uint8_t* row = static_cast<const uint8_t*>(range.keyPages[aheadPage]) + size_t(aheadSlot) * strideBytes;
      for (size_t offset = 0; offset < rowBytes; offset += 64) prefetchStream(row + offset, toL1);
      if (++aheadSlot == range.pageTokens) { aheadSlot = 0; ++aheadPage; }
    }
    const uint8_t* keys[TOKENS];
    for (int32_t t = 0; t < TOKENS; ++t) {
      if (t < tokens) {
        keys[t] = static_cast<const uint8_t*>(range.keyPages[page]) + size_t(slot) * strideBytes;
        if (++slot == range.pageTokens) { slot = 0; ++page; }
      } else {
        keys[t] = keys[0];  // a short last group repeats its first key; its sums are ignored
      }
    }
    R partial[V::kDotAccumulators];
    for (int32_t a = 0; a < V::kDotAccumulators; ++a) partial[a] = V::zero();
    for (int32_t c = 0; c < chunks; ++c) {
      R q[ROWS];
      for (int32_t r = 0; r < ROWS; ++r) q[r] = V::load(range.q + r * dim + c * V::W);
      for (int32_t t = 0; t < TOKENS; ++t) {
        const R k = loadRow<V, T>(keys[t], c * V::W);
        for (int32_t r = 0; r < ROWS; ++r) partial[r * TOKENS + t] = V::fmadd(q[r], k, partial[r * TOKENS + t]);
      }
    }
    float sums[V::kDotAccumulators];
    V::reduceMany(partial, sums);
    for (int32_t r = 0; r < ROWS; ++r) {
      for (int32_t t = 0; t < tokens; ++t) {
        float dot = sums[r * TOKENS + t];
        for (int32_t d = tailBegin; d < dim; ++d) dot += range.q[r * dim + d] * loadScalar<T>(keys[t], d);
        range.out[r * range.outStride + (row0 - range.rowBegin) + t] = dot;
      }
    }
  }
}

template <class V, DType T>
void scoreRangeOf(const ScoreRange& range) {
  switch (range.rows) {
    case 1: scoreRangeRows<V, T, 1>(range); break;
    case 2: scoreRangeRows<V, T, 2>(range); break;
    case 3: scoreRangeRows<V, T, 3>(range); break;
    case 4: scoreRangeRows<V, T, 4>(range); break;
    case 5: scoreRangeRows<V, T, 5>(range); break;
    case 6: scoreRangeRows<V, T, 6>(range); break;
    case 7: scoreRangeRows<V, T, 7>(range); break;
    default: scoreRangeRows<V, T, 8>(range); break;
  }
}

template <class V>
void scoreRange(const ScoreRange& range) {
  switch (range.kvType) {
    case DType::F16: scoreRangeOf<V, DType::F16>(range); break;
    case DType::BF16: scoreRangeOf<V, DType::BF16>(range); break;
    default: scoreRangeOf<V, DType::F32>(range); break;
  }
}
