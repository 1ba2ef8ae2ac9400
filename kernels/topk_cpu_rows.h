// The float32 / float16 scan shared by the SIMD levels, written once over a vector type.
//
// Included only by the level translation units (topk_cpu_avx2.cc, ...), each compiled with
// its own flags: everything here is in an anonymous namespace, so each level gets its own
// copy and no instantiation compiled for one CPU can be picked up by another (see topk_cpu.h).
//
// A level provides:
//   struct Vec { using T; static T zero(); static T load(const float*);
//                static T load_tail(const float*, int64_t n);   // first n lanes, rest zero
//                static T fma(T a, T b, T acc); static float sum(T); static constexpr int kLanes; };
//   struct F32Rows / F16Rows { using Elem; static Vec::T load(const Elem*);
//                              static Vec::T load_tail(const Elem*, int64_t n); };
#pragma once

#include <cstdint>

#include "topk_cpu.h"

#define CLAPEDGE_INLINE inline __attribute__((always_inline))
#define CLAPEDGE_UNROLL _Pragma("GCC unroll 32")

namespace clapedge {
namespace cpu {
namespace {

CLAPEDGE_INLINE int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
CLAPEDGE_INLINE int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
CLAPEDGE_INLINE bool finite(float s) { return s - s == 0.0f; }

// out[q][r] = <qs[q], rows[r]>. Every pair has its own accumulator, fed in the same order
// whatever the tile, so a pair's score does not depend on the tile it was computed in: equal
// rows tie exactly, and the re-rank's one-pair call gives the same bits as the scan.
template <class Vec, class Rows, int QT, int RT>
CLAPEDGE_INLINE void dots(const float* const* qs, const typename Rows::Elem* const* rows,
                          int64_t D, float out[QT][RT]) {
  using V = typename Vec::T;
  constexpr int W = Vec::kLanes;
  V acc[QT][RT];
  CLAPEDGE_UNROLL for (int q = 0; q < QT; ++q)
    CLAPEDGE_UNROLL for (int r = 0; r < RT; ++r) acc[q][r] = Vec::zero();
  int64_t d = 0;
  for (; d + W <= D; d += W) {
    V g[RT];
    CLAPEDGE_UNROLL for (int r = 0; r < RT; ++r) g[r] = Rows::load(rows[r] + d);
    CLAPEDGE_UNROLL for (int q = 0; q < QT; ++q) {
      const V x = Vec::load(qs[q] + d);
      CLAPEDGE_UNROLL for (int r = 0; r < RT; ++r) acc[q][r] = Vec::fma(x, g[r], acc[q][r]);
    }
  }
  if (d < D) {
    V g[RT];
    CLAPEDGE_UNROLL for (int r = 0; r < RT; ++r) g[r] = Rows::load_tail(rows[r] + d, D - d);
    CLAPEDGE_UNROLL for (int q = 0; q < QT; ++q) {
      const V x = Vec::load_tail(qs[q] + d, D - d);
      CLAPEDGE_UNROLL for (int r = 0; r < RT; ++r) acc[q][r] = Vec::fma(x, g[r], acc[q][r]);
    }
  }
  CLAPEDGE_UNROLL for (int q = 0; q < QT; ++q)
    CLAPEDGE_UNROLL for (int r = 0; r < RT; ++r) out[q][r] = Vec::sum(acc[q][r]);
}

// One register tile: queries [q0, q0 + QT) x rows [r0, r0 + RT) into the heaps.
template <class Vec, class Rows, int QT, int RT>
bool rows_tile(const ScanJob& job, int64_t q0, int64_t r0, TopKHeap* heaps) {
  const int64_t D = job.dim;
  const auto* base = static_cast<const typename Rows::Elem*>(job.vectors);
  const float* qs[QT];
  const typename Rows::Elem* rows[RT];
  CLAPEDGE_UNROLL for (int q = 0; q < QT; ++q) qs[q] = job.queries + (q0 + q) * D;
  CLAPEDGE_UNROLL for (int r = 0; r < RT; ++r) rows[r] = base + (r0 + r) * D;
  float s[QT][RT];
  dots<Vec, Rows, QT, RT>(qs, rows, D, s);
  bool ok = true;
  for (int q = 0; q < QT; ++q) {
    TopKHeap& heap = heaps[q0 + q];
    for (int r = 0; r < RT; ++r) {
      ok &= finite(s[q][r]);
      if (s[q][r] >= heap.threshold) offer(heap, job.allow, s[q][r], r0 + r);
    }
  }
  return ok;
}

// A tile of qt <= QT queries (the last tile of queries may be short).
template <class Vec, class Rows, int QT, int RT>
bool rows_tile_upto(const ScanJob& job, int64_t q0, int64_t qt, int64_t r0, TopKHeap* heaps) {
  if constexpr (QT > 1) {
    if (qt < QT) return rows_tile_upto<Vec, Rows, QT - 1, RT>(job, q0, qt, r0, heaps);
  }
  return rows_tile<Vec, Rows, QT, RT>(job, q0, r0, heaps);
}

// Blocked like a matrix product so that both operands come from cache: a block of rows
// (~256 KiB, read from memory once, then from L2) meets the queries a super-block at a time
// (~24 KiB, kept in L1), in register tiles of QT queries x RT rows. The loop order does not
// change any pair's arithmetic (see dots), so results do not depend on the number of queries.
template <class Vec, class Rows, int QT, int RT>
bool scan_rows(const ScanJob& job, int64_t n0, int64_t n1, TopKHeap* heaps) {
  const int64_t Q = job.num_queries, D = job.dim;
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(typename Rows::Elem));
  // One tile of queries: just stream the rows (no block boundaries in the prefetchers' way).
  const int64_t rows_per_block =
      Q <= QT ? n1 - n0 : max64(RT, (int64_t{256} << 10) / row_bytes / RT * RT);
  const int64_t queries_per_block = max64(QT, (int64_t{24} << 10) / (D * 4) / QT * QT);
  bool ok = true;
  for (int64_t b0 = n0; b0 < n1; b0 += rows_per_block) {
    const int64_t b1 = min64(n1, b0 + rows_per_block);
    for (int64_t s0 = 0; s0 < Q; s0 += queries_per_block) {
      const int64_t s1 = min64(Q, s0 + queries_per_block);
      int64_t r0 = b0;
      for (; r0 + RT <= b1; r0 += RT)
        for (int64_t q0 = s0; q0 < s1; q0 += QT)
          ok &= rows_tile_upto<Vec, Rows, QT, RT>(job, q0, min64(QT, s1 - q0), r0, heaps);
      for (; r0 < b1; ++r0)  // the block's last rows, one at a time (same arithmetic)
        for (int64_t q0 = s0; q0 < s1; q0 += QT)
          ok &= rows_tile_upto<Vec, Rows, QT, 1>(job, q0, min64(QT, s1 - q0), r0, heaps);
    }
  }
  return ok;
}

template <class Vec, class Rows>
float dot_one(const float* q, const typename Rows::Elem* row, int64_t dim) {
  float s[1][1];
  dots<Vec, Rows, 1, 1>(&q, &row, dim, s);
  return s[0][0];
}

// Rows of the int8 group starting at row0 (a multiple of 16) that may be returned: inside
// [n0, n1) and allowed. Bit r is row row0 + r.
CLAPEDGE_INLINE uint32_t group_live_bits(const ScanJob& job, int64_t row0, int64_t n0,
                                         int64_t n1) {
  const int64_t lo = max64(n0, row0) - row0, hi = min64(n1, row0 + 16) - row0;
  if (hi <= lo) return 0;
  uint32_t m = ((hi >= 16 ? 0xffffu : ((1u << hi) - 1u)) & ~((1u << lo) - 1u));
  if (job.allow != nullptr) {
    const int64_t byte = row0 >> 3;
    uint32_t bits = job.allow[byte];
    if (row0 + 8 < job.num_vectors) bits |= static_cast<uint32_t>(job.allow[byte + 1]) << 8;
    m &= bits;
  }
  return m;
}

CLAPEDGE_INLINE uint32_t load_u32(const void* p) {
  uint32_t v;
  __builtin_memcpy(&v, p, 4);
  return v;
}

}  // namespace
}  // namespace cpu
}  // namespace clapedge
