// The int4 loop's activations (part of int4_gemv.cpp, which includes it): each call's x, float32 or bf16,
// put once into the order and type the code it runs multiplies (int4_codes.h), with each accumulator lane's
// start, before the first weight is read; and the int8 rounding shared by the VNNI loop and vnni_prefill.cpp.

#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <utility>
#include <vector>

#include "int4_codes.h"

namespace minaf3_int4 {

// Isa::source as a table, checked once: position j of a step holds a column of lane(j)'s C adjacent ones.
template <class Isa>
std::array<int, Isa::kStep> permutation() {
  constexpr int C = Isa::kStep / Isa::kLanes;
  std::array<int, Isa::kStep> table{};
  for (int j = 0; j < Isa::kStep; ++j) {
    table[j] = static_cast<int>(Isa::source(j));
    const int64_t lane = Isa::lane(j), first = C * lane;
    TORCH_CHECK(table[j] / C == lane, "int4_linear: lane ", lane, " multiplies column ", table[j],
                " of a step, not one of ", first, " .. ", first + C - 1);
  }
  return table;
}

// Row m of x (M, K), float32 or bfloat16, as float32: in place, or widened into `buffer`.
inline const float* float_row(const at::Tensor& x, int64_t m, std::vector<float>& buffer) {
  const int64_t K = x.size(1);
  if (x.scalar_type() == at::kFloat) return x.data_ptr<float>() + m * K;
  const c10::BFloat16* row = x.data_ptr<c10::BFloat16>() + m * K;
  buffer.resize(K);
  for (int64_t k = 0; k < K; ++k) buffer[k] = static_cast<float>(row[k]);
  return buffer.data();
}

// x (M, K) float32 or bfloat16 -> the activations in Isa's order (Isa::X), and the accumulators' starts: for
// each unit of U columns and each lane, -(8 + kBias) times the sum of the activations that lane multiplies
// there (as multiplied: bf16-rounded where they are). Every call pays this before its first weight, so each
// pass is a plain loop over a row: the rounding, the permutation (a table made once), and per lane one sum
// over the C = kStep / kLanes adjacent columns it multiplies in each step.
template <class Isa>
std::pair<at::Tensor, at::Tensor> prepare(const at::Tensor& x, int64_t G) {
  using X = typename Isa::X;
  constexpr int S = Isa::kStep, L = Isa::kLanes, C = S / L;
  static const std::array<int, S> source = permutation<Isa>();
  const int64_t M = x.size(0), K = x.size(1), U = std::max<int64_t>(G, S), starts = K / U * L;
  at::Tensor xp = at::empty({M, K * static_cast<int64_t>(sizeof(X))}, x.options().dtype(at::kByte));
  at::Tensor start = at::empty({M, starts}, x.options().dtype(at::kFloat));
  std::vector<float> rounded(K), widened;
  X* dst = reinterpret_cast<X*>(xp.data_ptr());
  float* lanes = start.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    const float* row = float_row(x, m, widened);
    for (int64_t k = 0; k < K; ++k)
      rounded[k] = sizeof(X) == 2 ? bf16_to_float(float_to_bf16(row[k])) : row[k];
    X* out = dst + m * K;
    for (int64_t k0 = 0; k0 < K; k0 += S) {
      for (int j = 0; j < S; ++j) {
        const float v = rounded[k0 + source[j]];
        if constexpr (sizeof(X) == 2) {
          uint32_t bits;  // v is a bf16 value: its top half is exactly its bf16 bits
          std::memcpy(&bits, &v, sizeof bits);
          out[k0 + j] = static_cast<uint16_t>(bits >> 16);
        } else {
          out[k0 + j] = v;
        }
      }
    }
    for (int64_t u0 = 0; u0 < K; u0 += U) {
      float* unit = lanes + m * starts + u0 / U * L;
      for (int l = 0; l < L; ++l) {
        float sum = 0.0f;
        for (int64_t k0 = u0; k0 < u0 + U; k0 += S)
          for (int c = 0; c < C; ++c) sum += rounded[k0 + C * l + c];
        unit[l] = -(8.0f + Isa::kBias) * sum;
      }
    }
  }
  return {xp, start};
}

// The low byte of each of the 32 words `words`, in order, to 32 bytes at `to`.
__attribute__((target("avx512f,avx512bw"))) inline void store_low_bytes(int8_t* to, __m512i words) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(to), _mm512_cvtepi16_epi8(words));
}

