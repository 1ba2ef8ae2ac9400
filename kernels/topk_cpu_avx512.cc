// AVX-512 level (F, BW, VL, VNNI) of the fused similarity/top-k kernel.
// Compiled with -mavx512f -mavx512bw -mavx512vl -mavx512vnni -mavx2 -mfma -mf16c only; topk.cc
// calls it after checking the CPU. Everything here has internal linkage (see topk_cpu.h).
#include <immintrin.h>

#include "gallery.h"
#include "topk_cpu.h"

#include "topk_cpu_rows.h"

namespace clapedge {
namespace cpu {
namespace {

CLAPEDGE_INLINE __mmask16 low_bits16(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << n) - 1u);
}

// ---- float32 / float16 rows (the shared scan of topk_cpu_rows.h) --------------------------

struct Vec {
  using T = __m512;
  static constexpr int kLanes = 16;
  static CLAPEDGE_INLINE T zero() { return _mm512_setzero_ps(); }
  static CLAPEDGE_INLINE T load(const float* p) { return _mm512_loadu_ps(p); }
  static CLAPEDGE_INLINE T load_tail(const float* p, int64_t n) {
    return _mm512_maskz_loadu_ps(low_bits16(n), p);
  }
  static CLAPEDGE_INLINE T fma(T a, T b, T acc) { return _mm512_fmadd_ps(a, b, acc); }
  static CLAPEDGE_INLINE float sum(T v) { return _mm512_reduce_add_ps(v); }
};

struct F32Rows {
  using Elem = float;
  static CLAPEDGE_INLINE __m512 load(const float* p) { return Vec::load(p); }
  static CLAPEDGE_INLINE __m512 load_tail(const float* p, int64_t n) { return Vec::load_tail(p, n); }
};

struct F16Rows {
  using Elem = uint16_t;
  static CLAPEDGE_INLINE __m512 load(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static CLAPEDGE_INLINE __m512 load_tail(const uint16_t* p, int64_t n) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(low_bits16(n), p));
  }
};

// 6 queries x 4 rows = 24 accumulators of the 32 zmm registers.
constexpr int kQueryTile = 6;
constexpr int kRowTile = 4;

// ---- int8, grouped layout, VNNI -----------------------------------------------------------
//
// vpdpbusd multiplies unsigned by signed bytes. The queries are the unsigned side, stored
// with +128: sum((q + 128) * g) = q.g + 128 * sum(g), and 128 * sum(g) is the row's
// precomputed correction.

constexpr int kGroupTile = 3;     // groups (of 16 rows) per register tile
constexpr int kInt8QueryTile = 8;  // queries per register tile (8 x 3 accumulators)

template <int QT, int GT>
void int8_tile(const ScanJob& job, int64_t g0, int64_t q0, int64_t n0, int64_t n1,
               TopKHeap* heaps) {
  const int64_t Dp = padded_dim(job.dim);
  const int64_t gbytes = group_bytes(job.dim);
  const int8_t* G = static_cast<const int8_t*>(job.vectors) + g0 * gbytes;
  const uint8_t* qb = job.qcodes_u8_x8 + q0 * Dp;  // q0 is a multiple of 8

  __m512i acc[QT][GT];
  CLAPEDGE_UNROLL for (int q = 0; q < QT; ++q)
    CLAPEDGE_UNROLL for (int j = 0; j < GT; ++j) acc[q][j] = _mm512_setzero_si512();
  for (int64_t d = 0; d < Dp; d += 4, G += 64, qb += 32) {
    __m512i g[GT];
    CLAPEDGE_UNROLL for (int j = 0; j < GT; ++j) g[j] = _mm512_loadu_si512(G + j * gbytes);
    CLAPEDGE_UNROLL for (int q = 0; q < QT; ++q) {
      const __m512i b = _mm512_set1_epi32(static_cast<int>(load_u32(qb + 4 * q)));
      CLAPEDGE_UNROLL for (int j = 0; j < GT; ++j) acc[q][j] = _mm512_dpbusd_epi32(acc[q][j], b, g[j]);
    }
  }
  // Out of registers before the (data-dependent) heap updates, so that the accumulators
  // above stay in registers.
  alignas(64) int32_t dots[QT][GT][16];
  CLAPEDGE_UNROLL for (int q = 0; q < QT; ++q)
    CLAPEDGE_UNROLL for (int j = 0; j < GT; ++j) _mm512_store_si512(dots[q][j], acc[q][j]);

  for (int j = 0; j < GT; ++j) {
    const int64_t row0 = (g0 + j) * kGroupRows;
    const __mmask16 live = static_cast<__mmask16>(group_live_bits(job, row0, n0, n1));
    const __m512i corr = _mm512_loadu_si512(job.corrections + row0);
    const __m512 scale = _mm512_loadu_ps(job.scales + row0);
    for (int q = 0; q < QT; ++q) {
      TopKHeap& heap = heaps[q0 + q];
      const __m512i dot = _mm512_sub_epi32(_mm512_load_si512(dots[q][j]), corr);
      const __m512 s = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(dot), scale),
                                     _mm512_set1_ps(job.qscales[q0 + q]));
      __mmask16 m = _mm512_mask_cmp_ps_mask(live, s, _mm512_set1_ps(heap.threshold), _CMP_GE_OQ);
      if (m == 0) continue;  // the common case: nothing in this group beats the k-th score
      alignas(64) float tmp[16];
      _mm512_store_ps(tmp, s);
      while (m) {
        const int b = __builtin_ctz(m);
        m = static_cast<__mmask16>(m & (m - 1));
        if (tmp[b] >= heap.threshold) heap.push(tmp[b], row0 + b);
      }
    }
  }
}

