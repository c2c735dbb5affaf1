// One-token decode attention on the CPU: out (B, Hq, 1, D) = softmax(q k^T / sqrt(D) over visible slots) v
//
// At decode time each (row, query head) has one query against the static KV cache (B, Hkv, S, D). The
// generic path does this as two batched matrix products (G x D by D x S, then G x S by S x D per key head)
// plus a softmax kernel: three library calls per layer, each with a fixed cost of microseconds, and BLAS
// wakes its threads for products of a few thousand multiply-adds. At the widths where decode is bound by
// per-step overhead (tools/bench.py row 1: 28 layers, 7 query heads of 16 over 256 slots) those calls took
// a fifth of the compiled step. This kernel is one call per layer that does all three in registers and L1:
//
//   for each (row b, key head h): the G = Hq / Hkv query heads that read head h, so each cache row is read
//   once for all of them (grouped-query attention), and only the visible slots: mask (Bm, S) lists them
//   (causality by slot and left padding, from minaf3/attention.py's attention_mask);
//     1. scores[g][j] = q[g] . k[slot_j] / sqrt(D), one pass over the visible key rows;
//     2. softmax per query head in float32, with an 8-lane exp (Cephes' polynomial, ~2 ulp);
//     3. out[g] = sum_j p[g][j] v[slot_j] / sum_j p[g][j], one pass over the visible value rows.
//   A query that sees no slot outputs zeros (torch's sdpa since 2.5, and the eager path).
//
// q, k, v are float32 or bfloat16 (bf16 -> float32 is a 16-bit shift); all arithmetic is float32, the
// output is q's dtype. (row, key head) pairs run in parallel only when their work pays for waking threads.
// Built with -mavx2 -mfma by kernels/cpu_attention.py, which only calls it on AVX2 CPUs.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace {

// Multiply-adds below which the (row, key head) pairs run on the calling thread: waking a second thread
// and joining it costs a few microseconds, the time of ~100k multiply-adds here.
constexpr int64_t kMinParallelWork = 1 << 17;

// Eight float32 values from p: float32 as is, bfloat16 widened (its bits are the top half of a float32).
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}
inline float load1(const float* p) { return *p; }
inline float load1(const c10::BFloat16* p) { return static_cast<float>(*p); }

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

// exp(x) for x <= 0 (scores minus their maximum): x = n ln2 + r with |r| <= ln2 / 2, exp(r) by Cephes'
// degree-6 polynomial, 2^n built in the exponent bits. Below -87.3 (where float32's exp is denormal or 0)
// the exponent field is 0 and the result 0. A NaN stays NaN (maxps returns its second operand when either
// is NaN), so a corrupt score poisons its row as in the eager path instead of vanishing from the softmax.
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(-87.33654f), x);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // r = x - n ln2, with ln2 split in two so that n * ln2_hi is exact
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_add_ps(_mm256_fmadd_ps(y, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
  const __m256i biased = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
  const __m256i pow2n = _mm256_slli_epi32(_mm256_max_epi32(biased, _mm256_setzero_si256()), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(pow2n));
}

template <typename T>
struct Problem {
  const T* q;             // (B, Hq, D)
  const T* k;             // (B, Hkv, S, D)
  const T* v;             // (B, Hkv, S, D)
  const bool* visible;    // (Bm, S), Bm = 1 (shared by all rows) or B
  T* out;                 // (B, Hq, D)
  int64_t B, Hq, Hkv, S, D, mask_rows;
};

// The G query heads of key head h in row b (see the file comment).
template <typename T>
void attend_group(const Problem<T>& p, int64_t b, int64_t h) {
  const int64_t G = p.Hq / p.Hkv, D = p.D, D8 = D / 8 * 8;
  const bool* visible = p.visible + (p.mask_rows == 1 ? 0 : b) * p.S;
  std::vector<int32_t> slots;
  slots.reserve(p.S);
  for (int64_t s = 0; s < p.S; ++s) {
    if (visible[s]) slots.push_back(static_cast<int32_t>(s));
  }
  T* out = p.out + (b * p.Hq + h * G) * D;  // (G, D)
  const int64_t n = static_cast<int64_t>(slots.size());
  if (n == 0) {
    for (int64_t i = 0; i < G * D; ++i) out[i] = T(0.0f);
    return;
  }
  // Queries in float32, pre-scaled by 1 / sqrt(D): (G, D)
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  std::vector<float> q(G * D), scores(G * n), acc(G * D, 0.0f);
  const T* qg = p.q + (b * p.Hq + h * G) * D;
  for (int64_t i = 0; i < G * D; ++i) q[i] = load1(qg + i) * scale;
  const int64_t head = (b * p.Hkv + h) * p.S * D;  // offset of this head's (S, D) block in k and v

  // 1. scores (G, n): each visible key row is read once for the G heads
  for (int64_t j = 0; j < n; ++j) {
    const T* key = p.k + head + slots[j] * D;
    for (int64_t g = 0; g < G; ++g) {
      const float* qr = q.data() + g * D;
      __m256 dot = _mm256_setzero_ps();
      for (int64_t d = 0; d < D8; d += 8) dot = _mm256_fmadd_ps(_mm256_loadu_ps(qr + d), load8(key + d), dot);
      float s = hsum(dot);
      for (int64_t d = D8; d < D; ++d) s += qr[d] * load1(key + d);
      scores[g * n + j] = s;
    }
  }
  // 2. softmax of each head's row, in place; sums kept for step 3
  const int64_t n8 = n / 8 * 8;
  std::vector<float> sums(G);
  for (int64_t g = 0; g < G; ++g) {
    float* row = scores.data() + g * n;
    __m256 vmax = _mm256_set1_ps(-INFINITY);
    for (int64_t j = 0; j < n8; j += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(row + j));
    float m = hmax(vmax);
    for (int64_t j = n8; j < n; ++j) m = std::max(m, row[j]);
    const __m256 vm = _mm256_set1_ps(m);
    __m256 vsum = _mm256_setzero_ps();
    for (int64_t j = 0; j < n8; j += 8) {
      const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(row + j), vm));
      _mm256_storeu_ps(row + j, e);
      vsum = _mm256_add_ps(vsum, e);
    }
    float sum = hsum(vsum);
    for (int64_t j = n8; j < n; ++j) {
      row[j] = std::exp(row[j] - m);
      sum += row[j];
    }
    sums[g] = sum;
  }
  // 3. acc (G, D) = p (G, n) @ v[slots] (n, D): each visible value row is read once for the G heads
  for (int64_t j = 0; j < n; ++j) {
    const T* value = p.v + head + slots[j] * D;
    for (int64_t d = 0; d < D8; d += 8) {
      const __m256 vv = load8(value + d);
      for (int64_t g = 0; g < G; ++g) {
        float* a = acc.data() + g * D + d;
        _mm256_storeu_ps(a, _mm256_fmadd_ps(_mm256_set1_ps(scores[g * n + j]), vv, _mm256_loadu_ps(a)));
      }
    }
    for (int64_t d = D8; d < D; ++d) {
      const float vd = load1(value + d);
      for (int64_t g = 0; g < G; ++g) acc[g * D + d] += scores[g * n + j] * vd;
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    const float inv = 1.0f / sums[g];
    for (int64_t d = 0; d < D; ++d) out[g * D + d] = T(acc[g * D + d] * inv);
  }
}

