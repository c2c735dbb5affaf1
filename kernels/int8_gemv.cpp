// int8 weight-only matrix product on the CPU: y (M, N) = x (M, K) @ (w (N, K) * scales (N,)).T + bias
//
// Decode multiplies a few activation rows (batch 1-8) by every weight once, so its time is the time to stream
// the weights from memory. Reading int8 instead of fp32 cuts those bytes by 4; this kernel keeps the
// arithmetic cheap enough (AVX2: sign-extend 8 int8 -> 8 int32 -> 8 float, one FMA per activation row) that
// the stream, not the conversion, stays the limit. The per-row scale is applied once to each finished dot
// product, since sum_k x[k] * w[n, k] * s[n] = s[n] * sum_k x[k] * w[n, k].
//
// Blocking: R output rows x BT activation rows share one pass over K. Each converted weight vector is used
// BT times and each activation vector R times, with R * BT accumulators held in the 16 ymm registers.
// Many activation rows (prefill) are handled by tiling the weight rows so each tile is read from memory once.
// Rows are split across threads with at::parallel_for, so torch.set_num_threads governs this kernel too.
//
// Built by kernels/int8_linear.py through torch.utils.cpp_extension.load with -mavx2 -mfma; it is only
// called when torch reports AVX2 (or better) on this CPU. Measurements: the docstring of int8_linear.py.

// Only the headers needed: <torch/extension.h> (pybind11 and the whole C++ API) triples the build time.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

// Eight lanes of one ymm register hold eight consecutive k.
constexpr int64_t kLanes = 8;
// Output rows per thread task: 64 rows of a 3584-wide layer are 224 KiB of int8, enough work to amortise
// the task start, small enough that the smallest official layer (512 rows, k/v_proj) still spans 2 cores.
constexpr int64_t kGrainRows = 64;
// Least work per thread task, in weight bytes times activation rows: 256 KiB is ~10 us at batch 1, where
// waking a second thread costs a few us. Tiny layers (the 112-wide test models) then stay on one thread.
constexpr int64_t kMinTaskBytes = 256 * 1024;
// Bytes of one cache line: one prefetch per row per line.
constexpr int64_t kCacheLine = 64;
// How far ahead each row stream is prefetched: 1 KiB (16 lines) measured best among 0.25-2 KiB.
constexpr int64_t kPrefetchBytes = 1024;
// Weight bytes per tile (see rows_kernel): a quarter of a 1 MiB L2, leaving room for the activations.
constexpr int64_t kTileBytes = 256 * 1024;

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));  // 8 -> 4 lanes
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));                                            // 4 -> 2
  s = _mm_add_ss(s, _mm_movehdup_ps(s));                                             // 2 -> 1
  return _mm_cvtss_f32(s);
}

// Eight int8 weights at p as eight floats (exact: every int8 is a float).
inline __m256 load_int8x8(const int8_t* p) {
  __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
}

// One step of dot_block: 8 consecutive k of R weight rows against BT activation rows.
template <int R, int BT>
inline void dot_step(const float* xb, const int8_t* wr, int64_t K, int64_t k, __m256* acc) {
  __m256 wv[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) wv[r] = load_int8x8(wr + r * K + k);
#pragma GCC unroll 16
  for (int b = 0; b < BT; ++b) {
    const __m256 xv = _mm256_loadu_ps(xb + b * K + k);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) acc[r * BT + b] = _mm256_fmadd_ps(xv, wv[r], acc[r * BT + b]);
  }
}

// out[r * BT + b] = x[b0 + b] . w[n0 + r] for R weight rows and BT activation rows: dot products, unscaled.
// The accumulators are one flat array indexed by constants after full unrolling: with a 2-D array GCC 12
// kept a copy in memory and stored all of them on every iteration, which halved the FMA rate.
template <int R, int BT>
inline void dot_block(const float* x, const int8_t* w, int64_t K, int64_t n0, int64_t b0, float* out) {
  const int8_t* wr = w + n0 * K;  // row r starts at wr + r * K
  const float* xb = x + b0 * K;   // activation row b starts at xb + b * K
  __m256 acc[R * BT];
#pragma GCC unroll 16
  for (int i = 0; i < R * BT; ++i) acc[i] = _mm256_setzero_ps();

  const int64_t k_vec = K - K % kLanes;
  int64_t k = 0;
  for (; k + kCacheLine <= k_vec;) {
    // R interleaved row streams of a few KiB each are too short for the hardware prefetcher to ramp up:
    // ask for each row's bytes kPrefetchBytes ahead, and past a row's end for the same row of the next
    // block, so a block starts warm. Measured (one core, 18944 x 3584, batch 1): 6.3 ms -> 4.2 ms.
    for (int r = 0; r < R; ++r) {
      const int64_t ahead = k + kPrefetchBytes;
      const int8_t* p = ahead < K ? wr + r * K + ahead : wr + (r + R) * K + (ahead - K);
      _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0);  // never faults, even past the end
    }
#pragma GCC unroll 8
    for (int i = 0; i < kCacheLine / kLanes; ++i, k += kLanes) dot_step<R, BT>(xb, wr, K, k, acc);
  }
  for (; k < k_vec; k += kLanes) dot_step<R, BT>(xb, wr, K, k, acc);
