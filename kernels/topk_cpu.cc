// Scalar (portable) CPU path of the fused similarity/top-k kernel.
#include "topk_cpu.h"

#include <algorithm>
#include <cmath>

namespace clapedge {

TopKHeap::TopKHeap(int64_t k, float floor) : k_(k), floor_(floor) {
  items_.reserve(static_cast<size_t>(k));
}

void TopKHeap::push(float score, int64_t id) {
  Candidate c{score, id};
  if (!full()) {
    items_.push_back(c);
    std::push_heap(items_.begin(), items_.end(), better);
    return;
  }
  if (!better(c, items_.front())) return;
  std::pop_heap(items_.begin(), items_.end(), better);
  items_.back() = c;
  std::push_heap(items_.begin(), items_.end(), better);
}

namespace {

// Eight independent accumulators let the compiler vectorise without -ffast-math and keep
// the summation order fixed, so results are deterministic.
inline float dot_scalar(const float* a, const float* b, int64_t D) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t d = 0;
  for (; d + 8 <= D; d += 8)
    for (int j = 0; j < 8; ++j) acc[j] += a[d + j] * b[d + j];
  for (; d < D; ++d) acc[d & 7] += a[d] * b[d];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

inline bool allowed(const uint8_t* allow, int64_t i) {
  return allow == nullptr || (allow[i >> 3] >> (i & 7)) & 1;
}

}  // namespace

bool scan_f32_scalar(const float* queries, int64_t Q, const float* gallery, int64_t n0,
                     int64_t n1, int64_t D, const TopKParams& params,
                     std::vector<TopKHeap>& heaps) {
  // Block the gallery so a block stays in cache while every query visits it.
  constexpr int64_t kBlock = 64;
  bool finite = true;
  for (int64_t b0 = n0; b0 < n1; b0 += kBlock) {
    const int64_t b1 = std::min(n1, b0 + kBlock);
    for (int64_t q = 0; q < Q; ++q) {
      const float* qv = queries + q * D;
      TopKHeap& heap = heaps[static_cast<size_t>(q)];
      for (int64_t i = b0; i < b1; ++i) {
        const float s = dot_scalar(qv, gallery + i * D, D);
        if (!std::isfinite(s)) {
          finite = false;
          continue;
        }
        if (s < heap.threshold()) continue;
        if (!allowed(params.allow, i)) continue;
        heap.push(s, i);
      }
    }
  }
  return finite;
}

}  // namespace clapedge
