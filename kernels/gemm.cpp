// float32 matrix product for many activation rows on an AVX2 CPU: y (M, N) = x (M, K) @ w (N, K).T + bias,
// with x and w float32 or bf16 (widened to float32 as they are packed: on a CPU without bf16 instructions,
// torch's own bf16 products run at ~22 GFLOP/s on two cores, emulated), or w int8 with one float32 scale
// per row (an int8-quantized model's prefill: y = scales * (x @ w.T) + bias, the int8 values widened to
// float32 as they are packed; kernels/int8_linear.py), or w int4 with a bf16 scale per group of columns (an
// int4-quantized model's prefill: each panel's rows dequantized to float32 as they are packed; the layout
// is kernels/int4_linear.py's).
//
// Prefill and the audio encoder multiply a few hundred rows (155 for a 5 s clip and a 30-token question,
// 250 encoder frames) by weights of thousands of rows. There oneDNN and MKL reach 133-157 and 109-131
// GFLOP/s on two Zen 3 cores, against 155-184 for a 2048^3 product; this kernel reaches 165-183 (gemm.py).
// It is the textbook blocking (Goto's), sized for a 32 KiB L1 and a 512 KiB L2:
//
//   x is copied once per block of rows into panels of 6 rows, k-major ([K][6]: the 6 values one step needs
//   are adjacent); w is read in panels of 16 rows and KC columns, each transposed into [KC][16] (16 KiB)
//   just before use; a 6 x 16 tile of y lives in 12 ymm registers while each of KC steps loads two vectors
//   of the w panel, broadcasts 6 values of x and issues 12 FMAs. Each float of w is read from memory once
//   per block of x's rows, and the two FMA pipes of a core, not the loads, set the pace.
//
// Both operands of y = x @ w.T run along K, so one must be transposed for the broadcast-and-FMA step. w's
// panels are, on the fly with 8 x 8 in-register transposes (a scalar copy cost 10-15% of the time), not
// once at load time, so that the weights keep the (N, K) layout every other path reads. Threads split
// the panels of w; x's copy is shared.
//
// Built by kernels/gemm.py through torch.utils.cpp_extension.load with -mavx2 -mfma. minaf3/linear.py and
// kernels/int8_linear.py call it only on CPUs whose best vector unit is AVX2; where AVX-512 is present,
// oneDNN's kernels run for float32 and bf16, int8_gemv.cpp's AVX-512 loop for int8 (gemm.py).

// Only the headers needed: <torch/extension.h> (pybind11 and the whole C++ API) triples the build time.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <optional>
#include <vector>

#include "int4_layout.h"

