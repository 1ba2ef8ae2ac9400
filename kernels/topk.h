// Fused similarity + top-k: one pass over the gallery, never materialising the Q x N scores.
//
// The entry point reads like faiss's bfKnn: one parameter struct and one function.
//
//   clapedge::TopKParams p;
//   p.k = 10; p.dim = D;
//   p.queries = q; p.num_queries = Q;
//   p.vectors = gallery; p.num_vectors = N;          // float32 rows
//   p.out_scores = scores; p.out_ids = ids;          // [Q, k] each
//   clapedge::topk(p);
//
// Results are sorted by score descending, ties broken by the lower id; when fewer than k rows
// qualify the tail is padded with score -inf and id -1.
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

// How the gallery rows are stored.
//   Float32, Float16: row-major [num_vectors, dim].
//   Int8: symmetric per-row quantisation in the grouped layout of gallery.h (16 rows
//         interleaved in 4-byte steps), with per-row scales and VNNI corrections.
enum class DType { Float32 = 0, Float16 = 1, Int8 = 2 };

// CPU code paths. Auto picks the best one compiled in and supported by this CPU.
enum class SimdLevel {
  Auto = -1,
  Scalar = 0,
  Neon = 1,
  NeonDotprod = 2,
  Avx2 = 3,
  Avx512 = 4,
  Amx = 5,  // AVX-512 + AMX-INT8 tiles for the int8 scan of many queries
};

enum class Device { Cpu = 0, Cuda = 1 };

struct TopKParams {
  Metric metric = Metric::InnerProduct;
  int64_t k = 10;
  int64_t dim = 0;

  // Queries: float32 [num_queries, dim], row-major. Int8 galleries quantise them on the fly.
  const float* queries = nullptr;
  int64_t num_queries = 0;

  // Gallery: num_vectors rows stored as `dtype` (see DType).
  DType dtype = DType::Float32;
  const void* vectors = nullptr;
  int64_t num_vectors = 0;
  const float* scales = nullptr;         // Int8: one per row (padded to the group size)
  const int32_t* corrections = nullptr;  // Int8: 128 * sum of the row's codes (VNNI offset)

  // Optional exact re-rank: the best rerank_factor * k candidates of the first pass are
  // re-scored against this row-major float32 / float16 copy. nullptr: no re-rank.
  DType rerank_dtype = DType::Float32;
  const void* rerank_vectors = nullptr;
  int64_t rerank_factor = 4;

  // Optional allow-list over gallery rows: bit i of allow[i / 8] set means row i may be
  // returned. nullptr: every row is allowed.
  const uint8_t* allow = nullptr;
  // Optional per-query minimum score (length num_queries); rows scoring below are dropped.
  const float* min_score = nullptr;

  int threads = 0;  // 0: all hardware threads; the gallery is split across them
  SimdLevel simd = SimdLevel::Auto;
  Device device = Device::Cpu;

  // Outputs, [num_queries, k] each.
  float* out_scores = nullptr;
  int64_t* out_ids = nullptr;
};

// Throws KernelInputError on bad parameters, or when a computed score is not finite
// (NaN/Inf in the inputs): the caller can then say where.
void topk(const TopKParams& params);

// The best level compiled in and supported by this CPU.
SimdLevel best_simd_level();
// Whether `level` is compiled in and supported by this CPU.
bool simd_level_available(SimdLevel level);
const char* simd_level_name(SimdLevel level);

// Compiled with CUDA and at least one device is visible.
bool cuda_available();

}  // namespace clapedge
