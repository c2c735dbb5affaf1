// One-token decode attention on the CPU: out (B, Hq, 1, D) = softmax(q k^T / sqrt(D) over visible slots) v
//
// At decode time each (row, query head) has one query against the static KV cache (B, Hkv, S, D). The
// generic path does this as two batched matrix products plus a softmax: three library calls per layer, each
// with a fixed cost of microseconds, over all S slots of the cache. This kernel is one call per layer, and
// reads only the slots the query can see: slots 0..query_slot (causality; the slots after it are not written
// yet, so a cache sized for a long call costs nothing until it fills), of which key_mask hides left padding.
//
// Work: for each (row b, key head h) the G = Hq / Hkv query heads that read head h (grouped-query
// attention), so each cache row is read once for all of them. The slots may be split into ranges, each a
// task that leaves a partial softmax (its maximum score m, sum of exp(score - m), and the value rows
// weighted by those exps); the ranges are merged at the end (the "flash-decoding" split), so a long cache
// is shared out over threads even when B * Hkv = 1. Per range:
//   1. scores[g][j] = q[g] . k[j] / sqrt(D): eight slots at a time, their eight dot products reduced into
//      one vector by one transposing horizontal add (a horizontal sum per score would cost as much as the
//      products at head_dim 16); hidden slots get -inf;
//   2. exp(score - m) per query head, in float32, with an 8-lane exp (Cephes' polynomial, ~2 ulp);
//   3. acc[g] = sum_j p[g][j] v[j], up to 6 heads x 16 columns of accumulators held in registers while the
//      value rows stream past.
// A query that sees no slot outputs zeros (torch's sdpa since 2.5, and the eager path). A NaN in q, a
// visible key or a visible value row makes its outputs NaN, as in the eager path.
//
// q, k, v are float32 or bfloat16 (bf16 -> float32 is a 16-bit shift); all arithmetic is float32, the
// output is q's dtype. Built with -mavx2 -mfma by kernels/cpu_attention.py, which only calls it on AVX2 CPUs.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <vector>

#include "avx2_math.h"

using namespace minaf3_avx2;  // NOLINT: load8, hsum, exp8

namespace {

// Multiply-adds below which every range runs on the calling thread: waking a second thread and joining it
// costs microseconds, and on a machine whose other core is busy far more.
constexpr int64_t kMinParallelWork = 1 << 20;
// Multiply-adds per range when a long cache is split: small enough for two threads to share the ranges
// evenly when one of them is slowed, large enough that merging the partial results costs nothing.
constexpr int64_t kRangeWork = 1 << 18;
// Slots ahead of the one being read whose key and value rows are prefetched with the non-temporal hint. A
// long cache is read once per step and is larger than the caches: read through the cache hierarchy, it would
// evict the layer weights the rest of the step reads next (a decode step's time then grows with the prompt by
// more than the attention arithmetic). The hint asks the CPU to keep these lines out of the outer cache levels.
constexpr int64_t kPrefetchSlots = 32;
// Query heads whose value accumulators are held in registers at once (x 2 vectors of 8 columns: 12 of the
// 16 ymm registers, the rest for the value row and the broadcast weight).
constexpr int kHeadBlock = 6;

inline float load1(const float* p) { return *p; }
inline float load1(const c10::BFloat16* p) { return static_cast<float>(*p); }

// Lane i of the result is the sum of the eight lanes of a[i].
inline __m256 hsum8(const __m256* a) {
  const __m256 s01 = _mm256_hadd_ps(a[0], a[1]), s23 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 s45 = _mm256_hadd_ps(a[4], a[5]), s67 = _mm256_hadd_ps(a[6], a[7]);
  // lanes: (a0 a1 a2 a3 | a0 a1 a2 a3) and (a4 a5 a6 a7 | a4 a5 a6 a7), each a half of its sum
  const __m256 s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);
  return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31));
}

inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}


template <typename T>
struct Problem {
  const T* q;              // (B, Hq, D)
  const T* k;              // (B, Hkv, S, D)
  const T* v;              // (B, Hkv, S, D)
  const bool* key_mask;    // (Bm, S), Bm = 1 (shared by all rows) or B; null: every slot holds a token
  T* out;                  // (B, Hq, D)
  int64_t B, Hq, Hkv, S, D, mask_rows;
  int64_t n;               // slots 0..n-1 may be seen: the query's own slot and those before it
};

// A range's partial softmax for its G query heads: m (G) maximum score, l (G) sum of exp(score - m),
// acc (G, D) sum of exp(score - m) * value row.
struct Partial {
  float* m;
  float* l;
  float* acc;
};

