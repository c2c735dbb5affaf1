// The power spectrum of kLanes frames at once (part of log_mel.cpp, which includes it): |rfft|^2 of 400
// windowed real samples per frame, one frame per SIMD lane, so that every butterfly is a handful of
// full-width vector ops and no step shuffles lanes. The 400 real samples go in as 200 complex ones (even + i
// odd), through a Stockham FFT in radix 4, 2, 5, 5 stages, then the standard split into the 201 bins of the
// real transform, squared to power. The code uses GCC vector extensions, which GCC and Clang compile for
// any target, at the widest vectors the build's flags allow.

#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace minaf3_log_mel {

constexpr int kFft = 400;
constexpr int kHalf = kFft / 2;     // 200: the real transform as a complex one of half the length
constexpr int kBins = kFft / 2 + 1;  // 201

#if defined(__AVX512F__)
constexpr int kLanes = 16;  // one zmm register of frames
#elif defined(__AVX__)
constexpr int kLanes = 8;  // one ymm register
#else
constexpr int kLanes = 4;  // one xmm (SSE) or NEON register; 8 lanes emulated in pairs ran 4x slower
#endif
using vf = float __attribute__((vector_size(kLanes * sizeof(float))));
using vi = int32_t __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);  // an unaligned vector load
  return v;
}

inline vf splat(float x) { return vf{} + x; }

// A forward DFT of radix R on R complex vectors, in place: y_k = sum_n a_n exp(-2 pi i n k / R).
template <int R>
inline void butterfly(vf* re, vf* im);

template <>
inline void butterfly<2>(vf* re, vf* im) {
  vf r0 = re[0], i0 = im[0];
  re[0] = r0 + re[1], im[0] = i0 + im[1];
  re[1] = r0 - re[1], im[1] = i0 - im[1];
}

template <>
inline void butterfly<4>(vf* re, vf* im) {
  vf s0r = re[0] + re[2], s0i = im[0] + im[2], d0r = re[0] - re[2], d0i = im[0] - im[2];
  vf s1r = re[1] + re[3], s1i = im[1] + im[3];
  vf d1r = im[1] - im[3], d1i = re[3] - re[1];  // -i (a1 - a3)
  re[0] = s0r + s1r, im[0] = s0i + s1i;
  re[2] = s0r - s1r, im[2] = s0i - s1i;
  re[1] = d0r + d1r, im[1] = d0i + d1i;
  re[3] = d0r - d1r, im[3] = d0i - d1i;
}

template <>
inline void butterfly<5>(vf* re, vf* im) {
  // Pairs n and 5 - n share cos(2 pi n k / 5) and have opposite sines.
  const float c1 = std::cos(2 * M_PI / 5), c2 = std::cos(4 * M_PI / 5);
  const float s1 = std::sin(2 * M_PI / 5), s2 = std::sin(4 * M_PI / 5);
  vf b1r = re[1] + re[4], b1i = im[1] + im[4], d1r = re[1] - re[4], d1i = im[1] - im[4];
  vf b2r = re[2] + re[3], b2i = im[2] + im[3], d2r = re[2] - re[3], d2i = im[2] - im[3];
  vf r1r = re[0] + c1 * b1r + c2 * b2r, r1i = im[0] + c1 * b1i + c2 * b2i;
  vf r2r = re[0] + c2 * b1r + c1 * b2r, r2i = im[0] + c2 * b1i + c1 * b2i;
  vf q1r = s1 * d1r + s2 * d2r, q1i = s1 * d1i + s2 * d2i;  // y1 = r1 - i q1, y4 = r1 + i q1
  vf q2r = s2 * d1r - s1 * d2r, q2i = s2 * d1i - s1 * d2i;  // y2 = r2 - i q2, y3 = r2 + i q2
  re[0] = re[0] + b1r + b2r, im[0] = im[0] + b1i + b2i;
  re[1] = r1r + q1i, im[1] = r1i - q1r;
  re[4] = r1r - q1i, im[4] = r1i + q1r;
  re[2] = r2r + q2i, im[2] = r2i - q2r;
  re[3] = r2r - q2i, im[3] = r2i + q2r;
}

// The 200-point complex FFT as Stockham stages (out of place, self-sorting). Before a stage of radix R,
// the data holds `span` interleaved transforms of the first stages' length; butterfly j reads elements
// j + r N / R, twists them by exp(-2 pi i k r / (span R)) with k = j mod span, and writes R results
// span apart from (j / span) span R + k.
constexpr int kRadices[] = {4, 2, 5, 5};

