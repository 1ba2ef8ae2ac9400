// CPU building blocks of the top-k kernel, shared by every SIMD level.
#pragma once

#include <cstdint>
#include <vector>

#include "topk.h"

namespace clapedge {

struct Candidate {
  float score;
  int64_t id;
};

// Better = higher score, then lower id. Used to order results and heaps.
inline bool better(const Candidate& a, const Candidate& b) {
  return a.score > b.score || (a.score == b.score && a.id < b.id);
}

// A bounded heap that keeps the k best candidates; its top is the worst kept one, so a
// candidate is rejected with a single compare against `threshold()`.
class TopKHeap {
 public:
  explicit TopKHeap(int64_t k, float floor);
  bool full() const { return static_cast<int64_t>(items_.size()) == k_; }
  // Candidates must beat this score (or tie with a lower id) to enter.
  float threshold() const { return full() ? items_.front().score : floor_; }
  void push(float score, int64_t id);
  const std::vector<Candidate>& items() const { return items_; }

 private:
  int64_t k_;
  float floor_;
  std::vector<Candidate> items_;
};

// Scores gallery rows [n0, n1) against all queries into per-query heaps (scalar path).
// Returns false when a non-finite score was produced.
bool scan_f32_scalar(const float* queries, int64_t Q, const float* gallery, int64_t n0,
                     int64_t n1, int64_t D, const TopKParams& params,
                     std::vector<TopKHeap>& heaps);

}  // namespace clapedge
