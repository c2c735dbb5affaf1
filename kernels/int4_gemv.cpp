// int4 weight-only matrix product on the CPU for a few activation rows (decode):
//   y (M, N) = x (M, K) @ W.T + bias,   W[n, k] = scales[n, k / G] * (q[n, k] - 8)
// q in 0..15, two per byte (byte j of a row: column 2j in its low nibble, 2j + 1 in its high one), scales
// bf16, one per group of G columns, K a multiple of 128 (the layout: kernels/int4_linear.py).
//
// Decode reads every weight once per token, so its time is the weights' bytes over the memory bandwidth:
// at half a byte per weight, the loop must turn nibbles into products twice as fast per weight as the int8
// loop does to stay at that limit. Three things keep it cheap:
//   - x is permuted once per call into the order in which each instruction set unpacks the nibbles, so
//     that no weight is ever shuffled into column order;
//   - the scale multiplies each group's finished sum, not each weight, and the - 8 goes through the sums
//     of x:  sum_k x[k] W[n, k] = sum_g scales[n, g] * (sum_{k in g} x[k] q[n, k] - 8 sum_{k in g} x[k]),
//     each vector lane's share of the second sum being the value its accumulator starts from (computed
//     once per call), so that it costs the loop nothing;
//   - on CPUs with AVX-512 BF16, a nibble becomes the bf16 number 128 + q with one bitwise operation (its
//     bits are 0x4300 | q), and _mm512_dpbf16_ps multiplies 32 of them by bf16 activations at once; the 128
//     joins the 8. Products of bf16 values are exact in float32 and the sums are float32: only the
//     activations are rounded, to bf16 (a relative 2^-8 at most, far below int4's own error).
// On CPUs with AVX-512 VNNI (the default there; every CPU with AVX-512 BF16 has it) the activations are
// rounded to int8 once per call, per group of G columns with a scale of their own (x ~ xs * xq), and
// _mm512_dpbusd_epi32 multiplies 64 nibbles, masked to bytes, by 64 of them at once, summing exactly in
// int32: half the vector instructions per weight of the bf16 code, whose decode stops at the CPU rather than
// at the memory on fast memory. Each group's activations are then off by at most half their scale, about
// the bf16 rounding's size for a group without outliers, still far below int4's own error.
// Without either the nibbles are widened to int32 and converted to float32 (AVX-512 or AVX2 code), with
// float32 activations.
//
// One source for the instruction sets, as int8_gemv.cpp: built with -mavx2 -mfma; the AVX-512 entry points
// alone are compiled for their targets (`flatten` inlines the generic code into them), chosen at run time.
// Blocking, prefetching and threading are int8_gemv.cpp's (see there for why): R weight rows x BT
// activation rows per pass over K; short rows read in R runs; weights prefetched kPrefetchBytes ahead into
// L2; each thread claims chunks of rows from its own run first, then from the others'.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#pragma GCC diagnostic ignored "-Wpsabi"  // __m512 in generic code: always inlined (see int8_gemv.cpp)

