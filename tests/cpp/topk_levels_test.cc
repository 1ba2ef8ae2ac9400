// Every SIMD level this CPU can run against the scalar level and a double-precision brute
// force, on random inputs: float32, float16 and int8 galleries (with and without re-rank),
// odd sizes, duplicate rows, allow-lists and per-query minimum scores.
//
// Built by CMake with -DCLAPEDGE_BUILD_TESTS=ON (target topk_levels_test); the pytest
// tests/test_kernels_build.py cross-compiles it for aarch64 and runs it under qemu-user, so
// the NEON levels are tested on x86 machines too. Exit status 0 when every check passes.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "gallery.h"
#include "topk.h"

using namespace clapedge;

namespace {

int failures = 0;

void fail(const std::string& what) {
  if (++failures <= 20) std::fprintf(stderr, "FAIL: %s\n", what.c_str());
}

struct Problem {
  int64_t n, d, q, k;
  std::vector<float> gallery, queries;
  std::vector<uint8_t> allow;  // empty: none
  std::vector<float> min_score;  // empty: none
};

Problem make_problem(std::mt19937_64& rng, int64_t n, int64_t d, int64_t q, int64_t k) {
  Problem p{n, d, q, k, {}, {}, {}, {}};
  std::normal_distribution<float> normal;
  p.gallery.resize(static_cast<size_t>(n * d));
  for (float& x : p.gallery) x = normal(rng);
  for (int64_t i = 0; i + 1 < n; i += 5)  // duplicate rows: ties go to the lower id
    std::copy_n(p.gallery.begin() + i * d, d, p.gallery.begin() + (i + 1) * d);
  p.queries.resize(static_cast<size_t>(q * d));
  for (float& x : p.queries) x = normal(rng);
  if (rng() % 2) {
    p.allow.assign(static_cast<size_t>((n + 7) / 8), 0);
    for (int64_t i = 0; i < n; ++i)
      if (rng() % 3) p.allow[i / 8] |= static_cast<uint8_t>(1u << (i % 8));
  }
  if (rng() % 2) {
    p.min_score.resize(static_cast<size_t>(q));
    for (float& x : p.min_score) x = normal(rng) * std::sqrt(static_cast<float>(d)) * 0.5f;
  }
  return p;
}

uint16_t float_to_half(float f) {  // round to nearest even; inputs here are small normals
  uint32_t b;
  std::memcpy(&b, &f, 4);
  const uint32_t sign = (b >> 16) & 0x8000u;
  const int32_t exp = static_cast<int32_t>((b >> 23) & 0xff) - 127 + 15;
  uint32_t mant = b & 0x7fffffu;
  if (exp <= 0) return static_cast<uint16_t>(sign);  // flush tiny values to zero
  uint32_t h = sign | (static_cast<uint32_t>(exp) << 10) | (mant >> 13);
  const uint32_t rest = mant & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;
  return static_cast<uint16_t>(h);
}

struct Result {
  std::vector<float> scores;
  std::vector<int64_t> ids;
};

struct Stored {
  DType dtype;
  std::vector<float> f32;
  std::vector<uint16_t> f16;
  std::vector<int8_t> packed;
  std::vector<float> scales;
  std::vector<int32_t> corrections;
  std::vector<float> exact;  // what the scores approximate, as float rows
};

Stored store(const Problem& p, DType dtype) {
  Stored s{dtype, {}, {}, {}, {}, {}, {}};
  const int64_t n = p.n, d = p.d;
  if (dtype == DType::Float32) {
    s.f32 = p.gallery;
    s.exact = p.gallery;
  } else if (dtype == DType::Float16) {
    for (float x : p.gallery) s.f16.push_back(float_to_half(x));
    for (uint16_t h : s.f16) s.exact.push_back(half_to_float(h));
  } else {
    std::vector<int8_t> codes(static_cast<size_t>(n * d));
    s.scales.assign(static_cast<size_t>(num_groups(n) * kGroupRows), 0.0f);
    quantize_rows_int8(p.gallery.data(), n, d, codes.data(), s.scales.data());
    s.packed.resize(static_cast<size_t>(num_groups(n) * group_bytes(d)));
    s.corrections.resize(static_cast<size_t>(num_groups(n) * kGroupRows));
    pack_int8(codes.data(), n, d, s.packed.data(), s.corrections.data());
    s.exact = p.gallery;  // only used with re-rank
  }
  return s;
}

Result run(const Problem& p, const Stored& s, SimdLevel level, bool rerank, int threads,
           Device device = Device::Cpu) {
  Result r{std::vector<float>(static_cast<size_t>(p.q * p.k)),
           std::vector<int64_t>(static_cast<size_t>(p.q * p.k))};
  TopKParams t;
  t.k = p.k;
  t.dim = p.d;
  t.queries = p.queries.data();
  t.num_queries = p.q;
  t.dtype = s.dtype;
  t.num_vectors = p.n;
  t.vectors = s.dtype == DType::Float32   ? static_cast<const void*>(s.f32.data())
              : s.dtype == DType::Float16 ? static_cast<const void*>(s.f16.data())
                                          : static_cast<const void*>(s.packed.data());
  t.scales = s.scales.empty() ? nullptr : s.scales.data();
  t.corrections = s.corrections.empty() ? nullptr : s.corrections.data();
  if (rerank) {
    t.rerank_vectors = p.gallery.data();
    t.rerank_dtype = DType::Float32;
    t.rerank_factor = static_cast<int64_t>((p.n + p.k - 1) / p.k) + 1;  // every row a candidate
  }
  t.allow = p.allow.empty() ? nullptr : p.allow.data();
  t.min_score = p.min_score.empty() ? nullptr : p.min_score.data();
  t.threads = threads;
  t.simd = level;
  t.device = device;
  t.out_scores = r.scores.data();
  t.out_ids = r.ids.data();
  topk(t);
  return r;
}

// The result is a correct top-k of the double-precision scores against `rows`, up to tol.
void check_against_brute_force(const Problem& p, const std::vector<float>& rows,
                               const Result& r, const std::string& what) {
  for (int64_t qi = 0; qi < p.q; ++qi) {
    std::vector<double> ref(static_cast<size_t>(p.n)), tol(static_cast<size_t>(p.n));
    for (int64_t i = 0; i < p.n; ++i) {
      double s = 0, a = 0;
      for (int64_t j = 0; j < p.d; ++j) {
        s += static_cast<double>(p.queries[qi * p.d + j]) * rows[i * p.d + j];
        a += std::fabs(static_cast<double>(p.queries[qi * p.d + j]) * rows[i * p.d + j]);
      }
      ref[i] = s;
      tol[i] = (p.d + 2) * 1.2e-7 * a + 1e-6;
    }
    auto allowed = [&](int64_t i) { return p.allow.empty() || ((p.allow[i / 8] >> (i % 8)) & 1); };
    const double floor = p.min_score.empty() ? -INFINITY : p.min_score[qi];
    std::vector<char> taken(static_cast<size_t>(p.n), 0);
    int64_t m = 0;
    for (int64_t j = 0; j < p.k; ++j) {
      const int64_t id = r.ids[qi * p.k + j];
      const float s = r.scores[qi * p.k + j];
      if (id < 0) {
        if (!std::isinf(s)) fail(what + ": padding score not -inf");
        continue;
      }
      if (j != m) fail(what + ": padding before a result");
      ++m;
      if (id >= p.n || taken[id] || !allowed(id)) { fail(what + ": bad or repeated id"); continue; }
      taken[id] = 1;
      if (std::fabs(s - ref[id]) > tol[id]) fail(what + ": score off");
      if (s < floor) fail(what + ": under min_score");
      if (j > 0 && r.ids[qi * p.k + j - 1] >= 0) {
        const float prev = r.scores[qi * p.k + j - 1];
        if (prev < s || (prev == s && r.ids[qi * p.k + j - 1] > id)) fail(what + ": order");
      }
    }
    const double worst = m == p.k ? r.scores[qi * p.k + m - 1] : floor;
    for (int64_t i = 0; i < p.n; ++i)
      if (!taken[i] && allowed(i) && ref[i] > worst + 2 * tol[i] + 1e-5)
        fail(what + ": left out a better row");
  }
}

void same_bits(const Result& a, const Result& b, const std::string& what) {
  if (a.ids != b.ids || std::memcmp(a.scores.data(), b.scores.data(), a.scores.size() * 4) != 0)
    fail(what + ": differs from the scalar level");
}

}  // namespace