// scores (G, len) of the G query heads q (G, D), pre-scaled, against key rows keys (len, D).
template <typename T>
void score_range(const float* q, const T* keys, int64_t G, int64_t len, int64_t D, float* scores) {
  const int64_t D8 = D / 8 * 8, len8 = D8 == D ? len / 8 * 8 : 0;
  for (int64_t j = 0; j < len8; j += 8) {  // eight slots at once, head_dim a multiple of 8
    const T* block = keys + j * D;
    if (j + kPrefetchSlots + 8 <= len) {
      const char* ahead = reinterpret_cast<const char*>(block + kPrefetchSlots * D);
      for (int64_t l = 0; l < 8 * D * static_cast<int64_t>(sizeof(T)); l += 64)
        _mm_prefetch(ahead + l, _MM_HINT_NTA);
    }
    for (int64_t g = 0; g < G; ++g) {
      __m256 dot[8];
      for (int i = 0; i < 8; ++i) dot[i] = _mm256_setzero_ps();
      for (int64_t d = 0; d < D; d += 8) {
        const __m256 qd = _mm256_loadu_ps(q + g * D + d);
        for (int i = 0; i < 8; ++i) dot[i] = _mm256_fmadd_ps(qd, load8(block + i * D + d), dot[i]);
      }
      _mm256_storeu_ps(scores + g * len + j, hsum8(dot));
    }
  }
  for (int64_t j = len8; j < len; ++j) {  // the rest one slot at a time
    const T* key = keys + j * D;
    for (int64_t g = 0; g < G; ++g) {
      const float* qg = q + g * D;
      __m256 dot = _mm256_setzero_ps();
      for (int64_t d = 0; d < D8; d += 8) dot = _mm256_fmadd_ps(_mm256_loadu_ps(qg + d), load8(key + d), dot);
      float s = hsum(dot);
      for (int64_t d = D8; d < D; ++d) s += qg[d] * load1(key + d);
      scores[g * len + j] = s;
    }
  }
}

// acc (GB of the heads, columns [d, d + 8 W)) = p (those heads' rows of (G, len)) @ values (len, D)[:, d:],
// the GB x W accumulators in registers.
template <int GB, int W, typename T>
void weigh_values(const float* p, int64_t len, const T* values, int64_t D, int64_t d, float* acc) {
  __m256 a[GB][W];
  for (int g = 0; g < GB; ++g)
    for (int w = 0; w < W; ++w) a[g][w] = _mm256_setzero_ps();
  for (int64_t j = 0; j < len; ++j) {
    // Non-temporal only where this pass reads whole rows (head_dim 16): a wider row is read in several passes
    // over the slots (8 W columns each), which need its lines to stay in cache between them.
    if (D == 8 * W && j + kPrefetchSlots < len)
      _mm_prefetch(reinterpret_cast<const char*>(values + (j + kPrefetchSlots) * D), _MM_HINT_NTA);
    __m256 row[W];
    for (int w = 0; w < W; ++w) row[w] = load8(values + j * D + d + 8 * w);
    for (int g = 0; g < GB; ++g) {
      const __m256 weight = _mm256_set1_ps(p[g * len + j]);
      for (int w = 0; w < W; ++w) a[g][w] = _mm256_fmadd_ps(weight, row[w], a[g][w]);
    }
  }
  for (int g = 0; g < GB; ++g)
    for (int w = 0; w < W; ++w) _mm256_storeu_ps(acc + g * D + d + 8 * w, a[g][w]);
}

template <int W, typename T>
void weigh_values_heads(const float* p, int64_t len, const T* values, int64_t D, int64_t d, int64_t heads,
                        float* acc) {
  switch (heads) {  // a block of up to kHeadBlock heads: the count must be a constant to stay in registers
    case 1: return weigh_values<1, W>(p, len, values, D, d, acc);
    case 2: return weigh_values<2, W>(p, len, values, D, d, acc);
    case 3: return weigh_values<3, W>(p, len, values, D, d, acc);
    case 4: return weigh_values<4, W>(p, len, values, D, d, acc);
    case 5: return weigh_values<5, W>(p, len, values, D, d, acc);
    default: return weigh_values<kHeadBlock, W>(p, len, values, D, d, acc);
  }
}