template <int GT>
void int8_tile_any_q(const ScanJob& job, int64_t g0, int64_t q0, int64_t qt, int64_t n0,
                     int64_t n1, TopKHeap* heaps) {
  switch (qt) {
    case 1: return int8_tile<1, GT>(job, g0, q0, n0, n1, heaps);
    case 2: return int8_tile<2, GT>(job, g0, q0, n0, n1, heaps);
    case 3: return int8_tile<3, GT>(job, g0, q0, n0, n1, heaps);
    case 4: return int8_tile<4, GT>(job, g0, q0, n0, n1, heaps);
    case 5: return int8_tile<5, GT>(job, g0, q0, n0, n1, heaps);
    case 6: return int8_tile<6, GT>(job, g0, q0, n0, n1, heaps);
    case 7: return int8_tile<7, GT>(job, g0, q0, n0, n1, heaps);
    default: return int8_tile<8, GT>(job, g0, q0, n0, n1, heaps);
  }
}

// A few groups at a time (they stay in L1) against every query.
bool scan_int8(const ScanJob& job, int64_t n0, int64_t n1, TopKHeap* heaps) {
  const int64_t Q = job.num_queries;
  const int64_t g_end = num_groups(n1);
  for (int64_t g = n0 / kGroupRows; g < g_end; g += kGroupTile) {
    const int64_t gt = min64(kGroupTile, g_end - g);
    for (int64_t q0 = 0; q0 < Q; q0 += kInt8QueryTile) {
      const int64_t qt = min64(kInt8QueryTile, Q - q0);
      if (gt == 3)
        int8_tile_any_q<3>(job, g, q0, qt, n0, n1, heaps);
      else if (gt == 2)
        int8_tile_any_q<2>(job, g, q0, qt, n0, n1, heaps);
      else
        int8_tile_any_q<1>(job, g, q0, qt, n0, n1, heaps);
    }
  }
  return true;
}

bool scan(const ScanJob& job, int64_t n0, int64_t n1, TopKHeap* heaps) {
  switch (job.dtype) {
    case DType::Float32:
      return scan_rows<Vec, F32Rows, kQueryTile, kRowTile>(job, n0, n1, heaps);
    case DType::Float16:
      return scan_rows<Vec, F16Rows, kQueryTile, kRowTile>(job, n0, n1, heaps);
    case DType::Int8:
      return scan_int8(job, n0, n1, heaps);
  }
  return true;
}

// 12 independent vpdpbusd chains hide the instruction's latency.
double int8_mac_loop(int64_t iters) {
  __m512i acc[12];
  CLAPEDGE_UNROLL for (int i = 0; i < 12; ++i) acc[i] = _mm512_set1_epi32(i);
  __m512i a = _mm512_set1_epi8(3), b = _mm512_set1_epi8(-2);
  for (int64_t it = 0; it < iters; ++it) {
    CLAPEDGE_UNROLL for (int i = 0; i < 12; ++i) acc[i] = _mm512_dpbusd_epi32(acc[i], a, b);
    __asm__ volatile("" : "+v"(a));
  }
  __m512i s = acc[0];
  CLAPEDGE_UNROLL for (int i = 1; i < 12; ++i) s = _mm512_add_epi32(s, acc[i]);
  volatile int sink = _mm512_reduce_add_epi32(s);
  (void)sink;
  return 12.0 * 64.0 * static_cast<double>(iters);
}

const LevelKernels kAvx512{SimdLevel::Avx512, scan, dot_one<Vec, F32Rows>, dot_one<Vec, F16Rows>,
                          int8_mac_loop};

}  // namespace

const LevelKernels* avx512_kernels() { return &kAvx512; }

}  // namespace cpu
}  // namespace clapedge
