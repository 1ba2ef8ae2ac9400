// Fused similarity + top-k: one pass over the gallery, never materialising the Q x N scores.
//
// The entry point reads like faiss's bfKnn: one parameter struct and one function.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace clapedge {

// A user error (bad shapes, non-finite values). The bindings turn it into ValueError.
struct KernelInputError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

enum class Metric { InnerProduct };

struct TopKParams {
  Metric metric = Metric::InnerProduct;
  int64_t k = 10;
  int threads = 0;               // 0: all hardware threads
  // Optional allow-list over gallery rows: bit i of allow[i / 8] set means row i may be
  // returned. nullptr: every row is allowed.
  const uint8_t* allow = nullptr;
  // Optional per-query minimum score (length Q); rows scoring below are never returned.
  const float* min_score = nullptr;
};

// queries: [Q, D] row-major float32; gallery: [N, D] row-major float32.
// out_scores: [Q, k], out_ids: [Q, k]; sorted by score descending, ties by lower id;
// fewer than k candidates leaves -inf / -1 padding.
// Throws KernelInputError when a computed score is not finite (NaN/Inf in the inputs).
void topk_f32(const float* queries, int64_t Q, const float* gallery, int64_t N, int64_t D,
              const TopKParams& params, float* out_scores, int64_t* out_ids);

}  // namespace clapedge
