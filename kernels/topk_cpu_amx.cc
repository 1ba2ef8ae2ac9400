// AMX level (AVX-512 + AMX-INT8, Sapphire Rapids and later) of the fused similarity/top-k
// kernel: the int8 scan of many queries runs on the tile unit, where one TDPBSSD does
// 16 queries x 16 rows x 64 dims (16,384 multiply-accumulates) at once; everything else
// (float rows, few queries, dims that are not a multiple of 64) is the AVX-512 level's.
// Compiled with the AVX-512 flags plus -mamx-tile -mamx-int8; topk.cc calls it after checking
// the CPU and getting the kernel's permission to use the tile registers (arch_prctl).
#include <immintrin.h>

#include "aligned.h"
#include "gallery.h"
#include "topk_cpu.h"
#include "topk_cpu_rows.h"

namespace clapedge {
namespace cpu {
namespace {

// Below this many queries the int8 scan is memory-bound either way: keep AVX-512 VNNI.
constexpr int64_t kMinQueries = 8;

// Tile registers: C (int32 16 x 16) in 0..3, A (queries, 16 x 64 bytes) in 4..5,
// B (a 64-dim slice of a group, 16 steps x 64 bytes) in 6..7.
void configure_tiles() {
  static const TileConfig config = TileConfig::sixteen_by_64();
  _tile_loadconfig(&config);
}

// Queries [q0, q0 + 16 * QB) (zero codes past the last one) x groups [g0, g0 + GB).
// The signed x signed product needs no correction: the dots are exact integers, the same as
// every other level's.
template <int QB, int GB>
void amx_tile(const ScanJob& job, int64_t g0, int64_t q0, int64_t n0, int64_t n1,
              TopKHeap* heaps) {
  const int64_t Dp = padded_dim(job.dim);
  const int64_t gbytes = group_bytes(job.dim);
  const int8_t* G = static_cast<const int8_t*>(job.vectors) + g0 * gbytes;
  const int8_t* A = job.qcodes + q0 * Dp;
  _tile_zero(0);
  if constexpr (GB > 1) _tile_zero(1);
  if constexpr (QB > 1) _tile_zero(2);
  if constexpr (QB > 1 && GB > 1) _tile_zero(3);
  for (int64_t k = 0; k < Dp; k += 64) {
    _tile_loadd(4, A + k, Dp);
    _tile_loadd(6, G + k * 16, 64);
    if constexpr (GB > 1) _tile_loadd(7, G + gbytes + k * 16, 64);
    if constexpr (QB > 1) _tile_loadd(5, A + 16 * Dp + k, Dp);
    _tile_dpbssd(0, 4, 6);
    if constexpr (GB > 1) _tile_dpbssd(1, 4, 7);
    if constexpr (QB > 1) _tile_dpbssd(2, 5, 6);
    if constexpr (QB > 1 && GB > 1) _tile_dpbssd(3, 5, 7);
  }
  alignas(64) int32_t dots[QB][GB][16][16];  // [query block][group][query][row]
  _tile_stored(0, dots[0][0], 64);
  if constexpr (GB > 1) _tile_stored(1, dots[0][GB - 1], 64);
  if constexpr (QB > 1) _tile_stored(2, dots[QB - 1][0], 64);
  if constexpr (QB > 1 && GB > 1) _tile_stored(3, dots[QB - 1][GB - 1], 64);

  for (int j = 0; j < GB; ++j) {
    const int64_t row0 = (g0 + j) * kGroupRows;
    const __mmask16 live = static_cast<__mmask16>(group_live_bits(job, row0, n0, n1));
    if (live == 0) continue;
    const __m512 scale = _mm512_loadu_ps(job.scales + row0);
    for (int b = 0; b < QB; ++b) {
      const int64_t qn = min64(16, job.num_queries - (q0 + 16 * b));
      for (int64_t r = 0; r < qn; ++r) {
        const int64_t q = q0 + 16 * b + r;
        TopKHeap& heap = heaps[q];
        const __m512 s = _mm512_mul_ps(
            _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_load_si512(dots[b][j][r])), scale),
            _mm512_set1_ps(job.qscales[q]));
        __mmask16 m = _mm512_mask_cmp_ps_mask(live, s, _mm512_set1_ps(heap.threshold), _CMP_GE_OQ);
        if (m == 0) continue;
        alignas(64) float tmp[16];
        _mm512_store_ps(tmp, s);
        while (m) {
          const int bit = __builtin_ctz(m);
          m = static_cast<__mmask16>(m & (m - 1));
          if (tmp[bit] >= heap.threshold) heap.push(tmp[bit], row0 + bit);
        }
      }
    }
  }
}

template <int GB>
void amx_groups(const ScanJob& job, int64_t g, int64_t n0, int64_t n1, TopKHeap* heaps) {
  const int64_t Q = job.num_queries;
  int64_t q0 = 0;
  for (; q0 + 16 < Q; q0 += 32) amx_tile<2, GB>(job, g, q0, n0, n1, heaps);
  if (q0 < Q) amx_tile<1, GB>(job, g, q0, n0, n1, heaps);
}

bool scan_int8_amx(const ScanJob& job, int64_t n0, int64_t n1, TopKHeap* heaps) {
  configure_tiles();
  const int64_t g_end = num_groups(n1);
  int64_t g = n0 / kGroupRows;
  for (; g + 2 <= g_end; g += 2) amx_groups<2>(job, g, n0, n1, heaps);
  if (g < g_end) amx_groups<1>(job, g, n0, n1, heaps);
  _tile_release();
  return true;
}

bool scan(const ScanJob& job, int64_t n0, int64_t n1, TopKHeap* heaps) {
  if (job.dtype == DType::Int8 && job.num_queries >= kMinQueries && padded_dim(job.dim) % 64 == 0)
    return scan_int8_amx(job, n0, n1, heaps);
  return avx512_kernels()->scan(job, n0, n1, heaps);
}

float dot_f32(const float* q, const float* row, int64_t dim) {
  return avx512_kernels()->dot_f32(q, row, dim);
}

float dot_f16(const float* q, const uint16_t* row, int64_t dim) {
  return avx512_kernels()->dot_f16(q, row, dim);
}

// Four independent 16 x 16 x 64 tile products per round.
double int8_mac_loop(int64_t iters) {
  configure_tiles();
  alignas(64) int8_t a[16 * 64], b[16 * 64];
  for (int i = 0; i < 16 * 64; ++i) {
    a[i] = static_cast<int8_t>(i % 7 - 3);
    b[i] = static_cast<int8_t>(i % 5 - 2);
  }
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  _tile_loadd(4, a, 64);
  _tile_loadd(5, a, 64);
  _tile_loadd(6, b, 64);
  _tile_loadd(7, b, 64);
  for (int64_t i = 0; i < iters; ++i) {
    _tile_dpbssd(0, 4, 6);
    _tile_dpbssd(1, 4, 7);
    _tile_dpbssd(2, 5, 6);
    _tile_dpbssd(3, 5, 7);
  }
  alignas(64) int32_t c[16 * 16];
  _tile_stored(0, c, 64);
  _tile_release();
  volatile int32_t sink = c[0];
  (void)sink;
  return 4.0 * 16 * 16 * 64 * static_cast<double>(iters);
}

const LevelKernels kAmx{SimdLevel::Amx, scan, dot_f32, dot_f16, int8_mac_loop};

}  // namespace

const LevelKernels* amx_kernels() { return &kAmx; }

}  // namespace cpu
}  // namespace clapedge
