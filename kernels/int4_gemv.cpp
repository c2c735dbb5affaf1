// int4 weight-only matrix product on the CPU for a few activation rows (decode):
//   y (M, N) = x (M, K) @ W.T + bias,   W[n, k] = scales[n, k / G] * (q[n, k] - 8)
// q in 0..15, two per byte, in tiles of 16 rows stored word by word, bf16 scales one per group of G columns
// tiled the same way, K a multiple of 128 (the layout: kernels/int4_linear.py, int4_layout.h).
//
// Decode reads every weight once per token, so its time is the weights' bytes over the memory bandwidth:
// at half a byte per weight, the loop must turn nibbles into products twice as fast per weight as the int8
// loop does to stay at that limit. What keeps it cheap:
//   - a vector lane is a row: a tile's word w for its 16 rows is one 64-byte load, multiplied by the 8
//     activations of columns 8w .. 8w + 7 broadcast to every lane; nothing is shuffled, nothing summed
//     across lanes;
//   - the scale multiplies each group's finished sum, once for the 16 rows of a tile, not each weight, and
//     the - 8 goes through the sums of x:
//       sum_k x[k] W[n, k] = sum_g scales[n, g] * (sum_{k in g} x[k] q[n, k] - 8 sum_{k in g} x[k]),
//     the second sum being the value a group's accumulators start from (computed once per call);
//   - each instruction set has a code of its own for turning nibbles into products (int4_codes.h: AVX-512
//     VNNI, AVX-512, AVX2, all multiplying activations rounded to int8, exactly); the activations are
//     rounded and ordered once per call (int4_activations.h).
//
// One translation unit for the instruction sets, as int8_gemv.cpp: built with -mavx2 -mfma; the AVX-512
// entry points alone are compiled for their targets (`flatten` inlines the generic code into them), chosen
// at run time. A tile's words are one run of memory and the tiles follow one another; a one-row pass reads
// kStreams tiles of a chunk at once, from as many runs (rows_kernel), which the CPU's own prefetcher
// follows (a software prefetch ahead of them was slower); each thread claims chunks of tiles from its own
// run first, then from the others' (row_chunks.h). Several activation rows all pass over a tile (at most
// 16 x 9.5 KB at AF3's widest K) while it is in L2.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include "cpu_features.h"
#include "int4_activations.h"
#include "int4_codes.h"
#include "int4_layout.h"
#include "row_chunks.h"

using namespace minaf3_int4;  // NOLINT: this file is their one user
using minaf3_int4_layout::kTileRows;

