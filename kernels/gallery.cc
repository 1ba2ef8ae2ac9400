// Int8 quantisation and the grouped layout (see gallery.h). Runs once per gallery build, so
// it favours plain code over speed; the work is split over rows.
#include "gallery.h"

#include <algorithm>
#include <cmath>

#include "thread_pool.h"

namespace clapedge {

namespace {

template <typename Fn>
void over_rows(int64_t n, int threads, Fn fn) {
  const int t = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, n / 1024)));
  parallel_run(t, [&](int i) { fn(n * i / t, n * (i + 1) / t); });
}

}  // namespace

void quantize_rows_int8(const float* x, int64_t n, int64_t dim, int8_t* codes, float* scales,
                        int threads) {
  over_rows(n, threads, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* v = x + r * dim;
      int8_t* c = codes + r * dim;
      float amax = 0.0f;
      for (int64_t d = 0; d < dim; ++d) amax = std::max(amax, std::fabs(v[d]));
      if (!(amax > 0.0f)) {  // all zero (NaN/Inf are refused before this point)
        std::fill(c, c + dim, int8_t{0});
        scales[r] = 0.0f;
        continue;
      }
      const float inv = 127.0f / amax;
      for (int64_t d = 0; d < dim; ++d) {
        const float y = std::nearbyint(v[d] * inv);
        c[d] = static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, y)));
      }
      scales[r] = amax / 127.0f;
    }
  });
}

void pack_int8(const int8_t* codes, int64_t n, int64_t dim, int8_t* packed,
               int32_t* corrections, int threads) {
  const int64_t groups = num_groups(n);
  const int64_t gbytes = group_bytes(dim);
  over_rows(groups, threads, [&](int64_t g0, int64_t g1) {
    std::fill(packed + g0 * gbytes, packed + g1 * gbytes, int8_t{0});
    std::fill(corrections + g0 * kGroupRows, corrections + g1 * kGroupRows, 0);
    for (int64_t g = g0; g < g1; ++g) {
      for (int64_t r = 0; r < kGroupRows; ++r) {
        const int64_t row = g * kGroupRows + r;
        if (row >= n) break;
        const int8_t* c = codes + row * dim;
        int32_t sum = 0;
        for (int64_t d = 0; d < dim; ++d) {
          packed[g * gbytes + (d / 4) * 64 + r * 4 + d % 4] = c[d];
          sum += c[d];
        }
        corrections[row] = 128 * sum;
      }
    }
  });
}

void unpack_int8(const int8_t* packed, int64_t n, int64_t dim, int8_t* codes) {
  const int64_t gbytes = group_bytes(dim);
  for (int64_t row = 0; row < n; ++row) {
    const int64_t g = row / kGroupRows, r = row % kGroupRows;
    for (int64_t d = 0; d < dim; ++d)
      codes[row * dim + d] = packed[g * gbytes + (d / 4) * 64 + r * 4 + d % 4];
  }
}

}  // namespace clapedge