namespace {

constexpr int kMR = 6;    // rows of x per register tile: 6 x 2 accumulators + 2 w vectors + 1 broadcast
constexpr int kNR = 16;   // rows of w per panel: two ymm vectors of 8 floats
constexpr int kKC = 256;  // columns per w panel: 256 x 16 floats = 16 KiB, half of L1 (measured: 256 and 512
                          // within 2%, 128 3% slower)
// w panels multiplied per pass over x's copy: 8 x 16 KiB stay in L2 while each 6-row panel of x (6 KiB,
// in L1) meets all 8. Measured, 155 x 18944 -> 3584 (x's copy 11.7 MB, beyond L2): 139-144 GFLOP/s with 1
// panel per pass, 153-161 with 4, 164-167 with 8, 170-172 with 16; the other shapes of gemm.py within 2%.
constexpr int64_t kGroup = 8;
// Bytes of x's copy per block of rows (read from L3 once per kGroup panels): 16 MiB keeps a prompt of a few
// hundred rows in one block even at K = 18944, so that the weights stream from memory once.
// At most kBlockRows rows per block, so that with a narrow x (K of a few dozen) the per-thread slice of y
// (rows x 128 floats) stays at a few MiB.
constexpr int64_t kBlockBytes = 16 << 20, kBlockRows = 4096;

// C[r][0..16) (row stride 16) = (first ? 0 : C) + sum_k A[k][r] * B[k][0..16) for r < MR: A is a row
// panel of x ([kc][MR]), B a transposed w panel ([kc][16]). The accumulators are one flat array indexed by
// constants after full unrolling: with a 2-D array GCC 12 kept them in memory.
template <int MR>
inline void tile(const float* A, const float* B, int64_t kc, float* C, bool first) {
  __m256 acc[2 * MR];
#pragma GCC unroll 12
  for (int i = 0; i < 2 * MR; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 b0 = _mm256_load_ps(B + kNR * k), b1 = _mm256_load_ps(B + kNR * k + 8);
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      const __m256 a = _mm256_broadcast_ss(A + MR * k + r);
      acc[2 * r] = _mm256_fmadd_ps(a, b0, acc[2 * r]);
      acc[2 * r + 1] = _mm256_fmadd_ps(a, b1, acc[2 * r + 1]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
    float* c = C + kNR * r;
    if (!first) {
      acc[2 * r] = _mm256_add_ps(acc[2 * r], _mm256_loadu_ps(c));
      acc[2 * r + 1] = _mm256_add_ps(acc[2 * r + 1], _mm256_loadu_ps(c + 8));
    }
    _mm256_storeu_ps(c, acc[2 * r]);
    _mm256_storeu_ps(c + 8, acc[2 * r + 1]);
  }
}

inline void tile_rows(int mr, const float* A, const float* B, int64_t kc, float* C, bool first) {
  switch (mr) {
    case 1: tile<1>(A, B, kc, C, first); break;
    case 2: tile<2>(A, B, kc, C, first); break;
    case 3: tile<3>(A, B, kc, C, first); break;
    case 4: tile<4>(A, B, kc, C, first); break;
    case 5: tile<5>(A, B, kc, C, first); break;
    default: tile<6>(A, B, kc, C, first); break;
  }
}

// Transpose 8 rows of 8 floats in registers: r[i][j] -> r[j][i].
inline void transpose8(__m256 r[8]) {
  __m256 t[8], s[8];
  for (int i = 0; i < 4; ++i) {  // interleave pairs of rows
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {  // then pairs of pairs
    s[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    s[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    s[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    s[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {  // then the 128-bit halves
    r[i] = _mm256_permute2f128_ps(s[i], s[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(s[i], s[i + 4], 0x31);
  }
}

// Operands are float32, bf16 (uint16_t bit patterns: a bf16 is the top half of a float32) or, for w, int8;
// all are widened to float32 as they are packed, so the products and sums are float32 in every case.
inline float to_float(float v) { return v; }
inline float to_float(int8_t v) { return static_cast<float>(v); }  // exact: every int8 is a float
inline float to_float(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float f;
  __builtin_memcpy(&f, &wide, sizeof f);
  return f;
}
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline __m256 load8(const uint16_t* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

// An int4 weight (kernels/int4_linear.py): q packed two per byte, W = scales[n, k / G] * (q - 8), rows in
// tiles of 16 stored word by word (int4_layout.h).
struct Int4Weight {
  const uint8_t* w;   // (N, K / 2)
  const uint16_t* s;  // (N, K / G) bf16
  int64_t G, N;
};

// B[k][j] = w[j * K + k] for j < nr (zeros for nr <= j < 16) and k < kc: one panel of w, transposed.
template <class W>
void pack_panel(const W* w, int64_t K, int64_t nr, int64_t kc, float* B) {
  int64_t k = 0;
  if (nr == kNR) {
    for (; k + 8 <= kc; k += 8) {
      for (int g = 0; g < 2; ++g) {
        __m256 r[8];
        for (int i = 0; i < 8; ++i) r[i] = load8(w + (g * 8 + i) * K + k);
        transpose8(r);
        for (int i = 0; i < 8; ++i) _mm256_store_ps(B + (k + i) * kNR + g * 8, r[i]);
      }
    }
  }
  for (; k < kc; ++k) {  // a partial panel, or the last kc % 8 columns
    for (int64_t j = 0; j < kNR; ++j) B[k * kNR + j] = j < nr ? to_float(w[j * K + k]) : 0.0f;
  }
}

// The panel of rows n0 .. n0 + nr, columns k0 .. k0 + kc of a plain weight (float32, bf16, int8).
template <class W>
void pack(const W* w, int64_t K, int64_t n0, int64_t k0, int64_t nr, int64_t kc, float* B) {
  pack_panel(w + n0 * K + k0, K, nr, kc, B);
}

// The same for an int4 weight, dequantized as it is packed: two words of a row (8 bytes, int4_layout.h)
// hold 16 columns, the low nibbles the even ones and the high nibbles the odd ones, so 8 rows' low nibbles
// transposed are the panel's even columns and their high nibbles its odd ones; no pass puts them in column
// order first. kc is a
// multiple of 16 (K of 128, kKC of 32) and G of 32, so the 16 columns share one scale.
void pack(const Int4Weight* q, int64_t K, int64_t n0, int64_t k0, int64_t nr, int64_t kc, float* B) {
  const int64_t groups = K / q->G;
  const __m256i low4 = _mm256_set1_epi32(15);
  for (int64_t k = 0; k < kc; k += 16) {
    const int64_t column = k0 + k;
    for (int half = 0; half < 2; ++half) {  // rows 0-7 and 8-15 of the panel
      __m256 even[8], odd[8];
      for (int i = 0; i < 8; ++i) {
        const int64_t j = half * 8 + i;
        if (j >= nr) {  // a partial panel: zero weights
          even[i] = odd[i] = _mm256_setzero_ps();
          continue;
        }
        const int64_t n = n0 + j, word = column / 8;  // words `word` and `word` + 1: the 16 columns
        const __m128i bytes = _mm_setr_epi32(minaf3_int4_layout::word_value(q->w, q->N, K, n, word),
                                             minaf3_int4_layout::word_value(q->w, q->N, K, n, word + 1), 0, 0);
        const __m256i v = _mm256_cvtepu8_epi32(bytes);
        const uint16_t bits = minaf3_int4_layout::scale_of(q->s, q->N, groups, n, column / q->G);
        const __m256 scale = _mm256_set1_ps(to_float(bits));
        const __m256 offset = _mm256_mul_ps(scale, _mm256_set1_ps(-8.0f));  // W = scale * q - 8 scale
        even[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, low4)), scale, offset);
        odd[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), scale, offset);
      }
      transpose8(even);  // even[m]: column + 2m of the 8 rows
      transpose8(odd);   // odd[m]: column + 2m + 1
      for (int m = 0; m < 8; ++m) {
        _mm256_store_ps(B + (k + 2 * m) * kNR + half * 8, even[m]);
        _mm256_store_ps(B + (k + 2 * m + 1) * kNR + half * 8, odd[m]);
      }
    }
  }
}

struct FreeDeleter {
  void operator()(float* p) const { std::free(p); }
};
using Buffer = std::unique_ptr<float[], FreeDeleter>;

Buffer aligned_floats(int64_t n) {  // 64-byte aligned, for the aligned loads of the w panel
  const size_t bytes = (static_cast<size_t>(n) * sizeof(float) + 63) / 64 * 64;
  Buffer buffer(static_cast<float*>(std::aligned_alloc(64, bytes)));
  TORCH_CHECK(buffer, "f32_gemm: cannot allocate ", bytes, " bytes of working memory");
  return buffer;
}

// y[m0 .. m0 + rows) = the product for one block of x's rows, whose packed copy is A. scales (N,) or
// nullptr: each finished sum times its row's scale (int8 weights), then + bias.
template <class X, class W>
void block_product(const X* x, const W* w, const float* scales, const float* bias, float* y, int64_t m0,
                   int64_t rows, int64_t N, int64_t K, float* A) {
  const int64_t panels_of_x = (rows + kMR - 1) / kMR;
  // x's rows as [K][mr] panels, panel p at A + p * kMR * K (mr = 6, fewer in the last)
  at::parallel_for(0, panels_of_x, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t r0 = p * kMR, mr = std::min<int64_t>(kMR, rows - r0);
      const X* src = x + (m0 + r0) * K;
      float* dst = A + p * kMR * K;
      for (int64_t k = 0; k < K; ++k)
        for (int64_t r = 0; r < mr; ++r) dst[k * mr + r] = to_float(src[r * K + k]);
    }
  });
  const int64_t panels_of_w = (N + kNR - 1) / kNR;
  at::parallel_for(0, panels_of_w, 1, [&](int64_t begin, int64_t end) {
    Buffer B = aligned_floats(kGroup * kKC * kNR);
    Buffer C = aligned_floats(kGroup * panels_of_x * kMR * kNR);  // (rows, 16 * group) of y, in tiles
    for (int64_t q0 = begin; q0 < end; q0 += kGroup) {
      const int64_t group = std::min(kGroup, end - q0);
      for (int64_t k0 = 0; k0 < K; k0 += kKC) {
        const int64_t kc = std::min<int64_t>(kKC, K - k0);
        for (int64_t g = 0; g < group; ++g) {
          const int64_t n0 = (q0 + g) * kNR;
          pack(w, K, n0, k0, std::min<int64_t>(kNR, N - n0), kc, B.get() + g * kKC * kNR);
        }
        for (int64_t p = 0; p < panels_of_x; ++p) {
          const int64_t mr = std::min<int64_t>(kMR, rows - p * kMR);
          for (int64_t g = 0; g < group; ++g)
            tile_rows(static_cast<int>(mr), A + p * kMR * K + k0 * mr, B.get() + g * kKC * kNR, kc,
                      C.get() + (g * panels_of_x + p) * kMR * kNR, k0 == 0);
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        const int64_t n0 = (q0 + g) * kNR, nr = std::min<int64_t>(kNR, N - n0);
        for (int64_t r = 0; r < rows; ++r) {
          const float* c = C.get() + (g * panels_of_x + r / kMR) * kMR * kNR + (r % kMR) * kNR;
          float* out = y + (m0 + r) * N + n0;
          for (int64_t j = 0; j < nr; ++j)
            out[j] = c[j] * (scales ? scales[n0 + j] : 1.0f) + (bias ? bias[n0 + j] : 0.0f);
        }
      }
    }
  });
}

}  // namespace

// The data of a float32 tensor, or the bit patterns of a bf16 one.
template <class T>
const T* data_of(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.data_ptr());
}

bool float32_or_bf16(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16;
}

// y (..., N) float32 = x (..., K) @ w (N, K).T (times scales (N,) when given) + bias (N,) float32; or for an
// int4 weight (`int4`), w (N, K / 2) uint8 and its group scales.
at::Tensor gemm(const char* name, const at::Tensor& x, const at::Tensor& w, const at::Tensor* scales,
                const std::optional<at::Tensor>& bias, const at::Tensor* int4_scales = nullptr) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), name, ": CPU tensors expected");
  TORCH_CHECK(x.dim() >= 1 && w.dim() == 2, name, ": x (..., K) and w (N, K) expected");
  const int64_t columns = int4_scales ? 2 * w.size(1) : w.size(1);
  TORCH_CHECK(columns == x.size(-1), name, ": x has ", x.size(-1), " columns but w has ", columns);
  TORCH_CHECK(!scales || (scales->scalar_type() == at::kFloat && scales->numel() == w.size(0)), name, ": ",
              w.size(0), " weight rows need as many float32 scales");
  TORCH_CHECK(!bias || (bias->scalar_type() == at::kFloat && bias->numel() == w.size(0)), name,
              ": bias must be float32 with ", w.size(0), " entries");
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 1);  // (..., K) -> (..., N)
  shape.push_back(w.size(0));
  at::Tensor y = at::empty(shape, x.options().dtype(at::kFloat));
  const int64_t K = x.size(-1), N = w.size(0), M = K ? x.numel() / K : y.numel() / std::max<int64_t>(N, 1);
  if (M == 0 || N == 0) return y;
  if (K == 0) return bias ? y.copy_(bias->expand_as(y)) : y.zero_();
  const at::Tensor xc = x.contiguous(), wc = w.contiguous();
  const at::Tensor sc = scales ? scales->contiguous() : at::Tensor();
  const at::Tensor bc = bias ? bias->contiguous() : at::Tensor();
  const float* s = scales ? sc.data_ptr<float>() : nullptr;
  const float* b = bias ? bc.data_ptr<float>() : nullptr;
  const int64_t block = std::max<int64_t>(kMR, std::min(kBlockRows, kBlockBytes / (K * 4)) / kMR * kMR);
  Buffer A = aligned_floats(std::min(M, block) * K);
  auto product = [&](const auto* ws) {
    auto rows_of = [&](const auto* xs) {
      for (int64_t m0 = 0; m0 < M; m0 += block)
        block_product(xs, ws, s, b, y.data_ptr<float>(), m0, std::min(block, M - m0), N, K, A.get());
    };
    if (xc.scalar_type() == at::kFloat) {
      rows_of(data_of<float>(xc));
    } else {
      rows_of(data_of<uint16_t>(xc));
    }
  };
  if (wc.scalar_type() == at::kFloat) product(data_of<float>(wc));
  if (wc.scalar_type() == at::kBFloat16) product(data_of<uint16_t>(wc));
  if (wc.scalar_type() == at::kChar) product(data_of<int8_t>(wc));
  if (int4_scales) {
    const at::Tensor gs = int4_scales->contiguous();
    const Int4Weight q{data_of<uint8_t>(wc), data_of<uint16_t>(gs), K / gs.size(1), wc.size(0)};
    product(&q);
  }
  return y;
}

// y (..., N) float32 = x (..., K) @ w (N, K).T + bias (N,) float32, x and w float32 or bf16 (each widened to
// float32 as it is packed: a bf16 model's products in float32, as oneDNN does them).
at::Tensor f32_gemm(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(float32_or_bf16(x) && float32_or_bf16(w), "f32_gemm: x and w must be float32 or bfloat16");
  return gemm("f32_gemm", x, w, nullptr, bias);
}

// y (..., N) float32 = x (..., K) @ (w (N, K) * scales[:, None]).T + bias, x float32 or bf16, w int8 and
// scales (N,) float32: an int8 layer's product for many rows (kernels/int8_linear.py).
at::Tensor int8_gemm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                     const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(float32_or_bf16(x) && w.scalar_type() == at::kChar,
              "int8_gemm: x must be float32 or bfloat16 and w int8");
  return gemm("int8_gemm", x, w, &scales, bias);
}

