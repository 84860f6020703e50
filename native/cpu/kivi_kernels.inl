// Decode attention straight from KIVI codes (methods/kivi.md), written once over a vector type V
// and compiled per instruction set like attention_kernels.inl (included after it).
//
// Scores of a quantized key group: q.k^ = sum_c (q_c s_c) x_c + sum_c q_c m_c, so q is scaled by
// the group's channel scales once (q~) and every token costs headDim multiply-adds on unpacked
// codes, each unpacked vector serving all rows (GQA). Tokens run along the vector lanes.
// Outputs: each value code chunk is dequantized once (x^ = code * s + m, one FMA) and serves all rows.
// Dense-and-sparse records (kivi_format.h) add their outlier corrections in scalar passes: key
// outliers to a sub-block's scores before the softmax, value outliers to the accumulators.

constexpr int32_t kKiviBlock = 32;  // tokens per softmax block; splits start at multiples of it

// Scores of SUB tokens of one quantized key group (SUB = 16 or 32 lanes' worth of codes):
// acc[r][u] += q~_r,c * x_c for every channel c, each code vector unpacked once for all rows.
// Rows x lanes x SPLIT independent FMA chains hide the FMA latency even for one row.
template <class V, int BITS, int ROWS, int SUB>
inline void kiviGroupScores(const uint32_t* codes, size_t wordsPerChannel, int32_t offset, const float* qs,
                            int32_t dim, const float* beta, float* scores, int32_t scoreStride) {
  using R = typename V::R;
  constexpr int32_t LANES = SUB / V::W > 0 ? SUB / V::W : 1;
  constexpr int32_t CHAINS = ROWS * LANES;
  constexpr int32_t SPLIT = CHAINS >= 4 ? 1 : 4 / CHAINS;
  R acc[SPLIT][ROWS][LANES];
  for (int32_t s = 0; s < SPLIT; ++s)
    for (int32_t r = 0; r < ROWS; ++r)
      for (int32_t u = 0; u < LANES; ++u) acc[s][r][u] = V::zero();
  for (int32_t c0 = 0; c0 < dim; c0 += SPLIT) {
    for (int32_t s = 0; s < SPLIT; ++s) {
      const int32_t c = c0 + s;
      const uint32_t* words = codes + size_t(c) * wordsPerChannel;
      R x[LANES];
      for (int32_t u = 0; u < LANES; ++u) x[u] = V::template codes<BITS>(words, offset + u * V::W);
      for (int32_t r = 0; r < ROWS; ++r) {
        const R qc = V::set1(qs[r * dim + c]);
        for (int32_t u = 0; u < LANES; ++u) acc[s][r][u] = V::fmadd(qc, x[u], acc[s][r][u]);
      }
    }
  }
  for (int32_t r = 0; r < ROWS; ++r) {
    for (int32_t u = 0; u < LANES; ++u) {
      R total = acc[0][r][u];
      for (int32_t s = 1; s < SPLIT; ++s) total = V::add(total, acc[s][r][u]);
      V::store(scores + r * scoreStride + u * V::W, V::add(total, V::set1(beta[r])));
    }
  }
}

