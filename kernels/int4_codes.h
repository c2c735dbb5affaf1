// The int4 loop's codes, one per instruction set (part of int4_gemv.cpp, which includes it: a kernel builds
// from one source and the headers beside it). Each multiplies a step of a packed weight row by activations
// prepared in its own order (int4_activations.h), into vector lanes that int4_gemv.cpp's loop scales and
// sums. How the nibbles become products:
//   - AVX-512 VNNI (the default where the CPU has it; every CPU with AVX-512 BF16 does): the activations are
//     rounded to int8 once per call, per group of G columns with a scale of their own (x ~ xs * xq), and
//     _mm512_dpbusd_epi32 multiplies 64 nibbles, masked to bytes, by 64 of them at once, summing exactly in
//     int32: half the vector instructions per weight of the bf16 code, whose decode stops at the CPU rather
//     than at the memory on fast memory. Each group's activations are then off by at most half their
//     scale, about the bf16 rounding's size for a group without outliers, far below int4's own error.
//   - AVX-512 BF16: a nibble becomes the bf16 number 128 + q with one bitwise operation (its bits are
//     0x4300 | q), and _mm512_dpbf16_ps multiplies 32 of them by bf16 activations at once; the 128 joins
//     the 8. Products of bf16 values are exact in float32 and the sums are float32: only the activations
//     are rounded, to bf16 (a relative 2^-8 at most, far below int4's own error).
//   - AVX-512 or AVX2 alone: the nibbles are widened to int32 and converted to float32, with float32
//     activations.

#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#pragma GCC diagnostic ignored "-Wpsabi"  // __m512 in generic code: always inlined (see int8_gemv.cpp)