struct Twiddles {
  std::vector<float> cos[4], sin[4];  // per stage: [k * (R - 1) + r - 1] for k < span, 1 <= r < R
  float unpack_cos[kHalf / 2 + 1], unpack_sin[kHalf / 2 + 1];  // exp(-2 pi i k / 400), k <= 100

  Twiddles() {
    int span = 1;
    for (int s = 0; s < 4; ++s) {
      int R = kRadices[s];
      for (int k = 0; k < span; ++k)
        for (int r = 1; r < R; ++r) {
          double angle = -2 * M_PI * k * r / (span * R);
          cos[s].push_back(std::cos(angle));
          sin[s].push_back(std::sin(angle));
        }
      span *= R;
    }
    for (int k = 0; k <= kHalf / 2; ++k) {
      unpack_cos[k] = std::cos(-2 * M_PI * k / kFft);
      unpack_sin[k] = std::sin(-2 * M_PI * k / kFft);
    }
  }
};

const Twiddles& twiddles() {
  static const Twiddles table;  // built once, thread-safe (C++11 static initialisation)
  return table;
}

template <int R, int Span>
void fft_stage(const vf* sr, const vf* si, vf* dr, vf* di, const std::vector<float>& cos,
               const std::vector<float>& sin) {
  constexpr int stride = kHalf / R;
  // j = g Span + k, looped as (g, k): no division
  for (int g = 0, j = 0; g < stride / Span; ++g)
    for (int k = 0; k < Span; ++k, ++j) {
      vf re[R], im[R];
      re[0] = sr[j], im[0] = si[j];
      for (int r = 1; r < R; ++r) {
        vf a = sr[j + r * stride], b = si[j + r * stride];
        if (Span == 1) {  // the first stage: all twiddles are 1
          re[r] = a, im[r] = b;
        } else {
          float c = cos[k * (R - 1) + r - 1], s = sin[k * (R - 1) + r - 1];
          re[r] = a * c - b * s, im[r] = a * s + b * c;
        }
      }
      butterfly<R>(re, im);
      int d = g * Span * R + k;
      for (int r = 0; r < R; ++r) dr[d + r * Span] = re[r], di[d + r * Span] = im[r];
    }
}

// Frames' windowed samples z[m] = x[2m] + i x[2m + 1] in re, im (200 vectors each) -> their power
// |X[k]|^2 in re2 (201 vectors), returned; re, im and im2 are overwritten (the FFT's ping-pong buffers).
inline vf* power_spectrum(vf* re, vf* im, vf* re2, vf* im2) {
  const Twiddles& tw = twiddles();
  fft_stage<4, 1>(re, im, re2, im2, tw.cos[0], tw.sin[0]);
  fft_stage<2, 4>(re2, im2, re, im, tw.cos[1], tw.sin[1]);
  fft_stage<5, 8>(re, im, re2, im2, tw.cos[2], tw.sin[2]);
  fft_stage<5, 40>(re2, im2, re, im, tw.cos[3], tw.sin[3]);

  // Real transform from the complex one Z: X[k] = E[k] + exp(-2 pi i k / 400) O[k], where
  // E = (Z[k] + conj Z[200 - k]) / 2 and O = -i (Z[k] - conj Z[200 - k]) / 2 are the transforms of the
  // even and odd samples. Both are transforms of real sequences (E[200 - k] = conj E[k], the same for
  // O), so X[200 - k] = conj(E[k] - exp(-2 pi i k / 400) O[k]): one E and O serve bins k and 200 - k.
  vf* power = re2;
  for (int k = 0; k <= kHalf / 2; ++k) {
    const int a = k, b = k == 0 ? 0 : kHalf - k;
    vf er = (re[a] + re[b]) * 0.5f, ei = (im[a] - im[b]) * 0.5f;
    vf odd_r = (im[a] + im[b]) * 0.5f, odd_i = (re[b] - re[a]) * 0.5f;
    float c = tw.unpack_cos[k], sn = tw.unpack_sin[k];
    vf wor = c * odd_r - sn * odd_i, woi = c * odd_i + sn * odd_r;  // exp(-2 pi i k / 400) O[k]
    power[k] = (er + wor) * (er + wor) + (ei + woi) * (ei + woi);
    power[kHalf - k] = (er - wor) * (er - wor) + (ei - woi) * (ei - woi);
  }
  return power;
}

}  // namespace minaf3_log_mel
