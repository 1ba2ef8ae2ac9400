// Shape checks, SIMD dispatch, threading, merge and re-rank of the fused similarity/top-k
// kernel. The per-level scans live in topk_cpu*.cc, the GPU variant in topk_cuda.cu.
#include "topk.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cmath>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "aligned.h"
#include "gallery.h"
#include "thread_pool.h"
#include "topk_cpu.h"
#ifdef CLAPEDGE_HAVE_CUDA
#include "topk_cuda.h"
#endif

#if defined(__aarch64__) && defined(__linux__)
#include <asm/hwcap.h>
#include <sys/auxv.h>
#endif
#if defined(__linux__) && defined(__x86_64__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace clapedge {

namespace {

using cpu::Candidate;
using cpu::TopKHeap;

const float kNegInf = -std::numeric_limits<float>::infinity();

const cpu::LevelKernels* compiled_kernels(SimdLevel level) {
  switch (level) {
    case SimdLevel::Scalar:
      return cpu::scalar_kernels();
#ifdef CLAPEDGE_HAVE_AVX2
    case SimdLevel::Avx2:
      return cpu::avx2_kernels();
#endif
#ifdef CLAPEDGE_HAVE_AVX512
    case SimdLevel::Avx512:
      return cpu::avx512_kernels();
#endif
#if defined(CLAPEDGE_HAVE_AMX) && defined(CLAPEDGE_HAVE_AVX512)
    case SimdLevel::Amx:
      return cpu::amx_kernels();
#endif
#ifdef CLAPEDGE_HAVE_NEON
    case SimdLevel::Neon:
      return cpu::neon_kernels();
#endif
#ifdef CLAPEDGE_HAVE_NEON_DOTPROD
    case SimdLevel::NeonDotprod:
      return cpu::neon_dotprod_kernels();
#endif
    default:
      return nullptr;
  }
}

#if defined(__linux__) && defined(__x86_64__)
// Linux hands out the AMX tile state only on request (once per process, for every thread).
bool amx_permitted() {
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  static const bool ok = syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  return ok;
}
#else
bool amx_permitted() { return false; }
#endif

bool cpu_supports(SimdLevel level) {
  switch (level) {
    case SimdLevel::Scalar:
      return true;
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
    case SimdLevel::Avx2:
      __builtin_cpu_init();
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case SimdLevel::Avx512:
      __builtin_cpu_init();
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
#endif
#if defined(CLAPEDGE_HAVE_AMX) && defined(__GNUC__)
    case SimdLevel::Amx:
      __builtin_cpu_init();
      return cpu_supports(SimdLevel::Avx512) && __builtin_cpu_supports("amx-tile") &&
             __builtin_cpu_supports("amx-int8") && amx_permitted();
#endif
#if defined(__aarch64__)
    case SimdLevel::Neon:
      return true;  // Advanced SIMD is part of every AArch64 CPU
    case SimdLevel::NeonDotprod:
#if defined(__linux__) && defined(HWCAP_ASIMDDP)
      return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
#elif defined(__APPLE__)
      return true;  // every Apple silicon core has the dot-product instructions
#else
      return false;
#endif
#endif
    default:
      return false;
  }
}

int resolve_threads(int requested, int64_t N, int64_t D, int64_t Q) {
  // Below this much work (bytes of gallery times queries, capped) a thread costs more than
  // it saves.
  constexpr int64_t kMinWorkPerThread = int64_t{1} << 20;
  const int t = requested > 0 ? requested : hardware_threads();
  const int64_t work = N * D * std::min<int64_t>(std::max<int64_t>(Q, 1), 64);
  const int64_t by_work = std::max<int64_t>(1, work / kMinWorkPerThread);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(t, by_work)));
}

