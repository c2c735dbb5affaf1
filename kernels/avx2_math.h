// Vector math on eight float32 lanes (AVX2), shared by the CPU kernels that include it (cpu_attention.cpp,
// decode_ops.cpp): loads that widen bfloat16, a horizontal sum, and exp.

#pragma once

#include <c10/util/BFloat16.h>
#include <immintrin.h>

namespace minaf3_avx2 {

// Eight float32 values from p: float32 as is, bfloat16 widened (its bits are the top half of a float32).
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}

// The sum of the eight lanes.
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// exp(x) for x <= 0 (attention scores minus their maximum, -|g| in SiLU): x = n ln2 + r with |r| <= ln2 / 2,
// exp(r) by Cephes' degree-6 polynomial, 2^n built in the exponent bits; exactly 0 below -87.3 (where
// float32's exp is denormal or 0), so hidden slots (-inf) weigh nothing and silu(-inf) is -inf * 0 = NaN, as
// torch's. A NaN stays NaN, so a corrupt score poisons its row as in the eager path instead of vanishing
// from the softmax.
inline __m256 exp8(__m256 x) {
  const __m256 lowest = _mm256_set1_ps(-87.33654f);
  const __m256 keep = _mm256_cmp_ps(x, lowest, _CMP_NLT_UQ);  // x >= lowest, or NaN
  x = _mm256_max_ps(lowest, x);  // maxps returns its second operand, x, when either is NaN
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // r = x - n ln2, with ln2 split in two so that n * ln2_hi is exact
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_add_ps(_mm256_fmadd_ps(y, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
  const __m256i biased = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
  const __m256i pow2n = _mm256_slli_epi32(_mm256_max_epi32(biased, _mm256_setzero_si256()), 23);
  return _mm256_and_ps(_mm256_mul_ps(y, _mm256_castsi256_ps(pow2n)), keep);
}

}  // namespace minaf3_avx2
