// Quantized matrix products on the CPU for many activation rows (a prompt), with AVX-512 VNNI:
//   int4_gemm   y (M, N) = x (M, K) @ W.T + bias,  W[n, k] = scales[n, k / G] * (q[n, k] - 8)
//               kernels/int4_linear.py's layout: q in 0..15, two per byte (column 2j of a row in the low
//               nibble of its byte j), bf16 scales, one per group of G columns, rows in tiles of 16 stored
//               word by word (int4_layout.h)
//   int8_gemm   the same for W[n, k] = scales[n] * w[n, k], w int8 (kernels/int8_linear.py's layout)
//
// The activations come rounded to int8 per group of G columns by int4_gemv.cpp's quantize_int8 (the rounding
// of the int4 decode loop): x[m, k] ~ xs[m, k / G] * xq[m, k]. With the weight as s[n, g] * (u[n, k] - z),
// u unsigned bytes (int4: u = q, z = 8; int8: u = w + 128, z = 128, s the row's scale in every group),
//   sum_k x[m, k] W[n, k] = sum_g xs[m, g] s[n, g] (sum_{k in g} xq[m, k] u[n, k] - z sum_{k in g} xq[m, k])
// and the inner sums are exact in int32: _mm512_dpbusd_epi32 multiplies 64 unsigned bytes (the u) by 64
// signed ones (the xq) and adds each 4 adjacent products into an int32 lane, twice the products per
// instruction of the bf16 dot product a bf16 model's prefill runs on, at the same instructions per cycle
// on these cores. What it costs on top: converting and scaling each group's sums (3 float32 instructions
// per 8 product instructions at G = 32), and repacking the weights (below).
//
// Layout of the product: a vector lane is an output column. A panel of kPanel = 32 weight rows is repacked,
// per thread, so that a unit of 8 columns 8u .. 8u + 7 is two 64-byte vectors for each 16 rows, 4 bytes a
// row: for int4, the 32-bit word u of each packed row split into its low nibbles (columns 8u, 8u + 2,
// 8u + 4, 8u + 6) and its high ones (8u + 1, 8u + 3, 8u + 5, 8u + 7), the activations reordered once per
// call to match (each 8 bytes: the even columns' then the odd ones'); for int8, words 2u and 2u + 1 of
// each row, + 128, the activations in column order. The micro-kernel keeps kRows = 6 activation rows by the
// panel's 32 columns in registers: 12 int32 sums for the current group and 12 float32 totals.
// Rows are taken in chunks whose activations stay in the L3 cache (kChunkBytes), each chunk's panels spread
// over torch's threads; a panel (16 bytes per column per 32 rows: 115 KB at K = 3584, 606 KB at 18944)
// stays in L2 while every row of the chunk passes over it.
//
// Built by kernels/vnni_prefill.py with -mavx2 -mfma (cpp_build.py); the functions that use AVX-512 are
// compiled for it, and the operators refuse to run on a CPU without AVX-512 VNNI.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_features.h"
#include "int4_layout.h"

namespace {

constexpr int kRows = 6;                          // activation rows per micro-kernel call
constexpr int64_t kPanel = 32;                    // weight rows (output columns) per panel: two vectors
constexpr int64_t kChunkBytes = 4 * 1024 * 1024;  // int8 activations per chunk of rows (L3-resident)

inline float bf16_to_float(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float f;
  return std::memcpy(&f, &wide, sizeof f), f;
}

struct Problem {
  const int8_t* x;       // (M, K) int8 activations in the weights' order (int4: even columns, then odd ones)
  const int32_t* start;  // (M, K / G): -z times each group's sum of xq, where its int32 sums start
  const float* xscale;   // (M, K / G): each group's activation scale
  bool int4;             // the weights: int4 (w (N, K / 2), s (N, K / G) bf16) or int8 (w (N, K), s8 (N,))
  const uint8_t* w;      // the weight's bytes
  const uint16_t* s;     // int4: (N, K / G) bf16 scales
  const float* s8;       // int8: (N,) float32 scales
  const float* bias;     // (N,) or nullptr
  float* y;              // (M, N) float32 output, or nullptr when the output is y_bf16
  c10::BFloat16* y_bf16;  // (M, N) bfloat16 output, or nullptr
  int64_t M, N, K, G;
};

// Row m of xq (M, K) int8 in column order -> its bytes in the weights' order and each group's start (-z times
// its sum); `eights` (K / 8) is scratch.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
void reorder_row(const int8_t* row, int64_t K, int64_t G, bool int4, int8_t* to, int32_t* start,
                 int64_t* eights) {
  // int4: within each 8 bytes, bytes 0, 2, 4, 6, then 1, 3, 5, 7; int8: as they are
  const __m512i order = _mm512_broadcast_i32x4(
      int4 ? _mm_setr_epi8(0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15)
           : _mm_setr_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  const int64_t zero_point = int4 ? 8 : 128;
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80)), zero = _mm512_setzero_si512();
  for (int64_t k = 0; k < K; k += 64) {
    const __m512i v = _mm512_loadu_si512(row + k);
    _mm512_storeu_si512(to + k, _mm512_shuffle_epi8(v, order));
    _mm512_storeu_si512(eights + k / 8, _mm512_sad_epu8(_mm512_xor_si512(v, flip), zero));  // sums + 1024
  }
  const int64_t per_group = G / 8;
  for (int64_t g = 0; g < K / G; ++g) {
    int64_t sum = -128 * G;
    for (int64_t i = 0; i < per_group; ++i) sum += eights[g * per_group + i];
    start[g] = static_cast<int32_t>(-zero_point * sum);  // |sum| <= 127 G: no overflow
  }
}

