// AVX-512F/BW vectors of 16 floats. Included inside an anonymous namespace by kernels_avx512.cc.
struct VecAvx512 {
  using R = __m512;
  static constexpr int W = 16;
  static constexpr int kPrefillRows = 8;  // 16 accumulators + operands of 32 zmm registers
  static constexpr const char* kName = "avx512";
  static R zero() { return _mm512_setzero_ps(); }
  static R set1(float x) { return _mm512_set1_ps(x); }
  static R load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, R x) { _mm512_storeu_ps(p, x); }
  static R loadF16(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static R loadBF16(const uint16_t* p) {
    __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
  }
  static float halfToFloat(uint16_t h) { return _cvtsh_ss(h); }
  // count f16 values as floats, 8 at a time (F16C) with a scalar tail.
  static void halvesToFloats(const uint16_t* in, float* out, int32_t count) {
    int32_t i = 0;
    for (; i + 8 <= count; i += 8) _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i))));
    for (; i < count; ++i) out[i] = _cvtsh_ss(in[i]);
  }
  // Codes first .. first + 15 (first % 16 == 0) of a KIVI run packed `32 / BITS` per word, as floats.
  template <int BITS>
  static R codes(const uint32_t* words, int32_t first) {
    if constexpr (BITS == 8) {
      const auto* bytes = reinterpret_cast<const uint8_t*>(words) + first;
      return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes))));
    } else if constexpr (BITS == 4) {
      // A shifted lane's low 4 bits are its code: a permute of the floats 0..15 by them is the
      // code as a float (one instruction instead of a mask and a conversion).
      const __m512i pair = _mm512_castsi128_si512(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(words + first / 8)));
      const __m512i spread = _mm512_permutexvar_epi32(_mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0), pair);
      const __m512i shifts = _mm512_set_epi32(28, 24, 20, 16, 12, 8, 4, 0, 28, 24, 20, 16, 12, 8, 4, 0);
      const __m512 values = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
      return _mm512_permutexvar_ps(_mm512_srlv_epi32(spread, shifts), values);
    } else {
      // The permute reads a lane's low 4 bits: its code and the next one's low bits, so the
      // table holds k & 3 at index k.
      const __m512i word = _mm512_set1_epi32(int(words[first / 16]));
      const __m512i shifts = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
      const __m512 values = _mm512_set_ps(3, 2, 1, 0, 3, 2, 1, 0, 3, 2, 1, 0, 3, 2, 1, 0);
      return _mm512_permutexvar_ps(_mm512_srlv_epi32(word, shifts), values);
    }
  }
  // Transposes the 16 x 16 floats of r in place: lane j of r[i] becomes lane i of r[j].
  static void transpose(R* r) {
    R t[16];
    for (int i = 0; i < 8; ++i) {  // pairs of rows interleaved within 128-bit lanes
      t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
      t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    R u[16];  // u[4g + c], lane L: column 4L + c of rows 4g .. 4g + 3
    for (int g = 0; g < 4; ++g) {
      const __m512d a = _mm512_castps_pd(t[4 * g]), b = _mm512_castps_pd(t[4 * g + 1]);
      const __m512d c = _mm512_castps_pd(t[4 * g + 2]), d = _mm512_castps_pd(t[4 * g + 3]);
      u[4 * g] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
      u[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
      u[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
      u[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
    }
    for (int c = 0; c < 4; ++c) {  // row 4L + c gathers lane L of u[c], u[4 + c], u[8 + c], u[12 + c]
      const R v0 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x44), v1 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xEE);
      const R w0 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x44), w1 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xEE);
      r[c] = _mm512_shuffle_f32x4(v0, w0, 0x88);
      r[4 + c] = _mm512_shuffle_f32x4(v0, w0, 0xDD);
      r[8 + c] = _mm512_shuffle_f32x4(v1, w1, 0x88);
      r[12 + c] = _mm512_shuffle_f32x4(v1, w1, 0xDD);
    }
  }
  static R fmadd(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  static R mul(R a, R b) { return _mm512_mul_ps(a, b); }
  static R add(R a, R b) { return _mm512_add_ps(a, b); }
  static R max(R a, R b) { return _mm512_max_ps(a, b); }
  static float reduceAdd(R x) { return _mm512_reduce_add_ps(x); }
  static float reduceMax(R x) { return _mm512_reduce_max_ps(x); }
  // Accumulators the decode dot products keep in flight (of 32 zmm registers).
  static constexpr int kDotAccumulators = 16;
  // out[i] = sum of the lanes of in[i], i < 16, by a shuffle tree: 45 operations instead of 16
  // separate reductions of 9 dependent ones each.
  static void reduceMany(const R* in, float* out) {
    // The tree leaves vector (4 * lane + element) in final lane (4 * element + lane); feeding the
    // inputs transposed makes final lane i hold vector i.
    R a[16];
    for (int s = 0; s < 16; ++s) a[s] = in[(s % 4) * 4 + s / 4];
    R x[8], y[4];
    for (int i = 0; i < 8; ++i)
      x[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x44), _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xEE));
    for (int i = 0; i < 4; ++i)
      y[i] = _mm512_add_ps(_mm512_shuffle_f32x4(x[2 * i], x[2 * i + 1], 0x88), _mm512_shuffle_f32x4(x[2 * i], x[2 * i + 1], 0xDD));
    const R z0 = _mm512_add_ps(_mm512_unpacklo_ps(y[0], y[1]), _mm512_unpackhi_ps(y[0], y[1]));
    const R z1 = _mm512_add_ps(_mm512_unpacklo_ps(y[2], y[3]), _mm512_unpackhi_ps(y[2], y[3]));
    _mm512_storeu_ps(out, _mm512_add_ps(_mm512_shuffle_ps(z0, z1, 0x44), _mm512_shuffle_ps(z0, z1, 0xEE)));
  }
  // Same scheme as VecAvx2::exp2.
  static R exp2(R x) {
    const R lowest = _mm512_set1_ps(-126.0f);
    const __mmask16 underflow = _mm512_cmp_ps_mask(x, lowest, _CMP_LT_OQ);
    x = _mm512_min_ps(_mm512_max_ps(x, lowest), _mm512_set1_ps(127.0f));
    const R whole = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const R f = _mm512_sub_ps(x, whole);
    R p = _mm512_set1_ps(1.5403530393381606e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076284772e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650695910071e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718055994531e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(whole), _mm512_set1_epi32(127)), 23);
    return _mm512_maskz_mov_ps(__mmask16(~underflow), _mm512_mul_ps(p, _mm512_castsi512_ps(bits)));
  }
};
