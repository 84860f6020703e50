// Host vector kernels of the retrieval indexes (core/vector_ops.h), one instantiation per
// instruction set. Included by kernels_*.cc inside their anonymous namespace after vec_*.h.

// Keys are f32, or f16 (an index over an f16 cache keeps its keys in half the bytes; the f16 to
// f32 conversion is exact, so either gives the same scores).
template <class V>
inline typename V::R loadKey(const float* p) { return V::load(p); }
template <class V>
inline typename V::R loadKey(const uint16_t* p) { return V::loadF16(p); }
inline float keyAt(const float* p, int32_t i) { return p[i]; }
inline float keyAt(const uint16_t* p, int32_t i) { return kvslim::f16ToFloat(p[i]); }

// dot(a, b) over dim floats: four independent accumulators, then the scalar tail.
template <class V, class K>
inline float dotRow(const float* a, const K* b, int32_t dim) {
  typename V::R s0 = V::zero(), s1 = V::zero(), s2 = V::zero(), s3 = V::zero();
  int32_t i = 0;
  for (; i + 4 * V::W <= dim; i += 4 * V::W) {
    s0 = V::fmadd(V::load(a + i), loadKey<V>(b + i), s0);
    s1 = V::fmadd(V::load(a + i + V::W), loadKey<V>(b + i + V::W), s1);
    s2 = V::fmadd(V::load(a + i + 2 * V::W), loadKey<V>(b + i + 2 * V::W), s2);
    s3 = V::fmadd(V::load(a + i + 3 * V::W), loadKey<V>(b + i + 3 * V::W), s3);
  }
  for (; i + V::W <= dim; i += V::W) s0 = V::fmadd(V::load(a + i), loadKey<V>(b + i), s0);
  float sum = V::reduceAdd(V::add(V::add(s0, s1), V::add(s2, s3)));
  for (; i < dim; ++i) sum += a[i] * keyAt(b, i);
  return sum;
}

template <class V, class K>
inline float maxDotOne(const float* queries, int32_t rows, int32_t dim, const K* key) {
  float best = -INFINITY;
  for (int32_t r = 0; r < rows; ++r) best = std::max(best, dotRow<V>(queries + size_t(r) * size_t(dim), key, dim));
  return best;
}

template <class V, class K>
void maxDot(const float* queries, int32_t rows, int32_t dim, const K* keys, int64_t count, float* out) {
  for (int64_t i = 0; i < count; ++i) out[i] = maxDotOne<V>(queries, rows, dim, keys + size_t(i) * size_t(dim));
}

// ROWS queries x TOKENS keys per register tile: each key chunk loaded once for all rows, each
// query chunk once for all keys, the ROWS x TOKENS sums reduced together (as the decode kernel).
template <class V, int ROWS, class K>
void dotTile(const float* queries, int32_t dim, const K* keys, int64_t count, float* out, int64_t outStride) {
  using R = typename V::R;
  constexpr int32_t TOKENS = V::kDotAccumulators / ROWS;
  const int32_t chunks = dim / V::W;
  const int32_t tailBegin = chunks * V::W;
  for (int64_t j0 = 0; j0 < count; j0 += TOKENS) {
    const int32_t tokens = int32_t(count - j0 < TOKENS ? count - j0 : TOKENS);
    const K* key[TOKENS];
    for (int32_t t = 0; t < TOKENS; ++t) key[t] = keys + size_t(j0 + (t < tokens ? t : 0)) * size_t(dim);
    R partial[V::kDotAccumulators];
    for (int32_t a = 0; a < V::kDotAccumulators; ++a) partial[a] = V::zero();
    for (int32_t c = 0; c < chunks; ++c) {
      R q[ROWS];
      for (int32_t r = 0; r < ROWS; ++r) q[r] = V::load(queries + r * dim + c * V::W);
      for (int32_t t = 0; t < TOKENS; ++t) {
        const R k = loadKey<V>(key[t] + c * V::W);
        for (int32_t r = 0; r < ROWS; ++r) partial[r * TOKENS + t] = V::fmadd(q[r], k, partial[r * TOKENS + t]);
      }
    }
    float sums[V::kDotAccumulators];
    V::reduceMany(partial, sums);
    for (int32_t r = 0; r < ROWS; ++r) {
      for (int32_t t = 0; t < tokens; ++t) {
        float dot = sums[r * TOKENS + t];
        for (int32_t d = tailBegin; d < dim; ++d) dot += queries[r * dim + d] * keyAt(key[t], d);
        out[r * outStride + j0 + t] = dot;
      }
    }
  }
}