void check_params(const TopKParams& p) {
  auto fail = [](const std::string& what) { throw KernelInputError(what); };
  if (p.metric != Metric::InnerProduct) fail("only the inner-product metric is supported");
  if (p.k <= 0) fail("k must be positive, got " + std::to_string(p.k));
  if (p.dim <= 0) fail("dim must be positive, got " + std::to_string(p.dim));
  if (p.num_queries < 0 || p.num_vectors < 0) fail("negative number of queries or vectors");
  if (p.num_queries > 0 && (p.queries == nullptr || p.out_scores == nullptr || p.out_ids == nullptr))
    fail("queries and outputs must not be null");
  if (p.num_vectors > 0 && p.vectors == nullptr) fail("gallery vectors must not be null");
  if (p.dtype == DType::Int8 && p.num_vectors > 0 && (p.scales == nullptr || p.corrections == nullptr))
    fail("an int8 gallery needs its per-row scales and corrections");
  if (p.rerank_vectors != nullptr && p.rerank_dtype == DType::Int8)
    fail("the re-rank copy must be float32 or float16");
  if (p.rerank_vectors != nullptr && p.rerank_factor < 1)
    fail("rerank_factor must be >= 1, got " + std::to_string(p.rerank_factor));
  for (int64_t q = 0; q < p.num_queries; ++q)
    for (int64_t d = 0; d < p.dim; ++d)
      if (!std::isfinite(p.queries[q * p.dim + d]))
        fail("queries contain NaN or Inf (first at row " + std::to_string(q) + ")");
}

// Int8 galleries score against queries quantised the same way, padded to padded_dim (see
// ScanJob for the layouts).
struct QuantisedQueries {
  Aligned<int8_t> codes;
  Aligned<int8_t> codes_x8;
  Aligned<uint8_t> codes_u8_x8;
  std::vector<float> scales;

  QuantisedQueries(const float* q, int64_t Q, int64_t D)
      : codes(static_cast<size_t>((Q + 15) / 16 * 16 * padded_dim(D))),
        codes_x8(static_cast<size_t>((Q + 7) / 8 * 8 * padded_dim(D))),
        codes_u8_x8(static_cast<size_t>((Q + 7) / 8 * 8 * padded_dim(D)), 128),
        scales(static_cast<size_t>(Q)) {
    const int64_t Dp = padded_dim(D);
    std::vector<int8_t> rows(static_cast<size_t>(Q * D));
    quantize_rows_int8(q, Q, D, rows.data(), scales.data());
    for (int64_t i = 0; i < Q; ++i)
      for (int64_t d = 0; d < D; ++d) {
        const int8_t c = rows[i * D + d];
        codes.data()[i * Dp + d] = c;
        const int64_t at = (i / 8) * 8 * Dp + (d / 4) * 32 + (i % 8) * 4 + d % 4;
        codes_x8.data()[at] = c;
        codes_u8_x8.data()[at] = static_cast<uint8_t>(c + 128);
      }
  }
};

// fn(q) for every query, spread over the threads (merging and re-ranking many queries is
// worth it: the re-rank waits on random rows of the exact copy).
template <typename Fn>
void for_each_query(int threads, int64_t Q, Fn fn) {
  threads = static_cast<int>(std::min<int64_t>(threads, Q / 4));
  if (threads <= 1) {
    for (int64_t q = 0; q < Q; ++q) fn(q);
    return;
  }
  std::atomic<int64_t> next{0};
  parallel_run(threads, [&](int) {
    for (int64_t q; (q = next.fetch_add(1)) < Q;) fn(q);
  });
}

