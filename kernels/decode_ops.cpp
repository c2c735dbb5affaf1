// The element-wise steps of a Qwen2 decoder layer on the CPU, each one operator instead of several torch ops:
//
//   rms_norm(x, weight, eps)     weight * (x / sqrt(mean(x^2) + eps))       (Qwen2RMSNorm)
//   rope_cache(qkv, cos, sin, k_cache, v_cache, slots, num_heads)
//                                split q, k, v from the fused projection, rotate q and k (rotate-half RoPE),
//                                write k and v into the static cache at `slots`; returns q (B, Hq, T, D)
//   silu_mul(gate_up)            silu(gate) * up, gate and up the two halves of the fused projection
//
// Why: in eager decoding at batch 1 each torch op costs microseconds of dispatch for nanoseconds of work.
// RMSNorm is seven ops, RoPE and the cache writes about fifteen (split, views, two rotations of four ops each,
// two indexed writes), SiLU-and-multiply three; at small widths that dispatch was most of a decoder layer's
// time. The definitions are the torch code in minaf3/decoder.py, which the tests compare these with.
//
// Rounding follows the torch code: statistics and products in float32; with bfloat16 tensors each torch op's
// result is rounded to bfloat16 where torch rounds it (the normalised x before the weight; each RoPE product
// and their sum; silu(gate) before the product), so a bf16 model gets the torch path's values to within the
// float32 rounding of a different order of summation. Built with -mavx2 -mfma by kernels/decode_ops.py.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "avx2_math.h"

using namespace minaf3_avx2;  // NOLINT: load8, hsum, exp8

namespace {

using bf16 = c10::BFloat16;

// Eight float32 values back to T (load8, avx2_math.h, widens them): bfloat16 rounded to nearest even, as
// c10::BFloat16 does.
inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store8(bf16* p, __m256 v) {
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, v);
  for (int i = 0; i < 8; ++i) p[i] = bf16(lanes[i]);
}
// x rounded to T: float32 as is, bfloat16 rounded (what a torch op in T would store).
template <typename T>
inline float round_to(float x) { return static_cast<float>(T(x)); }
template <typename T>
inline __m256 round_to(__m256 v);
template <>
inline __m256 round_to<float>(__m256 v) { return v; }
template <>
inline __m256 round_to<bf16>(__m256 v) {  // to nearest even on the 16 dropped bits; a NaN stays NaN
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_add_epi32(bits, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb));
  const __m256 kept = _mm256_castsi256_ps(_mm256_and_si256(rounded, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
  return _mm256_blendv_ps(kept, v, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
}


// ---- RMSNorm ------------------------------------------------------------------------------------------------

// y (rows, H) = w * round_X(x * rsqrt(mean(x^2) + eps)), rounded to O (X and W both bf16: bf16, else float32).
template <typename X, typename W, typename O>
void rms_norm_rows(const X* x, const W* w, O* y, int64_t rows, int64_t H, float eps) {
  const int64_t H8 = H / 8 * 8;
  for (int64_t r = 0; r < rows; ++r, x += H, y += H) {
    __m256 squares = _mm256_setzero_ps();
    for (int64_t i = 0; i < H8; i += 8) {
      const __m256 v = load8(x + i);
      squares = _mm256_fmadd_ps(v, v, squares);
    }
    float sum = hsum(squares);
    for (int64_t i = H8; i < H; ++i) sum += static_cast<float>(x[i]) * static_cast<float>(x[i]);
    const float scale = 1.0f / std::sqrt(sum / static_cast<float>(H) + eps);
    const __m256 vscale = _mm256_set1_ps(scale);
    for (int64_t i = 0; i < H8; i += 8) {
      store8(y + i, _mm256_mul_ps(load8(w + i), round_to<X>(_mm256_mul_ps(load8(x + i), vscale))));
    }
    for (int64_t i = H8; i < H; ++i) {
      y[i] = O(static_cast<float>(w[i]) * round_to<X>(static_cast<float>(x[i]) * scale));
    }
  }
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "rms_norm: CPU tensors expected");
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 1 && weight.size(0) == x.size(-1), "rms_norm: x (..., H) and ",
              "weight (H,) expected, got ", x.sizes(), " and ", weight.sizes());
  const auto xt = x.scalar_type(), wt = weight.scalar_type();
  TORCH_CHECK((xt == at::kFloat || xt == at::kBFloat16) && (wt == at::kFloat || wt == at::kBFloat16),
              "rms_norm: float32 or bfloat16 expected, got ", xt, " and ", wt);
  const bool narrow = xt == at::kBFloat16 && wt == at::kBFloat16;  // torch's type promotion of w * x
  at::Tensor y = at::empty(x.sizes(), x.options().dtype(narrow ? at::kBFloat16 : at::kFloat));
  const int64_t H = x.size(-1), rows = H ? x.numel() / H : 0;
  if (rows == 0) return y;
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  const float e = static_cast<float>(eps);
  if (narrow) {
    rms_norm_rows(xc.data_ptr<bf16>(), wc.data_ptr<bf16>(), y.data_ptr<bf16>(), rows, H, e);
  } else if (xt == at::kFloat && wt == at::kFloat) {
    rms_norm_rows(xc.data_ptr<float>(), wc.data_ptr<float>(), y.data_ptr<float>(), rows, H, e);
  } else if (xt == at::kFloat) {
    rms_norm_rows(xc.data_ptr<float>(), wc.data_ptr<bf16>(), y.data_ptr<float>(), rows, H, e);
  } else {
    rms_norm_rows(xc.data_ptr<bf16>(), wc.data_ptr<float>(), y.data_ptr<float>(), rows, H, e);
  }
  return y;
}