// y (..., N) float32 = x (..., K) @ W.T + bias, x float32 or bf16 and W the int4 weight w (N, K / 2) uint8
// with scales (N, K / G) bf16, K a multiple of 128 and G of 32: an int4 layer's product for many rows.
at::Tensor int4_gemm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                     const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(float32_or_bf16(x) && w.scalar_type() == at::kByte && scales.scalar_type() == at::kBFloat16,
              "int4_gemm: x must be float32 or bfloat16, w uint8 and scales bfloat16");
  const int64_t K = 2 * w.size(1);
  TORCH_CHECK(K % 128 == 0 && scales.dim() == 2 && scales.size(0) == w.size(0) && scales.size(1) > 0 &&
                  K % scales.size(1) == 0 && (K / scales.size(1)) % 32 == 0,
              "int4_gemm: K = ", K, " must be a multiple of 128 in groups of a multiple of 32 columns");
  return gemm("int4_gemm", x, w, nullptr, bias, &scales);
}

// A torch operator rather than a pybind11 function: the build needs no Python headers, and torch.compile
// can trace through it (gemm.py registers its shape function).
TORCH_LIBRARY(minaf3_gemm, m) {
  m.def("f32_gemm(Tensor x, Tensor w, Tensor? bias) -> Tensor");
  m.def("int8_gemm(Tensor x, Tensor w, Tensor scales, Tensor? bias) -> Tensor");
  m.def("int4_gemm(Tensor x, Tensor w, Tensor scales, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(minaf3_gemm, CPU, m) {
  m.impl("f32_gemm", &f32_gemm);
  m.impl("int8_gemm", &int8_gemm);
  m.impl("int4_gemm", &int4_gemm);
}
