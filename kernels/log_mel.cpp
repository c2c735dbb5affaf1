// Whisper's log-mel front end on the CPU, every step of a frame in one pass while it sits in cache:
//
//   reflect-pad 200 | frames of 400 samples, hop 160 | periodic Hann | |rfft|^2 (201 bins)
//   | 128 mel filters | log10(max(mel, 1e-10)) | (x + 4) / 4 | max(x, window max - 2)
//
// The torch path of minaf3/features.py runs these as ~20 ops per block of frames; most of its time goes to
// MKL's rfft (400 points is too short for it to vectorise well), to |X|^2 over interleaved (re, im) pairs,
// and to log10. Here each SIMD lane holds one frame: kLanes frames go through the same 200-point complex
// FFT together, so every butterfly is a handful of full-width vector ops and no step shuffles lanes.
//
//   1. rows: the samples of a tile of kLanes frames, as the reference pads them, stored transposed:
//      rows[c][i] = padded sample 160 (t + i) + c. Frame t + i is rows i, i+1 and half of i+2, so sample n
//      of the tile's frames is one unaligned vector load, rows[n % 160][n / 160 ...]. Real samples are
//      transposed kLanes x kLanes in registers; reflection and zero padding are done per sample, only for
//      the few rows at a window's ends that need them.
//   2. fft (frame_fft.h): the 400 real samples as 200 complex ones (even + i odd), a Stockham FFT in radix
//      4, 2, 5, 5 stages, then the standard split into the 201 bins of the real transform, squared to power.
//   3. mel: each filter is a triangle a few bins wide: only its nonzero weights are multiplied.
//   4. log: log2 from the float's exponent plus a polynomial of its mantissa (Cephes' logf, ~1 ulp),
//      scaled to Whisper's units; each vector of kLanes frames is stored into one row of the output.
//
// Frames past the last one that reads a real sample are not computed (all their power is 0). Blocks go to
// torch's threads from a shared counter, so a descheduled thread delays only its own block; the thread
// that finishes a window's last block clamps that window while it is still in cache.
//
// Built by kernels/log_mel.py through torch.utils.cpp_extension.load, with the widest vector flags this CPU
// has (the code uses GCC vector extensions, which GCC and Clang compile for any target; no intrinsics).
// Measurements: the docstring of kernels/log_mel.py.

// Only the headers needed: <torch/extension.h> (pybind11 and the whole C++ API) triples the build time.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <utility>
#include <vector>

#include "frame_fft.h"

using namespace minaf3_log_mel;  // NOLINT: this file is its one user