// Pre-RoPE keys (kivi_format.h): scores of the SUB tokens from `first` (all in one quantized key
// group record, or all in the f16 residual when record is nullptr). The keys are dequantized
// channel-major into keys[c][u] (x^ = code * s + m, plus the outlier deltas), each token turned by
// its position, then dotted with the rows' post-RoPE queries. Lanes past subCount are zero keys
// (residual) or in-group tokens (quantized) whose scores the caller ignores.
// Angles: the state holds cos, sin of first * f_i per pair in double (std::cos/sin where the range
// starts, then advanced by SUB * f_i per sub-block by angle addition); token first + j of the
// sub-block uses cos(a + j f) = cos a cos jf - sin a sin jf (and the sine likewise) in float, with
// cos jf, sin jf from the driver's table. *ropeAt: the position the state holds (-1: none yet).
template <class V, int BITS, int ROWS, int SUB>
inline void kiviPreRopeScores(const KiviRange& range, const uint8_t* record, int64_t first, int32_t subCount,
                              int64_t* ropeAt, float* scores, int32_t scoreStride) {
  using R = typename V::R;
  constexpr int32_t LANES = SUB / V::W > 0 ? SUB / V::W : 1;
  const KiviFormat& format = range.format;
  const KiviHeadView& head = *range.head;
  const int32_t dim = format.headDim;
  const int32_t pairs = dim / 2;
  float* keys = range.ropeScratch;  // [dim, SUB]
  if (record != nullptr) {
    const int32_t offset = int32_t(first % format.group);
    const auto* codes = reinterpret_cast<const uint32_t*>(record);
    const size_t words = format.keyGroupWordsPerChannel();
    const auto* scales = reinterpret_cast<const uint16_t*>(record + format.keyGroupCodeBytes());
    const uint16_t* mins = scales + dim;
    for (int32_t c = 0; c < dim; ++c) {
      const R s = V::set1(V::halfToFloat(scales[c])), m = V::set1(V::halfToFloat(mins[c]));
      for (int32_t u = 0; u < LANES; ++u) {
        const R x = V::template codes<BITS>(codes + size_t(c) * words, offset + u * V::W);
        V::store(keys + c * SUB + u * V::W, V::fmadd(x, s, m));
      }
    }
    if (format.keyOutliers > 0) {
      // x^ + delta for the group's outliers at tokens of this sub-block (indices increase).
      const auto* indices = reinterpret_cast<const uint16_t*>(record + format.keyOutlierOffset());
      const uint16_t* deltas = indices + format.keyOutliers;
      for (int32_t i = 0; i < format.keyOutliers; ++i) {
        const int32_t t = int32_t(indices[i]) / dim - offset;
        if (t < 0) continue;
        if (t >= SUB) break;
        keys[(int32_t(indices[i]) % dim) * SUB + t] += V::halfToFloat(deltas[i]);
      }
    }
  } else {
    for (int32_t j = 0; j < SUB; ++j) {
      if (j < subCount) {
        const uint16_t* row = head.keyResidual + size_t(first + j - head.quantizedKeys) * size_t(dim);
        for (int32_t c = 0; c < dim; ++c) keys[c * SUB + j] = V::halfToFloat(row[c]);
      } else {
        for (int32_t c = 0; c < dim; ++c) keys[c * SUB + j] = 0.0f;
      }
    }
  }
  const double* frequencies = range.ropeFrequencies;
  double* angleCos = range.ropeState;
  double* angleSin = angleCos + pairs;
  double* stepCos = angleSin + pairs;
  double* stepSin = stepCos + pairs;
  if (*ropeAt < 0) {
    for (int32_t i = 0; i < pairs; ++i) {
      stepCos[i] = std::cos(double(SUB) * frequencies[i]);
      stepSin[i] = std::sin(double(SUB) * frequencies[i]);
    }
  }
  if (*ropeAt != first) {
    for (int32_t i = 0; i < pairs; ++i) {
      angleCos[i] = std::cos(double(first) * frequencies[i]);
      angleSin[i] = std::sin(double(first) * frequencies[i]);
    }
  }
  const float* withinCos = range.ropeWithin;
  const float* withinSin = withinCos + size_t(pairs) * 32;
  const bool adjacent = range.ropeStyle == RopeStyle::Adjacent;
  const R minusOne = V::set1(-1.0f);
  for (int32_t i = 0; i < pairs; ++i) {
    float* xa = keys + (adjacent ? 2 * i : i) * SUB;
    float* xb = keys + (adjacent ? 2 * i + 1 : i + pairs) * SUB;
    const R c0 = V::set1(float(angleCos[i])), s0 = V::set1(float(angleSin[i])), minusS0 = V::set1(-float(angleSin[i]));
    for (int32_t u = 0; u < LANES; ++u) {
      const R cj = V::load(withinCos + i * 32 + u * V::W), sj = V::load(withinSin + i * 32 + u * V::W);
      const R c = V::fmadd(c0, cj, V::mul(minusS0, sj));  // cos(a + jf)
      const R s = V::fmadd(s0, cj, V::mul(c0, sj));       // sin(a + jf)
      const R a = V::load(xa + u * V::W), b = V::load(xb + u * V::W);
      V::store(xa + u * V::W, V::fmadd(b, V::mul(s, minusOne), V::mul(a, c)));  // a c - b s
      V::store(xb + u * V::W, V::fmadd(a, s, V::mul(b, c)));                    // a s + b c
    }
    const double nextCos = angleCos[i] * stepCos[i] - angleSin[i] * stepSin[i];
    angleSin[i] = angleSin[i] * stepCos[i] + angleCos[i] * stepSin[i];
    angleCos[i] = nextCos;
  }
  *ropeAt = first + SUB;
  R acc[ROWS][LANES];
  for (int32_t r = 0; r < ROWS; ++r)
    for (int32_t u = 0; u < LANES; ++u) acc[r][u] = V::zero();
  for (int32_t c = 0; c < dim; ++c) {
    R x[LANES];
    for (int32_t u = 0; u < LANES; ++u) x[u] = V::load(keys + c * SUB + u * V::W);
    for (int32_t r = 0; r < ROWS; ++r) {
      const R qc = V::set1(range.q[r * dim + c]);
      for (int32_t u = 0; u < LANES; ++u) acc[r][u] = V::fmadd(qc, x[u], acc[r][u]);
    }
  }
  for (int32_t r = 0; r < ROWS; ++r)
    for (int32_t u = 0; u < LANES; ++u) V::store(scores + r * scoreStride + u * V::W, acc[r][u]);
}