void reorder_activations(const Problem& p, const int8_t* xq, int8_t* out, int32_t* start) {
  const int64_t K = p.K, groups = K / p.G;
  at::parallel_for(0, p.M, 16, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> eights(K / 8);
    for (int64_t m = begin; m < end; ++m)
      reorder_row(xq + m * K, K, p.G, p.int4, out + m * K, start + m * groups, eights.data());
  });
}

// r[i] lane j -> r[j] lane i: a 16 x 16 transpose of 32-bit words (unpacks within 128-bit lanes, then
// shuffles of whole 128-bit lanes).
__attribute__((target("avx512f"), always_inline)) inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  // r[4 i + e]'s 128-bit lane c: rows 4 i .. 4 i + 3 at word 4 c + e
  for (int e = 0; e < 4; ++e) {
    const __m512i a0 = _mm512_shuffle_i32x4(r[e], r[4 + e], 0x88);
    const __m512i a1 = _mm512_shuffle_i32x4(r[e], r[4 + e], 0xdd);
    const __m512i b0 = _mm512_shuffle_i32x4(r[8 + e], r[12 + e], 0x88);
    const __m512i b1 = _mm512_shuffle_i32x4(r[8 + e], r[12 + e], 0xdd);
    t[e] = _mm512_shuffle_i32x4(a0, b0, 0x88);
    t[8 + e] = _mm512_shuffle_i32x4(a0, b0, 0xdd);
    t[4 + e] = _mm512_shuffle_i32x4(a1, b1, 0x88);
    t[12 + e] = _mm512_shuffle_i32x4(a1, b1, 0xdd);
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

// Repack weight rows [n0, n0 + kPanel) (rows from N on as zero weights) into `panel` (K / 8 units of four
// vectors: rows 0-15's first 4 bytes of the unit, then their second 4, then the same for rows 16-31) and
// their scales into `ws` (K / G groups of kPanel float32, zero for rows from N on). An int4 weight's tile
// (int4_layout.h) holds word u of its 16 rows in one 64-byte run: each is loaded as it is. int8 rows are
// loaded 64 bytes of 16 rows at a time and transposed, so that every load is a whole cache line.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
void pack_panel(const Problem& p, int64_t n0, __m512i* panel, float* ws) {
  const int64_t groups = p.K / p.G, row_bytes = p.int4 ? p.K / 2 : p.K;
  const __m512i nibbles = _mm512_set1_epi8(0x0F), flip = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int half = 0; half < 2; ++half) {
    const int64_t first = n0 + 16 * half;
    if (p.int4) {  // word u is unit u: its low nibbles, then its high ones
      const int64_t rows = first < p.N ? minaf3_int4_layout::tile_rows(p.N, first) : 0;
      const __mmask16 mask = static_cast<__mmask16>((1u << rows) - 1);  // zero words for rows from N on
      const uint8_t* tile = p.w + std::min(first, p.N) * row_bytes;
      for (int64_t u = 0; u < p.K / 8; ++u) {
        const __m512i v = _mm512_maskz_loadu_epi32(mask, tile + u * 4 * rows);
        _mm512_store_si512(panel + 4 * u + 2 * half, _mm512_and_si512(v, nibbles));
        _mm512_store_si512(panel + 4 * u + 2 * half + 1, _mm512_and_si512(_mm512_srli_epi16(v, 4), nibbles));
      }
      continue;
    }
    const uint8_t* rows[16];  // the last row for lanes past N: its products are multiplied by a zero scale
    for (int j = 0; j < 16; ++j) rows[j] = p.w + std::min(first + j, p.N - 1) * row_bytes;
    for (int64_t byte = 0; byte < row_bytes; byte += 64) {  // 16 words of each row
      __m512i r[16];
      for (int j = 0; j < 16; ++j) r[j] = _mm512_loadu_si512(rows[j] + byte);
      transpose16(r);  // r[i]: word byte / 4 + i of the 16 rows; word w is half w % 2 of unit w / 2
      for (int i = 0; i < 16; ++i) {
        const int64_t word = byte / 4 + i;  // + 128 as unsigned bytes
        _mm512_store_si512(panel + 4 * (word / 2) + 2 * half + word % 2, _mm512_xor_si512(r[i], flip));
      }
    }
  }
  for (int64_t j = 0; j < kPanel; ++j) {
    const int64_t n = n0 + j;
    for (int64_t g = 0; g < groups; ++g)
      ws[g * kPanel + j] = n >= p.N  ? 0.f
                           : p.int4 ? bf16_to_float(minaf3_int4_layout::scale_of(p.s, p.N, groups, n, g))
                                    : p.s8[n];
  }
}

