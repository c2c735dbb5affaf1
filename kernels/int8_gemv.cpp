// int8 weight-only matrix product on the CPU: y (M, N) = x (M, K) @ (w (N, K) * scales (N,)).T + bias
//
// Decode multiplies a few activation rows (batch 1-8) by every weight once, so its time is the time to stream
// the weights from memory. Reading int8 instead of fp32 cuts those bytes by 4; this kernel keeps the
// arithmetic cheap enough (sign-extend int8 -> int32 -> float, one FMA per activation row) that the stream,
// not the conversion, stays the limit. The per-row scale is applied once to each finished dot product, since
// sum_k x[k] * w[n, k] * s[n] = s[n] * sum_k x[k] * w[n, k]. Activations stay float32 throughout.
// The same loop serves bf16 weights (widened by a 16-bit shift) and float32 ones, unscaled: their decode
// is as much a stream of weights, which torch's matrix-vector products read more slowly (kernels/gemv.py).
//
// Two instruction sets from one source: the kernel is written once over an `Isa` (Avx2: 8 float lanes in 16
// ymm registers; Avx512: 16 lanes in 32 zmm registers). The file is built with -mavx2 -mfma; the AVX-512
// entry point alone is compiled for AVX-512 (a target attribute, with `flatten` so that the generic kernel
// is inlined into it and compiled for that target) and chosen at run time when the CPU has it.
//
// Blocking: R output rows x BT activation rows share one pass over K. Each converted weight vector is used
// BT times and each activation vector R times, with R * BT accumulators held in registers. Many activation
// rows (prefill) are handled by tiling the weight rows so each tile is read from memory once. Short rows
// (an int8 row of 3584 is 3.5 KiB) are taken from R runs of consecutive rows, so that each of the R rows
// read at once is a long stream (rows_kernel).
//
// Streaming: the weights are requested into L2 far ahead of their use (kPrefetchBytes). Each thread streams
// its own contiguous share of the rows in chunks and then helps with what is left of the others' shares
// (row_chunks.h).
//
// Built by kernels/int8_linear.py through torch.utils.cpp_extension.load; it is only called when torch
// reports AVX2 (or better) on this CPU. Measurements: the docstring of int8_linear.py.

// Only the headers needed: <torch/extension.h> (pybind11 and the whole C++ API) triples the build time.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu_features.h"
#include "row_chunks.h"

// The generic kernel below handles __m512 values in functions compiled for the default (AVX2) target; GCC
// warns that passing them would use another ABI. They are never passed: `flatten` inlines all of them into
// the AVX-512 entry point.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace {

// Bytes of one cache line: the k loop advances one line of each weight row per iteration.
constexpr int64_t kCacheLine = 64;
// How far ahead of the bytes being multiplied the weights are prefetched into L2, in bytes of the block's
// stream (kPrefetchBytes / R ahead in each of its R rows). The hardware prefetcher alone does not run far
// enough ahead to keep the stream at the memory's speed; distances from 16 to 128 KiB were measured (batch
// 1, one and two cores), and 64 KiB reached the speed of a plain read of memory with the least spread.
constexpr int64_t kPrefetchBytes = 64 * 1024;
// Weight bytes per tile (see rows_kernel): a quarter of a 1 MiB L2, leaving room for the activations.
constexpr int64_t kTileBytes = 256 * 1024;
// Rows shorter than this are read in runs (rows_kernel): short rows read in adjacent blocks leave the
// memory streams too short to reach full speed, while longer rows (bf16 and float32 ones of AF3's widths)
// lost speed in runs; the crossing was measured between int8 rows of 3584 bytes and bf16 rows of 7 KiB.
constexpr int64_t kShortRowBytes = 4096;
// Columns from which the AVX-512 code runs (where the CPU has it). Its gain is fewer instructions per
// weight; its cost, a longer horizontal sum per output row. On Zen 4, whose 512-bit unit is two 256-bit
// halves, rows of 112 to 1024 columns took 1.1-1.9x the AVX2 code's time and rows of 3584 0.9-1x.
constexpr int64_t kAvx512MinColumns = 2048;