namespace {

// int8_gemv.cpp's sizes (see there why): prefetch distance, weight tile per L2, short rows, work per chunk.
constexpr int64_t kCacheLine = 64, kPrefetchBytes = 64 * 1024, kTileBytes = 256 * 1024;
constexpr int64_t kShortRowBytes = 4096, kChunkWork = 512 * 1024, kMinChunkRows = 16;
constexpr int64_t kAlign = 128;  // K is a multiple of this: a 64-byte line of a row per AVX-512 BF16 step

inline float bf16_to_float(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float f;
  return std::memcpy(&f, &wide, sizeof f), f;
}

inline uint16_t float_to_bf16(float v) {  // round to nearest even, as torch's conversion (no NaN here)
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  return static_cast<uint16_t>((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

// Each Isa: kStep columns per step (kStep / 2 bytes of a row) in vectors of kLanes floats; activations of
// type X, position j of a step holding column source(j) and adding to accumulator lane lane(j); kBias, the
// constant its unpacked nibbles carry (dot multiplies q + kBias); scales<G>, each lane's scale in a step.

struct Avx2 {
  static constexpr int kStep = 16, kLanes = 8;  // 8 bytes -> 8 int32 lanes: low nibbles, then high ones
  static constexpr float kBias = 0.0f;
  using X = float;
  using Vec = __m256;
  using Acc = Vec;  // what dot accumulates into; begin gives its start, finish adds it, scaled, to a total
  static inline Acc begin(const float* start) { return _mm256_loadu_ps(start); }
  static inline Vec finish(Acc acc, Vec scale, const float*, Vec total) {
    return _mm256_fmadd_ps(acc, scale, total);
  }
  static inline Vec zero() { return _mm256_setzero_ps(); }
  static inline Vec load(const float* p) { return _mm256_loadu_ps(p); }
  static inline Vec fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
  static inline float sum(Vec v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
  static inline int64_t source(int64_t j) { return j < 8 ? 2 * j : 2 * (j - 8) + 1; }
  static inline int64_t lane(int64_t j) { return j % 8; }
  // acc[b] += the step's 16 weights of the row at w times the BT activation rows at x (stride xs).
  template <int BT>
  static inline void dot(const uint8_t* w, const X* x, int64_t xs, Vec* acc) {
    const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w)));
    const Vec lo = _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(0x0F)));
    const Vec hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
    for (int b = 0; b < BT; ++b) acc[b] = fma(load(x + b * xs + 8), hi, fma(load(x + b * xs), lo, acc[b]));
  }
  template <int G>  // a step lies within one group
  static inline Vec scales(const uint16_t* s, int64_t k) { return _mm256_set1_ps(bf16_to_float(s[k / G])); }
  // R * BT group sums and as many totals, a row's 2 weight vectors and an activation: 16 ymm registers
  static constexpr int rows_per_block(int64_t M) { return M <= 1 ? 4 : 2; }
  static constexpr int max_bt(int64_t M) { return M <= 1 ? 1 : 2; }
};

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq")
struct Avx512 {
  static constexpr int kStep = 32, kLanes = 16;  // 16 bytes -> 16 int32 lanes
  static constexpr float kBias = 0.0f;
  using X = float;
  using Vec = __m512;
  using Acc = Vec;
  static inline Acc begin(const float* start) { return _mm512_loadu_ps(start); }
  static inline Vec finish(Acc acc, Vec scale, const float*, Vec total) {
    return _mm512_fmadd_ps(acc, scale, total);
  }
  static inline Vec zero() { return _mm512_setzero_ps(); }
  static inline Vec load(const float* p) { return _mm512_loadu_ps(p); }
  static inline Vec fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
  static inline float sum(Vec v) { return _mm512_reduce_add_ps(v); }
  static inline int64_t source(int64_t j) { return j < 16 ? 2 * j : 2 * (j - 16) + 1; }
  static inline int64_t lane(int64_t j) { return j % 16; }
  template <int BT>
  static inline void dot(const uint8_t* w, const X* x, int64_t xs, Vec* acc) {
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
    const Vec lo = _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(0x0F)));
    const Vec hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
    for (int b = 0; b < BT; ++b) acc[b] = fma(load(x + b * xs + 16), hi, fma(load(x + b * xs), lo, acc[b]));
  }
  template <int G>
  static inline Vec scales(const uint16_t* s, int64_t k) { return _mm512_set1_ps(bf16_to_float(s[k / G])); }
  static constexpr int rows_per_block(int64_t) { return 4; }
  static constexpr int max_bt(int64_t) { return 2; }
  // For the codes whose lane l covers columns k + 8l .. k + 8l + 7 of a 128-column step (Avx512Bf16,
  // Avx512Vnni): the scale of group (k + 8l) / G, for 128 / G groups.
  template <int G>
  static inline Vec eight_column_scales(const uint16_t* s, int64_t k) {
    if constexpr (G == 128) {
      return _mm512_set1_ps(bf16_to_float(s[k / G]));
    } else {
      // The step's 4 (G = 32) or 2 (G = 64) scales, read without passing the row's end; word 2l + 1 of the
      // result takes scale 8l / G and word 2l is zero: lane l is that scale as a float32.
      const __m128i bits = G == 32 ? _mm_loadl_epi64(reinterpret_cast<const __m128i*>(s + k / G))
                                   : _mm_cvtsi32_si128(*reinterpret_cast<const int32_t*>(s + k / G));
      const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
      const __m512i idx = _mm512_slli_epi32(_mm512_srli_epi32(lane, G == 32 ? 2 : 3), 16);
      const __m512i wide = _mm512_maskz_permutexvar_epi16(0xAAAAAAAA, idx, _mm512_castsi128_si512(bits));
      return _mm512_castsi512_ps(wide);
    }
  }
};
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")
struct Avx512Bf16 : Avx512 {  // Avx512's float32 vectors and blocking, bf16 products
  // 64 bytes = 32 words; word i holds columns 4i .. 4i + 3 in its four nibbles. Nibble j of every word,
  // masked and or-ed with 0x4300, is the bf16 128 + q (vector j), and dpbf16 pairs words 2l and 2l + 1:
  // lane l of vector j multiplies columns 8l + j and 8l + 4 + j, so every lane stays within 8 columns.
  static constexpr int kStep = 128;
  static constexpr float kBias = 128.0f;
  using X = uint16_t;  // bf16 bits
  // Position 32j + 2l + e of a step's activations holds column 8l + 4e + j.
  static inline int64_t source(int64_t p) { return 8 * ((p % 32) / 2) + 4 * (p % 2) + p / 32; }
  static inline int64_t lane(int64_t p) { return (p % 32) / 2; }
  template <int BT>
  static inline void dot(const uint8_t* w, const X* x, int64_t xs, Vec* acc) {
    const __m512i v = _mm512_loadu_si512(w);
    const __m512i mask = _mm512_set1_epi16(0x0F), one28 = _mm512_set1_epi16(0x4300);
    __m512i q[4];
    q[0] = _mm512_ternarylogic_epi32(v, mask, one28, 0xEA);  // (v & mask) | one28
    q[1] = _mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 4), mask, one28, 0xEA);
    q[2] = _mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 8), mask, one28, 0xEA);
    q[3] = _mm512_or_si512(_mm512_srli_epi16(v, 12), one28);
    for (int b = 0; b < BT; ++b)
      for (int j = 0; j < 4; ++j)
        acc[b] = _mm512_dpbf16_ps(acc[b], (__m512bh)_mm512_loadu_si512(x + b * xs + 32 * j), (__m512bh)q[j]);
  }
  template <int G>
  static inline Vec scales(const uint16_t* s, int64_t k) { return eight_column_scales<G>(s, k); }
};
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")
struct Avx512Vnni : Avx512 {  // int8 activations: 64 byte products an instruction, summed exactly in int32
  // 64 bytes = 128 columns: the low nibbles (columns 2i) and the high ones (2i + 1) as two vectors of bytes;
  // _mm512_dpbusd_epi32 sums 4 adjacent bytes into each int32 lane, so lane l takes columns 8l .. 8l + 7,
  // the lanes of Avx512Bf16 (and so its scales). Activations: per group of G columns, x ~ xs * xq with xq
  // int8 (xs = the group's largest magnitude / 127, xq rounded to nearest), so a lane's sum is
  // xs * (sum xq q - 8 sum xq): its start is the exact integer -8 sum xq, stored as int32 bits; finish
  // converts the sum to float32 and multiplies by the weight's and the activations' scales.
  static constexpr int kStep = 128;
  using X = int8_t;
  using Acc = __m512i;
  // Position p of a step's activations: the low-nibble bytes' columns, then the high ones'.
  static inline int64_t source(int64_t p) { return p < 64 ? 2 * p : 2 * (p - 64) + 1; }
  static inline int64_t lane(int64_t p) { return (p % 64) / 4; }
  static inline Acc begin(const float* start) { return _mm512_loadu_si512(start); }
  static inline Vec finish(Acc acc, Vec scale, const float* xscale, Vec total) {
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), _mm512_mul_ps(scale, _mm512_loadu_ps(xscale)), total);
  }
  template <int BT>
  static inline void dot(const uint8_t* w, const X* x, int64_t xs, Acc* acc) {
    const __m512i v = _mm512_loadu_si512(w), mask = _mm512_set1_epi8(0x0F);
    const __m512i lo = _mm512_and_si512(v, mask), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
    for (int b = 0; b < BT; ++b) {
      acc[b] = _mm512_dpbusd_epi32(acc[b], lo, _mm512_loadu_si512(x + b * xs));
      acc[b] = _mm512_dpbusd_epi32(acc[b], hi, _mm512_loadu_si512(x + b * xs + 64));
    }
  }
  template <int G>
  static inline Vec scales(const uint16_t* s, int64_t k) { return eight_column_scales<G>(s, k); }
};
#pragma GCC pop_options

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
  const bool runs = row_bytes < kShortRowBytes;
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

