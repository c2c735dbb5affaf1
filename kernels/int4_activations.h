// The int4 loop's activations (part of int4_gemv.cpp, which includes it): each call's x, float32 or bf16,
// rounded to int8 once and put into the order its codes multiply (int4_codes.h), with each group's start,
// before the first weight is read. The rounding is also vnni_prefill.cpp's (through quantize_int8).

#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

#include "int4_codes.h"

namespace minaf3_int4 {

// Row m of x (M, K), float32 or bfloat16, as float32: in place, or widened into `buffer`.
inline const float* float_row(const at::Tensor& x, int64_t m, std::vector<float>& buffer) {
  const int64_t K = x.size(1);
  if (x.scalar_type() == at::kFloat) return x.data_ptr<float>() + m * K;
  const c10::BFloat16* row = x.data_ptr<c10::BFloat16>() + m * K;
  buffer.resize(K);
  for (int64_t k = 0; k < K; ++k) buffer[k] = static_cast<float>(row[k]);
  return buffer.data();
}

// The largest of 8 floats.
inline float largest_of(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

// One row of activations, float32, as int8 per group of G columns (a multiple of 8): the scale is the
// group's largest magnitude / 127 and each value is rounded to the nearest multiple of it (ties to even); a
// group holding a NaN or an infinity gets scale NaN, so that it poisons its outputs as it would in float32.
// q (K) int8 in column order, group_scale (K / G). The rounding of every int8-activation product (this
// loop's and vnni_prefill.cpp's, through quantize_int8). AVX2, which every CPU the kernels run on has.
inline void quantize_row(const float* row, int64_t K, int64_t G, int8_t* q, float* group_scale) {
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF)), zero = _mm256_setzero_ps();
  const __m256 top = _mm256_set1_ps(127.0f), bottom = _mm256_set1_ps(-127.0f);
  for (int64_t g = 0; g < K / G; ++g) {
    __m256 largest = zero, bad = zero;
    for (int64_t k = g * G; k < (g + 1) * G; k += 8) {
      const __m256 v = _mm256_loadu_ps(row + k);
      bad = _mm256_or_ps(bad, _mm256_cmp_ps(_mm256_sub_ps(v, v), zero, _CMP_UNORD_Q));  // NaN or +-inf
      largest = _mm256_max_ps(largest, _mm256_and_ps(v, magnitude));
    }
    const bool finite = _mm256_movemask_ps(bad) == 0;
    const float big = largest_of(largest);
    group_scale[g] = finite ? big / 127.0f : NAN;
    // Zeros for a group that is not finite (its scale NaN), for an all-zero group, and for one so small
    // (below 127 / FLT_MAX) that 127 / big overflows: its values are then below 1e-36 each.
    const float reciprocal = 127.0f / big;
    const bool usable = finite && big > 0 && std::isfinite(reciprocal);
    const __m256 inverse = _mm256_set1_ps(usable ? reciprocal : 0.0f);
    for (int64_t k = g * G; k < (g + 1) * G; k += 8) {
      const __m256 v = finite ? _mm256_mul_ps(_mm256_loadu_ps(row + k), inverse) : zero;
      const __m256 r = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);  // ties to even
      const __m256i i = _mm256_cvtps_epi32(_mm256_min_ps(top, _mm256_max_ps(bottom, r)));
      // 8 int32 -> 8 int8: packing works within each 128-bit half, whose first 4 bytes are then its values
      const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(i, i), _mm256_setzero_si256());
      const int32_t low = _mm256_cvtsi256_si32(bytes), high = _mm256_extract_epi32(bytes, 4);
      std::memcpy(q + k, &low, 4);
      std::memcpy(q + k + 4, &high, 4);
    }
  }
}

// x (M, K) float32 or bfloat16 -> the loop's activations: quantize_row's int8 values, each 8 columns
// reordered as the 4 even ones, then the 4 odd ones (M, K); each group's start, -8 times the sum of its int8
// values, exact (M, K / G) int32; and each group's activation scale (M, K / G) float32.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> prepare_int8(const at::Tensor& x, int64_t G) {
  const int64_t M = x.size(0), K = x.size(1), groups = K / G;
  at::Tensor xp = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor start = at::empty({M, groups}, x.options().dtype(at::kInt));
  at::Tensor xscale = at::empty({M, groups}, x.options().dtype(at::kFloat));
  std::vector<int8_t> q(K);  // one row's int8 values, in column order
  std::vector<float> widened;
  const __m128i even_then_odd = _mm_setr_epi8(0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15);
  for (int64_t m = 0; m < M; ++m) {
    quantize_row(float_row(x, m, widened), K, G, q.data(), xscale.data_ptr<float>() + m * groups);
    int8_t* out = xp.data_ptr<int8_t>() + m * K;
    for (int64_t k = 0; k < K; k += 16) {
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q.data() + k));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + k), _mm_shuffle_epi8(v, even_then_odd));
    }
    int32_t* sums = start.data_ptr<int32_t>() + m * groups;
    for (int64_t g = 0; g < groups; ++g) {
      int32_t sum = 0;
      for (int64_t k = g * G; k < (g + 1) * G; ++k) sum += q[k];
      sums[g] = -8 * sum;
    }
  }
  return {xp, start, xscale};
}

}  // namespace minaf3_int4
