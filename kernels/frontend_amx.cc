// AMX level of the native front end: a panel of 32 output frames x 32 channels per round on
// the tile unit (two A tiles of 16 frames x 64 input bytes, two B tiles of 64 input bytes x
// 16 channels, four int32 accumulator tiles); the epilogue is the AVX-512 level's.
// topk.cc has already asked the kernel for the tile registers (simd_level_available).
#include <immintrin.h>

#include "aligned.h"
#include "frontend.h"

namespace clapedge {
namespace frontend {
namespace {

void configure() {
  static const TileConfig config = TileConfig::sixteen_by_64();
  _tile_loadconfig(&config);
}

// B packed as [n/16][kp/4][16][4]: the 64-byte slice kc of column block nb is a 16 x 64 tile
// at B + (nb * kp / 4 + kc * 16) * 64 with row stride 64.
template <int RB, int CB>
inline void tile_block(const uint8_t* A, int64_t lda, const int8_t* B, int64_t kp, int64_t n_cols,
                       int64_t nb, int32_t* C) {
  _tile_zero(0);
  if constexpr (CB > 1) _tile_zero(1);
  if constexpr (RB > 1) _tile_zero(2);
  if constexpr (RB > 1 && CB > 1) _tile_zero(3);
  const int8_t* B0 = B + nb * kp * 16;
  const int8_t* B1 = B0 + kp * 16;
  for (int64_t k = 0; k < kp; k += 64) {
    _tile_loadd(4, A + k, lda);
    _tile_loadd(6, B0 + k * 16, 64);
    if constexpr (CB > 1) _tile_loadd(7, B1 + k * 16, 64);
    if constexpr (RB > 1) _tile_loadd(5, A + 16 * lda + k, lda);
    _tile_dpbusd(0, 4, 6);
    if constexpr (CB > 1) _tile_dpbusd(1, 4, 7);
    if constexpr (RB > 1) _tile_dpbusd(2, 5, 6);
    if constexpr (RB > 1 && CB > 1) _tile_dpbusd(3, 5, 7);
  }
  const int64_t stride = n_cols * 4;
  int32_t* c0 = C + nb * 16;
  _tile_stored(0, c0, stride);
  if constexpr (CB > 1) _tile_stored(1, c0 + 16, stride);
  if constexpr (RB > 1) _tile_stored(2, c0 + 16 * n_cols, stride);
  if constexpr (RB > 1 && CB > 1) _tile_stored(3, c0 + 16 * n_cols + 16, stride);
}

// C needs room for 32 rows when rows > 16 (16 otherwise): whole tiles are stored.
template <int RB>
void tile_rows(const uint8_t* A, int64_t lda, const int8_t* B, int64_t kp, int64_t n_cols,
               int32_t* C) {
  const int64_t blocks = n_cols / 16;
  int64_t nb = 0;
  for (; nb + 2 <= blocks; nb += 2) tile_block<RB, 2>(A, lda, B, kp, n_cols, nb, C);
  if (nb < blocks) tile_block<RB, 1>(A, lda, B, kp, n_cols, nb, C);
}

void gemm_amx(const uint8_t* A, int64_t lda, int64_t rows, const int8_t* B, int64_t kp,
              int64_t n_cols, int32_t* C) {
  configure();
  if (rows > 16)
    tile_rows<2>(A, lda, B, kp, n_cols, C);
  else
    tile_rows<1>(A, lda, B, kp, n_cols, C);
  _tile_release();
}

}  // namespace

const FrontLevel* amx_front_level() {
  static const FrontLevel level = [] {
    FrontLevel l = *avx512_front_level();
    l.level = SimdLevel::Amx;
    l.gemm = gemm_amx;
    return l;
  }();
  return &level;
}

}  // namespace frontend
}  // namespace clapedge