// total (R, 32) float32 = the product of activation rows [m0, m0 + R) and the panel (without the bias).
template <int R, int G>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni"), always_inline)) inline void
micro_kernel(const Problem& p, int64_t m0, const __m512i* panel, const float* ws, __m512 total[R][2]) {
  const int64_t K = p.K, groups = K / G;
  const int8_t* x = p.x + m0 * K;
  const int32_t* start = p.start + m0 * groups;
  const float* xscale = p.xscale + m0 * groups;
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) total[r][0] = total[r][1] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512i acc[R][2];
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_set1_epi32(start[r * groups + g]);
#pragma GCC unroll 16
    for (int64_t u = g * G / 8; u < (g + 1) * G / 8; ++u) {
      const __m512i* b = panel + 4 * u;
      const __m512i lo0 = _mm512_load_si512(b), hi0 = _mm512_load_si512(b + 1);
      const __m512i lo1 = _mm512_load_si512(b + 2), hi1 = _mm512_load_si512(b + 3);
#pragma GCC unroll 6
      for (int r = 0; r < R; ++r) {
        int32_t even, odd;
        std::memcpy(&even, x + r * K + 8 * u, 4);
        std::memcpy(&odd, x + r * K + 8 * u + 4, 4);
        const __m512i a_even = _mm512_set1_epi32(even), a_odd = _mm512_set1_epi32(odd);
        acc[r][0] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc[r][0], lo0, a_even), hi0, a_odd);
        acc[r][1] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc[r][1], lo1, a_even), hi1, a_odd);
      }
    }
    const __m512 w0 = _mm512_loadu_ps(ws + g * kPanel), w1 = _mm512_loadu_ps(ws + g * kPanel + 16);
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const __m512 xs = _mm512_set1_ps(xscale[r * groups + g]);
      total[r][0] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(acc[r][0]), xs), w0, total[r][0]);
      total[r][1] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(acc[r][1]), xs), w1, total[r][1]);
    }
  }
}

