// One-lane "vector" for the portable kernels: the same templates as the SIMD builds, W = 1.
// Included inside an anonymous namespace by kernels_scalar.cc.
struct VecScalar {
  using R = float;
  static constexpr int W = 1;
  static constexpr int kPrefillRows = 4;
  static constexpr const char* kName = "scalar";
  static R zero() { return 0.0f; }
  static R set1(float x) { return x; }
  static R load(const float* p) { return *p; }
  static void store(float* p, R x) { *p = x; }
  static R loadF16(const uint16_t* p) { return kvslim::f16ToFloat(*p); }
  static R loadBF16(const uint16_t* p) { return kvslim::bf16ToFloat(*p); }
  static float halfToFloat(uint16_t h) { return kvslim::f16ToFloat(h); }
  static void halvesToFloats(const uint16_t* in, float* out, int32_t count) {
    for (int32_t i = 0; i < count; ++i) out[i] = kvslim::f16ToFloat(in[i]);
  }
  static void transpose(R*) {}  // 1 x 1
  // Code `first` of a KIVI run packed `32 / BITS` per word, as a float.
  template <int BITS>
  static R codes(const uint32_t* words, int32_t first) {
    constexpr int32_t perWord = 32 / BITS;
    return float((words[first / perWord] >> ((first % perWord) * BITS)) & ((1u << BITS) - 1u));
  }
  static R fmadd(R a, R b, R c) { return a * b + c; }
  static R mul(R a, R b) { return a * b; }
  static R add(R a, R b) { return a + b; }
  static R max(R a, R b) { return a > b ? a : b; }
  static float reduceAdd(R x) { return x; }
  static float reduceMax(R x) { return x; }
  static constexpr int kDotAccumulators = 8;  // at least kMaxDecodeRows
  static void reduceMany(const R* in, float* out) {
    for (int i = 0; i < kDotAccumulators; ++i) out[i] = in[i];
  }
  // 2^x, exactly 0 below -126 (masked scores are -inf).
  static R exp2(R x) { return x < -126.0f ? 0.0f : std::exp2(x); }
};
