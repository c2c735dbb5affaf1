// int4 weight-only matrix product on the CPU for a few activation rows (decode):
//   y (M, N) = x (M, K) @ W.T + bias,   W[n, k] = scales[n, k / G] * (q[n, k] - 8)
// q in 0..15, two per byte (byte j of a row: column 2j in its low nibble, 2j + 1 in its high one), scales
// bf16, one per group of G columns, K a multiple of 128 (the layout: kernels/int4_linear.py).
//
// Decode reads every weight once per token, so its time is the weights' bytes over the memory bandwidth:
// at half a byte per weight, the loop must turn nibbles into products twice as fast per weight as the int8
// loop does to stay at that limit. What keeps it cheap:
//   - x is permuted once per call into the order in which each instruction set unpacks the nibbles, so
//     that no weight is ever shuffled into column order;
//   - the scale multiplies each group's finished sum, not each weight, and the - 8 goes through the sums
//     of x:  sum_k x[k] W[n, k] = sum_g scales[n, g] * (sum_{k in g} x[k] q[n, k] - 8 sum_{k in g} x[k]),
//     each vector lane's share of the second sum being the value its accumulator starts from (computed
//     once per call), so that it costs the loop nothing;
//   - each instruction set has a code of its own for turning nibbles into products (int4_codes.h: AVX-512
//     VNNI with int8 activations, AVX-512 BF16, AVX-512, AVX2); the activations are prepared for it once
//     per call (int4_activations.h).
//
// One translation unit for the instruction sets, as int8_gemv.cpp: built with -mavx2 -mfma; the AVX-512
// entry points alone are compiled for their targets (`flatten` inlines the generic code into them), chosen
// at run time.
// Blocking, prefetching and threading are int8_gemv.cpp's (see there for why): R weight rows x BT
// activation rows per pass over K; short rows (every row at R = 8) read in R runs; weights prefetched
// kPrefetchBytes ahead into L2; each thread claims chunks of rows from its own run first, then from the
// others'.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include "cpu_features.h"
#include "int4_activations.h"
#include "int4_codes.h"
#include "row_chunks.h"

using namespace minaf3_int4;  // NOLINT: this file is their one user

