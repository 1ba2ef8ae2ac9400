// The NEON levels of the fused similarity/top-k kernel (AArch64, e.g. Jetson-class CPUs).
//
// Included by exactly two translation units: topk_cpu_neon.cc (plain Advanced SIMD, every
// AArch64 CPU) and topk_cpu_neon_dotprod.cc (defines CLAPEDGE_NEON_DOTPROD and is compiled
// with -march=armv8.2-a+dotprod: the int8 scan uses SDOT). Everything is internal to each.
#pragma once

#include <arm_neon.h>

#include "gallery.h"
#include "topk_cpu.h"
#include "topk_cpu_rows.h"

namespace clapedge {
namespace cpu {
namespace {

// ---- float32 / float16 rows (the shared scan of topk_cpu_rows.h) --------------------------

struct Vec {
  using T = float32x4_t;
  static constexpr int kLanes = 4;
  static CLAPEDGE_INLINE T zero() { return vdupq_n_f32(0.0f); }
  static CLAPEDGE_INLINE T load(const float* p) { return vld1q_f32(p); }
  static CLAPEDGE_INLINE T load_tail(const float* p, int64_t n) {
    float tmp[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int64_t i = 0; i < n; ++i) tmp[i] = p[i];
    return vld1q_f32(tmp);
  }
  static CLAPEDGE_INLINE T fma(T a, T b, T acc) { return vfmaq_f32(acc, a, b); }
  static CLAPEDGE_INLINE float sum(T v) { return vaddvq_f32(v); }
};

struct F32Rows {
  using Elem = float;
  static CLAPEDGE_INLINE float32x4_t load(const float* p) { return Vec::load(p); }
  static CLAPEDGE_INLINE float32x4_t load_tail(const float* p, int64_t n) { return Vec::load_tail(p, n); }
};

struct F16Rows {
  using Elem = uint16_t;
  static CLAPEDGE_INLINE float32x4_t load(const uint16_t* p) {
    return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p)));
  }
  static CLAPEDGE_INLINE float32x4_t load_tail(const uint16_t* p, int64_t n) {
    uint16_t tmp[4] = {0, 0, 0, 0};
    for (int64_t i = 0; i < n; ++i) tmp[i] = p[i];
    return load(tmp);
  }
};

// 32 q registers: 4 x 4 accumulators + 4 rows + 1 query.
constexpr int kQueryTile = 4;
constexpr int kRowTile = 4;

// ---- int8, grouped layout -----------------------------------------------------------------
//
// A 4-byte step of a group is 64 bytes: four 16-byte vectors of 4 rows x 4 dims. Against the
// query's 4 bytes broadcast to every 32-bit lane, each vector yields the 4 rows' partial dots:
// SDOT does it in one instruction; plain NEON widens (SMULL), adds pairs (ADDP: at most
// 2 * 127 * 127, no int16 overflow) and accumulates pairs into int32 (SADALP).

constexpr int kInt8QueryTile = 4;

CLAPEDGE_INLINE int32x4_t dot4(int32x4_t acc, int8x16_t g, int8x16_t q) {
#ifdef CLAPEDGE_NEON_DOTPROD
  return vdotq_s32(acc, g, q);
#else
  const int16x8_t lo = vmull_s8(vget_low_s8(g), vget_low_s8(q));
  const int16x8_t hi = vmull_high_s8(g, q);
  return vpadalq_s16(acc, vpaddq_s16(lo, hi));
#endif
}

template <int QT>
void int8_tile(const ScanJob& job, int64_t g, int64_t q0, int64_t n0, int64_t n1,
               TopKHeap* heaps) {
  const int64_t Dp = padded_dim(job.dim);
  const int8_t* G = static_cast<const int8_t*>(job.vectors) + g * group_bytes(job.dim);
  // q0 is a multiple of 4: its 4-byte steps sit at slot q0 % 8 of its block of 8.
  const int8_t* qb = job.qcodes_x8 + (q0 / 8) * 8 * Dp + (q0 % 8) * 4;

  int32x4_t acc[QT][4];
  CLAPEDGE_UNROLL for (int q = 0; q < QT; ++q)
    CLAPEDGE_UNROLL for (int c = 0; c < 4; ++c) acc[q][c] = vdupq_n_s32(0);
  for (int64_t d = 0; d < Dp; d += 4, G += 64, qb += 32) {
    int8x16_t gv[4];
    CLAPEDGE_UNROLL for (int c = 0; c < 4; ++c) gv[c] = vld1q_s8(G + 16 * c);
    CLAPEDGE_UNROLL for (int q = 0; q < QT; ++q) {
      const int8x16_t b = vreinterpretq_s8_u32(vdupq_n_u32(load_u32(qb + 4 * q)));
      CLAPEDGE_UNROLL for (int c = 0; c < 4; ++c) acc[q][c] = dot4(acc[q][c], gv[c], b);
    }
  }
  // Out of registers before the (data-dependent) heap updates.
  int32_t dots[QT][16];
  CLAPEDGE_UNROLL for (int q = 0; q < QT; ++q)
    CLAPEDGE_UNROLL for (int c = 0; c < 4; ++c) vst1q_s32(dots[q] + 4 * c, acc[q][c]);

  const int64_t row0 = g * kGroupRows;
  const uint32_t live = group_live_bits(job, row0, n0, n1);
  for (int q = 0; q < QT; ++q) {
    TopKHeap& heap = heaps[q0 + q];
    const float32x4_t qs = vdupq_n_f32(job.qscales[q0 + q]);
    for (int c = 0; c < 4; ++c) {
      const float32x4_t s = vmulq_f32(
          vmulq_f32(vcvtq_f32_s32(vld1q_s32(dots[q] + 4 * c)), vld1q_f32(job.scales + row0 + 4 * c)), qs);
      if (vmaxvq_u32(vcgeq_f32(s, vdupq_n_f32(heap.threshold))) == 0) continue;
      float tmp[4];
      vst1q_f32(tmp, s);
      for (int b = 0; b < 4; ++b) {
        const int r = 4 * c + b;
        if (((live >> r) & 1u) && tmp[b] >= heap.threshold) heap.push(tmp[b], row0 + r);
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

// 8 independent chains of the int8 step above (16 multiply-accumulates each).
double int8_mac_loop(int64_t iters) {
  int32x4_t acc[8];
  CLAPEDGE_UNROLL for (int i = 0; i < 8; ++i) acc[i] = vdupq_n_s32(i);
  int8x16_t a = vdupq_n_s8(3), b = vdupq_n_s8(-2);
  for (int64_t it = 0; it < iters; ++it) {
    CLAPEDGE_UNROLL for (int i = 0; i < 8; ++i) acc[i] = dot4(acc[i], a, b);
    __asm__ volatile("" : "+w"(a));
  }
  int32x4_t s = acc[0];
  CLAPEDGE_UNROLL for (int i = 1; i < 8; ++i) s = vaddq_s32(s, acc[i]);
  volatile int32_t sink = vaddvq_s32(s);
  (void)sink;
  return 8.0 * 16.0 * static_cast<double>(iters);
}

#ifdef CLAPEDGE_NEON_DOTPROD
const LevelKernels kLevel{SimdLevel::NeonDotprod, scan, dot_one<Vec, F32Rows>,
                          dot_one<Vec, F16Rows>, int8_mac_loop};
#else
const LevelKernels kLevel{SimdLevel::Neon, scan, dot_one<Vec, F32Rows>, dot_one<Vec, F16Rows>,
                          int8_mac_loop};
#endif

}  // namespace
}  // namespace cpu
}  // namespace clapedge