struct alignas(64) Run {
  std::atomic<int64_t> next{0};
  int64_t end = 0;
};

// y = the product of p, split over torch's threads as int8_gemv.cpp's run().
void run(const Problem& p, RowsFn rows) {
  const int64_t row_work = std::max<int64_t>(1, p.K / 2 * p.M);
  int64_t chunk = std::max<int64_t>(kMinChunkRows, kChunkWork / row_work);
  chunk = (chunk + 3) / 4 * 4;
  const int64_t N = p.N, num_chunks = (N + chunk - 1) / chunk;
  if (num_chunks == 1) {
    rows(p, 0, N);
    return;
  }
  const int64_t threads = std::min<int64_t>(num_chunks, at::get_num_threads());
  std::vector<Run> runs(threads);
  for (int64_t t = 0; t < threads; ++t) {
    runs[t].next = t * num_chunks / threads;
    runs[t].end = (t + 1) * num_chunks / threads;
  }
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t i = 0; i < threads; ++i) {
        Run& run = runs[(t + i) % threads];
        for (int64_t c = run.next++; c < run.end; c = run.next++) {
          rows(p, c * chunk, std::min(N, (c + 1) * chunk));
        }
      }
    }
  });
}

// The code `isa` names ("auto": the best this CPU runs), checked against the CPU.
std::string choose(const std::string& isa) {
  static const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  static const bool bf16 = avx512 && __builtin_cpu_supports("avx512bf16");
  static const bool vnni = avx512 && __builtin_cpu_supports("avx512vnni");
  if (isa == "auto") return vnni ? "avx512_vnni" : bf16 ? "avx512_bf16" : avx512 ? "avx512" : "avx2";
  TORCH_CHECK(isa == "avx2" || isa == "avx512" || isa == "avx512_bf16" || isa == "avx512_vnni",
              "int4_linear: isa must be auto, avx2, avx512, avx512_bf16 or avx512_vnni; got ", isa);
  const bool has = isa == "avx2" || (isa == "avx512" ? avx512 : isa == "avx512_bf16" ? bf16 : vnni);
  TORCH_CHECK(has, "int4_linear: this CPU has no ", isa);
  return isa;
}