// One row of activations, float32, as int8 per group of G columns: the scale is the group's largest
// magnitude / 127 and each value is rounded to the nearest multiple of it (ties to even); a group holding a
// NaN or an infinity gets scale NaN, so that it poisons its outputs as it would in float32. q (K) int8 in
// column order, group_scale (K / G). The rounding of every int8-activation product (this loop's and
// vnni_prefill.cpp's, through quantize_int8).
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
inline void quantize_row(const float* row, int64_t K, int64_t G, int8_t* q, float* group_scale) {
  const __m512 top = _mm512_set1_ps(127.0f), bottom = _mm512_set1_ps(-127.0f);
  for (int64_t g = 0; g < K / G; ++g) {
    __m512 largest = _mm512_setzero_ps();
    __mmask16 bad = 0;
    for (int64_t k = g * G; k < (g + 1) * G; k += 16) {
      const __m512 v = _mm512_loadu_ps(row + k);
      bad |= _mm512_fpclass_ps_mask(v, 0x99);  // quiet or signalling NaN, + or - infinity
      largest = _mm512_max_ps(largest, _mm512_abs_ps(v));
    }
    const bool finite = bad == 0;
    const float big = _mm512_reduce_max_ps(largest);
    group_scale[g] = finite ? big / 127.0f : NAN;
    // Zeros for a group that is not finite (its scale NaN), for an all-zero group, and for one so small
    // (below 127 / FLT_MAX) that 127 / big overflows: its values are then below 1e-36 each.
    const float reciprocal = 127.0f / big;
    const bool usable = finite && big > 0 && std::isfinite(reciprocal);
    const __m512 inverse = _mm512_set1_ps(usable ? reciprocal : 0.0f);
    for (int64_t k = g * G; k < (g + 1) * G; k += 16) {
      const __m512 v = finite ? _mm512_mul_ps(_mm512_loadu_ps(row + k), inverse) : _mm512_setzero_ps();
      const __m512 r = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);  // ties even
      const __m512i i = _mm512_cvtps_epi32(_mm512_min_ps(top, _mm512_max_ps(bottom, r)));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k), _mm512_cvtsepi32_epi8(i));
    }
  }
}

// x (M, K) float32 or bfloat16 -> Avx512Vnni's int8 activations in its order (quantize_row's), each
// lane's start (-8 times the sum of its int8 activations, exact, as int32 bits) and each lane's
// activation scale. Every call pays this before its first weight, so it is vector code: 16 values per
// instruction, the order by two byte narrowings, the lane sums by sums of absolute differences.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> prepare_int8(const at::Tensor& x, int64_t G) {
  using Isa = Avx512Vnni;
  constexpr int S = Isa::kStep, L = Isa::kLanes, C = S / L;
  static_assert(S == 128 && L == 16 && C == 8, "the narrowing below makes Avx512Vnni's order of 128 columns");
  static const bool order_checked = [] {  // the even columns' bytes, then the odd ones' (Isa::source)
    const std::array<int, S> source = permutation<Isa>();
    for (int j = 0; j < S; ++j)
      TORCH_CHECK(source[j] == (j < 64 ? 2 * j : 2 * (j - 64) + 1), "int4_linear: the VNNI order changed");
    return true;
  }();
  (void)order_checked;
  const int64_t M = x.size(0), K = x.size(1), starts = K / S * L;  // G <= S: a step is a unit
  at::Tensor xp = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor start = at::empty({M, starts}, x.options().dtype(at::kFloat));
  at::Tensor xscale = at::empty({M, starts}, x.options().dtype(at::kFloat));
  std::vector<int8_t> q(K);                      // one row's int8 values, in column order
  std::vector<float> group_scale(K / G + L), widened;  // + L: a step's 16-wide read past the last group
  int8_t* dst = xp.data_ptr<int8_t>();
  const __m512i word_low = _mm512_set1_epi16(0x00FF), bias = _mm512_set1_epi8(static_cast<char>(0x80));
  // lane l of a step takes group (8 l) / G: for G = 32, 64, 128, index l / 4, l / 8, 0 of the step's groups
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i group_of_lane = _mm512_srlv_epi32(lane, _mm512_set1_epi32(G == 32 ? 2 : G == 64 ? 3 : 4));
  for (int64_t m = 0; m < M; ++m) {
    const float* row = float_row(x, m, widened);
    quantize_row(row, K, G, q.data(), group_scale.data());
    int8_t* out = dst + m * K;
    float* lanes = start.data_ptr<float>() + m * starts;
    float* lane_scale = xscale.data_ptr<float>() + m * starts;
    for (int64_t k0 = 0; k0 < K; k0 += S) {
      const __m512i a = _mm512_loadu_si512(q.data() + k0), b = _mm512_loadu_si512(q.data() + k0 + 64);
      // a byte pair's low byte is its even column: narrowing the words keeps it, shifting first the odd one
      store_low_bytes(out + k0, _mm512_and_si512(a, word_low));
      store_low_bytes(out + k0 + 32, _mm512_and_si512(b, word_low));
      store_low_bytes(out + k0 + 64, _mm512_srli_epi16(a, 8));
      store_low_bytes(out + k0 + 96, _mm512_srli_epi16(b, 8));
      // lane l sums columns 8l .. 8l + 7: one 8-byte sum of absolute differences each, of q + 128 against 0
      const __m512i zero = _mm512_setzero_si512();
      const __m256i sa = _mm512_cvtepi64_epi32(_mm512_sad_epu8(_mm512_xor_si512(a, bias), zero));
      const __m256i sb = _mm512_cvtepi64_epi32(_mm512_sad_epu8(_mm512_xor_si512(b, bias), zero));
      const __m512i sums = _mm512_sub_epi32(_mm512_inserti64x4(_mm512_castsi256_si512(sa), sb, 1),
                                            _mm512_set1_epi32(8 * 128));
      _mm512_storeu_si512(lanes + k0 / S * L, _mm512_mullo_epi32(sums, _mm512_set1_epi32(-8)));
      const __m512 step_scales = _mm512_loadu_ps(group_scale.data() + k0 / G);
      _mm512_storeu_ps(lane_scale + k0 / S * L, _mm512_permutexvar_ps(group_of_lane, step_scales));
    }
  }
  return {xp, start, xscale};
}

}  // namespace minaf3_int4
