// Where an int4 weight's words and scales lie (kernels/int4_linear.py's layout, read by int4_gemv.cpp,
// vnni_prefill.cpp, gemm.cpp and bf16_tiles.cpp): rows in tiles of kTileRows, the last tile holding what is
// left; a tile stored column by column, word w (columns 8w .. 8w + 7, 4 bytes) of each of its rows, then
// word w + 1; its scales the same way, scale g of each of its rows, then g + 1.

#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace minaf3_int4_layout {

constexpr int64_t kTileRows = 16;

// Rows of the tile that starts at row n0 (a multiple of kTileRows) of an N-row weight.
inline int64_t tile_rows(int64_t N, int64_t n0) { return std::min(kTileRows, N - n0); }

// The 4 bytes of word `word` of row n: w (N, K / 2) uint8, K / 8 words a row.
inline const uint8_t* word_of(const uint8_t* w, int64_t N, int64_t K, int64_t n, int64_t word) {
  const int64_t n0 = n / kTileRows * kTileRows;
  return w + n0 * (K / 2) + (word * tile_rows(N, n0) + (n - n0)) * 4;
}

// Word `word` of row n as an int, its 4 bytes as they lie (for the readers that gather a row's words).
inline int word_value(const uint8_t* w, int64_t N, int64_t K, int64_t n, int64_t word) {
  int v;
  return std::memcpy(&v, word_of(w, N, K, n, word), sizeof v), v;
}

// The bf16 bits of scale g of row n: s (N, groups).
inline uint16_t scale_of(const uint16_t* s, int64_t N, int64_t groups, int64_t n, int64_t g) {
  const int64_t n0 = n / kTileRows * kTileRows;
  return s[n0 * groups + g * tile_rows(N, n0) + (n - n0)];
}

}  // namespace minaf3_int4_layout