// Isa::source as a table, checked once: position j of a step holds a column of lane(j)'s C adjacent ones.
template <class Isa>
std::array<int, Isa::kStep> permutation() {
  constexpr int C = Isa::kStep / Isa::kLanes;
  std::array<int, Isa::kStep> table{};
  for (int j = 0; j < Isa::kStep; ++j) {
    table[j] = static_cast<int>(Isa::source(j));
    const int64_t lane = Isa::lane(j), first = C * lane;
    TORCH_CHECK(table[j] / C == lane, "int4_linear: lane ", lane, " multiplies column ", table[j],
                " of a step, not one of ", first, " .. ", first + C - 1);
  }
  return table;
}

// Row m of x (M, K), float32 or bfloat16, as float32: in place, or widened into `buffer`.
const float* float_row(const at::Tensor& x, int64_t m, std::vector<float>& buffer) {
  const int64_t K = x.size(1);
  if (x.scalar_type() == at::kFloat) return x.data_ptr<float>() + m * K;
  const c10::BFloat16* row = x.data_ptr<c10::BFloat16>() + m * K;
  buffer.resize(K);
  for (int64_t k = 0; k < K; ++k) buffer[k] = static_cast<float>(row[k]);
  return buffer.data();
}

// x (M, K) float32 or bfloat16 -> the activations in Isa's order (Isa::X), and the accumulators' starts: for
// each unit of U columns and each lane, -(8 + kBias) times the sum of the activations that lane multiplies
// there (as multiplied: bf16-rounded where they are). Every call pays this before its first weight, so each
// pass is a plain loop over a row: the rounding, the permutation (a table made once), and per lane one sum
// over the C = kStep / kLanes adjacent columns it multiplies in each step.
template <class Isa>
std::pair<at::Tensor, at::Tensor> prepare(const at::Tensor& x, int64_t G) {
  using X = typename Isa::X;
  constexpr int S = Isa::kStep, L = Isa::kLanes, C = S / L;
  static const std::array<int, S> source = permutation<Isa>();
  const int64_t M = x.size(0), K = x.size(1), U = std::max<int64_t>(G, S), starts = K / U * L;
  at::Tensor xp = at::empty({M, K * static_cast<int64_t>(sizeof(X))}, x.options().dtype(at::kByte));
  at::Tensor start = at::empty({M, starts}, x.options().dtype(at::kFloat));
  std::vector<float> rounded(K), widened;
  X* dst = reinterpret_cast<X*>(xp.data_ptr());
  float* lanes = start.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    const float* row = float_row(x, m, widened);
    for (int64_t k = 0; k < K; ++k)
      rounded[k] = sizeof(X) == 2 ? bf16_to_float(float_to_bf16(row[k])) : row[k];
    X* out = dst + m * K;
    for (int64_t k0 = 0; k0 < K; k0 += S) {
      for (int j = 0; j < S; ++j) {
        const float v = rounded[k0 + source[j]];
        if constexpr (sizeof(X) == 2) {
          uint32_t bits;  // v is a bf16 value: its top half is exactly its bf16 bits
          std::memcpy(&bits, &v, sizeof bits);
          out[k0 + j] = static_cast<uint16_t>(bits >> 16);
        } else {
          out[k0 + j] = v;
        }
      }
    }
    for (int64_t u0 = 0; u0 < K; u0 += U) {
      float* unit = lanes + m * starts + u0 / U * L;
      for (int l = 0; l < L; ++l) {
        float sum = 0.0f;
        for (int64_t k0 = u0; k0 < u0 + U; k0 += S)
          for (int c = 0; c < C; ++c) sum += rounded[k0 + C * l + c];
        unit[l] = -(8.0f + Isa::kBias) * sum;
      }
    }
  }
  return {xp, start};
}