struct Avx2 {
  static constexpr int kLanes = 8;
  using Vec = __m256;
  static inline Vec zero() { return _mm256_setzero_ps(); }
  static inline Vec load(const float* p) { return _mm256_loadu_ps(p); }
  // Eight int8 weights at p as eight floats (exact: every int8 is a float).
  static inline Vec load_w(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  // Eight bf16 weights (their bit patterns) as eight floats: a bf16 is the top half of a float32.
  static inline Vec load_w(const uint16_t* p) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
  }
  static inline Vec load_w(const float* p) { return _mm256_loadu_ps(p); }
  static inline Vec fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
  static inline float sum(Vec v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));  // 8 -> 4 lanes
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));                                            // 4 -> 2
    s = _mm_add_ss(s, _mm_movehdup_ps(s));                                             // 2 -> 1
    return _mm_cvtss_f32(s);
  }
  // R output rows x BT activation rows per block: R * BT accumulators + R weight vectors + 1 activation
  // vector fit the 16 ymm registers; up to 2 activation rows take R = 4 (4-8 independent FMA chains hide
  // the FMA latency), more take R = 2 with BT = 4.
  static constexpr int rows_per_block(int64_t M) { return M <= 2 ? 4 : 2; }
};

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq")
struct Avx512 {
  static constexpr int kLanes = 16;
  using Vec = __m512;
  static inline Vec zero() { return _mm512_setzero_ps(); }
  static inline Vec load(const float* p) { return _mm512_loadu_ps(p); }
  static inline Vec load_w(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static inline Vec load_w(const uint16_t* p) {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
  }
  static inline Vec load_w(const float* p) { return _mm512_loadu_ps(p); }
  static inline Vec fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
  static inline float sum(Vec v) { return _mm512_reduce_add_ps(v); }
  // 32 zmm registers: R = 4 for 2-4 activation rows (4 x 4 accumulators + 4 weights + 1 activation = 21);
  // for one (decode), 8 rows read as runs (rows_kernel): more streams in flight on each core, which a Zen 4's
  // memory serves faster than 4 (8 accumulators + 8 weights + 1 activation = 17).
  static constexpr int rows_per_block(int64_t M) { return M <= 1 ? 8 : 4; }
};
#pragma GCC pop_options

// A weight as a float, for the scalar tail: int8 exactly; bf16 from its bit pattern (a float's top half).
inline float to_float(int8_t w) { return static_cast<float>(w); }
inline float to_float(float w) { return w; }  // float32 weights as they are
inline float to_float(uint16_t w) {
  const uint32_t bits = static_cast<uint32_t>(w) << 16;
  float f;
  __builtin_memcpy(&f, &bits, sizeof f);
  return f;
}

// out[r * BT + b] = x[b] . w[r] for R weight rows (w, row stride K) and BT activation rows (x, stride K):
// dot products, unscaled. W: int8_t, or uint16_t holding bf16 bit patterns. The accumulators are one flat
// array indexed by constants after full unrolling: with a 2-D array GCC 12 kept a copy in memory and stored
// all of them on every iteration.
template <class Isa, int R, int BT, class W>
inline void dot_block(const float* x, const W* w, int64_t K, int64_t stride, int64_t next, float* out) {
  using Vec = typename Isa::Vec;
  constexpr int L = Isa::kLanes;
  Vec acc[R * BT];
#pragma GCC unroll 16
  for (int i = 0; i < R * BT; ++i) acc[i] = Isa::zero();

  const int64_t k_vec = K - K % L;
  int64_t k = 0;
  for (; k + kCacheLine <= k_vec;) {
    // Each row's bytes kPrefetchBytes / R ahead; past the row's end, the same row of the next block (`next`
    // weights on), so that a block starts warm. A prefetch never faults, even past the weights' end.
    // An iteration covers 64 weights: one cache line of int8, two of bf16, four of float32.
    const int64_t ahead = k + kPrefetchBytes / R / static_cast<int64_t>(sizeof(W));
    for (int r = 0; r < R; ++r) {
      const W* line = w + r * stride + (ahead < K ? ahead : next + (ahead - K));
      for (size_t part = 0; part < sizeof(W); ++part)
        _mm_prefetch(reinterpret_cast<const char*>(line) + part * kCacheLine, _MM_HINT_T1);
    }
#pragma GCC unroll 8
    for (int i = 0; i < kCacheLine / L; ++i, k += L) {
      Vec wv[R];
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) wv[r] = Isa::load_w(w + r * stride + k);
#pragma GCC unroll 16
      for (int b = 0; b < BT; ++b) {
        const Vec xv = Isa::load(x + b * K + k);
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r) acc[r * BT + b] = Isa::fma(xv, wv[r], acc[r * BT + b]);
      }
    }
  }
  for (; k < k_vec; k += L) {  // the last K % 64 columns, a vector at a time
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const Vec wv = Isa::load_w(w + r * stride + k);
#pragma GCC unroll 16
      for (int b = 0; b < BT; ++b) acc[r * BT + b] = Isa::fma(Isa::load(x + b * K + k), wv, acc[r * BT + b]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < R * BT; ++i) out[i] = Isa::sum(acc[i]);
  for (k = k_vec; k < K; ++k) {  // the K % L tail, scalar
    for (int r = 0; r < R; ++r)
      for (int b = 0; b < BT; ++b) out[r * BT + b] += x[b * K + k] * to_float(w[r * stride + k]);
  }
}

