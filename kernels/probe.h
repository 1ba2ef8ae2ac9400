// Machine probes for the benchmark: the memory-bandwidth floor and the int8 compute peak that
// the kernel's timings are judged against.
#pragma once

#include <cstddef>
#include <cstdint>

#include "topk.h"

namespace clapedge {
namespace probe {

// Best-of-`repeats` read bandwidth (bytes per second) of `threads` threads streaming once
// through `bytes` bytes at `data`, each over its own slice.
double read_bandwidth(const uint8_t* data, size_t bytes, int threads, int repeats);

// Int8 multiply-accumulates per second that `threads` threads reach with the int8 dot-product
// instruction of `level` (VNNI vpdpbusd for avx512) on register-resident data, measured over
// about `seconds`.
double int8_peak_macs(SimdLevel level, int threads, double seconds);

}  // namespace probe
}  // namespace clapedge