// The low byte of each of the 32 words `words`, in order, to 32 bytes at `to`.
__attribute__((target("avx512f,avx512bw"))) inline void store_low_bytes(int8_t* to, __m512i words) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(to), _mm512_cvtepi16_epi8(words));
}

// One row of activations, float32, as int8 per group of G columns: the scale is the group's largest
// magnitude / 127 and each value is rounded to the nearest multiple of it (ties to even); a group holding a
// NaN or an infinity gets scale NaN, so that it poisons its outputs as it would in float32. q (K) int8 in
// column order, group_scale (K / G). The rounding of every int8-activation product (this loop's and
// vnni_prefill.cpp's, through quantize_int8).
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
void quantize_row(const float* row, int64_t K, int64_t G, int8_t* q, float* group_scale) {
  const __m512 top = _mm512_set1_ps(127.0f), bottom = _mm512_set1_ps(-127.0f);
  for (int64_t g = 0; g < K / G; ++g) {
    __m512 largest = _mm512_setzero_ps();
    __mmask16 bad = 0;
    for (int64_t k = g * G; k < (g + 1) * G; k += 16) {
      const __m512 v = _mm512_loadu_ps(row + k);
      bad |= _mm512_fpclass_ps_mask(v, 0x99);  // quiet or signalling NaN, + or - infinity
      largest = _mm512_max_ps(largest, _mm512_abs_ps(v));
    }
    const bool finite = bad == 0;
    const float big = _mm512_reduce_max_ps(largest);
    group_scale[g] = finite ? big / 127.0f : NAN;
    // Zeros for a group that is not finite (its scale NaN), for an all-zero group, and for one so small
    // (below 127 / FLT_MAX) that 127 / big overflows: its values are then below 1e-36 each.
    const float reciprocal = 127.0f / big;
    const bool usable = finite && big > 0 && std::isfinite(reciprocal);
    const __m512 inverse = _mm512_set1_ps(usable ? reciprocal : 0.0f);
    for (int64_t k = g * G; k < (g + 1) * G; k += 16) {
      const __m512 v = finite ? _mm512_mul_ps(_mm512_loadu_ps(row + k), inverse) : _mm512_setzero_ps();
      const __m512 r = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);  // ties even
      const __m512i i = _mm512_cvtps_epi32(_mm512_min_ps(top, _mm512_max_ps(bottom, r)));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k), _mm512_cvtsepi32_epi8(i));
    }
  }
}