namespace {

// int8_gemv.cpp's sizes (see there why): prefetch distance, weight tile per L2, short rows.
constexpr int64_t kCacheLine = 64, kPrefetchBytes = 64 * 1024, kTileBytes = 256 * 1024;
constexpr int64_t kShortRowBytes = 4096;
constexpr int64_t kAlign = 128;  // K is a multiple of this: a 64-byte line of a row per AVX-512 BF16 step

struct Problem {
  const void* x;       // (M, K) activations, permuted for the Isa (Isa::X)
  const uint8_t* w;    // (N, K / 2) packed
  const uint16_t* s;   // (N, K / G) bf16 scales
  const float* start;  // (M, K / U * L): each accumulator's start, -(8 + Isa::kBias) * its share of X
  const float* xscale;  // (M, K / U * L): each lane's activation scale (int8 activations), else nullptr
  const float* bias;   // (N,) or nullptr
  float* y;            // (M, N) float32 output, or nullptr when the output is y_bf16
  c10::BFloat16* y_bf16;  // (M, N) bfloat16 output (x's dtype), or nullptr
  int64_t M, N, K;
};

// out[r * BT + b] = y[b0 + b, n0 + r * gap] without the bias, for R weight rows `gap` rows apart from row n0
// (the next block `step` rows on, where the prefetch runs past a row's end) and BT activation rows from b0.
// The loop goes in units of U = max(G, step) columns: a group's steps, or one step of several groups.
template <class Isa, int R, int BT, int G>
inline void dot_block(const Problem& p, int64_t n0, int64_t gap, int64_t step, int64_t b0, float* out) {
  using Vec = typename Isa::Vec;
  using X = typename Isa::X;
  constexpr int S = Isa::kStep, L = Isa::kLanes, U = G > S ? G : S;
  const int64_t K = p.K, row = K / 2, groups = K / G, starts = K / U * L;
  const uint8_t* w = p.w + n0 * row;
  const uint16_t* s = p.s + n0 * groups;
  const X* x = static_cast<const X*>(p.x) + b0 * K;
  const float* start = p.start + b0 * starts;
  const float* xscale = p.xscale ? p.xscale + b0 * starts : nullptr;
  const int64_t stride = gap * row, next = step * row;
  Vec total[R * BT];
#pragma GCC unroll 16
  for (int i = 0; i < R * BT; ++i) total[i] = Isa::zero();
  for (int64_t k0 = 0, u = 0; k0 < K; k0 += U, u += L) {
    if ((k0 / 2) % kCacheLine == 0) {  // each row's line kPrefetchBytes / R ahead (or the next block's row)
      const int64_t ahead = k0 / 2 + kPrefetchBytes / R;
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const uint8_t* line = w + r * stride + (ahead < row ? ahead : next + ahead - row);
        _mm_prefetch(reinterpret_cast<const char*>(line), _MM_HINT_T1);
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      typename Isa::Acc acc[BT];
#pragma GCC unroll 4
      for (int b = 0; b < BT; ++b) acc[b] = Isa::begin(start + b * starts + u);
#pragma GCC unroll 4
      for (int64_t k = k0; k < k0 + U; k += S) Isa::template dot<BT>(w + r * stride + k / 2, x + k, K, acc);
      const Vec scale = Isa::template scales<G>(s + r * gap * groups, k0);
#pragma GCC unroll 4
      for (int b = 0; b < BT; ++b) {
        const float* lanes = xscale ? xscale + b * starts + u : nullptr;
        total[r * BT + b] = Isa::finish(acc[b], scale, lanes, total[r * BT + b]);
      }
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < R * BT; ++i) out[i] = Isa::sum(total[i]);
}

template <class Isa, int R, int G>
inline void block(const Problem& p, int64_t bt, int64_t n0, int64_t gap, int64_t step, int64_t b0) {
  float out[R * 2];  // (R, bt) row-major; direct calls, which `flatten` inlines (a pointer would not be)
  if (bt == 1) dot_block<Isa, R, 1, G>(p, n0, gap, step, b0, out);
  if (bt == 2) dot_block<Isa, R, 2, G>(p, n0, gap, step, b0, out);
  for (int r = 0; r < R; ++r) {
    const int64_t n = n0 + r * gap;
    for (int64_t b = 0; b < bt; ++b) {
      const float v = out[r * bt + b] + (p.bias ? p.bias[n] : 0.f);
      if (p.y) p.y[(b0 + b) * p.N + n] = v;
      else p.y_bf16[(b0 + b) * p.N + n] = c10::BFloat16(v);
    }
  }
}

// Output rows [begin, end) for all M activation rows: int8_gemv.cpp's rows_kernel.
template <class Isa, int R, int G>
inline void rows_kernel(const Problem& p, int64_t begin, int64_t end) {
  const int64_t row_bytes = p.K / 2, max_bt = Isa::max_bt(p.M);
  const int64_t tile = p.M <= max_bt ? end - begin : std::max<int64_t>(R, kTileBytes / row_bytes / R * R);
  const bool runs = R == 8 || row_bytes < kShortRowBytes;  // 8 rows a block: runs, whatever their length
  for (int64_t t0 = begin; t0 < end; t0 += tile) {
    const int64_t t1 = std::min(end, t0 + tile), q = (t1 - t0) / R;
    for (int64_t b0 = 0; b0 < p.M; b0 += max_bt) {
      const int64_t bt = std::min<int64_t>(max_bt, p.M - b0);
      for (int64_t i = 0; i < q; ++i) {
        if (runs) block<Isa, R, G>(p, bt, t0 + i, q, 1, b0);  // row i of each of R runs
        if (!runs) block<Isa, R, G>(p, bt, t0 + R * i, 1, R, b0);  // R adjacent rows
      }
      for (int64_t n = t0 + R * q; n < t1; ++n) block<Isa, 1, G>(p, bt, n, 1, 1, b0);
    }
  }
}

template <class Isa, int G>
inline void rows_for_isa(const Problem& p, int64_t begin, int64_t end) {
  if (Isa::rows_per_block(p.M) == 8) rows_kernel<Isa, 8, G>(p, begin, end);
  if (Isa::rows_per_block(p.M) == 4) rows_kernel<Isa, 4, G>(p, begin, end);
  if (Isa::rows_per_block(p.M) == 2) rows_kernel<Isa, 2, G>(p, begin, end);
}

// The entry points: everything they call is inlined (`flatten`) and so compiled for their target.
template <int G>
__attribute__((flatten)) void rows_avx2(const Problem& p, int64_t begin, int64_t end) {
  rows_for_isa<Avx2, G>(p, begin, end);
}

template <int G>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"), flatten))
void rows_avx512(const Problem& p, int64_t begin, int64_t end) {
  rows_for_isa<Avx512, G>(p, begin, end);
}

template <int G>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16"), flatten))
void rows_avx512_bf16(const Problem& p, int64_t begin, int64_t end) {
  rows_for_isa<Avx512Bf16, G>(p, begin, end);
}

template <int G>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni"), flatten))
void rows_avx512_vnni(const Problem& p, int64_t begin, int64_t end) {
  rows_for_isa<Avx512Vnni, G>(p, begin, end);
}

using RowsFn = void (*)(const Problem&, int64_t, int64_t);

// y = the product of p, split over torch's threads (row_chunks.h).
void run(const Problem& p, RowsFn rows) {
  minaf3_rows::for_row_chunks(p.N, p.K / 2 * p.M, [&](int64_t begin, int64_t end) { rows(p, begin, end); });
}

// The code `isa` names ("auto": the best this CPU runs), checked against the CPU.
std::string choose(const std::string& isa) {
  const bool avx512 = minaf3_cpu::has_avx512(), bf16 = minaf3_cpu::has_avx512_bf16();
  const bool vnni = minaf3_cpu::has_avx512_vnni();
  if (isa == "auto") return vnni ? "avx512_vnni" : bf16 ? "avx512_bf16" : avx512 ? "avx512" : "avx2";
  TORCH_CHECK(isa == "avx2" || isa == "avx512" || isa == "avx512_bf16" || isa == "avx512_vnni",
              "int4_linear: isa must be auto, avx2, avx512, avx512_bf16 or avx512_vnni; got ", isa);
  const bool has = isa == "avx2" || (isa == "avx512" ? avx512 : isa == "avx512_bf16" ? bf16 : vnni);
  TORCH_CHECK(has, "int4_linear: this CPU has no ", isa);
  return isa;
}

// y = the product of p for x (M, K): its activations prepared for `code`, then the rows of that code.
template <int G>
void run_for_group(const std::string& code, const at::Tensor& x, Problem& p) {
  if (code == "avx512_vnni") {
    const auto [xp, start, xscale] = prepare_int8(x, G);
    p.x = xp.data_ptr();
    p.start = start.data_ptr<float>();
    p.xscale = xscale.data_ptr<float>();
    run(p, rows_avx512_vnni<G>);
    return;
  }
  const auto [xp, start] = code == "avx512_bf16" ? prepare<Avx512Bf16>(x, G)
                           : code == "avx512"    ? prepare<Avx512>(x, G)
                                                 : prepare<Avx2>(x, G);
  p.x = xp.data_ptr();
  p.start = start.data_ptr<float>();
  run(p, code == "avx512_bf16" ? rows_avx512_bf16<G> : code == "avx512" ? rows_avx512<G> : rows_avx2<G>);
}

}  // namespace

// y (..., N) = x (..., K) @ W.T + bias (N,), W (N, K) the int4 weight above, given as w (N, K / 2) uint8 and
// scales (N, K / G) bfloat16 with G in {32, 64, 128} and K a multiple of 128. x is float32 or bfloat16 and
// y has its dtype (a bf16 model's activations go in and out without a conversion of their own, a dispatched
// call each); bias is float32 or bfloat16; the sums are float32 either way.
// isa: "auto" (the best code this CPU runs), or "avx512_vnni", "avx512_bf16", "avx512", "avx2" (tests run
// each; avx512_vnni rounds the activations to int8 per group, the others multiply them as float32 or bf16).
at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                       const std::optional<at::Tensor>& bias, const std::string& isa) {
  const char* name = "int4_linear";
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu() && scales.device().is_cpu(), name,
              ": CPU tensors expected");
  const auto floats = [](const at::Tensor& t) {
    return t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16;
  };
  TORCH_CHECK(x.dim() >= 1 && floats(x), name, ": x must be float32 or bfloat16 (..., K)");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte, name, ": w must be (N, K / 2) uint8");
  const int64_t K = x.size(-1), N = w.size(0);
  TORCH_CHECK(w.size(1) * 2 == K, name, ": x has ", K, " columns but w packs ", w.size(1) * 2);
  TORCH_CHECK(K % kAlign == 0, name, ": K = ", K, " must be a multiple of ", kAlign);
  TORCH_CHECK(scales.dim() == 2 && scales.scalar_type() == at::kBFloat16 && scales.size(0) == N, name,
              ": scales must be (", N, ", groups) bfloat16");
  const int64_t groups = scales.size(1), G = groups ? K / groups : 0;
  TORCH_CHECK(groups > 0 && G * groups == K && (G == 32 || G == 64 || G == 128), name, ": ", K,
              " columns in ", groups, " groups: the group size must be 32, 64 or 128");
  TORCH_CHECK(!bias || (floats(*bias) && bias->numel() == N), name,
              ": bias must be float32 or bfloat16 with ", N, " entries");
  const std::string code = choose(isa);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end() - 1);
  out_shape.push_back(N);
  at::Tensor y = at::empty(out_shape, x.options());
  const int64_t M = x.numel() / K;
  if (M == 0 || N == 0) return y;
  const at::Tensor xc = x.contiguous().view({M, K}), wc = w.contiguous(), sc = scales.contiguous();
  const at::Tensor bc = bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const bool wide = y.scalar_type() == at::kFloat;
  Problem p{nullptr, wc.data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(sc.data_ptr()), nullptr,
            nullptr, bias ? bc.data_ptr<float>() : nullptr, wide ? y.data_ptr<float>() : nullptr,
            wide ? nullptr : y.data_ptr<c10::BFloat16>(), M, N, K};
  if (G == 32) run_for_group<32>(code, xc, p);
  if (G == 64) run_for_group<64>(code, xc, p);
  if (G == 128) run_for_group<128>(code, xc, p);
  return y;
}