namespace {

constexpr int64_t kWindowSamples = 480000;  // 30 s at 16 kHz
constexpr int64_t kHop = 160;
constexpr int64_t kPad = kFft / 2;  // torch.stft(center=True) reflect-pads half a frame
constexpr int kMels = 128;
constexpr int64_t kFrames = 3000;
// Whisper's scaling: (log10(max(mel, 1e-10)) + 4) / 4, then a floor 8 log10 units (2 scaled) under the
// window's maximum. A frame of padding has power 0, so its value is the floor of the floor, kPadding.
constexpr float kLogFloor = 1e-10f;
constexpr float kPadding = -1.5f;  // (log10(1e-10) + 4) / 4
constexpr float kRange = 2.0f;     // 8 / 4
// Frames per block, the unit of work a thread takes: 20 windows make ~240 blocks, so threads finish
// together; 128-1024 measured alike on one thread.
constexpr int64_t kBlockFrames = 256;

// NaN-propagating maximum: once a NaN is seen it stays, so the window's maximum reports it.
inline vf max_keep_nan(vf m, vf y) { return (y > m) | (y != y) ? y : m; }
inline float max_keep_nan(float m, float y) { return (y > m || y != y) ? y : m; }

// (log10(max(x, 1e-10)) + 4) / 4 per lane. NaN stays NaN and +inf stays +inf (the caller reports them);
// the floor is applied by a comparison that is false for NaN.
inline vf scaled_log10(vf x) {
  x = x < splat(kLogFloor) ? splat(kLogFloor) : x;
  vi bits = (vi)x;  // same-size vector casts reinterpret the bits
  vi exponent = (bits >> 23) - 127;  // x >= 1e-10 > 0: no sign bit, no denormal
  vi mantissa_bits = (bits & 0x007fffff) | 0x3f800000;
  vf m = (vf)mantissa_bits;  // x = m 2^exponent, m in [1, 2)
  // Centre the mantissa on 1, m in [sqrt(1/2), sqrt(2)), where the polynomial is accurate.
  vi high = m > splat(float(M_SQRT2));  // -1 where true
  m = high ? m * 0.5f : m;
  exponent -= high;
  vf e = __builtin_convertvector(exponent, vf);
  vf f = m - 1.0f;
  vf z = f * f;
  // Cephes logf: ln(1 + f) = f - f^2 / 2 + f^3 P(f) on [sqrt(1/2) - 1, sqrt(2) - 1], P by Horner's rule
  constexpr float kP[] = {7.0376836292e-2f, -1.1514610310e-1f, 1.1676998740e-1f,
                          -1.2420140846e-1f, 1.4249322787e-1f, -1.6668057665e-1f,
                          2.0000714765e-1f,  -2.4999993993e-1f, 3.3333331174e-1f};
  vf p = splat(kP[0]);
  for (int i = 1; i < 9; ++i) p = p * f + kP[i];
  // ln 2 split in a part exact in float (0.693359375) and a small correction, as Cephes does
  vf ln = f + (f * z * p - 0.5f * z - 2.12194440e-4f * e) + 0.693359375f * e;
  vf scaled = ln * float(0.25 / M_LN10) + 1.0f;  // (ln x / ln 10 + 4) / 4
  return x <= splat(FLT_MAX) ? scaled : x;
}

// One mel filter's nonzero weights: bins [first, first + weights.size()).
struct Filter {
  int first;
  std::vector<float> weights;
};

std::vector<Filter> sparse_filters(const float* filters) {  // filters: (128, 201) row-major
  std::vector<Filter> out(kMels);
  for (int m = 0; m < kMels; ++m) {
    const float* row = filters + m * kBins;
    int lo = 0, hi = kBins;
    while (lo < kBins && row[lo] == 0.0f) ++lo;
    while (hi > lo && row[hi - 1] == 0.0f) --hi;
    out[m].first = lo;
    out[m].weights.assign(row + lo, row + hi);
  }
  return out;
}

// A thread's scratch space, reused from tile to tile.
struct Scratch {
  // rows[c][i] = padded sample 160 (t + i) + c for the tile's first frame t, i < 2 kLanes: sample n of the
  // tile's frames is rows[n % 160][n / 160 ...], one vector. The second half is the next tile's first half.
  std::vector<vf> rows;  // (160, 2) vectors
  std::vector<vf> re, im, re2, im2;  // the FFT's ping-pong buffers, (200,) each; re2 then holds the power
  Scratch() : rows(2 * kHop), re(kHalf), im(kHalf), re2(kBins), im2(kHalf) {}
};

struct Job {
  const float* source;
  const int64_t* valid;
  const float* hann;
  const std::vector<Filter>* filters;
  float* out;  // (W, 128, 3000)
};

// Padded sample p of window w, as torch.stft(center=True, pad_mode="reflect") pads it: sample p - 200,
// reflected at both ends of the 480,000 without repeating the edge; zero past the real samples.
inline float padded_sample(const Job& job, int64_t w, int64_t p) {
  int64_t j = std::abs(p - kPad);
  if (j >= kWindowSamples) j = 2 * (kWindowSamples - 1) - j;
  return j < job.valid[w] ? job.source[w * kWindowSamples + j] : 0.0f;
}

// Swaps bit B of the row index with bit B of the lane index in rows x and y = x + B: one step of a
// transpose. Lane c of x becomes y[c - B] where bit B of c is set, lane c of y becomes x[c + B] where not.
template <int B, int... C>
inline void swap_bit(vf& x, vf& y, std::integer_sequence<int, C...>) {
#if defined(__clang__) || __GNUC__ >= 12
  vf low = __builtin_shufflevector(x, y, ((C & B) ? kLanes + C - B : C)...);
  vf high = __builtin_shufflevector(x, y, ((C & B) ? kLanes + C : C + B)...);
#else  // GCC before 12 (Ubuntu 22.04's 11) has only its own form, with the lane indices as a vector
  vf low = __builtin_shuffle(x, y, vi{((C & B) ? kLanes + C - B : C)...});
  vf high = __builtin_shuffle(x, y, vi{((C & B) ? kLanes + C : C + B)...});
#endif
  x = low, y = high;
}

template <int B>
inline void transpose_step(vf* v) {
  if constexpr (B < kLanes) {
    for (int i = 0; i < kLanes; ++i)
      if (!(i & B)) swap_bit<B>(v[i], v[i + B], std::make_integer_sequence<int, kLanes>{});
    transpose_step<2 * B>(v);
  }
}

// Padded rows r .. r + kLanes - 1 of window w (160 samples each) into column `half` of rows: lane i of
// rows[c * 2 + half] = padded sample 160 (r + i) + c.
void fill_rows(const Job& job, int64_t w, int64_t r, vf* rows, int half) {
  const int64_t p = r * kHop;  // first padded position
  if (p >= kPad && p - kPad + kLanes * kHop <= job.valid[w]) {  // all real samples: transpose in registers
    const float* from = job.source + w * kWindowSamples + (p - kPad);
    for (int c0 = 0; c0 < kHop; c0 += kLanes) {  // kLanes x kLanes squares
      vf v[kLanes];
      for (int i = 0; i < kLanes; ++i) v[i] = load(from + i * kHop + c0);
      transpose_step<1>(v);
      for (int c = 0; c < kLanes; ++c) rows[(c0 + c) * 2 + half] = v[c];
    }
  } else {  // reflected or zero-padded samples: one at a time (the first and last rows of a window)
    for (int c = 0; c < kHop; ++c)
      for (int i = 0; i < kLanes; ++i)  // lane i of the vector at column `half` of sample row c
        rows[c * 2 + half][i] = padded_sample(job, w, (r + i) * kHop + c);
  }
}

// Frames [t0, t1) of window w -> their scaled log-mel, unclamped, in out; returns their maximum.
float log_mel_block(const Job& job, Scratch& s, int64_t w, int64_t t0, int64_t t1) {
  vi lane;
  for (int i = 0; i < kLanes; ++i) lane[i] = i;
  vf top = splat(-INFINITY);
  float* out_window = job.out + w * kMels * kFrames;
  fill_rows(job, w, t0, s.rows.data(), 1);
  for (int64_t t = t0; t < t1; t += kLanes) {
    // Frame t + i reads rows t + i .. t + i + 2: this tile's rows and the next tile's first two.
    for (int c = 0; c < kHop; ++c) s.rows[2 * c] = s.rows[2 * c + 1];
    fill_rows(job, w, t + kLanes, s.rows.data(), 1);

    // Windowed samples as 200 complex ones: z[m] = x[2m] + i x[2m + 1], x[n] = sample n * hann[n].
    // Sample n = 160 q + c is rows[c] from lane q on; even n have even c, since 160 is even.
    const float* rows = reinterpret_cast<const float*>(s.rows.data());
    for (int q = 0; q < 3; ++q)
      for (int c = 0; c < std::min<int>(kHop, kFft - q * kHop); c += 2) {
        const int m = (q * kHop + c) / 2;
        s.re[m] = load(rows + 2 * kLanes * c + q) * job.hann[2 * m];
        s.im[m] = load(rows + 2 * kLanes * (c + 1) + q) * job.hann[2 * m + 1];
      }
    const vf* power = power_spectrum(s.re.data(), s.im.data(), s.re2.data(), s.im2.data());

    const int64_t lanes = std::min<int64_t>(kLanes, t1 - t);
    for (int m = 0; m < kMels; ++m) {
      const Filter& filter = (*job.filters)[m];
      const vf* bins = power + filter.first;
      vf mel{};
      for (size_t i = 0; i < filter.weights.size(); ++i) mel += filter.weights[i] * bins[i];
      vf y = scaled_log10(mel);
      float* row = out_window + m * kFrames + t;
      if (lanes == kLanes) {
        std::memcpy(row, &y, sizeof y);
        top = max_keep_nan(top, y);
      } else {  // the last frames of the block: spare lanes are neither stored nor counted
        for (int64_t i = 0; i < lanes; ++i) row[i] = y[i];
        top = max_keep_nan(top, lane < (vi{} + int(lanes)) ? y : splat(-INFINITY));
      }
    }
  }
  float result = -INFINITY;
  for (int i = 0; i < kLanes; ++i) result = max_keep_nan(result, top[i]);
  return result;
}

// Whisper's clamp of a finished window: every value at least max(top - 2, -1.5), where top is the window's
// maximum (including its padding frames, -1.5); frames [computed, 3000) are padding and get the floor.
// Returns top; a window whose top is NaN or Inf is left as it is (unclamped, padding frames unset): the
// caller reports it and discards the features.
float clamp_window(const Job& job, int64_t w, int64_t computed, float top) {
  top = max_keep_nan(top, kPadding);
  if (!std::isfinite(top)) return top;
  const float floor = std::max(top - kRange, kPadding);
  for (int m = 0; m < kMels; ++m) {
    float* row = job.out + (w * kMels + m) * kFrames;
    for (int64_t t = 0; t < computed; ++t) row[t] = std::max(row[t], floor);
    std::fill(row + computed, row + kFrames, floor);
  }
  return top;
}

// Frames of a window that read a real sample: ceil((valid + 200) / 160), at most 3000; 0 if none.
int64_t computed_frames(int64_t valid) {
  return valid == 0 ? 0 : std::min(kFrames, (valid + kPad + kHop - 1) / kHop);
}

at::Tensor log_mel(const at::Tensor& source, at::IntArrayRef valid, const at::Tensor& hann,
                   const at::Tensor& filters, at::Tensor& out) {
  const int64_t W = static_cast<int64_t>(valid.size());
  TORCH_CHECK(source.device().is_cpu() && source.scalar_type() == at::kFloat && source.dim() == 1 &&
                  source.is_contiguous(),
              "log_mel: source must be a contiguous 1-D float32 CPU tensor");
  TORCH_CHECK(hann.scalar_type() == at::kFloat && hann.is_contiguous() && hann.numel() == kFft,
              "log_mel: hann must be 400 contiguous float32 values");
  TORCH_CHECK(filters.scalar_type() == at::kFloat && filters.is_contiguous() &&
                  filters.sizes() == at::IntArrayRef({kMels, kBins}),
              "log_mel: filters must be contiguous float32 (128, 201)");
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() &&
                  out.sizes() == at::IntArrayRef({W, kMels, kFrames}),
              "log_mel: out must be contiguous float32 (", W, ", 128, 3000)");
  for (int64_t w = 0; w < W; ++w)
    TORCH_CHECK(
        valid[w] >= 0 && valid[w] <= kWindowSamples && w * kWindowSamples + valid[w] <= source.numel(),
        "log_mel: window ", w, " has ", valid[w], " valid samples, outside the source");

