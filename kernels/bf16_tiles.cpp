// Quantized weights as bf16 tiles, for the prefill of int8 and int4 layers on CPUs with AVX-512 BF16
// (kernels/bf16_tiles.py): rows [row0, row0 + rows) of a weight, dequantized to a (rows, K) bf16 tensor that
// torch's bf16 matrix product (oneDNN's bf16 dot-product kernels) multiplies by a prompt's activations.
//
//   int8_dequantize   W[n, k] = scales[n] * w[n, k]               w (N, K) int8, scales (N,) float32
//   int4_dequantize   W[n, k] = scales[n, k / G] * (q[n, k] - 8)   kernels/int4_linear.py's layout
//
// Each weight is computed in float32 and rounded once to bf16 (to nearest even, as torch rounds). A tile of
// a few hundred rows is a fraction of the time its product takes (it reads the quantized bytes once and
// writes 2 bytes per weight into L2), so the product, not this, sets the pace.
//
// Built by kernels/bf16_tiles.py with -mavx2 -mfma (cpp_build.py); the row functions alone are compiled for
// AVX-512 BF16, and the operators refuse to run on a CPU without it.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>

#include "cpu_features.h"
#include "int4_layout.h"

namespace {

inline float bf16_to_float(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &wide, sizeof f);
  return f;
}

inline uint16_t float_to_bf16(float v) {  // round to nearest even, as torch's conversion (v finite)
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  return static_cast<uint16_t>((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

// 16 int8 weights at w as float32, times the scale s.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16"))) inline __m512 widen(const int8_t* w,
                                                                                         __m512 s) {
  const __m512i wide = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
  return _mm512_mul_ps(_mm512_cvtepi32_ps(wide), s);
}

// One int8 row of K columns (any K) times its scale, as bf16.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
void int8_row(const int8_t* w, float scale, int64_t K, uint16_t* out) {
  const __m512 s = _mm512_set1_ps(scale);
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    _mm512_storeu_si512(out + k, (__m512i)_mm512_cvtne2ps_pbh(widen(w + k + 16, s), widen(w + k, s)));
  }
  for (; k < K; ++k) out[k] = float_to_bf16(w[k] * scale);  // the last K % 32 columns
}

// Row n of an int4 weight of N rows and K columns (a multiple of 32; groups of G, a multiple of 32) as bf16:
// 4 words of the row (16 bytes, int4_layout.h) hold columns k + 2i (low nibbles) and k + 2i + 1 (high), put
// back in column order by one two-source permute each half.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
void int4_row(const uint8_t* w, const uint16_t* s, int64_t N, int64_t K, int64_t G, int64_t n,
              uint16_t* out) {
  using minaf3_int4_layout::word_value;
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  // lane i of columns k .. k + 15 is lo[i / 2] (even i) or hi[i / 2] (odd i): index i / 2 + 16 * (i % 2)
  const __m512i first = _mm512_or_si512(_mm512_srli_epi32(lane, 1),
                                        _mm512_slli_epi32(_mm512_and_si512(lane, _mm512_set1_epi32(1)), 4));
  const __m512i second = _mm512_add_epi32(first, _mm512_set1_epi32(8));
  for (int64_t k = 0; k < K; k += 32) {
    const int64_t u = k / 8;
    const __m128i bytes = _mm_setr_epi32(word_value(w, N, K, n, u), word_value(w, N, K, n, u + 1),
                                         word_value(w, N, K, n, u + 2), word_value(w, N, K, n, u + 3));
    const __m512i v = _mm512_cvtepu8_epi32(bytes);
    const __m512 scale = _mm512_set1_ps(bf16_to_float(minaf3_int4_layout::scale_of(s, N, K / G, n, k / G)));
    const __m512 offset = _mm512_mul_ps(scale, _mm512_set1_ps(-8.0f));
    const __m512i low_nibbles = _mm512_and_si512(v, _mm512_set1_epi32(15));
    const __m512 lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(low_nibbles), scale, offset);
    const __m512 hi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4)), scale, offset);
    const __m512 a = _mm512_permutex2var_ps(lo, first, hi), b = _mm512_permutex2var_ps(lo, second, hi);
    _mm512_storeu_si512(out + k, (__m512i)_mm512_cvtne2ps_pbh(b, a));
  }
}

// The checks both operators share; returns the (rows, K) bf16 output.
at::Tensor output_for(const char* name, const at::Tensor& w, int64_t K, int64_t row0, int64_t rows) {
  TORCH_CHECK(minaf3_cpu::has_avx512_bf16(), name, ": needs a CPU with AVX-512 BF16");
  TORCH_CHECK(w.device().is_cpu() && w.dim() == 2 && w.is_contiguous(), name,
              ": w must be a contiguous 2-D CPU tensor");
  TORCH_CHECK(row0 >= 0 && rows >= 0 && row0 + rows <= w.size(0), name, ": rows ", row0, " + ", rows, " of ",
              w.size(0));
  return at::empty({rows, K}, w.options().dtype(at::kBFloat16));
}

}  // namespace

// Rows [row0, row0 + rows) of scales[:, None] * w as bf16: w (N, K) int8, scales (N,) float32.
at::Tensor int8_dequantize(const at::Tensor& w, const at::Tensor& scales, int64_t row0, int64_t rows) {
  const char* name = "int8_dequantize";
  TORCH_CHECK(w.scalar_type() == at::kChar, name, ": w must be int8");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() == w.size(0),
              name, ": scales must be ", w.size(0), " contiguous float32 values");
  const int64_t K = w.size(1);
  at::Tensor out = output_for(name, w, K, row0, rows);
  const int8_t* wp = w.data_ptr<int8_t>() + row0 * K;
  const float* sp = scales.data_ptr<float>() + row0;
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) int8_row(wp + n * K, sp[n], K, op + n * K);
  });
  return out;
}

// Rows [row0, row0 + rows) of the int4 weight W as bf16: w (N, K / 2) uint8, scales (N, K / G) bf16, tiled.
at::Tensor int4_dequantize(const at::Tensor& w, const at::Tensor& scales, int64_t row0, int64_t rows) {
  const char* name = "int4_dequantize";
  TORCH_CHECK(w.scalar_type() == at::kByte, name, ": w must be uint8");
  const int64_t K = 2 * w.size(1), groups = scales.dim() == 2 ? scales.size(1) : 0;
  TORCH_CHECK(scales.scalar_type() == at::kBFloat16 && scales.is_contiguous() && groups > 0 &&
                  scales.size(0) == w.size(0) && K % 32 == 0 && K % groups == 0 && (K / groups) % 32 == 0,
              name, ": scales must be contiguous (", w.size(0), ", K / G) bfloat16, G and K multiples of 32");
  at::Tensor out = output_for(name, w, K, row0, rows);
  const int64_t G = K / groups, N = w.size(0);
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(scales.data_ptr());
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) int4_row(wp, sp, N, K, G, row0 + n, op + n * K);
  });
  return out;
}

TORCH_LIBRARY(minaf3_tiles, m) {
  m.def("int8_dequantize(Tensor w, Tensor scales, int row0, int rows) -> Tensor");
  m.def("int4_dequantize(Tensor w, Tensor scales, int row0, int rows) -> Tensor");
}

TORCH_LIBRARY_IMPL(minaf3_tiles, CPU, m) {
  m.impl("int8_dequantize", &int8_dequantize);
  m.impl("int4_dequantize", &int4_dequantize);
}