template <class V, int BITS, int ROWS, int SUB>
void kiviDecodeRows(const KiviRange& range) {
  using R = typename V::R;
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
  const size_t valueCodeBytes = format.valueCodeBytes();
  const bool toL1 = streamPrefetchToL1();

  float* qs = range.scratch;                                    // [ROWS, dim]: q~ of the current key group
  float* valueScales = qs + size_t(ROWS) * size_t(dim);         // [kKiviBlock, 2 * channelGroups]: s then m
  float beta[ROWS] = {};
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
  int64_t currentGroup = -1;
  int64_t ropeAt = -1;  // pre-RoPE keys: the position kiviPreRopeScores' angle state holds
  float scores[ROWS][kKiviBlock];
  // Value rows of the block: codes (quantized tokens) or f16 residual rows. Page walk without a
  // division per token.
  const uint8_t* valueRecords[kKiviBlock];
  const uint16_t* valueResidualRows[kKiviBlock];
  int64_t valuePage = range.tokenBegin / range.valueTokensPerPage;
  int64_t valueSlot = range.tokenBegin % range.valueTokensPerPage;
  // A window policy's hole: its aligned inside is jumped over, the rest masked (kivi_format.h).
  // Records of hole tokens may sit in released pages, so they are never read.
  const KiviSkip skip = kiviSkip(head);
  const int64_t holeBegin = head.holeBegin, holeEnd = head.holeEnd;
  // A hole token's probability is exactly 0; its value row points at a live f16 ring row (finite),
  // which keeps the value loop free of branches.
  const uint16_t* liveValueRow = head.valueResidual + size_t(head.valueRingStart) * size_t(dim);

  for (int64_t blockBegin = range.tokenBegin; blockBegin < end; blockBegin += kKiviBlock) {
    if (skip.length > 0 && blockBegin == skip.begin) {
      blockBegin += skip.length;
      if (blockBegin >= end) break;
      valuePage = blockBegin / range.valueTokensPerPage;
      valueSlot = blockBegin % range.valueTokensPerPage;
    }
    const int32_t count = int32_t(end - blockBegin < kKiviBlock ? end - blockBegin : kKiviBlock);
    const bool holed = blockBegin < holeEnd && blockBegin + count > holeBegin;
    for (int32_t sub = 0; sub < count; sub += SUB) {
      const int64_t first = blockBegin + sub;
      const int32_t subCount = count - sub < SUB ? count - sub : SUB;
      // Wholly in the hole: nothing is read (the hole mask below sets its scores).
      if (holed && first >= holeBegin && first + subCount <= holeEnd) continue;
      if (range.ropeFrequencies != nullptr) {
        const uint8_t* record = nullptr;
        if (first < head.quantizedKeys) {
          const int64_t g = first / group;
          record = static_cast<const uint8_t*>(head.keyPage(g / range.keyGroupsPerPage)) +
                   size_t(g % range.keyGroupsPerPage) * keyGroupBytes;
        }
        kiviPreRopeScores<V, BITS, ROWS, SUB>(range, record, first, subCount, &ropeAt, &scores[0][sub], kKiviBlock);
        continue;
      }
      if (first < head.quantizedKeys) {
        // quantizedKeys is a multiple of the group (a multiple of SUB): the sub-block is quantized.
        const int64_t g = first / group;
        const uint8_t* record = static_cast<const uint8_t*>(head.keyPage(g / range.keyGroupsPerPage)) +
                                size_t(g % range.keyGroupsPerPage) * keyGroupBytes;
        if (g != currentGroup) {
          currentGroup = g;
          // The next group's record streams in while this one computes.
          const int64_t nextPage = (g + 1) / range.keyGroupsPerPage;
          if (g + 1 < head.quantizedKeys / group && head.keyPageHeld(nextPage)) {
            const uint8_t* next = static_cast<const uint8_t*>(head.keyPage(nextPage)) + size_t((g + 1) % range.keyGroupsPerPage) * keyGroupBytes;
            for (size_t offset = 0; offset < keyGroupBytes; offset += 64) prefetchStream(next + offset, toL1);
          }
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
        kiviGroupScores<V, BITS, ROWS, SUB>(reinterpret_cast<const uint32_t*>(record), keyWords, int32_t(first % group),
                                            qs, dim, beta, &scores[0][sub], kKiviBlock);
        if (format.keyOutliers > 0) {
          // Dense-and-sparse: score_t += q_c * delta for the group's outliers at tokens of this
          // sub-block (indices t * dim + c increase, so the walk stops past the sub-block).
          const auto* indices = reinterpret_cast<const uint16_t*>(record + format.keyOutlierOffset());
          const uint16_t* deltas = indices + format.keyOutliers;
          const int32_t offset = int32_t(first % group);
          for (int32_t i = 0; i < format.keyOutliers; ++i) {
            const int32_t t = int32_t(indices[i]) / dim - offset;
            if (t < 0) continue;
            if (t >= subCount) break;
            const int32_t c = int32_t(indices[i]) % dim;
            const float delta = V::halfToFloat(deltas[i]);
            for (int32_t r = 0; r < ROWS; ++r) scores[r][sub + t] += range.q[r * dim + c] * delta;
          }
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
    if (holed) {
      for (int32_t j = 0; j < count; ++j) {
        if (blockBegin + j < holeBegin || blockBegin + j >= holeEnd) continue;
        for (int32_t r = 0; r < ROWS; ++r) scores[r][j] = -__builtin_inff();
      }
    }
    if (blockBegin < head.evictedTokens) {
      for (int32_t j = 0; j < count; ++j) {
        if (!head.isEvicted(blockBegin + j)) continue;
        for (int32_t r = 0; r < ROWS; ++r) scores[r][j] = -__builtin_inff();
      }
    }
    if (range.scoresOut != nullptr) {
      for (int32_t r = 0; r < ROWS; ++r) {
        float* out = range.scoresOut + r * range.scoresStride + (blockBegin - range.tokenBegin);
        for (int32_t j = 0; j < count; ++j) out[j] = scores[r][j];
      }
    }
    softmaxBlock<V>(&scores[0][0], kKiviBlock, ROWS, count, state, dim, dim);

    // Values of the block: record pointers, and each quantized token's scales and mins as floats.
    for (int32_t j = 0; j < count; ++j) {
      const int64_t t = blockBegin + j;
      if (holed && t >= holeBegin && t < holeEnd) {
        valueRecords[j] = nullptr;
        valueResidualRows[j] = liveValueRow;
        if (t < head.quantizedValues && ++valueSlot == range.valueTokensPerPage) { valueSlot = 0; ++valuePage; }
        continue;
      }
      if (t < head.quantizedValues) {
        const uint8_t* record = static_cast<const uint8_t*>(head.valuePage(valuePage)) + size_t(valueSlot) * valueBytes;
        valueRecords[j] = record;
        V::halvesToFloats(reinterpret_cast<const uint16_t*>(record + valueCodeBytes),
                          valueScales + size_t(j) * 2 * size_t(channelGroups), 2 * channelGroups);
        if (++valueSlot == range.valueTokensPerPage) { valueSlot = 0; ++valuePage; }
      } else {
        valueRecords[j] = nullptr;
        const int64_t row = (head.valueRingStart + (t - head.quantizedValues)) % range.ringRows;
        valueResidualRows[j] = head.valueResidual + size_t(row) * size_t(dim);
      }
    }
    // Prefetch the next block's value records (contiguous within a page).
    if (blockBegin + kKiviBlock < head.quantizedValues && valueSlot + kKiviBlock <= range.valueTokensPerPage &&
        head.valuePageHeld(valuePage)) {
      const uint8_t* next = static_cast<const uint8_t*>(head.valuePage(valuePage)) + size_t(valueSlot) * valueBytes;
      for (size_t offset = 0; offset < kKiviBlock * valueBytes; offset += 64) prefetchStream(next + offset, toL1);
    }
    // o += p x^ with x^ = code * s + m unpacked once per chunk for all rows. A pass of all CHUNKS
    // chunks (every pass but a short last one) runs without a bound check per chunk.
    const auto valuePass = [&](int32_t c0, int32_t passChunks, auto fullPass) {
      constexpr bool kFull = decltype(fullPass)::value;
      R out[CHUNKS][ROWS];
      for (int32_t c = 0; c < CHUNKS; ++c)
        for (int32_t r = 0; r < ROWS; ++r)
          out[c][r] = kFull || c < passChunks ? V::load(state.acc + r * dim + (c0 + c) * V::W) : V::zero();
      // The value group of each chunk (a division per chunk here, not per token).
      int32_t chunkGroup[CHUNKS];
      for (int32_t c = 0; c < CHUNKS; ++c) chunkGroup[c] = (c0 + c) * V::W / group;
      for (int32_t j = 0; j < count; ++j) {
        R p[ROWS];
        for (int32_t r = 0; r < ROWS; ++r) p[r] = V::set1(scores[r][j]);
        if (valueRecords[j] != nullptr) {
          const auto* words = reinterpret_cast<const uint32_t*>(valueRecords[j]);
          const float* floats = valueScales + size_t(j) * 2 * size_t(channelGroups);
          for (int32_t c = 0; c < CHUNKS; ++c) {
            if (!kFull && c >= passChunks) break;
            const int32_t g = chunkGroup[c];
            const R x = V::fmadd(V::template codes<BITS>(words, (c0 + c) * V::W), V::set1(floats[g]), V::set1(floats[channelGroups + g]));
            for (int32_t r = 0; r < ROWS; ++r) out[c][r] = V::fmadd(p[r], x, out[c][r]);
          }
        } else {
          const uint16_t* values = valueResidualRows[j];
          for (int32_t c = 0; c < CHUNKS; ++c) {
            if (!kFull && c >= passChunks) break;
            const R v = V::loadF16(values + (c0 + c) * V::W);
            for (int32_t r = 0; r < ROWS; ++r) out[c][r] = V::fmadd(p[r], v, out[c][r]);
          }
        }
      }
      for (int32_t c = 0; c < (kFull ? CHUNKS : passChunks); ++c)
        for (int32_t r = 0; r < ROWS; ++r) V::store(state.acc + r * dim + (c0 + c) * V::W, out[c][r]);
    };
    for (int32_t c0 = 0; c0 < chunks; c0 += CHUNKS) {
      if (chunks - c0 >= CHUNKS) valuePass(c0, CHUNKS, std::true_type{});
      else valuePass(c0, chunks - c0, std::false_type{});
    }
    if (format.valueOutliers > 0) {
      // Dense-and-sparse: out_c += p_t * delta for each value outlier c of a quantized token t.
      for (int32_t j = 0; j < count; ++j) {
        if (valueRecords[j] == nullptr) continue;
        const auto* indices = reinterpret_cast<const uint16_t*>(valueRecords[j] + format.valueOutlierOffset());
        const uint16_t* deltas = indices + format.valueOutliers;
        for (int32_t i = 0; i < format.valueOutliers; ++i) {
          const float delta = V::halfToFloat(deltas[i]);
          for (int32_t r = 0; r < ROWS; ++r) state.acc[r * dim + indices[i]] += scores[r][j] * delta;
        }
      }
    }
  }
}

template <class V, int BITS, int ROWS>
void kiviDecodeOfRows(const KiviRange& range) {
  // Sub-blocks of 32 tokens give more independent FMA chains; a group of 16 needs 16.
  if (range.format.group % 32 == 0) kiviDecodeRows<V, BITS, ROWS, 32>(range);
  else kiviDecodeRows<V, BITS, ROWS, 16>(range);
}

template <class V, int BITS>
void kiviDecodeOfBits(const KiviRange& range) {
  switch (range.rows) {
    case 1: kiviDecodeOfRows<V, BITS, 1>(range); break;
    case 2: kiviDecodeOfRows<V, BITS, 2>(range); break;
    case 3: kiviDecodeOfRows<V, BITS, 3>(range); break;
    case 4: kiviDecodeOfRows<V, BITS, 4>(range); break;
    case 5: kiviDecodeOfRows<V, BITS, 5>(range); break;
    case 6: kiviDecodeOfRows<V, BITS, 6>(range); break;
    case 7: kiviDecodeOfRows<V, BITS, 7>(range); break;
    default: kiviDecodeOfRows<V, BITS, 8>(range); break;
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
