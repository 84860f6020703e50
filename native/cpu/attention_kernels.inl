// Attention kernels written once over a vector type V (VecScalar, VecAvx2, VecAvx512) and
// compiled once per instruction set. No STL in here: an inline STL instantiation compiled with
// AVX-512 flags could be merged by the linker into code that must run on any CPU.

constexpr float kNoScoreYet = -1e30f;  // finite start of a running max: 2^(kNoScoreYet - m) is 0, never NaN

inline float scalarExp2(float x) { return x < -126.0f ? 0.0f : std::exp2(x); }

template <class V>
inline typename V::R loadRow(const void* row, DType type, int offset) {
  switch (type) {
    case DType::F16: return V::loadF16(static_cast<const uint16_t*>(row) + offset);
    case DType::BF16: return V::loadBF16(static_cast<const uint16_t*>(row) + offset);
    default: return V::load(static_cast<const float*>(row) + offset);
  }
}

inline float loadScalar(const void* row, DType type, int offset) {
  switch (type) {
    case DType::F16: return f16ToFloat(static_cast<const uint16_t*>(row)[offset]);
    case DType::BF16: return bf16ToFloat(static_cast<const uint16_t*>(row)[offset]);
    default: return static_cast<const float*>(row)[offset];
  }
}

// Online softmax over a block of `count` scores per row: updates max/sum, rescales the row's
// accumulator, and leaves 2^(s - max) in place of the scores.
template <class V>
inline void softmaxBlock(float* scores, int32_t stride, int32_t rows, int32_t count, SoftmaxState& state,
                         int32_t accDim, int32_t accStride) {
  for (int32_t r = 0; r < rows; ++r) {
    float* s = scores + r * stride;
    float blockMax = kNoScoreYet;
    for (int32_t j = 0; j < count; ++j) blockMax = s[j] > blockMax ? s[j] : blockMax;
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

template <class V, int ROWS>
void decodeRangeRows(const DecodeRange& range) {
  using R = typename V::R;
  const int32_t dim = range.headDim;
  const int32_t chunks = dim / V::W;
  const int32_t tailBegin = chunks * V::W;
  const size_t rowBytes = size_t(range.rowStride) * (range.kvType == DType::F32 ? 4 : 2);
  SoftmaxState state = range.state;
  for (int32_t r = 0; r < ROWS; ++r) {
    state.max[r] = kNoScoreYet;
    state.sum[r] = 0.0f;
    for (int32_t d = 0; d < dim; ++d) state.acc[r * dim + d] = 0.0f;
  }
  int64_t lastOfAll = range.lastToken[0];
  for (int32_t r = 1; r < ROWS; ++r) lastOfAll = range.lastToken[r] > lastOfAll ? range.lastToken[r] : lastOfAll;
  const int64_t end = range.tokenEnd < lastOfAll + 1 ? range.tokenEnd : lastOfAll + 1;

  float scores[ROWS][kDecodeBlock];
  const uint8_t* keyRows[kDecodeBlock];
  const uint8_t* valueRows[kDecodeBlock];
  int64_t page = range.tokenBegin / range.pageTokens;
  int64_t slot = range.tokenBegin % range.pageTokens;
  for (int64_t blockBegin = range.tokenBegin; blockBegin < end; blockBegin += kDecodeBlock) {
    const int32_t count = int32_t(end - blockBegin < kDecodeBlock ? end - blockBegin : kDecodeBlock);
    // Page walk without a division per token.
    for (int32_t j = 0; j < count; ++j) {
      keyRows[j] = static_cast<const uint8_t*>(range.keyPages[page]) + size_t(slot) * rowBytes;
      valueRows[j] = static_cast<const uint8_t*>(range.valuePages[page]) + size_t(slot) * rowBytes;
      if (++slot == range.pageTokens) { slot = 0; ++page; }
    }
    for (int32_t j = 0; j < count; ++j) {
      R partial[ROWS];
      for (int32_t r = 0; r < ROWS; ++r) partial[r] = V::zero();
      for (int32_t c = 0; c < chunks; ++c) {
        const R k = loadRow<V>(keyRows[j], range.kvType, c * V::W);
        for (int32_t r = 0; r < ROWS; ++r) partial[r] = V::fmadd(V::load(range.q + r * dim + c * V::W), k, partial[r]);
      }
      for (int32_t r = 0; r < ROWS; ++r) {
        float score = V::reduceAdd(partial[r]);
        for (int32_t d = tailBegin; d < dim; ++d) score += range.q[r * dim + d] * loadScalar(keyRows[j], range.kvType, d);
        scores[r][j] = blockBegin + j <= range.lastToken[r] ? score : -__builtin_inff();
      }
    }
    softmaxBlock<V>(&scores[0][0], kDecodeBlock, ROWS, count, state, dim, dim);
    for (int32_t c = 0; c < chunks; ++c) {
      R out[ROWS];
      for (int32_t r = 0; r < ROWS; ++r) out[r] = V::load(state.acc + r * dim + c * V::W);
      for (int32_t j = 0; j < count; ++j) {
        const R v = loadRow<V>(valueRows[j], range.kvType, c * V::W);
        for (int32_t r = 0; r < ROWS; ++r) out[r] = V::fmadd(V::set1(scores[r][j]), v, out[r]);
      }
      for (int32_t r = 0; r < ROWS; ++r) V::store(state.acc + r * dim + c * V::W, out[r]);
    }
    for (int32_t d = tailBegin; d < dim; ++d) {
      for (int32_t j = 0; j < count; ++j) {
        const float v = loadScalar(valueRows[j], range.kvType, d);
        for (int32_t r = 0; r < ROWS; ++r) state.acc[r * dim + d] += scores[r][j] * v;
      }
    }
  }
}

template <class V>
void decodeRange(const DecodeRange& range) {
  // Row counts are compile-time so the per-row accumulators stay in registers.
  switch (range.rows) {
    case 1: decodeRangeRows<V, 1>(range); break;
    case 2: decodeRangeRows<V, 2>(range); break;
    case 3: decodeRangeRows<V, 3>(range); break;
    case 4: decodeRangeRows<V, 4>(range); break;
    case 5: decodeRangeRows<V, 5>(range); break;
    case 6: decodeRangeRows<V, 6>(range); break;
    case 7: decodeRangeRows<V, 7>(range); break;
    default: decodeRangeRows<V, 8>(range); break;
  }
}

// ---------------------------------------------------------------------------------------------
// Prefill: register tiles of kPrefillRows rows x 2 vectors of keys (compute-bound, GEMM-like).

template <class V>
void prefillTile(const PrefillTile& tile) {
  using R = typename V::R;
  constexpr int32_t ROWS = V::kPrefillRows;
  constexpr int32_t BLOCK = 2 * V::W;
  const int32_t dim = tile.paddedDim;
  const int32_t rows = tile.rows;
  SoftmaxState state = tile.state;
  float* scores = tile.scratch;
  for (int64_t blockBegin = tile.keyBegin; blockBegin < tile.keyEnd; blockBegin += BLOCK) {
    const float* keys = tile.keysTransposed + size_t(blockBegin / BLOCK) * size_t(dim) * BLOCK;
    R s0[ROWS], s1[ROWS];
    for (int32_t r = 0; r < ROWS; ++r) { s0[r] = V::zero(); s1[r] = V::zero(); }
    for (int32_t d = 0; d < dim; ++d) {
      const R k0 = V::load(keys + d * BLOCK);
      const R k1 = V::load(keys + d * BLOCK + V::W);
      for (int32_t r = 0; r < ROWS; ++r) {
        const R q = V::set1(tile.q[r * dim + d]);
        s0[r] = V::fmadd(q, k0, s0[r]);
        s1[r] = V::fmadd(q, k1, s1[r]);
      }
    }
    int32_t count = BLOCK;
    if (blockBegin + count > tile.keyEnd) count = int32_t(tile.keyEnd - blockBegin);
    for (int32_t r = 0; r < rows; ++r) {
      float* s = scores + r * BLOCK;
      V::store(s, s0[r]);
      V::store(s + V::W, s1[r]);
      for (int32_t j = 0; j < count; ++j)
        if (blockBegin + j > tile.lastToken[r]) s[j] = -__builtin_inff();
    }
    softmaxBlock<V>(scores, BLOCK, rows, count, state, dim, dim);
    for (int32_t c = 0; c < dim; c += V::W) {
      R out[ROWS];
      for (int32_t r = 0; r < ROWS; ++r) out[r] = r < rows ? V::load(state.acc + r * dim + c) : V::zero();
      const float* values = tile.values + size_t(blockBegin) * size_t(dim) + c;
      for (int32_t j = 0; j < count; ++j) {
        const R v = V::load(values + size_t(j) * size_t(dim));
        for (int32_t r = 0; r < ROWS; ++r) out[r] = V::fmadd(V::set1(scores[r * BLOCK + j]), v, out[r]);
      }
      for (int32_t r = 0; r < rows; ++r) V::store(state.acc + r * dim + c, out[r]);
    }
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

template <class V>
KernelTable makeTable() {
  KernelTable table;
  table.name = V::kName;
  table.vectorWidth = V::W;
  table.prefillRows = V::kPrefillRows;
  table.prefillBlockKeys = 2 * V::W;
  table.decodeRange = &decodeRange<V>;
  table.prefillTile = &prefillTile<V>;
  table.streamSum = &streamSum<V>;
  table.fmaBurn = &fmaBurn<V>;
  return table;
}
