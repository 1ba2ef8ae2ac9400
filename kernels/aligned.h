// Small helpers shared by the kernels: a 64-byte-aligned buffer, and the AMX tile
// configuration both AMX levels use (eight 16 x 64-byte tiles).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace clapedge {

// A filled buffer whose data starts on a 64-byte boundary (tile and vector loads of
// misaligned rows straddle two cache lines; AMX tile loads run at half speed then).
template <typename T>
class Aligned {
 public:
  explicit Aligned(size_t count, T fill = T{}) : raw_(count + 64 / sizeof(T) + 1, fill) {
    const auto addr = reinterpret_cast<uintptr_t>(raw_.data());
    data_ = raw_.data() + ((64 - addr % 64) % 64) / sizeof(T);
  }
  T* data() { return data_; }

 private:
  std::vector<T> raw_;
  T* data_;
};

// The LDTILECFG operand: palette 1, tiles 0..7 of 16 rows x 64 bytes.
struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];

  static TileConfig sixteen_by_64() {
    TileConfig c{};
    c.palette_id = 1;
    for (int i = 0; i < 8; ++i) {
      c.rows[i] = 16;
      c.colsb[i] = 64;
    }
    return c;
  }
};

}  // namespace clapedge