template <class W>
struct Problem {
  const float* x;       // (M, K)
  const W* w;           // (N, K)
  const float* scales;  // (N,), or nullptr: unscaled (bf16 weights)
  const float* bias;    // (N,) or nullptr
  float* y;             // (M, N)
  int64_t M, N, K;
};

// y[b0 .. b0 + bt, n0 + r * gap] for r < R = scaled dot products + bias, for bt <= 4 activation rows: the
// block's weight rows are `gap` rows apart, and the next block's start `step` rows after n0.
template <class Isa, int R, class W>
inline void block(const Problem<W>& p, int64_t bt, int64_t n0, int64_t gap, int64_t step, int64_t b0) {
  float out[R * 4];  // (R, bt) row-major
  const float* xb = p.x + b0 * p.K;
  const W* wr = p.w + n0 * p.K;
  const int64_t stride = gap * p.K, next = step * p.K;
  switch (bt) {
    case 1: dot_block<Isa, R, 1>(xb, wr, p.K, stride, next, out); break;
    case 2: dot_block<Isa, R, 2>(xb, wr, p.K, stride, next, out); break;
    case 3: dot_block<Isa, R, 3>(xb, wr, p.K, stride, next, out); break;
    default: dot_block<Isa, R, 4>(xb, wr, p.K, stride, next, out); break;
  }
  for (int r = 0; r < R; ++r) {
    const int64_t n = n0 + r * gap;
    const float scale = p.scales ? p.scales[n] : 1.0f, bias = p.bias ? p.bias[n] : 0.0f;
    for (int64_t b = 0; b < bt; ++b) p.y[(b0 + b) * p.N + n] = out[r * bt + b] * scale + bias;
  }
}

// Output rows [begin, end) for all M activation rows. With more than 4 activation rows, the rows go in
// tiles of about kTileBytes; each tile meets every group of 4 activation rows while it sits in L2, so
// memory streams each weight once and a group's activations (4 * K floats) stay in L1/L2 across the tile.
// Up to 4 (decode), one tile is the whole range, read once.
// The blocks of R rows: a row shorter than kShortRowBytes (every row at R = 8) is read in runs. The tile
// is cut into R runs of q = rows / R consecutive rows, and block i takes row i of each run: R streams, each
// reading its run from start to end. Blocks of R adjacent short rows would read one short stretch of memory
// in R places at once, which the CPU's prefetchers follow badly. Longer rows go in blocks of R adjacent
// rows (at R = 4). Then the rows left over, one at a time.
template <class Isa, int R, class W>
inline void rows_kernel(const Problem<W>& p, int64_t begin, int64_t end) {
  const int64_t row_bytes = p.K * static_cast<int64_t>(sizeof(W));
  const int64_t tile = p.M <= 4 ? end - begin : std::max<int64_t>(R, kTileBytes / row_bytes / R * R);
  const bool runs = R == 8 || row_bytes < kShortRowBytes;  // 8 rows a block: runs, whatever their length
  for (int64_t t0 = begin; t0 < end; t0 += tile) {
    const int64_t t1 = std::min(end, t0 + tile), q = (t1 - t0) / R;
    for (int64_t b0 = 0; b0 < p.M; b0 += 4) {
      const int64_t bt = std::min<int64_t>(4, p.M - b0);
      for (int64_t i = 0; i < q; ++i) {
        if (runs) {
          block<Isa, R, W>(p, bt, t0 + i, q, 1, b0);
        } else {
          block<Isa, R, W>(p, bt, t0 + R * i, 1, R, b0);
        }
      }
      for (int64_t n = t0 + R * q; n < t1; ++n) block<Isa, 1, W>(p, bt, n, 1, 1, b0);
    }
  }
}

template <class Isa, class W>
inline void rows_for_isa(const Problem<W>& p, int64_t begin, int64_t end) {
  if (Isa::rows_per_block(p.M) == 8) {
    rows_kernel<Isa, 8, W>(p, begin, end);
  } else if (Isa::rows_per_block(p.M) == 4) {
    rows_kernel<Isa, 4, W>(p, begin, end);
  } else {
    rows_kernel<Isa, 2, W>(p, begin, end);
  }
}

// The entry points: everything they call is inlined (`flatten`) and so compiled for their target.
template <class W>
__attribute__((flatten)) void rows_avx2(const Problem<W>& p, int64_t begin, int64_t end) {
  rows_for_isa<Avx2, W>(p, begin, end);
}

template <class W>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"), flatten))
void rows_avx512(const Problem<W>& p, int64_t begin, int64_t end) {
  rows_for_isa<Avx512, W>(p, begin, end);
}