// acc (G, D) = p (G, len) @ values (len, D).
template <typename T>
void weigh_range(const float* p, const T* values, int64_t G, int64_t len, int64_t D, float* acc) {
  const int64_t D16 = D / 16 * 16, D8 = D / 8 * 8;
  // Blocks of equal size (7 heads: 4 and 3, not 6 and 1): a block's accumulators are its independent chains
  // of FMAs, and a block of one head would wait on the FMA latency at every slot.
  const int64_t blocks = (G + kHeadBlock - 1) / kHeadBlock, per_block = (G + blocks - 1) / blocks;
  for (int64_t g = 0; g < G; g += per_block) {
    const int64_t heads = std::min<int64_t>(per_block, G - g);
    const float* pg = p + g * len;
    float* ag = acc + g * D;
    for (int64_t d = 0; d < D16; d += 16) weigh_values_heads<2>(pg, len, values, D, d, heads, ag);
    if (D8 > D16) weigh_values_heads<1>(pg, len, values, D, D16, heads, ag);
    for (int64_t d = D8; d < D; ++d) {  // columns past the last multiple of 8
      for (int64_t h = 0; h < heads; ++h) {
        float s = 0.0f;
        for (int64_t j = 0; j < len; ++j) s += pg[h * len + j] * load1(values + j * D + d);
        ag[h * D + d] = s;
      }
    }
  }
}

// The partial softmax of slots [j0, j1) for the G query heads of key head h in row b.
template <typename T>
void attend_range(const Problem<T>& p, int64_t b, int64_t h, int64_t j0, int64_t j1, Partial out) {
  const int64_t G = p.Hq / p.Hkv, D = p.D, len = j1 - j0;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  std::vector<float> q(G * D), scores(G * len);
  const T* qg = p.q + (b * p.Hq + h * G) * D;
  for (int64_t i = 0; i < G * D; ++i) q[i] = load1(qg + i) * scale;
  const int64_t head = (b * p.Hkv + h) * p.S * D + j0 * D;  // offset of slot j0 of this head in k and v
  score_range(q.data(), p.k + head, G, len, D, scores.data());
  if (p.key_mask != nullptr) {  // left padding: hidden slots weigh exp(-inf) = 0
    const bool* visible = p.key_mask + (p.mask_rows == 1 ? 0 : b) * p.S + j0;
    for (int64_t j = 0; j < len; ++j) {
      if (!visible[j])
        for (int64_t g = 0; g < G; ++g) scores[g * len + j] = -INFINITY;
    }
  }
  const int64_t len8 = len / 8 * 8;
  for (int64_t g = 0; g < G; ++g) {
    float* row = scores.data() + g * len;
    __m256 vmax = _mm256_set1_ps(-INFINITY);
    for (int64_t j = 0; j < len8; j += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(row + j));
    float m = hmax(vmax);
    for (int64_t j = len8; j < len; ++j) m = std::max(m, row[j]);
    out.m[g] = m;
    if (m == -INFINITY) m = 0.0f;  // nothing visible in this range: every exp is 0
    const __m256 vm = _mm256_set1_ps(m);
    __m256 vsum = _mm256_setzero_ps();
    for (int64_t j = 0; j < len8; j += 8) {
      const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(row + j), vm));
      _mm256_storeu_ps(row + j, e);
      vsum = _mm256_add_ps(vsum, e);
    }
    float sum = hsum(vsum);
    for (int64_t j = len8; j < len; ++j) {
      row[j] = row[j] == -INFINITY ? 0.0f : std::exp(row[j] - m);
      sum += row[j];
    }
    out.l[g] = sum;
  }
  weigh_range(scores.data(), p.v + head, G, len, D, out.acc);
}

// out (G, D) of key head h in row b from its ranges' partial softmaxes: rescaled to their common maximum.
template <typename T>
void merge(const Problem<T>& p, int64_t b, int64_t h, const std::vector<Partial>& parts) {
  const int64_t G = p.Hq / p.Hkv, D = p.D;
  T* out = p.out + (b * p.Hq + h * G) * D;
  std::vector<float> sum(D);
  for (int64_t g = 0; g < G; ++g) {
    float m = -INFINITY;  // the largest range maximum; NaN if any is (a NaN score), which then reaches out
    for (const Partial& part : parts) {
      if (part.m[g] > m || std::isnan(part.m[g])) m = std::isnan(m) ? m : part.m[g];
    }
    if (m == -INFINITY) {  // the query sees no slot
      for (int64_t d = 0; d < D; ++d) out[g * D + d] = T(0.0f);
      continue;
    }
    float l = 0.0f;
    std::fill(sum.begin(), sum.end(), 0.0f);
    for (const Partial& part : parts) {
      const float w = part.m[g] == -INFINITY ? 0.0f : std::exp(part.m[g] - m);
      l += w * part.l[g];
      for (int64_t d = 0; d < D; ++d) sum[d] += w * part.acc[g * D + d];
    }
    for (int64_t d = 0; d < D; ++d) out[g * D + d] = T(sum[d] / l);
  }
}

