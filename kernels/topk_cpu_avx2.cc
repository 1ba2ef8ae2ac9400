// AVX2 level (AVX2, FMA, F16C) of the fused similarity/top-k kernel, for x86 CPUs without
// AVX-512 VNNI. Compiled with -mavx2 -mfma -mf16c only; topk.cc calls it after checking the
// CPU. Everything here has internal linkage (see topk_cpu.h).
#include <immintrin.h>

#include "gallery.h"
#include "topk_cpu.h"

#include "topk_cpu_rows.h"

namespace clapedge {
namespace cpu {
namespace {

CLAPEDGE_INLINE __m256i lane_mask(int64_t n) {  // the first n of 8 int32 lanes
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), idx);
}

// ---- float32 / float16 rows (the shared scan of topk_cpu_rows.h) --------------------------

struct Vec {
  using T = __m256;
  static constexpr int kLanes = 8;
  static CLAPEDGE_INLINE T zero() { return _mm256_setzero_ps(); }
  static CLAPEDGE_INLINE T load(const float* p) { return _mm256_loadu_ps(p); }
  static CLAPEDGE_INLINE T load_tail(const float* p, int64_t n) {
    return _mm256_maskload_ps(p, lane_mask(n));
  }
  static CLAPEDGE_INLINE T fma(T a, T b, T acc) { return _mm256_fmadd_ps(a, b, acc); }
  static CLAPEDGE_INLINE float sum(T v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    x = _mm_add_ss(x, _mm_movehdup_ps(x));
    return _mm_cvtss_f32(x);
  }
};

struct F32Rows {
  using Elem = float;
  static CLAPEDGE_INLINE __m256 load(const float* p) { return Vec::load(p); }
  static CLAPEDGE_INLINE __m256 load_tail(const float* p, int64_t n) { return Vec::load_tail(p, n); }
};

struct F16Rows {
  using Elem = uint16_t;
  static CLAPEDGE_INLINE __m256 load(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static CLAPEDGE_INLINE __m256 load_tail(const uint16_t* p, int64_t n) {
    alignas(16) uint16_t tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t i = 0; i < n; ++i) tmp[i] = p[i];
    return _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(tmp)));
  }
};

// 16 ymm registers: 3 x 3 accumulators + 3 rows + 1 query.
constexpr int kQueryTile = 3;
constexpr int kRowTile = 3;

// ---- int8, grouped layout -----------------------------------------------------------------
//
// maddubs multiplies unsigned by signed bytes and adds pairs into saturating int16. With
// |q| as the unsigned side and g * sign(q) as the signed side the products are exact and a
// pair is at most 2 * 127 * 127 = 32258 < 32767 (codes never reach -128), so nothing
// saturates; madd with ones then widens the pairs to int32.

constexpr int kInt8QueryTile = 4;  // 4 queries x 2 halves of a group = 8 accumulators