// y = the product of p, split over torch's threads (row_chunks.h).
template <class W>
void run(const Problem<W>& p, bool allow_avx512) {
  const bool wide = allow_avx512 && p.K >= kAvx512MinColumns && minaf3_cpu::has_avx512();
  const auto rows = wide ? rows_avx512<W> : rows_avx2<W>;
  const int64_t row_work = p.K * p.M * static_cast<int64_t>(sizeof(W));
  minaf3_rows::for_row_chunks(p.N, row_work, 4, [&](int64_t begin, int64_t end) { rows(p, begin, end); });
}

// (..., K) -> (..., N) float32 output for x (..., K) float32 and a weight of N rows; bias checked too.
at::Tensor output_for(const char* name, const at::Tensor& x, const at::Tensor& w,
                      const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), name, ": CPU tensors expected");
  TORCH_CHECK(x.dim() >= 1 && w.dim() == 2, name, ": x (..., K) and w (N, K) expected");
  TORCH_CHECK(x.scalar_type() == at::kFloat, name, ": x must be float32");
  TORCH_CHECK(w.size(1) == x.size(-1), name, ": x has ", x.size(-1), " columns but w has ", w.size(1));
  TORCH_CHECK(!bias || (bias->scalar_type() == at::kFloat && bias->numel() == w.size(0)), name,
              ": bias must be float32 with ", w.size(0), " entries");
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end() - 1);  // (..., K) -> (..., N)
  out_shape.push_back(w.size(0));
  return at::empty(out_shape, x.options());
}

}  // namespace

// y (..., N) float32 = x (..., K) float32 @ (w (N, K) * scales[:, None]).T + bias (N,) float32, for a weight
// stored as `dtype` (element type W) and scales (N,) float32 or none: the three operators below.
template <class W>
at::Tensor stream_product(const char* name, at::ScalarType dtype, const char* dtype_name,
                          const at::Tensor& x, const at::Tensor& w, const at::Tensor* scales,
                          const std::optional<at::Tensor>& bias, bool allow_avx512) {
  at::Tensor y = output_for(name, x, w, bias);
  TORCH_CHECK(w.scalar_type() == dtype, name, ": w must be ", dtype_name);
  TORCH_CHECK(!scales || (scales->scalar_type() == at::kFloat && scales->numel() == w.size(0)), name, ": ",
              w.size(0), " weight rows need as many float32 scales, got ", scales ? scales->numel() : 0);
  const int64_t K = x.size(-1), N = w.size(0), M = K ? x.numel() / K : 0;
  if (M == 0 || N == 0) return y;
  const at::Tensor xc = x.contiguous(), wc = w.contiguous();
  const at::Tensor sc = scales ? scales->contiguous() : at::Tensor();
  const at::Tensor bc = bias ? bias->contiguous() : at::Tensor();
  run(Problem<W>{xc.data_ptr<float>(), reinterpret_cast<const W*>(wc.data_ptr()),
                 scales ? sc.data_ptr<float>() : nullptr, bias ? bc.data_ptr<float>() : nullptr,
                 y.data_ptr<float>(), M, N, K},
      allow_avx512);
  return y;
}

// int8 weights with one scale per row. allow_avx512: false forces the AVX2 code on an AVX-512 CPU (tests
// run both).
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                       const std::optional<at::Tensor>& bias, bool allow_avx512) {
  return stream_product<int8_t>("int8_linear", at::kChar, "int8", x, w, &scales, bias, allow_avx512);
}

// bf16 weights (their bit patterns read as uint16), unscaled: torch's own bf16 matrix-vector products read
// them at about 60% of the speed this reaches (tools/bench.py, row 3 bf16).
at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                       bool allow_avx512) {
  return stream_product<uint16_t>("bf16_linear", at::kBFloat16, "bfloat16", x, w, nullptr, bias,
                                  allow_avx512);
}

// float32 weights, unscaled, for eager decoding, where oneDNN's and MKL's matrix-vector products stream a
// large layer at ~80% and ~50% of the memory's speed (tools/bench.py, row 3 fp32).
at::Tensor f32_linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                      bool allow_avx512) {
  return stream_product<float>("f32_linear", at::kFloat, "float32", x, w, nullptr, bias, allow_avx512);
}

// A torch operator rather than a pybind11 function: torch.compile can trace through it (int8_linear.py
// registers its shape function), and the build needs no Python headers.
TORCH_LIBRARY(minaf3_int8, m) {
  m.def("int8_linear(Tensor x, Tensor w, Tensor scales, Tensor? bias, bool allow_avx512=True) -> Tensor");
  m.def("bf16_linear(Tensor x, Tensor w, Tensor? bias, bool allow_avx512=True) -> Tensor");
  m.def("f32_linear(Tensor x, Tensor w, Tensor? bias, bool allow_avx512=True) -> Tensor");
}

TORCH_LIBRARY_IMPL(minaf3_int8, CPU, m) {
  m.impl("int8_linear", &int8_linear);
  m.impl("bf16_linear", &bf16_linear);
  m.impl("f32_linear", &f32_linear);
}
