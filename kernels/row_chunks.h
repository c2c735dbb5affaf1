// How the one-row product loops (int8_gemv.cpp, int4_gemv.cpp) share a weight's rows out over torch's
// threads. The rows go in chunks of about kChunkWork bytes of weights times activation rows. Each thread owns
// a contiguous run of chunks and claims them in order, so its weights arrive as one stream (the prefetch past
// a chunk's end lands in its own next chunk); a thread done with its run claims the chunks left in the
// others' runs, so a thread whose core is busy elsewhere does less of the work instead of holding the
// product back.

#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

namespace minaf3_rows {

// Work per claimed chunk, in weight bytes times activation rows: 512 KiB is ~25 us at batch 1, long next to
// a claim (one atomic add) and short enough that the threads finish within a chunk of each other.
constexpr int64_t kChunkWork = 512 * 1024;
// Fewest rows per chunk: at large batch a chunk is a tile that many activation rows pass over.
constexpr int64_t kMinChunkRows = 16;

// One thread's run of chunks [next, end): `next` is claimed with an atomic increment, by its owner or by a
// thread that has finished its own run. A cache line each, so that claims in one run do not slow another's.
struct alignas(64) Run {
  std::atomic<int64_t> next{0};
  int64_t end = 0;
};

// rows(begin, end) over rows [0, N) of a weight whose row is `row_work` bytes times activation rows, split
// into chunks of about `work` over the threads; each chunk a multiple of `unit` rows, the loop's block of
// rows (4 for int8_gemv.cpp, so that only the layer's last rows go one at a time; int4_gemv.cpp's tiles).
template <typename Rows>
void for_row_chunks(int64_t N, int64_t row_work, int64_t unit, const Rows& rows,
                    int64_t work = kChunkWork) {
  int64_t chunk = std::max<int64_t>(kMinChunkRows, work / std::max<int64_t>(1, row_work));
  chunk = (chunk + unit - 1) / unit * unit;
  const int64_t num_chunks = (N + chunk - 1) / chunk;
  if (num_chunks == 1) {  // a small layer: waking a second thread costs more than its whole product
    rows(0, N);
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
      for (int64_t i = 0; i < threads; ++i) {  // its own run first, then the others'
        Run& run = runs[(t + i) % threads];
        for (int64_t c = run.next++; c < run.end; c = run.next++) rows(c * chunk, std::min(N, (c + 1) * chunk));
      }
    }
  });
}

}  // namespace minaf3_rows