// First pass on the CPU: every thread takes chunks of rows off a shared counter (so a slow
// or busy core does less) into its own heaps; the heaps are merged afterwards.
// Returns the best `keep` candidates of each query, best first.
std::vector<std::vector<Candidate>> first_pass_cpu(const TopKParams& p, const cpu::ScanJob& job,
                                                   const cpu::LevelKernels& level, int64_t keep,
                                                   const std::vector<float>& floors) {
  const int64_t Q = p.num_queries, N = p.num_vectors;
  const int threads = resolve_threads(p.threads, N, padded_dim(p.dim), Q);
  // Guided chunks: each takes a share of what is left, so the first are large (few switches)
  // and the last small (a thread that was preempted on a shared machine holds up the end by
  // little). Boundaries are multiples of the int8 group.
  std::vector<int64_t> bounds{0};
  while (bounds.back() < N) {
    const int64_t left = N - bounds.back();
    int64_t chunk = std::max<int64_t>(2048, left / (int64_t{threads} * 4));
    chunk = (chunk + kGroupRows - 1) / kGroupRows * kGroupRows;
    bounds.push_back(std::min(N, bounds.back() + chunk));
  }
  const int64_t chunks = static_cast<int64_t>(bounds.size()) - 1;

  std::vector<Candidate> storage(static_cast<size_t>(threads * Q * keep));
  std::vector<TopKHeap> heaps(static_cast<size_t>(threads * Q));
  for (int t = 0; t < threads; ++t)
    for (int64_t q = 0; q < Q; ++q)
      heaps[t * Q + q].reset(keep, floors[q], storage.data() + (t * Q + q) * keep);
  std::vector<char> finite(static_cast<size_t>(threads), 1);
  std::atomic<int64_t> next{0};
  parallel_run(threads, [&](int t) {
    for (int64_t c; (c = next.fetch_add(1)) < chunks;)
      if (!level.scan(job, bounds[c], bounds[c + 1], heaps.data() + t * Q)) finite[t] = 0;
  });
  for (char f : finite)
    if (!f) throw KernelInputError("queries or gallery contain NaN or Inf (a score was not finite)");

  std::vector<std::vector<Candidate>> best(static_cast<size_t>(Q));
  for_each_query(threads, Q, [&](int64_t q) {
    auto& m = best[q];
    for (int t = 0; t < threads; ++t) {
      const TopKHeap& h = heaps[t * Q + q];
      m.insert(m.end(), h.items, h.items + h.size);
    }
    std::sort(m.begin(), m.end(), cpu::better);
    if (static_cast<int64_t>(m.size()) > keep) m.resize(static_cast<size_t>(keep));
  });
  return best;
}

// Re-scores the candidates against the exact copy; drops those under the query's min score.
void rerank(const TopKParams& p, const cpu::LevelKernels& level, std::vector<Candidate>& cands,
            int64_t q) {
  const float* qv = p.queries + q * p.dim;
  const float floor = p.min_score ? p.min_score[q] : kNegInf;
  const size_t row_bytes = static_cast<size_t>(p.dim) * (p.rerank_dtype == DType::Float32 ? 4 : 2);
  auto row = [&](int64_t id) {
    return static_cast<const char*>(p.rerank_vectors) + static_cast<size_t>(id) * row_bytes;
  };
  // The rows are scattered over the copy: ask for the next one while scoring this one.
  auto prefetch = [&](int64_t id) {
    for (size_t b = 0; b < row_bytes; b += 64) __builtin_prefetch(row(id) + b);
  };
  std::vector<Candidate> kept;
  kept.reserve(cands.size());
  if (!cands.empty()) prefetch(cands[0].id);
  for (size_t j = 0; j < cands.size(); ++j) {
    if (j + 1 < cands.size()) prefetch(cands[j + 1].id);
    const int64_t id = cands[j].id;
    const float s =
        p.rerank_dtype == DType::Float32
            ? level.dot_f32(qv, reinterpret_cast<const float*>(row(id)), p.dim)
            : level.dot_f16(qv, reinterpret_cast<const uint16_t*>(row(id)), p.dim);
    if (s >= floor) kept.push_back({s, id});
  }
  std::sort(kept.begin(), kept.end(), cpu::better);
  cands.swap(kept);
}

}  // namespace

SimdLevel best_simd_level() {
  for (SimdLevel l : {SimdLevel::Amx, SimdLevel::Avx512, SimdLevel::Avx2, SimdLevel::NeonDotprod,
                      SimdLevel::Neon})
    if (simd_level_available(l)) return l;
  return SimdLevel::Scalar;
}