  const std::vector<Filter> sparse = sparse_filters(filters.data_ptr<float>());
  Job job{source.data_ptr<float>(), valid.data(), hann.data_ptr<float>(), &sparse, out.data_ptr<float>()};
  twiddles();  // built before the threads start

  // Blocks of kBlockFrames computed frames, window after window: window w owns blocks
  // [first_block[w], first_block[w + 1]).
  struct Block {
    int64_t window, t0, t1;
  };
  std::vector<Block> blocks;
  std::vector<int64_t> computed(W), first_block(W + 1);
  for (int64_t w = 0; w < W; ++w) {
    computed[w] = computed_frames(valid[w]);
    first_block[w] = static_cast<int64_t>(blocks.size());
    for (int64_t t = 0; t < computed[w]; t += kBlockFrames)
      blocks.push_back({w, t, std::min(computed[w], t + kBlockFrames)});
  }
  first_block[W] = static_cast<int64_t>(blocks.size());
  std::vector<std::atomic<int64_t>> remaining(W);  // blocks of each window not yet finished
  for (int64_t w = 0; w < W; ++w) remaining[w] = first_block[w + 1] - first_block[w];

  at::Tensor tops = at::empty({W}, source.options());
  float* top = tops.data_ptr<float>();
  for (int64_t w = 0; w < W; ++w)  // windows without a real sample: all padding
    if (computed[w] == 0) top[w] = clamp_window(job, w, 0, kPadding);

  std::vector<float> block_top(blocks.size());
  std::atomic<int64_t> next{0};
  const int64_t n_blocks = static_cast<int64_t>(blocks.size());
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_blocks));
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    Scratch scratch;
    for (int64_t i = next++; i < n_blocks; i = next++) {
      const int64_t w = blocks[i].window;
      block_top[i] = log_mel_block(job, scratch, w, blocks[i].t0, blocks[i].t1);
      // The thread that finishes a window's last block sees every block's top (acquire-release on the
      // counter) and clamps the window.
      if (remaining[w].fetch_sub(1, std::memory_order_acq_rel) == 1) {
        float window_top = -INFINITY;
        for (int64_t j = first_block[w]; j < first_block[w + 1]; ++j)
          window_top = max_keep_nan(window_top, block_top[j]);
        top[w] = clamp_window(job, w, computed[w], window_top);
      }
    }
  });
  return tops;
}

}  // namespace

TORCH_LIBRARY(minaf3_log_mel, m) {
  m.def("log_mel(Tensor source, int[] valid, Tensor hann, Tensor filters, Tensor(a!) out) -> Tensor");
}

TORCH_LIBRARY_IMPL(minaf3_log_mel, CPU, m) { m.impl("log_mel", &log_mel); }