namespace {

constexpr int64_t kAlign = 128;  // K is a multiple of this (kernels/int4_linear.py's ALIGN)
constexpr int64_t kChunkTiles = 4;  // a chunk of rows is whole runs of every code's kStreams tiles
// Weight bytes per chunk of a one-row pass: half of row_chunks.h's, which measured faster (the cores'
// kStreams runs stay closer together) while the memory ran fast, and no slower while it ran slow.
constexpr int64_t kStreamChunkBytes = 256 * 1024;

struct Problem {
  const int8_t* x;        // (M, K) int8 activations, each 8 columns' even ones then odd ones
  const uint8_t* w;       // (N, K / 2) packed, tiled
  const uint16_t* s;      // (N, K / G) bf16 scales, tiled
  const int32_t* start;   // (M, K / G) each group's start: -8 times its sum of int8 activations
  const float* xscale;    // (M, K / G) each group's activation scale
  const float* bias;      // (N,) or nullptr
  float* y;               // (M, N) float32 output, or nullptr when the output is y_bf16
  c10::BFloat16* y_bf16;  // (M, N) bfloat16 output (x's dtype), or nullptr
  int64_t M, N, K;
};

// out[(t * BT + b) * 16 + l] = y[b0 + b, n0 + t * gap + l] without the bias: T tiles `gap` rows apart from
// row n0 (all 16 rows of each when kFull, else T = 1 and the rows the last tile has), read group by group
// together, times BT activation rows from b0.
template <class Isa, int T, int BT, int G, bool kFull>
inline void tile_block(const Problem& p, int64_t n0, int64_t gap, int64_t b0, float* out) {
  using Vec = typename Isa::Vec;
  constexpr int L = Isa::kLanes, H = Isa::kHalves, words = G / 8, A = T * H * BT;  // words of a group
  static_assert(kFull || T == 1, "a short tile is read alone");
  const int64_t K = p.K, groups = K / G;
  const int64_t rows = kFull ? kTileRows : minaf3_int4_layout::tile_rows(p.N, n0), stride = 4 * rows;
  const uint8_t* w[T];
  const uint16_t* s[T];
#pragma GCC unroll 4
  for (int t = 0; t < T; ++t) {
    w[t] = p.w + (n0 + t * gap) * (K / 2);
    s[t] = p.s + (n0 + t * gap) * groups;
  }
  const int8_t* x = p.x + b0 * K;
  const int32_t* start = p.start + b0 * groups;
  const float* xscale = p.xscale + b0 * groups;
  typename Isa::Mask mask[H];
#pragma GCC unroll 2
  for (int h = 0; h < H; ++h) mask[h] = Isa::mask(static_cast<int>(std::clamp<int64_t>(rows - h * L, 0, L)));
  Vec total[A];  // [t][h][b]
#pragma GCC unroll 8
  for (int i = 0; i < A; ++i) total[i] = Isa::zero();
  for (int64_t g = 0; g < groups; ++g) {
    typename Isa::Acc acc[A];
#pragma GCC unroll 8
    for (int i = 0; i < A; ++i) acc[i] = Isa::begin(start[(i % BT) * groups + g]);
#pragma GCC unroll 16
    for (int j = 0; j < words; ++j) {
#pragma GCC unroll 4
      for (int t = 0; t < T; ++t) {
#pragma GCC unroll 2
        for (int h = 0; h < H; ++h) {
          const uint8_t* word = w[t] + (g * words + j) * stride + 4 * L * h;
          const typename Isa::Raw v = kFull ? Isa::load(word) : Isa::load(word, mask[h]);
          Isa::template dot<BT>(v, x + 8 * (g * words + j), K, acc + (t * H + h) * BT);
        }
      }
    }
#pragma GCC unroll 4
    for (int t = 0; t < T; ++t) {
      const uint16_t* scales = s[t] + g * rows;  // the group's scale of each of the tile's rows
      uint16_t padded[kTileRows];  // a short tile's, then zeros: no load passes the tensor's end
      if constexpr (!kFull) {
        std::fill(std::copy(scales, scales + rows, padded), padded + kTileRows, 0);
        scales = padded;
      }
#pragma GCC unroll 2
      for (int h = 0; h < H; ++h) {
        const Vec scale = Isa::scales(scales + h * L);
#pragma GCC unroll 4
        for (int b = 0; b < BT; ++b) {
          const int i = (t * H + h) * BT + b;
          total[i] = Isa::finish(acc[i], scale, xscale[b * groups + g], total[i]);
        }
      }
    }
  }
#pragma GCC unroll 4
  for (int t = 0; t < T; ++t)
#pragma GCC unroll 2
    for (int h = 0; h < H; ++h)
#pragma GCC unroll 4
      for (int b = 0; b < BT; ++b)
        Isa::store(out + (t * BT + b) * kTileRows + h * L, total[(t * H + h) * BT + b]);
}

// y's rows of T tiles `gap` rows apart from n0 (see tile_block) for activation rows b0 .. b0 + BT, with bias.
template <class Isa, int T, int BT, int G>
inline void tiles(const Problem& p, int64_t n0, int64_t gap, int64_t b0) {
  float out[T * BT * kTileRows];  // direct calls, which `flatten` inlines (a pointer would not be)
  const int64_t rows = minaf3_int4_layout::tile_rows(p.N, n0);
  if (rows == kTileRows) tile_block<Isa, T, BT, G, true>(p, n0, gap, b0, out);
  if constexpr (T == 1) {
    if (rows < kTileRows) tile_block<Isa, 1, BT, G, false>(p, n0, gap, b0, out);
  }
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t b = 0; b < BT; ++b) {
      for (int64_t l = 0; l < rows; ++l) {
        const int64_t n = n0 + t * gap + l;
        const float v = out[(t * BT + b) * kTileRows + l] + (p.bias ? p.bias[n] : 0.f);
        if (p.y) p.y[(b0 + b) * p.N + n] = v;
        else p.y_bf16[(b0 + b) * p.N + n] = c10::BFloat16(v);
      }
    }
  }
}