template <typename T>
void run(const Problem<T>& p) {
  const int64_t pairs = p.B * p.Hkv, G = p.Hq / p.Hkv;
  const int64_t pair_work = 2 * G * p.n * p.D;  // multiply-adds: scores and weighted values
  const bool parallel = pairs * pair_work >= kMinParallelWork && at::get_num_threads() > 1;
  // Ranges per (row, key head): one, unless the work is shared out; then at least 64 slots each.
  const int64_t ranges = parallel ? std::clamp<int64_t>(pair_work / kRangeWork, 1, std::max<int64_t>(1, p.n / 64))
                                  : 1;
  const int64_t tasks = pairs * ranges, stride = G * (p.D + 2);
  std::vector<float> partials(tasks * stride);
  auto partial = [&](int64_t task) {
    float* base = partials.data() + task * stride;
    return Partial{base, base + G, base + 2 * G};
  };
  auto task = [&](int64_t t) {
    const int64_t pair = t / ranges, r = t % ranges;
    attend_range(p, pair / p.Hkv, pair % p.Hkv, r * p.n / ranges, (r + 1) * p.n / ranges, partial(t));
  };
  if (!parallel) {
    for (int64_t t = 0; t < tasks; ++t) task(t);
  } else {
    // Tasks are claimed one at a time, so a thread whose core is busy elsewhere does fewer of them.
    std::atomic<int64_t> next{0};
    at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
      for (int64_t t = next++; t < tasks; t = next++) task(t);
    });
  }
  std::vector<Partial> parts(ranges);
  for (int64_t pair = 0; pair < pairs; ++pair) {
    for (int64_t r = 0; r < ranges; ++r) parts[r] = partial(pair * ranges + r);
    merge(p, pair / p.Hkv, pair % p.Hkv, parts);
  }
}

}  // namespace

// q (B, Hq, 1, D), k and v (B, Hkv, S, D) of one dtype (float32 or bfloat16); key_mask (Bm, S) bool with
// Bm = 1 or B, or none; query_slot: one integer, the query's cache slot (it sees slots 0..query_slot), or
// none for every slot -> out (B, Hq, 1, D) in q's dtype.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& key_mask,
                            const std::optional<at::Tensor>& query_slot) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
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
  if (key_mask) {
    TORCH_CHECK(key_mask->device().is_cpu() && key_mask->scalar_type() == at::kBool && key_mask->dim() == 2 &&
                    key_mask->size(1) == S && (key_mask->size(0) == 1 || key_mask->size(0) == B),
                "decode_attention: key_mask must be bool (1 or ", B, ", ", S, "), got ", key_mask->scalar_type(),
                " ", key_mask->sizes());
  }
  int64_t n = S;
  if (query_slot) {
    TORCH_CHECK(query_slot->device().is_cpu() && query_slot->numel() == 1 && !query_slot->is_floating_point(),
                "decode_attention: query_slot must be one integer, got ", query_slot->scalar_type(), " ",
                query_slot->sizes());
    // Read in place: item() is a dispatched operator call, a microsecond per layer of every decoded token.
    const int64_t slot = query_slot->scalar_type() == at::kLong ? *query_slot->data_ptr<int64_t>()
                                                                : query_slot->item<int64_t>();
    TORCH_CHECK(slot >= 0 && slot < S, "decode_attention: query_slot ", slot, " is outside the ", S,
                " cache slots");
    n = slot + 1;
  }
  at::Tensor out = at::empty(q.sizes(), q.options());  // every element is written below
  if (out.numel() == 0) return out;
  const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  const at::Tensor mc = key_mask ? key_mask->contiguous() : at::Tensor();
  const bool* mask = key_mask ? mc.data_ptr<bool>() : nullptr;
  const int64_t mask_rows = key_mask ? key_mask->size(0) : 1;
  if (q.scalar_type() == at::kFloat) {
    run(Problem<float>{qc.data_ptr<float>(), kc.data_ptr<float>(), vc.data_ptr<float>(), mask,
                       out.data_ptr<float>(), B, Hq, Hkv, S, D, mask_rows, n});
  } else {
    using bf16 = c10::BFloat16;
    run(Problem<bf16>{qc.data_ptr<bf16>(), kc.data_ptr<bf16>(), vc.data_ptr<bf16>(), mask,
                      out.data_ptr<bf16>(), B, Hq, Hkv, S, D, mask_rows, n});
  }
  return out;
}

// A torch operator, so torch.compile can trace through it (cpu_attention.py registers its shape function).
TORCH_LIBRARY(minaf3_attn, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? key_mask, Tensor? query_slot) -> Tensor");
}

TORCH_LIBRARY_IMPL(minaf3_attn, CPU, m) { m.impl("decode_attention", &decode_attention); }
