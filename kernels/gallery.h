// Storage forms of a gallery: per-row int8 quantisation, the grouped int8 layout every SIMD
// level reads, and float16 conversion.
//
// Grouped int8 layout: rows are taken 16 at a time (a group; the last one is zero-padded) and
// the dimension is padded with zeros to a multiple of 4 (`padded_dim`). Inside a group the
// bytes run d/4-step by d/4-step, and each step holds 4 consecutive dimensions of each of the
// 16 rows:
//
//   byte of (row r, dim d) = (r / 16) * group_bytes + (d / 4) * 64 + (r % 16) * 4 + d % 4
//
// so one 64-byte load feeds one AVX-512 VNNI `vpdpbusd` (or four NEON `sdot`) for 16 rows at
// once and the 16 scores come out in the lanes of one register: no horizontal sums.
#pragma once

#include <cstdint>
#include <cstring>

namespace clapedge {

constexpr int64_t kGroupRows = 16;

static inline int64_t padded_dim(int64_t dim) { return (dim + 3) / 4 * 4; }
static inline int64_t num_groups(int64_t n) { return (n + kGroupRows - 1) / kGroupRows; }
static inline int64_t group_bytes(int64_t dim) { return padded_dim(dim) * kGroupRows; }

// Symmetric per-row quantisation: scale = max|x| / 127, code = round(x * 127 / max|x|),
// so codes lie in [-127, 127] (never -128: the AVX2 sign trick relies on it). An all-zero row
// gets scale 0 and zero codes. `codes` is row-major [n, dim].
void quantize_rows_int8(const float* x, int64_t n, int64_t dim, int8_t* codes, float* scales,
                        int threads = 1);

// Row-major codes [n, dim] -> grouped layout (num_groups(n) * group_bytes(dim) bytes), and
// corrections[i] = 128 * sum(codes of row i) (num_groups(n) * 16 entries, zero-padded).
void pack_int8(const int8_t* codes, int64_t n, int64_t dim, int8_t* packed,
               int32_t* corrections, int threads = 1);

// Grouped layout -> row-major codes [n, dim].
void unpack_int8(const int8_t* packed, int64_t n, int64_t dim, int8_t* codes);

// IEEE binary16 -> binary32, exact (the portable path; SIMD levels use F16C / FCVTL).
static inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);  // Inf / NaN
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;
  } else {  // subnormal: renormalise
    exp = 113;
    while ((mant & 0x400u) == 0) {
      mant <<= 1;
      --exp;
    }
    bits = sign | (exp << 23) | ((mant & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

}  // namespace clapedge