// Rows [m0, m0 + R) of y for the panel at n0: the micro-kernel's totals plus the bias, stored in y's dtype.
template <int R, int G>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni"), flatten)) void
rows_for_panel(const Problem& p, int64_t m0, int64_t n0, const __m512i* panel, const float* ws) {
  __m512 total[R][2];
  micro_kernel<R, G>(p, m0, panel, ws, total);
  const int64_t valid = std::min(kPanel, p.N - n0);
  for (int h = 0; h < 2; ++h) {
    const int64_t n = n0 + 16 * h, count = std::clamp<int64_t>(valid - 16 * h, 0, 16);
    if (count == 0) continue;
    const __mmask16 keep = static_cast<__mmask16>((1u << count) - 1);
    const __m512 bias = p.bias ? _mm512_maskz_loadu_ps(keep, p.bias + n) : _mm512_setzero_ps();
    for (int r = 0; r < R; ++r) {
      const __m512 v = _mm512_add_ps(total[r][h], bias);
      const int64_t at = (m0 + r) * p.N + n;
      if (p.y) {
        _mm512_mask_storeu_ps(p.y + at, keep, v);
      } else {  // round to nearest even, as torch's conversion
        const __m512i bits = _mm512_castps_si512(v);
        const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
        const __m512i rounded = _mm512_srli_epi32(
            _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
        _mm256_mask_storeu_epi16(p.y_bf16 + at, keep, _mm512_cvtepi32_epi16(rounded));
      }
    }
  }
}

template <int G>
void rows_of_chunk(const Problem& p, int64_t m_begin, int64_t m_end, int64_t n0, const __m512i* panel,
                   const float* ws) {
  int64_t m = m_begin;
  for (; m + kRows <= m_end; m += kRows) rows_for_panel<kRows, G>(p, m, n0, panel, ws);
  switch (m_end - m) {
    case 5: rows_for_panel<5, G>(p, m, n0, panel, ws); break;
    case 4: rows_for_panel<4, G>(p, m, n0, panel, ws); break;
    case 3: rows_for_panel<3, G>(p, m, n0, panel, ws); break;
    case 2: rows_for_panel<2, G>(p, m, n0, panel, ws); break;
    case 1: rows_for_panel<1, G>(p, m, n0, panel, ws); break;
    default: break;
  }
}

// y = the whole product: chunks of rows in turn, each chunk's panels over torch's threads.
void run(const Problem& p) {
  const int64_t panels = (p.N + kPanel - 1) / kPanel, groups = p.K / p.G;
  const int64_t chunk = std::max<int64_t>(kRows, kChunkBytes / p.K / kRows * kRows);
  for (int64_t m0 = 0; m0 < p.M; m0 += chunk) {
    const int64_t m1 = std::min(p.M, m0 + chunk);
    at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
      std::vector<uint8_t> bytes(p.K / 8 * 4 * 64 + 64);  // the panel, 64-byte aligned
      const uintptr_t aligned = (reinterpret_cast<uintptr_t>(bytes.data()) + 63) & ~uintptr_t{63};
      const auto panel = reinterpret_cast<const __m512i*>(aligned);
      std::vector<float> ws(groups * kPanel);
      for (int64_t i = begin; i < end; ++i) {
        pack_panel(p, i * kPanel, const_cast<__m512i*>(panel), ws.data());
        if (p.G == 32) rows_of_chunk<32>(p, m0, m1, i * kPanel, panel, ws.data());
        if (p.G == 64) rows_of_chunk<64>(p, m0, m1, i * kPanel, panel, ws.data());
        if (p.G == 128) rows_of_chunk<128>(p, m0, m1, i * kPanel, panel, ws.data());
      }
    });
  }
}

// The checks both operators share, the output, and the product. K: the activations' width; groups: xs's.
at::Tensor product(const char* name, const at::Tensor& xq, const at::Tensor& xs, Problem p, int64_t groups,
                   const std::optional<at::Tensor>& bias, at::ScalarType dtype) {
  const int64_t K = p.K, N = p.N, M = xq.numel() / std::max<int64_t>(K, 1), G = groups ? K / groups : 0;
  TORCH_CHECK(groups > 0 && G * groups == K && (G == 32 || G == 64 || G == 128), name, ": ", K,
              " columns in ", groups, " groups: the group size must be 32, 64 or 128");
  TORCH_CHECK(xs.device().is_cpu() && xs.scalar_type() == at::kFloat && xs.numel() == M * groups, name,
              ": xs must be float32 (..., ", groups, ")");
  TORCH_CHECK(!bias || (bias->device().is_cpu() && bias->scalar_type() == at::kFloat && bias->numel() == N),
              name, ": bias must be float32 with ", N, " entries");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, name, ": dtype must be float32 or bfloat16");
  std::vector<int64_t> out_shape(xq.sizes().begin(), xq.sizes().end() - 1);
  out_shape.push_back(N);
  at::Tensor y = at::empty(out_shape, xq.options().dtype(dtype));
  if (M == 0 || N == 0) return y;
  const at::Tensor xc = xq.contiguous(), sc = xs.contiguous();
  const at::Tensor bc = bias ? bias->contiguous() : at::Tensor();
  at::Tensor ordered = at::empty({M, K}, xq.options());
  at::Tensor start = at::empty({M, groups}, xq.options().dtype(at::kInt));
  p.M = M;
  p.G = G;
  reorder_activations(p, xc.data_ptr<int8_t>(), ordered.data_ptr<int8_t>(), start.data_ptr<int32_t>());
  p.x = ordered.data_ptr<int8_t>();
  p.start = start.data_ptr<int32_t>();
  p.xscale = sc.data_ptr<float>();
  p.bias = bias ? bc.data_ptr<float>() : nullptr;
  p.y = dtype == at::kFloat ? y.data_ptr<float>() : nullptr;
  p.y_bf16 = dtype == at::kFloat ? nullptr : y.data_ptr<c10::BFloat16>();
  run(p);
  return y;
}