template <class V, class K>
void dotMatrix(const float* queries, int32_t rows, int32_t dim, const K* keys, int64_t count, float* out) {
  for (int32_t r0 = 0; r0 < rows; r0 += 4) {
    const float* q = queries + size_t(r0) * size_t(dim);
    float* o = out + size_t(r0) * size_t(count);
    switch (rows - r0 < 4 ? rows - r0 : 4) {
      case 1: dotTile<V, 1>(q, dim, keys, count, o, count); break;
      case 2: dotTile<V, 2>(q, dim, keys, count, o, count); break;
      case 3: dotTile<V, 3>(q, dim, keys, count, o, count); break;
      default: dotTile<V, 4>(q, dim, keys, count, o, count); break;
    }
  }
}

// Every cache line of one key (a graph scan jumps around memory: the hardware prefetcher cannot
// guess the next key, and a key spans several lines). always_inline: GCC deletes the calls of an
// out-of-line function whose only effect is prefetching (attention_kernels.inl).
template <class K>
__attribute__((always_inline)) inline void prefetchKey(const K* key, int32_t dim) {
  for (int32_t i = 0; i < dim; i += int32_t(64 / sizeof(K))) __builtin_prefetch(key + i);
}

template <class V, class K>
void maxDotGather(const float* queries, int32_t rows, int32_t dim, const K* base, const uint32_t* ids, int64_t count,
                  float* out) {
  // Keys kAhead ahead are on their way while one is scored: several misses in flight at once.
  constexpr int64_t kAhead = 4;
  for (int64_t i = 0; i < std::min(count, kAhead); ++i) prefetchKey(base + size_t(ids[i]) * size_t(dim), dim);
  for (int64_t i = 0; i < count; ++i) {
    if (i + kAhead < count) prefetchKey(base + size_t(ids[i + kAhead]) * size_t(dim), dim);
    out[i] = maxDotOne<V>(queries, rows, dim, base + size_t(ids[i]) * size_t(dim));
  }
}

// out[i] = sum_t u[t] * rows[i * dim + t] in double (ActQKV's block scores) for `count` contiguous
// rows of f32, f16 or bf16 (ActQKV keeps its representatives in the store's dtype; widening is
// exact). Eight partial sums per row: element t fused into partial t % 8 in order of t, then a
// fixed tree, the contract of core/block_scores_args.h. Explicit fma (not a contraction left to
// the compiler) gives every SIMD level and the CUDA kernel the same bits.
template <DType T>
inline double rowElement(const void* rows, size_t i) {
  if constexpr (T == DType::F16) return double(kvslim::f16ToFloat(static_cast<const uint16_t*>(rows)[i]));
  else if constexpr (T == DType::BF16) return double(kvslim::bf16ToFloat(static_cast<const uint16_t*>(rows)[i]));
  else return double(static_cast<const float*>(rows)[i]);
}

template <DType T>
inline void dotsF64Of(const double* u, int32_t dim, const void* rows, int64_t count, double* out) {
  for (int64_t i = 0; i < count; ++i) {
    const size_t row = size_t(i) * size_t(dim);
    double part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int32_t t = 0;
#if defined(__AVX512F__)
    __m512d acc = _mm512_setzero_pd();
    for (; t + 8 <= dim; t += 8) {
      __m256 x;
      if constexpr (T == DType::F16) {
        x = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(rows) + row + t)));
      } else if constexpr (T == DType::BF16) {
        const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(rows) + row + t));
        x = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
      } else {
        x = _mm256_loadu_ps(static_cast<const float*>(rows) + row + t);
      }
      acc = _mm512_fmadd_pd(_mm512_cvtps_pd(x), _mm512_loadu_pd(u + t), acc);
    }
    _mm512_storeu_pd(part, acc);
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
    __m256d low = _mm256_setzero_pd(), high = _mm256_setzero_pd();
    for (; t + 8 <= dim; t += 8) {
      __m256 x;
      if constexpr (T == DType::F16) {
        x = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(rows) + row + t)));
      } else if constexpr (T == DType::BF16) {
        const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(rows) + row + t));
        x = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
      } else {
        x = _mm256_loadu_ps(static_cast<const float*>(rows) + row + t);
      }
      low = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(x)), _mm256_loadu_pd(u + t), low);
      high = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(x, 1)), _mm256_loadu_pd(u + t + 4), high);
    }
    _mm256_storeu_pd(part, low);
    _mm256_storeu_pd(part + 4, high);