template <int QT>
void int8_tile(const ScanJob& job, int64_t g, int64_t q0, int64_t n0, int64_t n1,
               TopKHeap* heaps) {
  const int64_t Dp = padded_dim(job.dim);
  const int8_t* G = static_cast<const int8_t*>(job.vectors) + g * group_bytes(job.dim);
  // q0 is a multiple of 4: its 4-byte steps sit at slot q0 % 8 of its block of 8.
  const int8_t* qb = job.qcodes_x8 + (q0 / 8) * 8 * Dp + (q0 % 8) * 4;
  const __m256i ones = _mm256_set1_epi16(1);

  __m256i acc[QT][2];
  CLAPEDGE_UNROLL for (int q = 0; q < QT; ++q) acc[q][0] = acc[q][1] = _mm256_setzero_si256();
  for (int64_t d = 0; d < Dp; d += 4, G += 64, qb += 32) {
    const __m256i g0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(G));
    const __m256i g1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(G + 32));
    CLAPEDGE_UNROLL for (int q = 0; q < QT; ++q) {
      const __m256i b = _mm256_set1_epi32(static_cast<int>(load_u32(qb + 4 * q)));
      const __m256i a = _mm256_abs_epi8(b);
      const __m256i p0 = _mm256_maddubs_epi16(a, _mm256_sign_epi8(g0, b));
      const __m256i p1 = _mm256_maddubs_epi16(a, _mm256_sign_epi8(g1, b));
      acc[q][0] = _mm256_add_epi32(acc[q][0], _mm256_madd_epi16(p0, ones));
      acc[q][1] = _mm256_add_epi32(acc[q][1], _mm256_madd_epi16(p1, ones));
    }
  }
  // Out of registers before the (data-dependent) heap updates, so that the accumulators
  // above stay in registers.
  alignas(32) int32_t dots[QT][2][8];
  CLAPEDGE_UNROLL for (int q = 0; q < QT; ++q)
    CLAPEDGE_UNROLL for (int h = 0; h < 2; ++h)
      _mm256_store_si256(reinterpret_cast<__m256i*>(dots[q][h]), acc[q][h]);

  const int64_t row0 = g * kGroupRows;
  const uint32_t live = group_live_bits(job, row0, n0, n1);
  for (int h = 0; h < 2; ++h) {
    const int64_t base = row0 + 8 * h;
    const __m256 scale = _mm256_loadu_ps(job.scales + base);
    for (int q = 0; q < QT; ++q) {
      TopKHeap& heap = heaps[q0 + q];
      const __m256i dot = _mm256_load_si256(reinterpret_cast<const __m256i*>(dots[q][h]));
      const __m256 s = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(dot), scale),
                                     _mm256_set1_ps(job.qscales[q0 + q]));
      unsigned m = (live >> (8 * h)) &
                   static_cast<unsigned>(_mm256_movemask_ps(
                       _mm256_cmp_ps(s, _mm256_set1_ps(heap.threshold), _CMP_GE_OQ)));
      if (m == 0) continue;
      alignas(32) float tmp[8];
      _mm256_store_ps(tmp, s);
      while (m) {
        const int b = __builtin_ctz(m);
        m &= m - 1;
        if (tmp[b] >= heap.threshold) heap.push(tmp[b], base + b);
      }
    }
  }
}

bool scan_int8(const ScanJob& job, int64_t n0, int64_t n1, TopKHeap* heaps) {
  const int64_t Q = job.num_queries;
  for (int64_t g = n0 / kGroupRows; g * kGroupRows < n1; ++g)
    for (int64_t q0 = 0; q0 < Q; q0 += kInt8QueryTile) {
      switch (min64(kInt8QueryTile, Q - q0)) {
        case 1: int8_tile<1>(job, g, q0, n0, n1, heaps); break;
        case 2: int8_tile<2>(job, g, q0, n0, n1, heaps); break;
        case 3: int8_tile<3>(job, g, q0, n0, n1, heaps); break;
        default: int8_tile<4>(job, g, q0, n0, n1, heaps); break;
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

// The maddubs + madd + add sequence of the int8 scan, 6 independent chains.
double int8_mac_loop(int64_t iters) {
  __m256i acc[6];
  CLAPEDGE_UNROLL for (int i = 0; i < 6; ++i) acc[i] = _mm256_set1_epi32(i);
  __m256i a = _mm256_set1_epi8(3), b = _mm256_set1_epi8(-2);
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t it = 0; it < iters; ++it) {
    CLAPEDGE_UNROLL for (int i = 0; i < 6; ++i)
      acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), ones));
    __asm__ volatile("" : "+x"(a));
  }
  __m256i s = acc[0];
  CLAPEDGE_UNROLL for (int i = 1; i < 6; ++i) s = _mm256_add_epi32(s, acc[i]);
  volatile int sink = _mm256_extract_epi32(s, 0);
  (void)sink;
  return 6.0 * 32.0 * static_cast<double>(iters);
}

const LevelKernels kAvx2{SimdLevel::Avx2, scan, dot_one<Vec, F32Rows>, dot_one<Vec, F16Rows>,
                        int8_mac_loop};

}  // namespace

const LevelKernels* avx2_kernels() { return &kAvx2; }

}  // namespace cpu
}  // namespace clapedge