// ---- RoPE and the cache write ----------------------------------------------------------------------------

// out (D) = x * cos + (-x2, x1) * sin, the rotate-half form of minaf3/decoder.py's apply_rope; with bf16,
// each product and the sum rounded to bf16 as torch's ops in bf16 round them.
// Without contracting x * cos + turned * sin into a fused multiply-add (GCC would: -ffp-contract=fast is its
// default), so float32 results are torch's to the bit.
template <typename T>
__attribute__((optimize("fp-contract=off"))) inline void rotate(const T* x, const T* cos, const T* sin, int64_t D,
                                                                 T* out) {
  const int64_t half = D / 2;
  for (int64_t i = 0; i < D; ++i) {
    const float xi = static_cast<float>(x[i]);
    const float turned = i < half ? -static_cast<float>(x[i + half]) : static_cast<float>(x[i - half]);
    const float a = round_to<T>(xi * static_cast<float>(cos[i]));
    const float b = round_to<T>(turned * static_cast<float>(sin[i]));
    out[i] = T(a + b);
  }
}

template <typename T>
void rope_cache_rows(const T* qkv, const T* cos, const T* sin, T* k_cache, T* v_cache, const int64_t* slots,
                     T* q, int64_t B, int64_t T_, int64_t Hq, int64_t Hkv, int64_t S, int64_t D) {
  const int64_t width = (Hq + 2 * Hkv) * D;  // one token's q, k, v
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < T_; ++t) {
      const T* row = qkv + (b * T_ + t) * width;
      const T* c = cos + (b * T_ + t) * D;
      const T* s = sin + (b * T_ + t) * D;
      for (int64_t h = 0; h < Hq; ++h) rotate(row + h * D, c, s, D, q + ((b * Hq + h) * T_ + t) * D);
      for (int64_t h = 0; h < Hkv; ++h) {
        const int64_t at = ((b * Hkv + h) * S + slots[t]) * D;  // cache (B, Hkv, S, D)
        rotate(row + (Hq + h) * D, c, s, D, k_cache + at);
        const T* v = row + (Hq + Hkv + h) * D;
        for (int64_t i = 0; i < D; ++i) v_cache[at + i] = v[i];
      }
    }
  }
}

