// Portable (scalar) CPU level of the fused similarity/top-k kernel, and the heap every level
// shares. Compiled with the baseline flags of the target only.
#include <algorithm>

#include "gallery.h"
#include "topk_cpu.h"

namespace clapedge {
namespace cpu {

void TopKHeap::reset(int64_t k_, float floor_, Candidate* storage) {
  k = k_;
  floor = floor_;
  threshold = floor_;
  size = 0;
  items = storage;
}

// A min-heap under `better`: items[0] is the worst kept candidate.
void TopKHeap::push(float score, int64_t id) {
  const Candidate c{score, id};
  auto worse = [](const Candidate& a, const Candidate& b) { return better(b, a); };
  if (size < k) {
    int64_t i = size++;
    while (i > 0) {
      const int64_t parent = (i - 1) / 2;
      if (!worse(c, items[parent])) break;
      items[i] = items[parent];
      i = parent;
    }
    items[i] = c;
    if (size == k) threshold = items[0].score;
    return;
  }
  if (!better(c, items[0])) return;
  int64_t i = 0;
  for (;;) {
    const int64_t l = 2 * i + 1, r = l + 1;
    if (l >= size) break;
    int64_t m = l;
    if (r < size && worse(items[r], items[l])) m = r;
    if (!worse(items[m], c)) break;
    items[i] = items[m];
    i = m;
  }
  items[i] = c;
  threshold = items[0].score;
}

namespace {

// Eight independent accumulators keep the summation order fixed (results are deterministic)
// and still let the compiler vectorise without -ffast-math.
float dot_f32_scalar(const float* a, const float* b, int64_t dim) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t d = 0;
  for (; d + 8 <= dim; d += 8)
    for (int j = 0; j < 8; ++j) acc[j] += a[d + j] * b[d + j];
  for (; d < dim; ++d) acc[d & 7] += a[d] * b[d];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

float dot_f16_scalar(const float* a, const uint16_t* b, int64_t dim) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t d = 0;
  for (; d + 8 <= dim; d += 8)
    for (int j = 0; j < 8; ++j) acc[j] += a[d + j] * half_to_float(b[d + j]);
  for (; d < dim; ++d) acc[d & 7] += a[d] * half_to_float(b[d]);
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

inline bool finite(float s) { return s - s == 0.0f; }

template <typename Row, float (*Dot)(const float*, const Row*, int64_t)>
bool scan_rows(const ScanJob& job, int64_t n0, int64_t n1, TopKHeap* heaps) {
  // Block the gallery so a block stays in cache while every query visits it.
  constexpr int64_t kBlock = 64;
  const int64_t D = job.dim;
  const Row* rows = static_cast<const Row*>(job.vectors);
  bool ok = true;
  for (int64_t b0 = n0; b0 < n1; b0 += kBlock) {
    const int64_t b1 = std::min(n1, b0 + kBlock);
    for (int64_t q = 0; q < job.num_queries; ++q) {
      const float* qv = job.queries + q * D;
      TopKHeap& heap = heaps[q];
      for (int64_t i = b0; i < b1; ++i) {
        const float s = Dot(qv, rows + i * D, D);
        if (!finite(s)) ok = false;
        if (s >= heap.threshold) offer(heap, job.allow, s, i);
      }
    }
  }
  return ok;
}

bool scan_int8(const ScanJob& job, int64_t n0, int64_t n1, TopKHeap* heaps) {
  const int64_t Dp = padded_dim(job.dim);
  const int8_t* packed = static_cast<const int8_t*>(job.vectors);
  for (int64_t g = n0 / kGroupRows; g * kGroupRows < n1; ++g) {
    const int8_t* G = packed + g * group_bytes(job.dim);
    const int64_t row0 = g * kGroupRows;
    for (int64_t q = 0; q < job.num_queries; ++q) {
      const int8_t* qc = job.qcodes + q * Dp;
      int32_t acc[kGroupRows] = {};
      for (int64_t d4 = 0; d4 < Dp / 4; ++d4) {
        const int8_t* step = G + d4 * 64;
        const int8_t* q4 = qc + d4 * 4;
        for (int r = 0; r < kGroupRows; ++r)
          for (int b = 0; b < 4; ++b) acc[r] += q4[b] * step[r * 4 + b];
      }
      TopKHeap& heap = heaps[q];
      for (int r = 0; r < kGroupRows; ++r) {
        const int64_t row = row0 + r;
        if (row < n0 || row >= n1) continue;
        const float s = static_cast<float>(acc[r]) * job.scales[row] * job.qscales[q];
        if (s >= heap.threshold) offer(heap, job.allow, s, row);
      }
    }
  }
  return true;
}

bool scan_scalar(const ScanJob& job, int64_t n0, int64_t n1, TopKHeap* heaps) {
  switch (job.dtype) {
    case DType::Float32:
      return scan_rows<float, dot_f32_scalar>(job, n0, n1, heaps);
    case DType::Float16:
      return scan_rows<uint16_t, dot_f16_scalar>(job, n0, n1, heaps);
    case DType::Int8:
      return scan_int8(job, n0, n1, heaps);
  }
  return true;
}

double int8_mac_loop(int64_t iters) {
  int32_t acc[16] = {};
  int8_t a[64], b[64];
  for (int i = 0; i < 64; ++i) {
    a[i] = static_cast<int8_t>(i - 32);
    b[i] = static_cast<int8_t>(7 - i);
  }
  for (int64_t it = 0; it < iters; ++it) {
    for (int i = 0; i < 64; ++i) acc[i & 15] += a[i] * b[i];
    a[it & 63] = static_cast<int8_t>(acc[it & 15]);  // a dependency the compiler must keep
  }
  int32_t s = 0;
  for (int32_t v : acc) s += v;
  volatile int32_t sink = s;
  (void)sink;
  return 64.0 * static_cast<double>(iters);
}

const LevelKernels kScalar{SimdLevel::Scalar, scan_scalar, dot_f32_scalar, dot_f16_scalar,
                           int8_mac_loop};

}  // namespace

const LevelKernels* scalar_kernels() { return &kScalar; }

}  // namespace cpu
}  // namespace clapedge