bool simd_level_available(SimdLevel level) {
  return compiled_kernels(level) != nullptr && cpu_supports(level);
}

const char* simd_level_name(SimdLevel level) {
  switch (level) {
    case SimdLevel::Auto: return "auto";
    case SimdLevel::Scalar: return "scalar";
    case SimdLevel::Neon: return "neon";
    case SimdLevel::NeonDotprod: return "neon_dotprod";
    case SimdLevel::Avx2: return "avx2";
    case SimdLevel::Avx512: return "avx512";
    case SimdLevel::Amx: return "amx";
  }
  return "unknown";
}

bool cuda_available() {
#ifdef CLAPEDGE_HAVE_CUDA
  return cuda::device_count() > 0;
#else
  return false;
#endif
}

void topk(const TopKParams& p) {
  check_params(p);
  const SimdLevel level_id = p.simd == SimdLevel::Auto ? best_simd_level() : p.simd;
  if (!simd_level_available(level_id))
    throw KernelInputError(std::string("SIMD level '") + simd_level_name(level_id) +
                           "' is not available on this CPU or in this build");
  const cpu::LevelKernels& level = *compiled_kernels(level_id);
  const int64_t Q = p.num_queries, N = p.num_vectors, k = p.k;
  if (Q == 0) return;

  const bool reranking = p.rerank_vectors != nullptr;
  // The first pass keeps k' = rerank_factor * k candidates when re-ranking, and ignores
  // min_score then (the approximate scores could drop a row whose exact score passes).
  int64_t keep = reranking ? k * p.rerank_factor : k;
  keep = std::max<int64_t>(1, std::min(keep, N));
  std::vector<float> floors(static_cast<size_t>(Q), kNegInf);
  if (p.min_score && !reranking)
    for (int64_t q = 0; q < Q; ++q) floors[q] = p.min_score[q];

  std::vector<std::vector<Candidate>> best;
  if (N > 0) {
    std::unique_ptr<QuantisedQueries> qq;
    if (p.dtype == DType::Int8) qq.reset(new QuantisedQueries(p.queries, Q, p.dim));
    if (p.device == Device::Cuda) {
#ifdef CLAPEDGE_HAVE_CUDA
      best = cuda::first_pass(p, qq ? qq->codes.data() : nullptr, qq ? qq->scales.data() : nullptr,
                              keep, floors);
#else
      throw KernelInputError("clapedge was built without CUDA (configure with -DCLAPEDGE_CUDA=ON)");
#endif
    } else {
      cpu::ScanJob job{};
      job.num_queries = Q;
      job.dim = p.dim;
      job.queries = p.queries;
      if (qq) {
        job.qcodes = qq->codes.data();
        job.qcodes_x8 = qq->codes_x8.data();
        job.qcodes_u8_x8 = qq->codes_u8_x8.data();
        job.qscales = qq->scales.data();
      }
      job.dtype = p.dtype;
      job.vectors = p.vectors;
      job.num_vectors = N;
      job.scales = p.scales;
      job.corrections = p.corrections;
      job.allow = p.allow;
      best = first_pass_cpu(p, job, level, keep, floors);
    }
  } else {
    best.resize(static_cast<size_t>(Q));
  }

  const int threads = reranking ? resolve_threads(p.threads, N, p.dim, Q) : 1;
  for_each_query(threads, Q, [&](int64_t q) {
    auto& cands = best[q];
    if (reranking) rerank(p, level, cands, q);
    const int64_t n = std::min<int64_t>(k, static_cast<int64_t>(cands.size()));
    for (int64_t j = 0; j < k; ++j) {
      p.out_scores[q * k + j] = j < n ? cands[j].score : kNegInf;
      p.out_ids[q * k + j] = j < n ? cands[j].id : -1;
    }
  });
}

}  // namespace clapedge
