// CUDA variant of the fused similarity/top-k first pass (see topk_cuda.h).
//
//   tile_topk: grid (tiles, Q), 256 threads. The block's 8 warps score the tile's rows for one
//              query into shared memory (float rows: a warp per row, lanes over the dimension;
//              int8 groups: a warp per group of 16 rows, __dp4a on the grouped layout), then
//              warp 0 pulls the tile's best `keep` out by repeated warp arg-max.
//   merge_topk: one warp per query does the same over the tiles' candidates.
// Ties go to the lower id everywhere, as on the CPU.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <stdexcept>
#include <string>

#include "gallery.h"
#include "topk_cuda.h"

namespace clapedge {
namespace cuda {

namespace {

constexpr int kTileRows = 1024;  // a multiple of the int8 group (16 rows)
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("CUDA error in ") + what + ": " + cudaGetErrorString(e));
}

// A device buffer freed on scope exit.
template <typename T>
struct DeviceBuffer {
  T* ptr = nullptr;
  explicit DeviceBuffer(size_t count) {
    if (count) check(cudaMalloc(&ptr, count * sizeof(T)), "cudaMalloc");
  }
  DeviceBuffer(const T* host, size_t count) : DeviceBuffer(count) {
    if (count) check(cudaMemcpy(ptr, host, count * sizeof(T), cudaMemcpyHostToDevice), "cudaMemcpy");
  }
  ~DeviceBuffer() {
    if (ptr) cudaFree(ptr);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
};

struct Cand {
  float score;
  int64_t id;
};

__device__ __forceinline__ bool better(float sa, int64_t ia, float sb, int64_t ib) {
  return sa > sb || (sa == sb && ia < ib);
}

__device__ __forceinline__ bool allowed(const uint8_t* allow, int64_t i) {
  return allow == nullptr || ((allow[i >> 3] >> (i & 7)) & 1) != 0;
}

// Warp arg-max over (score, id) with ties to the lower id; every lane gets the winner.
__device__ __forceinline__ void warp_best(float& s, int64_t& id, int& slot) {
  for (int off = 16; off > 0; off >>= 1) {
    const float os = __shfl_xor_sync(0xffffffffu, s, off);
    const int64_t oid = __shfl_xor_sync(0xffffffffu, id, off);
    const int oslot = __shfl_xor_sync(0xffffffffu, slot, off);
    if (better(os, oid, s, id)) {
      s = os;
      id = oid;
      slot = oslot;
    }
  }
}

// Repeatedly takes the best of scores[0..count) (ids[i], or base + i when ids is null) and
// writes it to out[0..keep); taken entries become -inf. Called by one whole warp.
__device__ void warp_select(float* scores, const int64_t* ids, int64_t base, int count,
                            int64_t keep, Cand* out) {
  const int lane = threadIdx.x & 31;
  for (int64_t j = 0; j < keep; ++j) {
    float s = -INFINITY;
    int64_t id = INT64_MAX;
    int slot = -1;
    for (int i = lane; i < count; i += 32) {
      const int64_t iid = ids ? ids[i] : base + i;
      if (iid >= 0 && better(scores[i], iid, s, id)) {
        s = scores[i];
        id = iid;
        slot = i;
      }
    }
    warp_best(s, id, slot);
    if (lane == 0) {
      if (slot < 0 || s == -INFINITY) {
        out[j] = Cand{-INFINITY, -1};
      } else {
        out[j] = Cand{s, id};
        scores[slot] = -INFINITY;
      }
    }
    __syncwarp();
  }
}

struct Args {
  int dtype;  // 0 float32, 1 float16, 2 int8
  int64_t n, dim, keep, tiles;
  const float* queries;
  const int8_t* qcodes;
  const float* qscales;
  const void* vectors;
  const float* scales;
  const uint8_t* allow;
  const float* floors;
  Cand* out;  // [Q][tiles][keep]
  int* non_finite;
};

__global__ void tile_topk(Args a) {
  extern __shared__ unsigned char smem[];
  float* scores = reinterpret_cast<float*>(smem);
  unsigned char* query = smem + kTileRows * sizeof(float);
  const int64_t tile = blockIdx.x, q = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  const int64_t row0 = tile * kTileRows;
  const int64_t Dp = (a.dim + 3) / 4 * 4;  // padded_dim (gallery.h is host code)
  const float floor = a.floors[q];

  if (a.dtype == 2) {
    for (int64_t i = threadIdx.x; i < Dp; i += kThreads) query[i] = a.qcodes[q * Dp + i];
  } else {
    float* qf = reinterpret_cast<float*>(query);
    for (int64_t i = threadIdx.x; i < a.dim; i += kThreads) qf[i] = a.queries[q * a.dim + i];
  }
  __syncthreads();

  if (a.dtype == 2) {
    // A warp per group of 16 rows: lane r (and r + 16) owns row r, the two halves take
    // alternate 4-byte steps, so each step reads 2 x 64 contiguous bytes.
    const int8_t* packed = static_cast<const int8_t*>(a.vectors);
    const int* q4 = reinterpret_cast<const int*>(query);
    const int r = lane & 15, half = lane >> 4;
    for (int gi = warp; gi < kTileRows / 16; gi += kWarps) {
      const int64_t row = row0 + gi * 16 + r;
      int acc = 0;
      if (row0 + gi * 16 < a.n) {
        const int8_t* G = packed + (row0 / 16 + gi) * Dp * 16;
        for (int64_t d4 = half; d4 < Dp / 4; d4 += 2)
          acc = __dp4a(*reinterpret_cast<const int*>(G + d4 * 64 + r * 4), q4[d4], acc);
      }
      acc += __shfl_xor_sync(0xffffffffu, acc, 16);
      if (half == 0) {
        float s = -INFINITY;
        if (row < a.n && allowed(a.allow, row)) {
          s = static_cast<float>(acc) * a.scales[row] * a.qscales[q];
          if (s < floor) s = -INFINITY;
        }
        scores[gi * 16 + r] = s;
      }
    }
  } else {
    const float* qf = reinterpret_cast<const float*>(query);
    for (int i = warp; i < kTileRows; i += kWarps) {
      const int64_t row = row0 + i;
      float acc = 0.0f;
      if (row < a.n) {
        if (a.dtype == 0) {
          const float* v = static_cast<const float*>(a.vectors) + row * a.dim;
          for (int64_t d = lane; d < a.dim; d += 32) acc = fmaf(qf[d], v[d], acc);
        } else {
          const __half* v = static_cast<const __half*>(a.vectors) + row * a.dim;
          for (int64_t d = lane; d < a.dim; d += 32) acc = fmaf(qf[d], __half2float(v[d]), acc);
        }
      }
      for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
      if (lane == 0) {
        float s = -INFINITY;
        if (row < a.n) {
          if (!isfinite(acc)) atomicOr(a.non_finite, 1);
          else if (allowed(a.allow, row) && acc >= floor) s = acc;
        }
        scores[i] = s;
      }
    }
  }
  __syncthreads();
  if (warp == 0) {
    const int count = static_cast<int>(a.n - row0 < kTileRows ? a.n - row0 : kTileRows);
    warp_select(scores, nullptr, row0, count, a.keep, a.out + (q * a.tiles + tile) * a.keep);
  }
}

__global__ void merge_topk(Cand* cands, int64_t per_query, int64_t keep, float* work_scores,
                           int64_t* work_ids, Cand* out) {
  const int64_t q = blockIdx.x;
  Cand* c = cands + q * per_query;
  float* s = work_scores + q * per_query;
  int64_t* id = work_ids + q * per_query;
  for (int64_t i = threadIdx.x; i < per_query; i += 32) {
    s[i] = c[i].score;
    id[i] = c[i].id;
  }
  __syncwarp();
  warp_select(s, id, 0, static_cast<int>(per_query), keep, out + q * keep);
}

}  // namespace

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) return 0;
  return n;
}

