// CPU building blocks of the top-k kernel, shared by every SIMD level.
//
// Each SIMD level lives in its own translation unit compiled with its own flags
// (topk_cpu.cc: portable, topk_cpu_avx2.cc, topk_cpu_avx512.cc, topk_cpu_neon*.cc) and exports
// one table of functions (`LevelKernels`); topk.cc picks a table at call time. Because those
// translation units are compiled for different CPUs, nothing here may be an inline function
// with external linkage that a level could instantiate with its own instructions: the shared
// helpers are `static inline`, and the heap's members are defined out of line in topk_cpu.cc.
#pragma once

#include <cstdint>

#include "topk.h"

namespace clapedge {
namespace cpu {

struct Candidate {
  float score;
  int64_t id;
};

// Better = higher score, then lower id. Used to order results and heaps.
static inline bool better(const Candidate& a, const Candidate& b) {
  return a.score > b.score || (a.score == b.score && a.id < b.id);
}

// A bounded min-heap (by `better`) that keeps the k best candidates. `threshold` is the
// score a candidate must reach (>=) to be worth offering: the worst kept score once full, the
// floor (min_score or -inf) before. Hot loops read the field and reject with one compare.
struct TopKHeap {
  float threshold;
  float floor;
  int64_t k;
  int64_t size;
  Candidate* items;  // storage for k candidates, owned by the caller

  void reset(int64_t k, float floor, Candidate* storage);
  // Offers a candidate with score >= threshold; keeps it if it beats the worst kept one.
  void push(float score, int64_t id);
};

static inline bool allowed(const uint8_t* allow, int64_t i) {
  return allow == nullptr || ((allow[i >> 3] >> (i & 7)) & 1) != 0;
}

// The cold path of every scan: a score already passed `score >= heap.threshold`.
static inline void offer(TopKHeap& heap, const uint8_t* allow, float score, int64_t id) {
  if (score >= heap.threshold && allowed(allow, id)) heap.push(score, id);
}

// Everything a level needs to score gallery rows [n0, n1) against every query.
struct ScanJob {
  int64_t num_queries;
  int64_t dim;
  const float* queries;  // Float32 / Float16 galleries: [num_queries, dim]

  // Int8 galleries: queries quantised like the gallery rows, padded to padded_dim(dim).
  const int8_t* qcodes;  // signed codes, row-major [round_up(num_queries, 16), padded_dim]
                         // (rows past the last query are zero: whole AMX tiles)
  // The same codes interleaved by blocks of 8 queries, so a register tile finds the 4-byte
  // steps of all its queries side by side: [ceil(Q / 8)][padded_dim / 4][8 queries][4 bytes]
  // (missing queries of the last block are zero codes).
  const int8_t* qcodes_x8;
  const uint8_t* qcodes_u8_x8;  // codes + 128 (the unsigned operand of vpdpbusd)
  const float* qscales;         // [num_queries]

  DType dtype;
  const void* vectors;
  int64_t num_vectors;
  const float* scales;
  const int32_t* corrections;

  const uint8_t* allow;
};

struct LevelKernels {
  SimdLevel level;
  // Scores rows [n0, n1) (n0 a multiple of 16 for Int8) into heaps[0..num_queries).
  // Returns false when a score was not finite.
  bool (*scan)(const ScanJob& job, int64_t n0, int64_t n1, TopKHeap* heaps);
  // One exact score for the re-rank pass; the same arithmetic as the Float32 / Float16 scan
  // of this level, so a re-ranked score equals the plain float score bit for bit.
  float (*dot_f32)(const float* q, const float* row, int64_t dim);
  float (*dot_f16)(const float* q, const uint16_t* row, int64_t dim);
  // Probe for the benchmark: `iters` rounds of this level's int8 multiply-accumulate
  // instruction on register-resident data; returns how many multiply-accumulates it did.
  double (*int8_mac_loop)(int64_t iters);
};

// One table per level; only the levels compiled in for this architecture are defined
// (topk.cc checks the CLAPEDGE_HAVE_<LEVEL> macros set by CMake).
const LevelKernels* scalar_kernels();
const LevelKernels* avx2_kernels();
const LevelKernels* avx512_kernels();
const LevelKernels* amx_kernels();
const LevelKernels* neon_kernels();
const LevelKernels* neon_dotprod_kernels();

}  // namespace cpu
}  // namespace clapedge