#else
    for (; t + 8 <= dim; t += 8)
      for (int32_t k = 0; k < 8; ++k) part[k] = __builtin_fma(rowElement<T>(rows, row + size_t(t + k)), u[t + k], part[k]);
#endif
    for (; t < dim; ++t) part[t % 8] = __builtin_fma(rowElement<T>(rows, row + size_t(t)), u[t], part[t % 8]);
    out[i] = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
  }
}

inline void dotsF64(const double* u, int32_t dim, const void* rows, DType type, int64_t count, double* out) {
  switch (type) {
    case DType::F16: dotsF64Of<DType::F16>(u, dim, rows, count, out); break;
    case DType::BF16: dotsF64Of<DType::BF16>(u, dim, rows, count, out); break;
    default: dotsF64Of<DType::F32>(u, dim, rows, count, out); break;
  }
}

template <class V>
void boxBound(const float* queries, int32_t rows, int32_t dim, const float* lo, const float* hi, int64_t pages,
              float* out) {
  for (int64_t p = 0; p < pages; ++p) {
    const float* l = lo + size_t(p) * size_t(dim);
    const float* h = hi + size_t(p) * size_t(dim);
    float best = -INFINITY;
    for (int32_t r = 0; r < rows; ++r) {
      const float* q = queries + size_t(r) * size_t(dim);
      typename V::R acc = V::zero();
      int32_t i = 0;
      for (; i + V::W <= dim; i += V::W) {
        const typename V::R qi = V::load(q + i);
        acc = V::add(acc, V::max(V::mul(qi, V::load(l + i)), V::mul(qi, V::load(h + i))));
      }
      float sum = V::reduceAdd(acc);
      for (; i < dim; ++i) sum += std::max(q[i] * l[i], q[i] * h[i]);
      best = std::max(best, sum);
    }
    out[p] = best;
  }
}

// Softmax of row[0, visible) in place, zeros after: max, then exp2((x - max) * log2(e)) summed in
// the same pass, then one scaling pass.
template <class V>
void softmaxRow(float* row, int64_t visible, int64_t total) {
  using R = typename V::R;
  constexpr float kLog2e = 1.4426950408889634f;
  int64_t i = 0;
  R high = V::set1(-INFINITY);
  for (; i + V::W <= visible; i += V::W) high = V::max(high, V::load(row + i));
  float max = V::reduceMax(high);
  for (; i < visible; ++i) max = std::max(max, row[i]);
  const R offset = V::set1(-max * kLog2e), log2e = V::set1(kLog2e);
  R sums = V::zero();
  for (i = 0; i + V::W <= visible; i += V::W) {
    const R e = V::exp2(V::fmadd(V::load(row + i), log2e, offset));
    V::store(row + i, e);
    sums = V::add(sums, e);
  }
  float sum = V::reduceAdd(sums);
  for (; i < visible; ++i) {
    row[i] = std::exp2((row[i] - max) * kLog2e);
    sum += row[i];
  }
  const float inverse = sum > 0 ? 1.0f / sum : 0.0f;
  const R scale = V::set1(inverse);
  for (i = 0; i + V::W <= visible; i += V::W) V::store(row + i, V::mul(V::load(row + i), scale));
  for (; i < visible; ++i) row[i] *= inverse;
  for (i = visible; i < total; ++i) row[i] = 0.0f;
}

// Written as the drivers wrote it (a scaling pass, softmaxRow, an accumulating pass), so the sums
// are the same bits; here the passes are compiled for the ISA, and a row's zeros past `visible`
// are neither written nor added.
template <class V>
void softmaxInto(float* row, int64_t visible, float unit, double* sums, int64_t count) {
  if (unit != 1.0f) {
    for (int64_t i = 0; i < visible; ++i) row[i] *= unit;
  }
  softmaxRow<V>(row, visible, visible);
  for (int64_t i = 0; i < count; ++i) sums[i] += double(row[i]);
}