namespace minaf3_int4 {

inline float bf16_to_float(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float f;
  return std::memcpy(&f, &wide, sizeof f), f;
}

inline uint16_t float_to_bf16(float v) {  // round to nearest even, as torch's conversion (no NaN here)
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  return static_cast<uint16_t>((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

// Each Isa: kStep columns per step (kStep / 2 bytes of a row) in vectors of kLanes floats; activations of
// type X, position j of a step holding column source(j) and adding to accumulator lane lane(j); kBias, the
// constant its unpacked nibbles carry (dot multiplies q + kBias); scales<G>, each lane's scale in a step.

struct Avx2 {
  static constexpr int kStep = 16, kLanes = 8;  // 8 bytes -> 8 int32 lanes: low nibbles, then high ones
  static constexpr float kBias = 0.0f;
  using X = float;
  using Vec = __m256;
  using Acc = Vec;  // what dot accumulates into; begin gives its start, finish adds it, scaled, to a total
  static inline Acc begin(const float* start) { return _mm256_loadu_ps(start); }
  static inline Vec finish(Acc acc, Vec scale, const float*, Vec total) {
    return _mm256_fmadd_ps(acc, scale, total);
  }
  static inline Vec zero() { return _mm256_setzero_ps(); }
  static inline Vec load(const float* p) { return _mm256_loadu_ps(p); }
  static inline Vec fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
  static inline float sum(Vec v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
  static inline int64_t source(int64_t j) { return j < 8 ? 2 * j : 2 * (j - 8) + 1; }
  static inline int64_t lane(int64_t j) { return j % 8; }
  // acc[b] += the step's 16 weights of the row at w times the BT activation rows at x (stride xs).
  template <int BT>
  static inline void dot(const uint8_t* w, const X* x, int64_t xs, Vec* acc) {
    const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w)));
    const Vec lo = _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(0x0F)));
    const Vec hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
    for (int b = 0; b < BT; ++b) acc[b] = fma(load(x + b * xs + 8), hi, fma(load(x + b * xs), lo, acc[b]));
  }
  template <int G>  // a step lies within one group
  static inline Vec scales(const uint16_t* s, int64_t k) { return _mm256_set1_ps(bf16_to_float(s[k / G])); }
  // R * BT group sums and as many totals, a row's 2 weight vectors and an activation: 16 ymm registers
  static constexpr int rows_per_block(int64_t M) { return M <= 1 ? 4 : 2; }
  static constexpr int max_bt(int64_t M) { return M <= 1 ? 1 : 2; }
};

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq")
struct Avx512 {
  static constexpr int kStep = 32, kLanes = 16;  // 16 bytes -> 16 int32 lanes
  static constexpr float kBias = 0.0f;
  using X = float;
  using Vec = __m512;
  using Acc = Vec;
  static inline Acc begin(const float* start) { return _mm512_loadu_ps(start); }
  static inline Vec finish(Acc acc, Vec scale, const float*, Vec total) {
    return _mm512_fmadd_ps(acc, scale, total);
  }
  static inline Vec zero() { return _mm512_setzero_ps(); }
  static inline Vec load(const float* p) { return _mm512_loadu_ps(p); }
  static inline Vec fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
  static inline float sum(Vec v) { return _mm512_reduce_add_ps(v); }
  static inline int64_t source(int64_t j) { return j < 16 ? 2 * j : 2 * (j - 16) + 1; }
  static inline int64_t lane(int64_t j) { return j % 16; }
  template <int BT>
  static inline void dot(const uint8_t* w, const X* x, int64_t xs, Vec* acc) {
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
    const Vec lo = _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(0x0F)));
    const Vec hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
    for (int b = 0; b < BT; ++b) acc[b] = fma(load(x + b * xs + 16), hi, fma(load(x + b * xs), lo, acc[b]));
  }
  template <int G>
  static inline Vec scales(const uint16_t* s, int64_t k) { return _mm512_set1_ps(bf16_to_float(s[k / G])); }
  // One activation row (decode): 8 weight rows a block, each read as a run of its own (int4_gemv.cpp's
  // rows_kernel): more streams in flight on each core, which a Zen 4's memory serves faster than 4.
  static constexpr int rows_per_block(int64_t M) { return M <= 1 ? 8 : 4; }
  static constexpr int max_bt(int64_t) { return 2; }
  // For the codes whose lane l covers columns k + 8l .. k + 8l + 7 of a 128-column step (Avx512Bf16,
  // Avx512Vnni): the scale of group (k + 8l) / G, for 128 / G groups.
  template <int G>
  static inline Vec eight_column_scales(const uint16_t* s, int64_t k) {
    if constexpr (G == 128) {
      return _mm512_set1_ps(bf16_to_float(s[k / G]));
    } else {
      // The step's 4 (G = 32) or 2 (G = 64) scales, read without passing the row's end; word 2l + 1 of the
      // result takes scale 8l / G and word 2l is zero: lane l is that scale as a float32.
      const __m128i bits = G == 32 ? _mm_loadl_epi64(reinterpret_cast<const __m128i*>(s + k / G))
                                   : _mm_cvtsi32_si128(*reinterpret_cast<const int32_t*>(s + k / G));
      const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
      const __m512i idx = _mm512_slli_epi32(_mm512_srli_epi32(lane, G == 32 ? 2 : 3), 16);
      const __m512i wide = _mm512_maskz_permutexvar_epi16(0xAAAAAAAA, idx, _mm512_castsi128_si512(bits));
      return _mm512_castsi512_ps(wide);
    }
  }
};
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")
struct Avx512Bf16 : Avx512 {  // Avx512's float32 vectors and blocking, bf16 products
  // 64 bytes = 32 words; word i holds columns 4i .. 4i + 3 in its four nibbles. Nibble j of every word,
  // masked and or-ed with 0x4300, is the bf16 128 + q (vector j), and dpbf16 pairs words 2l and 2l + 1:
  // lane l of vector j multiplies columns 8l + j and 8l + 4 + j, so every lane stays within 8 columns.
  static constexpr int kStep = 128;
  static constexpr float kBias = 128.0f;
  using X = uint16_t;  // bf16 bits
  // Position 32j + 2l + e of a step's activations holds column 8l + 4e + j.
  static inline int64_t source(int64_t p) { return 8 * ((p % 32) / 2) + 4 * (p % 2) + p / 32; }
  static inline int64_t lane(int64_t p) { return (p % 32) / 2; }
  template <int BT>
  static inline void dot(const uint8_t* w, const X* x, int64_t xs, Vec* acc) {
    const __m512i v = _mm512_loadu_si512(w);
    const __m512i mask = _mm512_set1_epi16(0x0F), one28 = _mm512_set1_epi16(0x4300);
    __m512i q[4];
    q[0] = _mm512_ternarylogic_epi32(v, mask, one28, 0xEA);  // (v & mask) | one28
    q[1] = _mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 4), mask, one28, 0xEA);
    q[2] = _mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 8), mask, one28, 0xEA);
    q[3] = _mm512_or_si512(_mm512_srli_epi16(v, 12), one28);
    for (int b = 0; b < BT; ++b)
      for (int j = 0; j < 4; ++j)
        acc[b] = _mm512_dpbf16_ps(acc[b], (__m512bh)_mm512_loadu_si512(x + b * xs + 32 * j), (__m512bh)q[j]);
  }
  template <int G>
  static inline Vec scales(const uint16_t* s, int64_t k) { return eight_column_scales<G>(s, k); }
};
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")
struct Avx512Vnni : Avx512 {  // int8 activations: 64 byte products an instruction, summed exactly in int32
  // 64 bytes = 128 columns: the low nibbles (columns 2i) and the high ones (2i + 1) as two vectors of bytes;
  // _mm512_dpbusd_epi32 sums 4 adjacent bytes into each int32 lane, so lane l takes columns 8l .. 8l + 7,
  // the lanes of Avx512Bf16 (and so its scales). Activations: per group of G columns, x ~ xs * xq with xq
  // int8 (xs = the group's largest magnitude / 127, xq rounded to nearest), so a lane's sum is
  // xs * (sum xq q - 8 sum xq): its start is the exact integer -8 sum xq, stored as int32 bits; finish
  // converts the sum to float32 and multiplies by the weight's and the activations' scales.
  static constexpr int kStep = 128;
  using X = int8_t;
  using Acc = __m512i;
  // Position p of a step's activations: the low-nibble bytes' columns, then the high ones'.
  static inline int64_t source(int64_t p) { return p < 64 ? 2 * p : 2 * (p - 64) + 1; }
  static inline int64_t lane(int64_t p) { return (p % 64) / 4; }
  static inline Acc begin(const float* start) { return _mm512_loadu_si512(start); }
  static inline Vec finish(Acc acc, Vec scale, const float* xscale, Vec total) {
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), _mm512_mul_ps(scale, _mm512_loadu_ps(xscale)), total);
  }
  template <int BT>
  static inline void dot(const uint8_t* w, const X* x, int64_t xs, Acc* acc) {
    const __m512i v = _mm512_loadu_si512(w), mask = _mm512_set1_epi8(0x0F);
    const __m512i lo = _mm512_and_si512(v, mask), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
    for (int b = 0; b < BT; ++b) {
      acc[b] = _mm512_dpbusd_epi32(acc[b], lo, _mm512_loadu_si512(x + b * xs));
      acc[b] = _mm512_dpbusd_epi32(acc[b], hi, _mm512_loadu_si512(x + b * xs + 64));
    }
  }
  template <int G>
  static inline Vec scales(const uint16_t* s, int64_t k) { return eight_column_scales<G>(s, k); }
};
#pragma GCC pop_options

}  // namespace minaf3_int4