std::vector<std::vector<cpu::Candidate>> first_pass(const TopKParams& p, const int8_t* qcodes,
                                                    const float* qscales, int64_t keep,
                                                    const std::vector<float>& floors) {
  const int64_t Q = p.num_queries, N = p.num_vectors, D = p.dim, Dp = padded_dim(D);
  const int64_t tiles = (N + kTileRows - 1) / kTileRows;
  const int dtype = static_cast<int>(p.dtype);
  size_t vec_bytes = static_cast<size_t>(N * D) * (p.dtype == DType::Float32 ? 4 : 2);
  if (p.dtype == DType::Int8) vec_bytes = static_cast<size_t>(num_groups(N) * group_bytes(D));

  DeviceBuffer<unsigned char> vectors(static_cast<const unsigned char*>(p.vectors), vec_bytes);
  DeviceBuffer<float> queries(p.queries, static_cast<size_t>(Q * D));
  DeviceBuffer<int8_t> codes(qcodes, qcodes ? static_cast<size_t>(Q * Dp) : 0);
  DeviceBuffer<float> qsc(qscales, qscales ? static_cast<size_t>(Q) : 0);
  DeviceBuffer<float> scales(p.scales, p.scales ? static_cast<size_t>(num_groups(N) * kGroupRows) : 0);
  DeviceBuffer<uint8_t> allow(p.allow, p.allow ? static_cast<size_t>((N + 7) / 8) : 0);
  DeviceBuffer<float> fl(floors.data(), floors.size());
  DeviceBuffer<Cand> tile_out(static_cast<size_t>(Q * tiles * keep));
  DeviceBuffer<float> work_s(static_cast<size_t>(Q * tiles * keep));
  DeviceBuffer<int64_t> work_i(static_cast<size_t>(Q * tiles * keep));
  DeviceBuffer<Cand> out(static_cast<size_t>(Q * keep));
  DeviceBuffer<int> non_finite(1);
  check(cudaMemset(non_finite.ptr, 0, sizeof(int)), "cudaMemset");

  Args a{dtype, N, D, keep, tiles, queries.ptr, codes.ptr, qsc.ptr, vectors.ptr, scales.ptr,
         p.allow ? allow.ptr : nullptr, fl.ptr, tile_out.ptr, non_finite.ptr};
  const size_t smem = kTileRows * sizeof(float) +
                      static_cast<size_t>(p.dtype == DType::Int8 ? Dp : D * static_cast<int64_t>(sizeof(float)));
  if (smem > 48 * 1024)
    check(cudaFuncSetAttribute(tile_topk, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(smem)), "cudaFuncSetAttribute");
  tile_topk<<<dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(Q)), kThreads, smem>>>(a);
  check(cudaGetLastError(), "tile_topk launch");
  merge_topk<<<static_cast<unsigned>(Q), 32>>>(tile_out.ptr, tiles * keep, keep, work_s.ptr,
                                                 work_i.ptr, out.ptr);
  check(cudaGetLastError(), "merge_topk launch");

  std::vector<Cand> host(static_cast<size_t>(Q * keep));
  int bad = 0;
  check(cudaMemcpy(host.data(), out.ptr, host.size() * sizeof(Cand), cudaMemcpyDeviceToHost),
        "cudaMemcpy");
  check(cudaMemcpy(&bad, non_finite.ptr, sizeof(int), cudaMemcpyDeviceToHost), "cudaMemcpy");
  if (bad) throw KernelInputError("queries or gallery contain NaN or Inf (a score was not finite)");

  std::vector<std::vector<cpu::Candidate>> best(static_cast<size_t>(Q));
  for (int64_t q = 0; q < Q; ++q)
    for (int64_t j = 0; j < keep; ++j) {
      const Cand& c = host[q * keep + j];
      if (c.id >= 0) best[q].push_back({c.score, c.id});
    }
  return best;
}

}  // namespace cuda
}  // namespace clapedge
