// Shape checks, threading and dispatch of the fused similarity/top-k kernel.
#include <algorithm>
#include <cmath>
#include <limits>
#include <thread>
#include <vector>

#include "topk.h"
#include "topk_cpu.h"

namespace clapedge {

namespace {

int resolve_threads(int requested, int64_t N, int64_t D) {
  // Below this much work a thread costs more than it saves.
  constexpr int64_t kMinWorkPerThread = 1 << 18;
  int hw = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  int t = requested > 0 ? requested : hw;
  int64_t by_work = std::max<int64_t>(1, (N * D) / kMinWorkPerThread);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(t, by_work)));
}

}  // namespace

void topk_f32(const float* queries, int64_t Q, const float* gallery, int64_t N, int64_t D,
              const TopKParams& params, float* out_scores, int64_t* out_ids) {
  if (params.k <= 0) throw KernelInputError("k must be positive, got " + std::to_string(params.k));
  if (Q < 0 || N < 0 || D <= 0) throw KernelInputError("invalid shapes");

  const float neg_inf = -std::numeric_limits<float>::infinity();
  const int threads = resolve_threads(params.threads, N, D);
  // Split the gallery (not the queries) so a single query uses every thread.
  std::vector<std::vector<TopKHeap>> heaps(static_cast<size_t>(threads));
  std::vector<char> finite(static_cast<size_t>(threads), 1);
  auto work = [&](int t) {
    auto& hs = heaps[static_cast<size_t>(t)];
    hs.reserve(static_cast<size_t>(Q));
    for (int64_t q = 0; q < Q; ++q)
      hs.emplace_back(params.k, params.min_score ? params.min_score[q] : neg_inf);
    const int64_t n0 = N * t / threads, n1 = N * (t + 1) / threads;
    finite[static_cast<size_t>(t)] =
        scan_f32_scalar(queries, Q, gallery, n0, n1, D, params, hs);
  };
  if (threads == 1) {
    work(0);
  } else {
    std::vector<std::thread> pool;
    for (int t = 1; t < threads; ++t) pool.emplace_back(work, t);
    work(0);
    for (auto& th : pool) th.join();
  }
  for (char f : finite)
    if (!f) throw KernelInputError("queries or gallery contain NaN or Inf (a score was not finite)");

  std::vector<Candidate> merged;
  for (int64_t q = 0; q < Q; ++q) {
    merged.clear();
    for (auto& hs : heaps) {
      const auto& items = hs[static_cast<size_t>(q)].items();
      merged.insert(merged.end(), items.begin(), items.end());
    }
    const int64_t keep = std::min<int64_t>(params.k, static_cast<int64_t>(merged.size()));
    std::partial_sort(merged.begin(), merged.begin() + keep, merged.end(), better);
    for (int64_t j = 0; j < params.k; ++j) {
      out_scores[q * params.k + j] = j < keep ? merged[static_cast<size_t>(j)].score : neg_inf;
      out_ids[q * params.k + j] = j < keep ? merged[static_cast<size_t>(j)].id : -1;
    }
  }
}

}  // namespace clapedge