int main() {
  std::vector<SimdLevel> levels;
  for (SimdLevel l : {SimdLevel::Scalar, SimdLevel::Neon, SimdLevel::NeonDotprod, SimdLevel::Avx2,
                      SimdLevel::Avx512, SimdLevel::Amx})
    if (simd_level_available(l)) levels.push_back(l);
  std::printf("levels:");
  for (SimdLevel l : levels) std::printf(" %s", simd_level_name(l));
  std::printf(" (best %s)%s\n", simd_level_name(best_simd_level()),
              cuda_available() ? " + cuda" : "");

  std::mt19937_64 rng(12345);
  const int64_t sizes[][4] = {{0, 5, 1, 3},    {1, 1, 1, 1},    {7, 3, 2, 10},  {16, 16, 3, 4},
                              {17, 17, 5, 5},  {33, 31, 9, 7},  {100, 64, 8, 10}, {257, 65, 13, 20},
                              {1000, 100, 4, 10}, {5000, 24, 3, 8}, {531, 128, 40, 10},
                              {77, 192, 17, 5}};
  int checks = 0;
  for (const auto& sz : sizes) {
    const Problem p = make_problem(rng, sz[0], sz[1], sz[2], sz[3]);
    for (DType dtype : {DType::Float32, DType::Float16, DType::Int8}) {
      const Stored s = store(p, dtype);
      for (bool rerank : {false, true}) {
        if (rerank && dtype != DType::Int8) continue;
        const Result scalar = run(p, s, SimdLevel::Scalar, rerank, 1);
        for (SimdLevel l : levels) {
          for (int threads : {1, 3}) {
            const std::string what = std::string(simd_level_name(l)) + " dtype=" +
                                     std::to_string(static_cast<int>(dtype)) +
                                     (rerank ? "+rerank" : "") + " n=" + std::to_string(p.n) +
                                     " d=" + std::to_string(p.d) + " t=" + std::to_string(threads);
            const Result r = run(p, s, l, rerank, threads);
            if (dtype == DType::Int8 && !rerank)
              same_bits(r, scalar, what);  // exact integer dots: identical everywhere
            else
              check_against_brute_force(p, rerank ? p.gallery : s.exact, r, what);
            ++checks;
          }
        }
        if (cuda_available()) {  // the GPU variant, where there is one
          const std::string what = std::string("cuda dtype=") + std::to_string(static_cast<int>(dtype)) +
                                   (rerank ? "+rerank" : "") + " n=" + std::to_string(p.n);
          const Result r = run(p, s, SimdLevel::Auto, rerank, 1, Device::Cuda);
          if (dtype == DType::Int8 && !rerank)
            same_bits(r, scalar, what);
          else
            check_against_brute_force(p, rerank ? p.gallery : s.exact, r, what);
          ++checks;
        }
      }
    }
  }
  if (failures) {
    std::fprintf(stderr, "%d of the checks failed\n", failures);
    return 1;
  }
  std::printf("OK: %d checks\n", checks);
  return 0;
}