void check_activations(const char* name, const at::Tensor& xq, const at::Tensor& xs, const at::Tensor& w) {
  TORCH_CHECK(minaf3_cpu::has_avx512_vnni(), name, ": this CPU has no AVX-512 VNNI");
  TORCH_CHECK(xq.device().is_cpu() && w.device().is_cpu(), name, ": CPU tensors expected");
  TORCH_CHECK(xq.dim() >= 1 && xq.scalar_type() == at::kChar, name, ": xq must be int8 (..., K)");
  TORCH_CHECK(xq.size(-1) % 128 == 0, name, ": K = ", xq.size(-1), " must be a multiple of 128");
  TORCH_CHECK(xs.dim() >= 1, name, ": xs must be float32 (..., groups)");
}

}  // namespace

// y (..., N) = x @ W.T + bias for x ~ xs * xq, given as xq (..., K) int8 and xs (..., K / G) float32 (from
// int4_gemv.cpp's quantize_int8; G in {32, 64, 128}, K a multiple of 128), bias float32 (N,) or None; y
// float32 or bfloat16 (`dtype`). int4_gemm: W the int4 weight, w (N, K / 2) uint8 and scales (N, K / G')
// bfloat16 (G' in {32, 64, 128}, the activations' G); int8_gemm: W = scales[:, None] * w, w (N, K) int8,
// scales (N,) float32.
at::Tensor int4_gemm(const at::Tensor& xq, const at::Tensor& xs, const at::Tensor& w,
                     const at::Tensor& scales, const std::optional<at::Tensor>& bias, at::ScalarType dtype) {
  const char* name = "int4_gemm";
  check_activations(name, xq, xs, w);
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte, name, ": w must be (N, K / 2) uint8");
  const int64_t K = xq.size(-1), N = w.size(0);
  TORCH_CHECK(w.size(1) * 2 == K, name, ": xq has ", K, " columns, w packs ", w.size(1) * 2);
  TORCH_CHECK(scales.device().is_cpu() && scales.dim() == 2 && scales.scalar_type() == at::kBFloat16 &&
                  scales.size(0) == N && scales.size(1) == xs.size(-1),
              name, ": scales must be (", N, ", groups) bfloat16, with the groups of xs");
  const at::Tensor wc = w.contiguous(), gc = scales.contiguous();
  Problem p{};
  p.int4 = true;
  p.w = wc.data_ptr<uint8_t>();
  p.s = reinterpret_cast<const uint16_t*>(gc.data_ptr());
  p.N = N;
  p.K = K;
  return product(name, xq, xs, p, scales.size(1), bias, dtype);
}

at::Tensor int8_gemm(const at::Tensor& xq, const at::Tensor& xs, const at::Tensor& w,
                     const at::Tensor& scales, const std::optional<at::Tensor>& bias, at::ScalarType dtype) {
  const char* name = "int8_gemm";
  check_activations(name, xq, xs, w);
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar, name, ": w must be (N, K) int8");
  const int64_t K = xq.size(-1), N = w.size(0);
  TORCH_CHECK(w.size(1) == K, name, ": xq has ", K, " columns, w ", w.size(1));
  TORCH_CHECK(scales.device().is_cpu() && scales.scalar_type() == at::kFloat && scales.numel() == N, name,
              ": scales must be float32 with ", N, " entries");
  const at::Tensor wc = w.contiguous(), sc = scales.contiguous();
  Problem p{};
  p.int4 = false;
  p.w = reinterpret_cast<const uint8_t*>(wc.data_ptr<int8_t>());
  p.s8 = sc.data_ptr<float>();
  p.N = N;
  p.K = K;
  return product(name, xq, xs, p, xs.size(-1), bias, dtype);
}

TORCH_LIBRARY(minaf3_vnni, m) {
  m.def("int4_gemm(Tensor xq, Tensor xs, Tensor w, Tensor scales, Tensor? bias, ScalarType dtype) -> Tensor");
  m.def("int8_gemm(Tensor xq, Tensor xs, Tensor w, Tensor scales, Tensor? bias, ScalarType dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(minaf3_vnni, CPU, m) {
  m.impl("int4_gemm", &int4_gemm);
  m.impl("int8_gemm", &int8_gemm);
}