#pragma GCC unroll 16
  for (int i = 0; i < R * BT; ++i) out[i] = hsum(acc[i]);
  for (k = k_vec; k < K; ++k) {  // the K % 8 tail, scalar
    for (int r = 0; r < R; ++r)
      for (int b = 0; b < BT; ++b) out[r * BT + b] += xb[b * K + k] * static_cast<float>(wr[r * K + k]);
  }
}

// y[b0 .. b0 + bt, n0 .. n0 + R] = scaled dot products + bias, for bt <= 4 activation rows.
template <int R>
inline void block(int64_t bt, const float* x, const int8_t* w, const float* scales, const float* bias,
                  float* y, int64_t N, int64_t K, int64_t n0, int64_t b0) {
  float out[R * 4];  // (R, bt) row-major
  switch (bt) {
    case 1: dot_block<R, 1>(x, w, K, n0, b0, out); break;
    case 2: dot_block<R, 2>(x, w, K, n0, b0, out); break;
    case 3: dot_block<R, 3>(x, w, K, n0, b0, out); break;
    default: dot_block<R, 4>(x, w, K, n0, b0, out); break;
  }
  for (int r = 0; r < R; ++r)
    for (int64_t b = 0; b < bt; ++b)
      y[(b0 + b) * N + n0 + r] = out[r * bt + b] * scales[n0 + r] + (bias ? bias[n0 + r] : 0.0f);
}

// Output rows [begin, end) for all M activation rows. Rows go in tiles of about kTileBytes of int8; each
// tile meets every group of 4 activation rows while it sits in L2, so memory streams each weight once and
// a group's activations (4 * K floats) stay in L1/L2 across the tile. Within a tile: blocks of R rows, then
// single rows. Register budget (16 ymm): R * BT accumulators + R weight vectors + 1 activation vector; up
// to 2 activation rows take R = 4 (4-8 independent FMA chains hide the FMA latency), more take R = 2.
template <int R>
void rows_kernel(const float* x, const int8_t* w, const float* scales, const float* bias, float* y, int64_t M,
                 int64_t N, int64_t K, int64_t begin, int64_t end) {
  const int64_t tile = std::max<int64_t>(R, kTileBytes / K / R * R);
  for (int64_t t0 = begin; t0 < end; t0 += tile) {
    const int64_t t1 = std::min(end, t0 + tile);
    for (int64_t b0 = 0; b0 < M; b0 += 4) {
      const int64_t bt = std::min<int64_t>(4, M - b0);
      int64_t n = t0;
      for (; n + R <= t1; n += R) block<R>(bt, x, w, scales, bias, y, N, K, n, b0);
      for (; n < t1; ++n) block<1>(bt, x, w, scales, bias, y, N, K, n, b0);
    }
  }
}

}  // namespace

// x (..., K) float32, w (N, K) int8, scales (N,) float32, bias (N,) float32 or None -> y (..., N) float32.
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                       const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "int8_linear: CPU tensors expected");
  TORCH_CHECK(x.dim() >= 1 && w.dim() == 2, "int8_linear: x (..., K) and w (N, K) expected");
  TORCH_CHECK(x.scalar_type() == at::kFloat, "int8_linear: x must be float32");
  TORCH_CHECK(w.scalar_type() == at::kChar, "int8_linear: w must be int8");
  TORCH_CHECK(scales.scalar_type() == at::kFloat, "int8_linear: scales must be float32");
  const int64_t K = x.size(-1), N = w.size(0), M = K ? x.numel() / K : 0;
  TORCH_CHECK(w.size(1) == K, "int8_linear: x has ", K, " columns but w has ", w.size(1));
  TORCH_CHECK(scales.numel() == N, "int8_linear: ", N, " weight rows but ", scales.numel(), " scales");
  TORCH_CHECK(!bias || (bias->scalar_type() == at::kFloat && bias->numel() == N),
              "int8_linear: bias must be float32 with ", N, " entries");

  const at::Tensor xc = x.contiguous(), wc = w.contiguous(), sc = scales.contiguous();
  const at::Tensor bc = bias ? bias->contiguous() : at::Tensor();
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end() - 1);  // (..., K) -> (..., N)
  out_shape.push_back(N);
  at::Tensor y = at::empty(out_shape, x.options());
  const float* xp = xc.data_ptr<float>();
  const int8_t* wp = wc.data_ptr<int8_t>();
  const float* sp = sc.data_ptr<float>();
  const float* bp = bias ? bc.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();

  // A small layer runs on one thread: starting the pool costs more than its whole product.
  const int64_t grain = std::max<int64_t>(kGrainRows, kMinTaskBytes / std::max<int64_t>(1, K * M));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    if (M <= 2) {
      rows_kernel<4>(xp, wp, sp, bp, yp, M, N, K, begin, end);
    } else {
      rows_kernel<2>(xp, wp, sp, bp, yp, M, N, K, begin, end);
    }
  });
  return y;
}

// A torch operator rather than a pybind11 function: torch.compile can trace through it (int8_linear.py
// registers its shape function), and the build needs no Python headers.
TORCH_LIBRARY(minaf3_int8, m) {
  m.def("int8_linear(Tensor x, Tensor w, Tensor scales, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(minaf3_int8, CPU, m) { m.impl("int8_linear", &int8_linear); }
