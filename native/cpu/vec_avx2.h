// AVX2 + FMA + F16C vectors of 8 floats. Included inside an anonymous namespace by kernels_avx2.cc.
struct VecAvx2 {
  using R = __m256;
  static constexpr int W = 8;
  static constexpr int kPrefillRows = 4;  // 8 accumulators + operands fit 16 ymm registers
  static constexpr const char* kName = "avx2";
  static R zero() { return _mm256_setzero_ps(); }
  static R set1(float x) { return _mm256_set1_ps(x); }
  static R load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, R x) { _mm256_storeu_ps(p, x); }
  static R loadF16(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static R loadBF16(const uint16_t* p) {
    __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
  }
  static float halfToFloat(uint16_t h) { return _cvtsh_ss(h); }
  // count f16 values as floats, 8 at a time (F16C) with a scalar tail.
  static void halvesToFloats(const uint16_t* in, float* out, int32_t count) {
    int32_t i = 0;
    for (; i + 8 <= count; i += 8) _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i))));
    for (; i < count; ++i) out[i] = _cvtsh_ss(in[i]);
  }
  // Codes first .. first + 7 (first % 8 == 0) of a KIVI run packed `32 / BITS` per word, as floats.
  template <int BITS>
  static R codes(const uint32_t* words, int32_t first) {
    if constexpr (BITS == 8) {
      const auto* bytes = reinterpret_cast<const uint8_t*>(words) + first;
      return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes))));
    } else if constexpr (BITS == 4) {
      const __m256i word = _mm256_set1_epi32(int(words[first / 8]));
      const __m256i shifts = _mm256_set_epi32(28, 24, 20, 16, 12, 8, 4, 0);
      return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(word, shifts), _mm256_set1_epi32(15)));
    } else {
      const __m256i word = _mm256_set1_epi32(int(words[first / 16]));
      const __m256i shifts = _mm256_add_epi32(_mm256_set_epi32(14, 12, 10, 8, 6, 4, 2, 0), _mm256_set1_epi32((first % 16) * 2));
      // The permute reads a shifted lane's low 3 bits (its code and one bit of the next): the
      // table holds k & 3 at index k, the code as a float without a mask and a conversion.
      const __m256 values = _mm256_set_ps(3, 2, 1, 0, 3, 2, 1, 0);
      return _mm256_permutevar8x32_ps(values, _mm256_srlv_epi32(word, shifts));
    }
  }
  // Transposes the 8 x 8 floats of r in place: lane j of r[i] becomes lane i of r[j].
  static void transpose(R* r) {
    R t[8];
    for (int i = 0; i < 4; ++i) {  // pairs of rows interleaved within 128-bit lanes
      t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
      t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    R u[8];  // u[4g + c], lane L: column 4L + c of rows 4g .. 4g + 3
    for (int g = 0; g < 2; ++g) {
      const __m256d a = _mm256_castps_pd(t[4 * g]), b = _mm256_castps_pd(t[4 * g + 1]);
      const __m256d c = _mm256_castps_pd(t[4 * g + 2]), d = _mm256_castps_pd(t[4 * g + 3]);
      u[4 * g] = _mm256_castpd_ps(_mm256_unpacklo_pd(a, c));
      u[4 * g + 1] = _mm256_castpd_ps(_mm256_unpackhi_pd(a, c));
      u[4 * g + 2] = _mm256_castpd_ps(_mm256_unpacklo_pd(b, d));
      u[4 * g + 3] = _mm256_castpd_ps(_mm256_unpackhi_pd(b, d));
    }
    for (int c = 0; c < 4; ++c) {
      r[c] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x20);
      r[4 + c] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x31);
    }
  }
  static R fmadd(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  static R mul(R a, R b) { return _mm256_mul_ps(a, b); }
  static R add(R a, R b) { return _mm256_add_ps(a, b); }
  static R max(R a, R b) { return _mm256_max_ps(a, b); }
  static float reduceAdd(R x) {
    __m128 sum = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
    sum = _mm_add_ss(sum, _mm_movehdup_ps(sum));
    return _mm_cvtss_f32(sum);
  }
  static float reduceMax(R x) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
  }
  // Accumulators the decode dot products keep in flight (of 16 ymm registers).
  static constexpr int kDotAccumulators = 8;
  // out[i] = sum of the lanes of in[i], i < 8, by a shuffle tree (see VecAvx512::reduceMany).
  static void reduceMany(const R* in, float* out) {
    // The tree leaves the vector in slot (2 * element + half) in final lane (4 * half + element).
    R a[8];
    for (int s = 0; s < 8; ++s) a[s] = in[(s % 2) * 4 + s / 2];
    R x[4];
    for (int i = 0; i < 4; ++i)
      x[i] = _mm256_add_ps(_mm256_permute2f128_ps(a[2 * i], a[2 * i + 1], 0x20), _mm256_permute2f128_ps(a[2 * i], a[2 * i + 1], 0x31));
    const R z0 = _mm256_add_ps(_mm256_unpacklo_ps(x[0], x[1]), _mm256_unpackhi_ps(x[0], x[1]));
    const R z1 = _mm256_add_ps(_mm256_unpacklo_ps(x[2], x[3]), _mm256_unpackhi_ps(x[2], x[3]));
    _mm256_storeu_ps(out, _mm256_add_ps(_mm256_shuffle_ps(z0, z1, 0x44), _mm256_shuffle_ps(z0, z1, 0xEE)));
  }
  // 2^x: x = i + f with f in [-0.5, 0.5], 2^f by a degree-6 polynomial (rel. error < 2e-7),
  // 2^i through the exponent bits; exactly 0 below -126 (masked scores are -inf).
  static R exp2(R x) {
    const R lowest = _mm256_set1_ps(-126.0f);
    const R underflow = _mm256_cmp_ps(x, lowest, _CMP_LT_OQ);
    x = _mm256_min_ps(_mm256_max_ps(x, lowest), _mm256_set1_ps(127.0f));
    const R whole = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const R f = _mm256_sub_ps(x, whole);
    R p = _mm256_set1_ps(1.5403530393381606e-4f);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3333558146428443e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.6181291076284772e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.5504108664821580e-2f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.4022650695910071e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.9314718055994531e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(whole), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(underflow, _mm256_mul_ps(p, _mm256_castsi256_ps(bits)));
  }
};