at::Tensor rope_cache(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& k_cache,
                      at::Tensor& v_cache, const at::Tensor& slots, int64_t num_heads) {
  TORCH_CHECK(qkv.device().is_cpu() && k_cache.device().is_cpu() && v_cache.device().is_cpu() &&
                  cos.device().is_cpu() && sin.device().is_cpu() && slots.device().is_cpu(),
              "rope_cache: CPU tensors expected");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.is_contiguous() &&
                  v_cache.is_contiguous(),
              "rope_cache: k_cache and v_cache must be contiguous (B, Hkv, S, D), got ", k_cache.sizes(), " and ",
              v_cache.sizes());
  const int64_t B = k_cache.size(0), Hkv = k_cache.size(1), S = k_cache.size(2), D = k_cache.size(3);
  const int64_t Hq = num_heads;
  TORCH_CHECK(qkv.dim() == 3 && qkv.size(0) == B && qkv.size(2) == (Hq + 2 * Hkv) * D, "rope_cache: qkv must be (",
              B, ", T, ", (Hq + 2 * Hkv) * D, ") for ", Hq, " query and ", Hkv, " key heads of ", D, ", got ",
              qkv.sizes());
  TORCH_CHECK(D % 2 == 0, "rope_cache: head_dim must be even, got ", D);
  const int64_t T_ = qkv.size(1);
  TORCH_CHECK(cos.numel() == B * T_ * D && sin.numel() == B * T_ * D, "rope_cache: cos and sin must hold (", B,
              ", ", T_, ", ", D, ") angles, got ", cos.sizes(), " and ", sin.sizes());
  const auto dtype = qkv.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "rope_cache: float32 or bfloat16 expected, got ",
              dtype);
  TORCH_CHECK(cos.scalar_type() == dtype && sin.scalar_type() == dtype && k_cache.scalar_type() == dtype &&
                  v_cache.scalar_type() == dtype,
              "rope_cache: qkv, cos, sin and the caches must share one dtype");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.numel() == T_, "rope_cache: slots must be ", T_,
              " int64 cache slots, got ", slots.scalar_type(), " ", slots.sizes());
  const at::Tensor sc = slots.contiguous();
  const int64_t* slot = sc.data_ptr<int64_t>();
  for (int64_t t = 0; t < T_; ++t) {
    TORCH_CHECK(slot[t] >= 0 && slot[t] < S, "rope_cache: slot ", slot[t], " is outside the ", S, " cache slots");
  }
  at::Tensor q = at::empty({B, Hq, T_, D}, qkv.options());
  if (B * T_ == 0) return q;
  const at::Tensor xc = qkv.contiguous(), cc = cos.contiguous(), snc = sin.contiguous();
  if (dtype == at::kFloat) {
    rope_cache_rows(xc.data_ptr<float>(), cc.data_ptr<float>(), snc.data_ptr<float>(), k_cache.data_ptr<float>(),
                    v_cache.data_ptr<float>(), slot, q.data_ptr<float>(), B, T_, Hq, Hkv, S, D);
  } else {
    rope_cache_rows(xc.data_ptr<bf16>(), cc.data_ptr<bf16>(), snc.data_ptr<bf16>(), k_cache.data_ptr<bf16>(),
                    v_cache.data_ptr<bf16>(), slot, q.data_ptr<bf16>(), B, T_, Hq, Hkv, S, D);
  }
  return q;
}

// ---- SiLU and multiply -----------------------------------------------------------------------------------

// silu(g) = g * sigmoid(g), sigmoid from e = exp(-|g|) <= 1 so that nothing overflows:
// sigmoid(g) = 1 / (1 + e) for g >= 0, e / (1 + e) below.
inline __m256 silu8(__m256 g) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 e = exp8(_mm256_or_ps(g, sign));  // exp(-|g|)
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 negative = _mm256_cmp_ps(g, _mm256_setzero_ps(), _CMP_LT_OQ);
  const __m256 sigmoid = _mm256_div_ps(_mm256_blendv_ps(one, e, negative), _mm256_add_ps(one, e));
  return _mm256_mul_ps(g, sigmoid);
}

// out (rows, I) = round_T(silu(gate)) * up, with gate_up (rows, 2I) = [gate | up].
template <typename T>
void silu_mul_rows(const T* gate_up, T* out, int64_t rows, int64_t I) {
  const int64_t I8 = I / 8 * 8;
  for (int64_t r = 0; r < rows; ++r, gate_up += 2 * I, out += I) {
    const T* up = gate_up + I;
    for (int64_t i = 0; i < I8; i += 8) {
      store8(out + i, _mm256_mul_ps(round_to<T>(silu8(load8(gate_up + i))), load8(up + i)));
    }
    for (int64_t i = I8; i < I; ++i) {
      const float g = static_cast<float>(gate_up[i]);
      out[i] = T(round_to<T>(g / (1.0f + std::exp(-g))) * static_cast<float>(up[i]));
    }
  }
}

at::Tensor silu_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.device().is_cpu(), "silu_mul: a CPU tensor expected");
  TORCH_CHECK(gate_up.dim() >= 1 && gate_up.size(-1) % 2 == 0, "silu_mul: gate_up must be (..., 2 I), got ",
              gate_up.sizes());
  const auto dtype = gate_up.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "silu_mul: float32 or bfloat16 expected, got ", dtype);
  std::vector<int64_t> shape(gate_up.sizes().begin(), gate_up.sizes().end());
  const int64_t I = shape.back() / 2;
  shape.back() = I;
  at::Tensor out = at::empty(shape, gate_up.options());
  const int64_t rows = I ? out.numel() / I : 0;
  if (rows == 0) return out;
  const at::Tensor gc = gate_up.contiguous();
  if (dtype == at::kFloat) {
    silu_mul_rows(gc.data_ptr<float>(), out.data_ptr<float>(), rows, I);
  } else {
    silu_mul_rows(gc.data_ptr<bf16>(), out.data_ptr<bf16>(), rows, I);
  }
  return out;
}

}  // namespace

// Torch operators, so that a forward traced by torch.compile could call them (decode_ops.py registers their
// shape functions); rope_cache declares the caches it writes.
TORCH_LIBRARY(minaf3_decode, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("rope_cache(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slots, "
        "int num_heads) -> Tensor");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
}

TORCH_LIBRARY_IMPL(minaf3_decode, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("rope_cache", &rope_cache);
  m.impl("silu_mul", &silu_mul);
}
