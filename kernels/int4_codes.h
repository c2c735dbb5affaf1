// The int4 loop's codes, one per instruction set (part of int4_gemv.cpp, which includes it: a kernel builds
// from one source and the headers beside it). A tile's word w is one 32-bit lane per row (int4_layout.h):
// its 8 nibbles are columns 8w .. 8w + 7 of that row, the low nibbles of its 4 bytes the even columns and
// the high nibbles the odd ones. Each code multiplies a vector of such words by the 8 activations of those
// columns, broadcast to every lane, into one int32 accumulator per lane (that is, per row); int4_gemv.cpp's
// loop converts, scales and adds up each group's sums.
// The activations are rounded to int8 once per call, per group of G columns with a scale of their own
// (x ~ xs * xq; int4_activations.h), in the order the even columns of each 8, then the odd ones, so that the
// nibbles, masked to bytes, multiply them as they lie: the 4 even-column bytes of a lane by one broadcast
// word of activations, the 4 odd ones by the next. Each group's activations are then off by at most half
// their scale, about the bf16 rounding's size for a group without outliers, far below int4's own error.
// The products are exact integers, summed exactly in int32:
//   - AVX-512 VNNI (the default where the CPU has it): _mm512_dpbusd_epi32 multiplies 64 bytes by 64 and
//     adds each lane's 4 products to it, one instruction;
//   - AVX-512 (BW) or AVX2 alone: _mm512_maddubs_epi16 / _mm256_maddubs_epi16 multiply and add byte pairs
//     into int16 (at most 2 x 15 x 127 = 3810: never saturates), the even and odd pairs are added
//     (at most 7620), and a multiply-add by ones widens each lane's 2 int16 to its int32 sum: 4
//     instructions for what VNNI does in 2, and a fifth of the instructions of converting nibbles to float.
// Every CPU with AVX-512 BF16 also has AVX-512 VNNI, whose code does twice the products per instruction of
// a bf16 dot product: the loop has no bf16 code.

#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#pragma GCC diagnostic ignored "-Wpsabi"  // __m512 in generic code: always inlined (see int8_gemv.cpp)