// x (..., K) float32 or bfloat16 -> (xq (..., K) int8, xs (..., K / G) float32) with x ~ xs * xq per group
// of G columns (quantize_row), K a multiple of 128: the activations of vnni_prefill.cpp's product.
std::tuple<at::Tensor, at::Tensor> quantize_int8(const at::Tensor& x, int64_t G) {
  const char* name = "quantize_int8";
  TORCH_CHECK(x.device().is_cpu() && x.dim() >= 1 &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              name, ": x must be a float32 or bfloat16 CPU tensor (..., K)");
  const int64_t K = x.size(-1);
  TORCH_CHECK(K % kAlign == 0 && (G == 32 || G == 64 || G == 128), name, ": K = ", K,
              " must be a multiple of ", kAlign, " and G one of 32, 64, 128; got G = ", G);
  TORCH_CHECK(choose("auto") == "avx512_vnni", name, ": this CPU has no AVX-512 VNNI");
  const int64_t M = x.numel() / K;
  std::vector<int64_t> scale_shape(x.sizes().begin(), x.sizes().end() - 1);
  scale_shape.push_back(K / G);
  at::Tensor xq = at::empty(x.sizes(), x.options().dtype(at::kChar));
  at::Tensor xs = at::empty(scale_shape, x.options().dtype(at::kFloat));
  const at::Tensor xc = x.contiguous().view({M, K});
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> widened;
    for (int64_t m = begin; m < end; ++m)
      quantize_row(float_row(xc, m, widened), K, G, xq.data_ptr<int8_t>() + m * K,
                   xs.data_ptr<float>() + m * (K / G));
  });
  return {xq, xs};
}

TORCH_LIBRARY(minaf3_int4, m) {
  m.def("int4_linear(Tensor x, Tensor w, Tensor scales, Tensor? bias, str isa='auto') -> Tensor");
  m.def("quantize_int8(Tensor x, int G) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(minaf3_int4, CPU, m) {
  m.impl("int4_linear", &int4_linear);
  m.impl("quantize_int8", &quantize_int8);
}
