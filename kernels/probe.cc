#include "probe.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <vector>

#include "thread_pool.h"
#include "topk_cpu.h"

namespace clapedge {
namespace probe {

namespace {

double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// XOR of every 8-byte word: the compiler vectorises it, and the result is used so the
// loads cannot be dropped.
uint64_t xor_words(const uint8_t* p, size_t bytes) {
  constexpr size_t kLanes = 8;
  uint64_t acc[kLanes] = {};
  size_t i = 0;
  for (; i + kLanes * 8 <= bytes; i += kLanes * 8)
    for (size_t j = 0; j < kLanes; ++j) {
      uint64_t w;
      std::memcpy(&w, p + i + j * 8, 8);
      acc[j] ^= w;
    }
  uint64_t r = 0;
  for (uint64_t a : acc) r ^= a;
  for (; i < bytes; ++i) r ^= p[i];
  return r;
}

const cpu::LevelKernels* level_kernels(SimdLevel level) {
  switch (level) {
#ifdef CLAPEDGE_HAVE_AVX512
    case SimdLevel::Avx512: return cpu::avx512_kernels();
#endif
#if defined(CLAPEDGE_HAVE_AMX) && defined(CLAPEDGE_HAVE_AVX512)
    case SimdLevel::Amx: return cpu::amx_kernels();
#endif
#ifdef CLAPEDGE_HAVE_AVX2
    case SimdLevel::Avx2: return cpu::avx2_kernels();
#endif
#ifdef CLAPEDGE_HAVE_NEON_DOTPROD
    case SimdLevel::NeonDotprod: return cpu::neon_dotprod_kernels();
#endif
#ifdef CLAPEDGE_HAVE_NEON
    case SimdLevel::Neon: return cpu::neon_kernels();
#endif
    default: return cpu::scalar_kernels();
  }
}

}  // namespace

double read_bandwidth(const uint8_t* data, size_t bytes, int threads, int repeats) {
  threads = std::max(1, threads);
  std::atomic<uint64_t> sink{0};
  double best = 0.0;
  for (int rep = 0; rep < std::max(1, repeats); ++rep) {
    const double t0 = now();
    parallel_run(threads, [&](int t) {
      const size_t a = bytes * t / threads / 64 * 64, b = bytes * (t + 1) / threads / 64 * 64;
      sink ^= xor_words(data + a, (t == threads - 1 ? bytes : b) - a);
    });
    const double dt = now() - t0;
    if (dt > 0) best = std::max(best, static_cast<double>(bytes) / dt);
  }
  return best;
}

double int8_peak_macs(SimdLevel level, int threads, double seconds) {
  if (level == SimdLevel::Auto) level = best_simd_level();
  if (!simd_level_available(level)) throw KernelInputError("SIMD level not available");
  const cpu::LevelKernels* k = level_kernels(level);
  threads = std::max(1, threads);
  // Calibrate on one thread, then time every thread together; keep the best of 3.
  int64_t iters = 1 << 16;
  for (;;) {
    const double t0 = now();
    k->int8_mac_loop(iters);
    if (now() - t0 > seconds / 20 || iters > (int64_t{1} << 40)) break;
    iters *= 2;
  }
  double best = 0.0;
  for (int rep = 0; rep < 3; ++rep) {
    std::vector<double> macs(static_cast<size_t>(threads));
    const double t0 = now();
    parallel_run(threads, [&](int t) { macs[t] = k->int8_mac_loop(iters); });
    const double dt = now() - t0;
    double total = 0;
    for (double m : macs) total += m;
    best = std::max(best, total / dt);
  }
  return best;
}

}  // namespace probe
}  // namespace clapedge