namespace minaf3_int4 {

// Each Isa: kLanes rows a vector (a tile of 16 rows is kHalves vectors, at 4 * kLanes bytes from each
// other within a word), at most kMaxBT activation rows a pass over a tile, kStreams tiles a one-row pass
// (int4_gemv.cpp's rows_kernel). Acc: a lane's sums within a group, from begin (the group's start: -8
// times the sum of its int8 activations) to finish (converted, multiplied by the weight's and the
// activations' scales and added to the lane's total). A short last tile's words are loaded under a Mask of
// the rows it has (a masked-out lane reads nothing).

struct Avx2 {
  // 16 ymm registers: 2 halves x 2 tiles (or BT rows) of sums and totals, the words
  static constexpr int kLanes = 8, kHalves = 2, kMaxBT = 2, kStreams = 2;
  using Vec = __m256;
  using Raw = __m256i;
  using Mask = __m256i;
  using Acc = __m256i;
  static inline Mask mask(int lanes) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(lanes), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static inline Raw load(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static inline Raw load(const uint8_t* p, Mask m) {
    return _mm256_maskload_epi32(reinterpret_cast<const int*>(p), m);
  }
  static inline Acc begin(int32_t start) { return _mm256_set1_epi32(start); }
  // acc[b] += the word's products with the 8 activations of row b at x + b * xs
  template <int BT>
  static inline void dot(Raw v, const int8_t* x, int64_t xs, Acc* acc) {
    const __m256i nibble = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    const __m256i lo = _mm256_and_si256(v, nibble), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
#pragma GCC unroll 2
    for (int b = 0; b < BT; ++b) {
      int32_t even, odd;
      std::memcpy(&even, x + b * xs, 4);
      std::memcpy(&odd, x + b * xs + 4, 4);
      const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_set1_epi32(even)),
                                             _mm256_maddubs_epi16(hi, _mm256_set1_epi32(odd)));
      acc[b] = _mm256_add_epi32(acc[b], _mm256_madd_epi16(pairs, ones));
    }
  }
  // kLanes bf16 scales as float32
  static inline Vec scales(const uint16_t* s) {
    const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
  }
  static inline Vec finish(Acc acc, Vec scale, float xscale, Vec total) {
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), _mm256_mul_ps(scale, _mm256_set1_ps(xscale)), total);
  }
  static inline Vec zero() { return _mm256_setzero_ps(); }
  static inline void store(float* out, Vec v) { _mm256_storeu_ps(out, v); }
};

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq")
struct Avx512 {
  static constexpr int kLanes = 16, kHalves = 1, kMaxBT = 4, kStreams = 4;
  using Vec = __m512;
  using Raw = __m512i;
  using Mask = __mmask16;
  using Acc = __m512i;
  static inline Mask mask(int lanes) { return static_cast<Mask>((1u << lanes) - 1); }
  static inline Raw load(const uint8_t* p) { return _mm512_loadu_si512(p); }
  static inline Raw load(const uint8_t* p, Mask m) { return _mm512_maskz_loadu_epi32(m, p); }
  static inline Acc begin(int32_t start) { return _mm512_set1_epi32(start); }
  template <int BT>
  static inline void dot(Raw v, const int8_t* x, int64_t xs, Acc* acc) {
    const __m512i nibble = _mm512_set1_epi8(0x0F), ones = _mm512_set1_epi16(1);
    const __m512i lo = _mm512_and_si512(v, nibble), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
#pragma GCC unroll 4
    for (int b = 0; b < BT; ++b) {
      int32_t even, odd;
      std::memcpy(&even, x + b * xs, 4);
      std::memcpy(&odd, x + b * xs + 4, 4);
      const __m512i pairs = _mm512_add_epi16(_mm512_maddubs_epi16(lo, _mm512_set1_epi32(even)),
                                             _mm512_maddubs_epi16(hi, _mm512_set1_epi32(odd)));
      acc[b] = _mm512_add_epi32(acc[b], _mm512_madd_epi16(pairs, ones));
    }
  }
  static inline Vec scales(const uint16_t* s) {
    const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
  }
  static inline Vec finish(Acc acc, Vec scale, float xscale, Vec total) {
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), _mm512_mul_ps(scale, _mm512_set1_ps(xscale)), total);
  }
  static inline Vec zero() { return _mm512_setzero_ps(); }
  static inline void store(float* out, Vec v) { _mm512_storeu_ps(out, v); }
};
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")
struct Avx512Vnni : Avx512 {  // Avx512's loads and finish, one instruction for 64 products
  struct Acc {
    __m512i even, odd;  // two chains, the low nibbles' products and the high ones': added at the finish
  };
  static inline Acc begin(int32_t start) { return {_mm512_set1_epi32(start), _mm512_setzero_si512()}; }
  template <int BT>
  static inline void dot(Raw v, const int8_t* x, int64_t xs, Acc* acc) {
    const __m512i nibble = _mm512_set1_epi8(0x0F);
    const __m512i lo = _mm512_and_si512(v, nibble), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
#pragma GCC unroll 4
    for (int b = 0; b < BT; ++b) {
      int32_t even, odd;
      std::memcpy(&even, x + b * xs, 4);
      std::memcpy(&odd, x + b * xs + 4, 4);
      acc[b].even = _mm512_dpbusd_epi32(acc[b].even, lo, _mm512_set1_epi32(even));
      acc[b].odd = _mm512_dpbusd_epi32(acc[b].odd, hi, _mm512_set1_epi32(odd));
    }
  }
  static inline Vec finish(Acc acc, Vec scale, float xscale, Vec total) {
    return Avx512::finish(_mm512_add_epi32(acc.even, acc.odd), scale, xscale, total);
  }
};
#pragma GCC pop_options

}  // namespace minaf3_int4