// Output rows [begin, end) (begin a multiple of kTileRows) for all M activation rows. One activation row
// (decode): Isa::kStreams tiles at a time, one from each of the kStreams runs that split the chunk's tiles,
// so that each core reads that many streams at once: Zen 4's memory serves a core faster so than one stream
// (or than a software prefetch ahead of one). Several rows: a tile at a time, every row passing over it.
template <class Isa, int G>
inline void rows_kernel(const Problem& p, int64_t begin, int64_t end) {
  constexpr int S = Isa::kStreams;
  int64_t n0 = begin;
  if (p.M == 1) {
    const int64_t runs = (end - begin) / kTileRows / S, gap = runs * kTileRows;
    for (int64_t i = 0; i < runs; ++i) tiles<Isa, S, 1, G>(p, begin + i * kTileRows, gap, 0);
    n0 = begin + runs * S * kTileRows;
  }
  for (; n0 < end; n0 += kTileRows) {
    for (int64_t b0 = 0; b0 < p.M; b0 += Isa::kMaxBT) {
      const int64_t bt = std::min<int64_t>(Isa::kMaxBT, p.M - b0);
      if (bt == 1) tiles<Isa, 1, 1, G>(p, n0, 0, b0);
      if (bt == 2) tiles<Isa, 1, 2, G>(p, n0, 0, b0);
      if constexpr (Isa::kMaxBT >= 3) {
        if (bt == 3) tiles<Isa, 1, 3, G>(p, n0, 0, b0);
        if (bt == 4) tiles<Isa, 1, 4, G>(p, n0, 0, b0);
      }
    }
  }
}

// The entry points: everything they call is inlined (`flatten`) and so compiled for their target.
template <int G>
__attribute__((flatten)) void rows_avx2(const Problem& p, int64_t begin, int64_t end) {
  rows_kernel<Avx2, G>(p, begin, end);
}

template <int G>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"), flatten))
void rows_avx512(const Problem& p, int64_t begin, int64_t end) {
  rows_kernel<Avx512, G>(p, begin, end);
}

template <int G>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni"), flatten))
void rows_avx512_vnni(const Problem& p, int64_t begin, int64_t end) {
  rows_kernel<Avx512Vnni, G>(p, begin, end);
}

using RowsFn = void (*)(const Problem&, int64_t, int64_t);

// y = the product of p, split over torch's threads in chunks of whole tiles (row_chunks.h).
void run(const Problem& p, RowsFn rows) {
  const bool one = p.M == 1;
  const int64_t unit = one ? kChunkTiles * kTileRows : kTileRows;  // rows_kernel's block of rows
  minaf3_rows::for_row_chunks(
      p.N, p.K / 2 * p.M, unit, [&](int64_t begin, int64_t end) { rows(p, begin, end); },
      one ? kStreamChunkBytes : minaf3_rows::kChunkWork);
}

// The code `isa` names ("auto": the best this CPU runs), checked against the CPU.
std::string choose(const std::string& isa) {
  const bool avx512 = minaf3_cpu::has_avx512(), vnni = minaf3_cpu::has_avx512_vnni();
  if (isa == "auto") return vnni ? "avx512_vnni" : avx512 ? "avx512" : "avx2";
  TORCH_CHECK(isa == "avx2" || isa == "avx512" || isa == "avx512_vnni",
              "int4_linear: isa must be auto, avx2, avx512 or avx512_vnni; got ", isa);
  const bool has = isa == "avx2" || (isa == "avx512" ? avx512 : vnni);
  TORCH_CHECK(has, "int4_linear: this CPU has no ", isa);
  return isa;
}

// y = the product of p for x (M, K): its activations prepared, then the rows of `code`.
template <int G>
void run_for_group(const std::string& code, const at::Tensor& x, Problem& p) {
  const auto [xp, start, xscale] = prepare_int8(x, G);
  p.x = xp.data_ptr<int8_t>();
  p.start = start.data_ptr<int32_t>();
  p.xscale = xscale.data_ptr<float>();
  run(p, code == "avx512_vnni" ? rows_avx512_vnni<G> : code == "avx512" ? rows_avx512<G> : rows_avx2<G>);
}

}  // namespace

// y (..., N) = x (..., K) @ W.T + bias (N,), W (N, K) the int4 weight above, given as w (N, K / 2) uint8 and
// scales (N, K / G) bfloat16 (both tiled) with G in {32, 64, 128} and K a multiple of 128. x is float32 or
// bfloat16 and y has its dtype (a bf16 model's activations go in and out without a conversion of their own,
// a dispatched call each); bias is float32 or bfloat16; the group sums are converted to float32 and scaled.
// isa: "auto" (the best code this CPU runs), or "avx512_vnni", "avx512", "avx2" (tests run each; all round
// the activations to int8 per group and give the same bits).
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