template <typename T>
void run(const Problem<T>& p) {
  const int64_t pairs = p.B * p.Hkv;
  const int64_t work = std::max<int64_t>(1, (p.Hq / p.Hkv) * p.S * p.D);  // multiply-adds per pair, at most
  at::parallel_for(0, pairs, std::max<int64_t>(1, kMinParallelWork / work), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) attend_group(p, i / p.Hkv, i % p.Hkv);
  });
}

}  // namespace

// q (B, Hq, 1, D), k and v (B, Hkv, S, D) of one dtype (float32 or bfloat16), visible (Bm, S) bool with
// Bm = 1 or B -> out (B, Hq, 1, D) in that dtype.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& visible) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu() && visible.device().is_cpu(),
              "decode_attention: CPU tensors expected");
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1, "decode_attention: q must be (B, Hq, 1, D), got ", q.sizes());
  TORCH_CHECK(k.dim() == 4 && k.sizes() == v.sizes(),
              "decode_attention: k and v must both be (B, Hkv, S, D), got ", k.sizes(), " and ", v.sizes());
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(3), Hkv = k.size(1), S = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(3) == D, "decode_attention: k ", k.sizes(), " does not match q ",
              q.sizes());
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "decode_attention: ", Hq, " query heads are not a multiple of ", Hkv,
              " key heads");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type(),
              "decode_attention: q, k, v must share one dtype, got ", q.scalar_type(), ", ", k.scalar_type(),
              ", ", v.scalar_type());
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16,
              "decode_attention: float32 or bfloat16 expected, got ", q.scalar_type());
  TORCH_CHECK(visible.scalar_type() == at::kBool && visible.dim() == 2 && visible.size(1) == S &&
                  (visible.size(0) == 1 || visible.size(0) == B),
              "decode_attention: visible must be bool (1 or ", B, ", ", S, "), got ", visible.scalar_type(),
              " ", visible.sizes());
  at::Tensor out = at::empty(q.sizes(), q.options());  // every element is written below
  if (out.numel() == 0) return out;
  const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous(), mc = visible.contiguous();
  if (q.scalar_type() == at::kFloat) {
    run(Problem<float>{qc.data_ptr<float>(), kc.data_ptr<float>(), vc.data_ptr<float>(), mc.data_ptr<bool>(),
                       out.data_ptr<float>(), B, Hq, Hkv, S, D, visible.size(0)});
  } else {
    using bf16 = c10::BFloat16;
    run(Problem<bf16>{qc.data_ptr<bf16>(), kc.data_ptr<bf16>(), vc.data_ptr<bf16>(), mc.data_ptr<bool>(),
                      out.data_ptr<bf16>(), B, Hq, Hkv, S, D, visible.size(0)});
  }
  return out;
}

// A torch operator, so torch.compile can trace through it (cpu_attention.py registers its shape function).
TORCH_LIBRARY(minaf3_attn, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor visible) -> Tensor");
}

TORCH_LIBRARY_IMPL(minaf3_attn, CPU, m) { m.impl("decode_attention", &decode_attention); }
