// Decode attention straight from KIVI codes (methods/kivi.md), written once over a vector type V
// and compiled per instruction set like attention_kernels.inl (included after it).
//
// Scores of a quantized key group: q.k^ = sum_c (q_c s_c) x_c + sum_c q_c m_c, so q is scaled by
// the group's channel scales once (q~) and every token costs headDim multiply-adds on unpacked
// codes, each unpacked vector serving all rows (GQA). Tokens run along the vector lanes.
// Outputs: o_c = sum_t (p_t s_t,j) x_t,c + sum_t p_t m_t,j; the second sum is kept per row and
// channel group (minAcc) and folded in at the end.

constexpr int32_t kKiviSub = 16;    // tokens per sub-block: one code vector of 16 lanes (AVX-512)
constexpr int32_t kKiviBlock = 32;  // tokens per softmax block

template <class V, int BITS, int ROWS>
void kiviDecodeRows(const KiviRange& range) {
  using R = typename V::R;
  constexpr int32_t LANES = kKiviSub / V::W;  // code vectors per sub-block
  constexpr int32_t CHUNKS = V::kDotAccumulators / ROWS > 0 ? V::kDotAccumulators / ROWS : 1;
  const KiviFormat& format = range.format;
  const KiviHeadView& head = *range.head;
  const int32_t dim = format.headDim;
  const int32_t group = format.group;
  const int32_t channelGroups = dim / group;
  const int32_t chunks = dim / V::W;  // headDim is a multiple of 16
  const size_t keyWords = format.keyGroupWordsPerChannel();
  const size_t keyGroupBytes = format.keyGroupBytes();
  const size_t valueBytes = format.valueTokenBytes();

  float* qs = range.scratch;                                   // [ROWS, dim]: q~ of the current key group
  float* minAcc = qs + size_t(ROWS) * size_t(dim);             // [ROWS, channelGroups]
  float* ps = minAcc + size_t(ROWS) * size_t(channelGroups);   // [kKiviBlock, ROWS, channelGroups]: p_t s_t,j
  float beta[ROWS] = {};
  SoftmaxState state = range.state;
  for (int32_t r = 0; r < ROWS; ++r) {
    state.max[r] = kNoScoreYet;
    state.sum[r] = 0.0f;
    for (int32_t d = 0; d < dim; ++d) state.acc[r * dim + d] = 0.0f;
    for (int32_t j = 0; j < channelGroups; ++j) minAcc[r * channelGroups + j] = 0.0f;
  }
  int64_t lastOfAll = range.lastToken[0], firstLast = range.lastToken[0];
  for (int32_t r = 1; r < ROWS; ++r) {
    lastOfAll = range.lastToken[r] > lastOfAll ? range.lastToken[r] : lastOfAll;
    firstLast = range.lastToken[r] < firstLast ? range.lastToken[r] : firstLast;
  }
  const int64_t end = range.tokenEnd < lastOfAll + 1 ? range.tokenEnd : lastOfAll + 1;
  int64_t currentGroup = -1;
  float scores[ROWS][kKiviBlock];

  for (int64_t blockBegin = range.tokenBegin; blockBegin < end; blockBegin += kKiviBlock) {
    const int32_t count = int32_t(end - blockBegin < kKiviBlock ? end - blockBegin : kKiviBlock);
    for (int32_t sub = 0; sub < count; sub += kKiviSub) {
      const int64_t first = blockBegin + sub;
      const int32_t subCount = count - sub < kKiviSub ? count - sub : kKiviSub;
      if (first < head.quantizedKeys) {
        // quantizedKeys is a multiple of the group (>= 16): the whole sub-block is quantized.
        const int64_t g = first / group;
        const uint8_t* record = static_cast<const uint8_t*>(head.keyPages[g / range.keyGroupsPerPage]) +
                                size_t(g % range.keyGroupsPerPage) * keyGroupBytes;
        const auto* codes = reinterpret_cast<const uint32_t*>(record);
        if (g != currentGroup) {
          currentGroup = g;
          const auto* scales = reinterpret_cast<const uint16_t*>(record + format.keyGroupCodeBytes());
          const uint16_t* mins = scales + dim;
          for (int32_t r = 0; r < ROWS; ++r) {
            R bias = V::zero();
            for (int32_t c = 0; c < chunks; ++c) {
              const R q = V::load(range.q + r * dim + c * V::W);
              V::store(qs + r * dim + c * V::W, V::mul(q, V::loadF16(scales + c * V::W)));
              bias = V::fmadd(q, V::loadF16(mins + c * V::W), bias);
            }
            beta[r] = V::reduceAdd(bias);
          }
        }
        const int32_t offset = int32_t(first % group);
        R acc[ROWS][LANES];
        for (int32_t r = 0; r < ROWS; ++r)
          for (int32_t u = 0; u < LANES; ++u) acc[r][u] = V::zero();
        for (int32_t c = 0; c < dim; ++c) {
          const uint32_t* words = codes + size_t(c) * keyWords;
          R x[LANES];
          for (int32_t u = 0; u < LANES; ++u) x[u] = V::template codes<BITS>(words, offset + u * V::W);
          for (int32_t r = 0; r < ROWS; ++r) {
            const R qc = V::set1(qs[r * dim + c]);
            for (int32_t u = 0; u < LANES; ++u) acc[r][u] = V::fmadd(qc, x[u], acc[r][u]);
          }
        }
        for (int32_t r = 0; r < ROWS; ++r) {
          float lane[kKiviSub];
          for (int32_t u = 0; u < LANES; ++u) V::store(lane + u * V::W, acc[r][u]);
          for (int32_t j = 0; j < subCount; ++j) scores[r][sub + j] = lane[j] + beta[r];
        }
      } else {
        // Residual keys: f16 rows.
        for (int32_t j = 0; j < subCount; ++j) {
          const uint16_t* row = head.keyResidual + size_t(first + j - head.quantizedKeys) * size_t(dim);
          for (int32_t r = 0; r < ROWS; ++r) {
            R dot = V::zero();
            for (int32_t c = 0; c < chunks; ++c) dot = V::fmadd(V::load(range.q + r * dim + c * V::W), V::loadF16(row + c * V::W), dot);
            scores[r][sub + j] = V::reduceAdd(dot);
          }
        }
      }
    }
    if (blockBegin + count - 1 > firstLast) {
      for (int32_t r = 0; r < ROWS; ++r)
        for (int32_t j = 0; j < count; ++j)
          if (blockBegin + j > range.lastToken[r]) scores[r][j] = -__builtin_inff();
    }
    float oldMax[ROWS];
    for (int32_t r = 0; r < ROWS; ++r) oldMax[r] = state.max[r];
    softmaxBlock<V>(&scores[0][0], kKiviBlock, ROWS, count, state, dim, dim);
    for (int32_t r = 0; r < ROWS; ++r) {
      if (state.max[r] != oldMax[r]) {
        const float alpha = scalarExp2(oldMax[r] - state.max[r]);
        for (int32_t j = 0; j < channelGroups; ++j) minAcc[r * channelGroups + j] *= alpha;
      }
    }
    // Per quantized value token: p s per row and channel group, and the min sums.
    for (int32_t j = 0; j < count; ++j) {
      const int64_t t = blockBegin + j;
      if (t >= head.quantizedValues) break;
      const uint8_t* record = static_cast<const uint8_t*>(head.valuePages[t / range.valueTokensPerPage]) +
                              size_t(t % range.valueTokensPerPage) * valueBytes;
      const auto* scales = reinterpret_cast<const uint16_t*>(record + format.valueCodeBytes());
      const uint16_t* mins = scales + channelGroups;
      for (int32_t g = 0; g < channelGroups; ++g) {
        const float s = f16ToFloat(scales[g]), m = f16ToFloat(mins[g]);
        for (int32_t r = 0; r < ROWS; ++r) {
          ps[(j * ROWS + r) * channelGroups + g] = scores[r][j] * s;
          minAcc[r * channelGroups + g] += scores[r][j] * m;
        }
      }
    }
    for (int32_t c0 = 0; c0 < chunks; c0 += CHUNKS) {
      const int32_t passChunks = chunks - c0 < CHUNKS ? chunks - c0 : CHUNKS;
      R out[CHUNKS][ROWS];
      for (int32_t c = 0; c < CHUNKS; ++c)
        for (int32_t r = 0; r < ROWS; ++r)
          out[c][r] = c < passChunks ? V::load(state.acc + r * dim + (c0 + c) * V::W) : V::zero();
      for (int32_t j = 0; j < count; ++j) {
        const int64_t t = blockBegin + j;
        if (t < head.quantizedValues) {
          const auto* words = static_cast<const uint32_t*>(
              static_cast<const void*>(static_cast<const uint8_t*>(head.valuePages[t / range.valueTokensPerPage]) +
                                       size_t(t % range.valueTokensPerPage) * valueBytes));
          for (int32_t c = 0; c < CHUNKS; ++c) {
            if (c >= passChunks) break;
            const int32_t channel = (c0 + c) * V::W;
            const R x = V::template codes<BITS>(words, channel);
            const float* scale = ps + size_t(j * ROWS) * size_t(channelGroups) + channel / group;
            for (int32_t r = 0; r < ROWS; ++r) out[c][r] = V::fmadd(V::set1(scale[r * channelGroups]), x, out[c][r]);
          }
        } else {
          const int64_t row = (head.valueRingStart + (t - head.quantizedValues)) % range.ringRows;
          const uint16_t* values = head.valueResidual + size_t(row) * size_t(dim);
          for (int32_t c = 0; c < CHUNKS; ++c) {
            if (c >= passChunks) break;
            const R v = V::loadF16(values + (c0 + c) * V::W);
            for (int32_t r = 0; r < ROWS; ++r) out[c][r] = V::fmadd(V::set1(scores[r][j]), v, out[c][r]);
          }
        }
      }
      for (int32_t c = 0; c < passChunks; ++c)
        for (int32_t r = 0; r < ROWS; ++r) V::store(state.acc + r * dim + (c0 + c) * V::W, out[c][r]);
    }
  }
  for (int32_t r = 0; r < ROWS; ++r)
    for (int32_t d = 0; d < dim; ++d) state.acc[r * dim + d] += minAcc[r * channelGroups + d / group];
}

template <class V, int BITS>
void kiviDecodeOfBits(const KiviRange& range) {
  switch (range.rows) {
    case 1: kiviDecodeRows<V, BITS, 1>(range); break;
    case 2: kiviDecodeRows<V, BITS, 2>(range); break;
    case 3: kiviDecodeRows<V, BITS, 3>(range); break;
    case 4: kiviDecodeRows<V, BITS, 4>(range); break;
    case 5: kiviDecodeRows<V, BITS, 5>(range); break;
    case 6: kiviDecodeRows<V, BITS, 6>(range); break;
    case 7: kiviDecodeRows<V, BITS, 7>(range); break;
    default: kiviDecodeRows<V, BITS, 8>(range); break;
  }
}

template <class V>
void kiviDecodeRange(const KiviRange& range) {
  switch (range.format.bits) {
    case 2: kiviDecodeOfBits<V, 2>(range); break;
    case 4: kiviDecodeOfBits<V, 4>(range); break;
    default: kiviDecodeOfBits<V, 8>(range); break;
  }
}