// x (M, K) float32 or bfloat16 -> Avx512Vnni's int8 activations in its order (quantize_row's), each
// lane's start (-8 times the sum of its int8 activations, exact, as int32 bits) and each lane's
// activation scale. Every call pays this before its first weight, so it is vector code: 16 values per
// instruction, the order by two byte narrowings, the lane sums by sums of absolute differences.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))
std::tuple<at::Tensor, at::Tensor, at::Tensor> prepare_int8(const at::Tensor& x, int64_t G) {
  using Isa = Avx512Vnni;
  constexpr int S = Isa::kStep, L = Isa::kLanes, C = S / L;
  static_assert(S == 128 && L == 16 && C == 8, "the narrowing below makes Avx512Vnni's order of 128 columns");
  static const bool order_checked = [] {  // the even columns' bytes, then the odd ones' (Isa::source)
    const std::array<int, S> source = permutation<Isa>();
    for (int j = 0; j < S; ++j)
      TORCH_CHECK(source[j] == (j < 64 ? 2 * j : 2 * (j - 64) + 1), "int4_linear: the VNNI order changed");
    return true;
  }();
  (void)order_checked;
  const int64_t M = x.size(0), K = x.size(1), starts = K / S * L;  // G <= S: a step is a unit
  at::Tensor xp = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor start = at::empty({M, starts}, x.options().dtype(at::kFloat));
  at::Tensor xscale = at::empty({M, starts}, x.options().dtype(at::kFloat));
  std::vector<int8_t> q(K);                      // one row's int8 values, in column order
  std::vector<float> group_scale(K / G + L), widened;  // + L: a step's 16-wide read past the last group
  int8_t* dst = xp.data_ptr<int8_t>();
  const __m512i word_low = _mm512_set1_epi16(0x00FF), bias = _mm512_set1_epi8(static_cast<char>(0x80));
  // lane l of a step takes group (8 l) / G: for G = 32, 64, 128, index l / 4, l / 8, 0 of the step's groups
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i group_of_lane = _mm512_srlv_epi32(lane, _mm512_set1_epi32(G == 32 ? 2 : G == 64 ? 3 : 4));
  for (int64_t m = 0; m < M; ++m) {
    const float* row = float_row(x, m, widened);
    quantize_row(row, K, G, q.data(), group_scale.data());
    int8_t* out = dst + m * K;
    float* lanes = start.data_ptr<float>() + m * starts;
    float* lane_scale = xscale.data_ptr<float>() + m * starts;
    for (int64_t k0 = 0; k0 < K; k0 += S) {
      const __m512i a = _mm512_loadu_si512(q.data() + k0), b = _mm512_loadu_si512(q.data() + k0 + 64);
      // a byte pair's low byte is its even column: narrowing the words keeps it, shifting first the odd one
      store_low_bytes(out + k0, _mm512_and_si512(a, word_low));
      store_low_bytes(out + k0 + 32, _mm512_and_si512(b, word_low));
      store_low_bytes(out + k0 + 64, _mm512_srli_epi16(a, 8));
      store_low_bytes(out + k0 + 96, _mm512_srli_epi16(b, 8));
      // lane l sums columns 8l .. 8l + 7: one 8-byte sum of absolute differences each, of q + 128 against 0
      const __m512i zero = _mm512_setzero_si512();
      const __m256i sa = _mm512_cvtepi64_epi32(_mm512_sad_epu8(_mm512_xor_si512(a, bias), zero));
      const __m256i sb = _mm512_cvtepi64_epi32(_mm512_sad_epu8(_mm512_xor_si512(b, bias), zero));
      const __m512i sums = _mm512_sub_epi32(_mm512_inserti64x4(_mm512_castsi256_si512(sa), sb, 1),
                                            _mm512_set1_epi32(8 * 128));
      _mm512_storeu_si512(lanes + k0 / S * L, _mm512_mullo_epi32(sums, _mm512_set1_epi32(-8)));
      const __m512 step_scales = _mm512_loadu_ps(group_scale.data() + k0 / G);
      _mm512_storeu_ps(lane_scale + k0 / S * L, _mm512_permutexvar_ps(group_of_lane, step_scales));
    }
  }
  return {xp, start, xscale};
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
