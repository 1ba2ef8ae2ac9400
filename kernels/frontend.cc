// Portable part of the native front end: weight packing, the per-clip GroupNorm fold, the
// layer loop over panels of output frames and threads, and the scalar level (the reference
// the SIMD levels are tested against).
#include "frontend.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>

#include "aligned.h"
#include "thread_pool.h"

namespace clapedge {
namespace frontend {
namespace {

constexpr int64_t kPanel = 32;  // output frames per GEMM panel (two 16-row AMX tiles)
constexpr size_t kMaxLayers = 32;
constexpr int64_t kMaxKernel = 1024;
constexpr int64_t kMaxChannels = 4096;

// ---- scalar level -------------------------------------------------------------------------

void gemm_scalar(const uint8_t* A, int64_t lda, int64_t rows, const int8_t* B, int64_t kp,
                 int64_t n_cols, int32_t* C) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t n = 0; n < n_cols; ++n) {
      const int8_t* col = B + (n / 16) * kp * 16 + (n % 16) * 4;
      int32_t acc = 0;
      for (int64_t k = 0; k < kp; ++k)
        acc += static_cast<int32_t>(A[r * lda + k]) * static_cast<int32_t>(col[(k / 4) * 64 + k % 4]);
      C[r * n_cols + n] = acc;
    }
}

void dequant_scalar(const int32_t* acc, const int32_t* corr, float row_scale, const float* w_scale,
                    const float* bias, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) {
    float y = static_cast<float>(acc[i] - corr[i]) * (row_scale * w_scale[i]);
    out[i] = bias ? y + bias[i] : y;
  }
}

void layer_norm_scalar(float* x, int64_t n, const float* w, const float* b, float eps) {
  float sum = 0.f;
  for (int64_t i = 0; i < n; ++i) sum += x[i];
  const float mean = sum / static_cast<float>(n);
  float sq = 0.f;
  for (int64_t i = 0; i < n; ++i) sq += (x[i] - mean) * (x[i] - mean);
  const float inv = 1.0f / std::sqrt(sq / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) {
    float y = (x[i] - mean) * inv;
    if (w) y *= w[i];
    if (b) y += b[i];
    x[i] = y;
  }
}

void gelu_scalar(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = 0.5f * x[i] * (1.0f + std::erf(x[i] * 0.70710678118654752f));
}

void quantize_scalar(const float* x, int64_t n, float inv_scale, uint8_t* u) {
  for (int64_t i = 0; i < n; ++i) {
    const float q = std::nearbyint(x[i] * inv_scale);
    u[i] = static_cast<uint8_t>(static_cast<int32_t>(std::min(127.f, std::max(-127.f, q))) + 128);
  }
}

float absmax_scalar(const float* x, int64_t n) {
  float m = 0.f;
  for (int64_t i = 0; i < n; ++i) m = std::max(m, std::fabs(x[i]));
  return m;
}

void conv0_scalar(const float* x, int64_t stride, int64_t kernel, int64_t rows, const float* w,
                  const float* b, int64_t channels, float* out) {
  for (int64_t t = 0; t < rows; ++t)
    for (int64_t c = 0; c < channels; ++c) {
      float acc = b ? b[c] : 0.f;
      for (int64_t i = 0; i < kernel; ++i) acc += x[stride * t + i] * w[i * channels + c];
      out[t * channels + c] = acc;
    }
}

const FrontLevel kScalar{SimdLevel::Scalar, gemm_scalar,  dequant_scalar, layer_norm_scalar,
                         gelu_scalar,       quantize_scalar, absmax_scalar, conv0_scalar};

const FrontLevel* level_for(SimdLevel simd) {
  if (simd == SimdLevel::Auto) simd = best_simd_level();
  if (!simd_level_available(simd))
    throw KernelInputError(std::string("SIMD level '") + simd_level_name(simd) +
                           "' is not available on this CPU or in this build");
  const FrontLevel* l = nullptr;
  if (simd == SimdLevel::Amx) l = amx_front_level();
  if (simd == SimdLevel::Amx && !l) simd = SimdLevel::Avx512;
  if (simd == SimdLevel::Avx512) l = avx512_front_level();
  return l ? l : &kScalar;  // AVX2 / NEON: the scalar level (the runtime does not pick them)
}

int64_t conv_frames(int64_t samples, int64_t kernel, int64_t stride) {
  return samples < kernel ? 0 : (samples - kernel) / stride + 1;
}

}  // namespace

const FrontLevel* scalar_front_level() { return &kScalar; }

#ifndef CLAPEDGE_HAVE_AVX512
const FrontLevel* avx512_front_level() { return nullptr; }
#endif
#ifndef CLAPEDGE_HAVE_AMX
const FrontLevel* amx_front_level() { return nullptr; }
#endif

FrontEnd::Packed FrontEnd::pack(const std::vector<int8_t>& w, int64_t k, int64_t n) {
  Packed p;
  p.k = k;
  p.n = n;
  p.kp = (k + 63) / 64 * 64;
  p.b.assign(static_cast<size_t>(n * p.kp), 0);
  p.corr.assign(static_cast<size_t>(n), 0);
  for (int64_t kk = 0; kk < k; ++kk)
    for (int64_t nn = 0; nn < n; ++nn) {
      const int8_t q = w[kk * n + nn];
      p.b[(nn / 16) * p.kp * 16 + (kk / 4) * 64 + (nn % 16) * 4 + kk % 4] = q;
      p.corr[nn] += 128 * static_cast<int32_t>(q);
    }
  return p;
}

FrontEnd::FrontEnd(std::vector<LayerSpec> layers, ProjectionSpec projection)
    : layers_(std::move(layers)), proj_(std::move(projection)) {
  if (layers_.empty()) throw KernelInputError("front end: no conv layers");
  // Bounds far past any wav2vec2-family front end (512 channels, kernels <= 10, 7 layers),
  // so that a damaged or hostile file cannot ask for gigabytes of activations per second.
  if (layers_.size() > kMaxLayers)
    throw KernelInputError("front end: more than " + std::to_string(kMaxLayers) + " conv layers");
  for (size_t i = 0; i < layers_.size(); ++i) {
    const LayerSpec& l = layers_[i];
    const std::string at = "front end layer " + std::to_string(i) + ": ";
    if (l.kernel < 1 || l.stride < 1 || l.cin < 1 || l.cout < 1)
      throw KernelInputError(at + "kernel, stride and channels must be >= 1");
    if (l.kernel > kMaxKernel || l.stride > kMaxKernel || l.cout > kMaxChannels || l.cin > kMaxChannels)
      throw KernelInputError(at + "kernel or stride above " + std::to_string(kMaxKernel) +
                             ", or channels above " + std::to_string(kMaxChannels));
    if (l.cout % 16 != 0) throw KernelInputError(at + "output channels must be a multiple of 16");
    if (i == 0) {
      if (l.cin != 1) throw KernelInputError(at + "the first conv must have one input channel");
      if (static_cast<int64_t>(l.weight_f32.size()) != l.kernel * l.cout)
        throw KernelInputError(at + "float weight must be [kernel, cout]");
    } else {
      if (l.cin != layers_[i - 1].cout)
        throw KernelInputError(at + "input channels differ from the previous layer's output");
      if (static_cast<int64_t>(l.weight_i8.size()) != l.kernel * l.cin * l.cout ||
          static_cast<int64_t>(l.weight_scale.size()) != l.cout)
        throw KernelInputError(at + "int8 weight must be [kernel*cin, cout] with cout scales");
      if (l.norm == Norm::GroupTime)
        throw KernelInputError(at + "GroupNorm over time is supported in the first layer only");
    }
    if (!l.bias.empty() && static_cast<int64_t>(l.bias.size()) != l.cout)
      throw KernelInputError(at + "bias must have cout values");
    if ((!l.norm_weight.empty() && static_cast<int64_t>(l.norm_weight.size()) != l.cout) ||
        (!l.norm_bias.empty() && static_cast<int64_t>(l.norm_bias.size()) != l.cout))
      throw KernelInputError(at + "norm weight and bias must have cout values");
  }
  packed_.resize(layers_.size());
  for (size_t i = 1; i < layers_.size(); ++i)
    packed_[i] = pack(layers_[i].weight_i8, layers_[i].kernel * layers_[i].cin, layers_[i].cout);
  if (proj_.present) {
    if (proj_.din != layers_.back().cout)
      throw KernelInputError("front end projection: input width differs from the last conv's");
    if (proj_.dout % 16 != 0 || proj_.dout < 16 || proj_.dout > kMaxChannels)
      throw KernelInputError("front end projection: output width must be a multiple of 16, "
                             "at most " + std::to_string(kMaxChannels));
    if (static_cast<int64_t>(proj_.weight_i8.size()) != proj_.din * proj_.dout ||
        static_cast<int64_t>(proj_.weight_scale.size()) != proj_.dout ||
        (!proj_.bias.empty() && static_cast<int64_t>(proj_.bias.size()) != proj_.dout))
      throw KernelInputError("front end projection: weight, scales or bias have the wrong size");
    if (proj_.layer_norm && ((!proj_.ln_weight.empty() &&
                              static_cast<int64_t>(proj_.ln_weight.size()) != proj_.din) ||
                             (!proj_.ln_bias.empty() &&
                              static_cast<int64_t>(proj_.ln_bias.size()) != proj_.din)))
      throw KernelInputError("front end projection: LayerNorm parameters have the wrong size");
    proj_packed_ = pack(proj_.weight_i8, proj_.din, proj_.dout);
  }
}

int64_t FrontEnd::out_channels() const { return proj_.present ? proj_.dout : layers_.back().cout; }

int64_t FrontEnd::frames(int64_t samples) const {
  int64_t f = samples;
  for (const LayerSpec& l : layers_) f = conv_frames(f, l.kernel, l.stride);
  return f;
}

void FrontEnd::run(const float* wave, int64_t samples, int64_t valid_samples, float* out,
                   int threads, SimdLevel simd) const {
  const FrontLevel& L = *level_for(simd);
  const int64_t n_out = frames(samples);
  if (n_out < 1)
    throw KernelInputError("front end: " + std::to_string(samples) +
                           " samples are too few for one output frame");
  threads = std::max(1, threads);
  valid_samples = std::min(std::max<int64_t>(valid_samples, 0), samples);
  std::unique_lock<std::mutex> lock(workspace_mutex_, std::try_to_lock);
  if (lock.owns_lock()) {
    run_with(workspace_, L, wave, samples, valid_samples, out, threads);
  } else {
    Workspace own;
    run_with(own, L, wave, samples, valid_samples, out, threads);
  }
}

namespace {
// Grows (never shrinks) a buffer; new elements are value-initialised once, on growth only.
float* at_least(std::vector<float>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(static_cast<size_t>(n));
  return v.data();
}
}  // namespace

void FrontEnd::run_with(Workspace& ws, const FrontLevel& L, const float* wave, int64_t samples,
                        int64_t valid_samples, float* out, int threads) const {

  // ---- layer 0: float conv (+ GroupNorm folded per clip, or LayerNorm) + GELU ----
  const LayerSpec& l0 = layers_[0];
  const int64_t C0 = l0.cout, F0 = conv_frames(samples, l0.kernel, l0.stride);
  std::vector<float> w0(l0.weight_f32), b0(l0.bias);
  if (b0.empty()) b0.assign(static_cast<size_t>(C0), 0.f);
  if (l0.norm == Norm::GroupTime) {
    const int64_t K = l0.kernel;
    const int64_t V = std::max<int64_t>(1, std::min(F0, conv_frames(valid_samples, K, l0.stride)));
    std::vector<double> mean(static_cast<size_t>(K), 0.0), cov(static_cast<size_t>(K * K), 0.0);
    for (int64_t t = 0; t < V; ++t)
      for (int64_t i = 0; i < K; ++i) mean[i] += wave[l0.stride * t + i];
    for (auto& m : mean) m /= static_cast<double>(V);
    for (int64_t t = 0; t < V; ++t) {
      const float* x = wave + l0.stride * t;
      for (int64_t i = 0; i < K; ++i) {
        const double di = x[i] - mean[i];
        for (int64_t j = 0; j <= i; ++j) cov[i * K + j] += di * (x[j] - mean[j]);
      }
    }
    for (int64_t i = 0; i < K; ++i)
      for (int64_t j = 0; j <= i; ++j) cov[j * K + i] = cov[i * K + j] /= static_cast<double>(V);
    for (int64_t c = 0; c < C0; ++c) {
      double mu = b0[c], var = 0.0;
      for (int64_t i = 0; i < K; ++i) {
        mu += mean[i] * l0.weight_f32[i * C0 + c];
        double row = 0.0;
        for (int64_t j = 0; j < K; ++j) row += cov[i * K + j] * l0.weight_f32[j * C0 + c];
        var += row * l0.weight_f32[i * C0 + c];
      }
      double a = 1.0 / std::sqrt(std::max(var, 0.0) + l0.norm_eps);
      if (!l0.norm_weight.empty()) a *= l0.norm_weight[c];
      for (int64_t i = 0; i < K; ++i) w0[i * C0 + c] = static_cast<float>(l0.weight_f32[i * C0 + c] * a);
      b0[c] = static_cast<float>((b0[c] - mu) * a + (l0.norm_bias.empty() ? 0.0 : l0.norm_bias[c]));
    }
  }
  // Layer-0 frames [t0, t0 + rows) -> o (+ their absolute maxima).
  const bool ln0 = l0.norm == Norm::LayerChannel;
  const float* nw0 = l0.norm_weight.empty() ? nullptr : l0.norm_weight.data();
  const float* nb0 = l0.norm_bias.empty() ? nullptr : l0.norm_bias.data();
  auto layer0_rows = [&](int64_t t0, int64_t rows, float* o, float* o_max) {
    L.conv0(wave + l0.stride * t0, l0.stride, l0.kernel, rows, w0.data(), b0.data(), C0, o);
    for (int64_t r = 0; r < rows; ++r) {
      float* row = o + r * C0;
      if (ln0) L.layer_norm(row, C0, nw0, nb0, l0.norm_eps);
      L.gelu(row, C0);
      o_max[r] = L.absmax(row, C0);
    }
  };
  // With a second layer, layer 0 is computed inside its panels (the 65 input frames of 32
  // output frames, in cache) instead of being written out whole: at 16 kHz and 512
  // channels that output is 6.5 MB per second of audio, written once and read back.
  const bool fuse0 = layers_.size() > 1;
  float* cur = fuse0 ? nullptr : at_least(ws.a, F0 * C0);
  float* cur_max = fuse0 ? nullptr : at_least(ws.a_max, F0);
  float* nxt_buf = nullptr;
  float* nxt_max_buf = nullptr;
  if (!fuse0) {
    constexpr int64_t kChunk = 128;
    const int64_t chunks = (F0 + kChunk - 1) / kChunk;
    std::atomic<int64_t> next{0};
    parallel_run(static_cast<int>(std::min<int64_t>(threads, chunks)), [&](int) {
      for (int64_t c; (c = next.fetch_add(1)) < chunks;) {
        const int64_t t0 = c * kChunk, rows = std::min(kChunk, F0 - t0);
        layer0_rows(t0, rows, cur + t0 * C0, cur_max + t0);
      }
    });
  }

  // ---- int8 layers, then the projection, panel by panel ----
  int64_t F_in = F0, C_in = C0;
  const int64_t n_layers = static_cast<int64_t>(layers_.size());
  const int64_t n_steps = n_layers - 1 + (proj_.present ? 1 : 0);
  for (int64_t step = 0; step < n_steps; ++step) {
    const bool is_proj = step == n_layers - 1;
    const LayerSpec* l = is_proj ? nullptr : &layers_[step + 1];
    const Packed& P = is_proj ? proj_packed_ : packed_[step + 1];
    const int64_t kernel = is_proj ? 1 : l->kernel, stride = is_proj ? 1 : l->stride;
    const int64_t N = P.n, F = conv_frames(F_in, kernel, stride);
    const bool last = step == n_steps - 1;
    // ping-pong between the workspace's two buffers
    const bool cur_in_a = cur != nullptr && cur == ws.a.data();
    std::vector<float>& nb_vec = cur_in_a ? ws.b : ws.a;
    std::vector<float>& nm_vec = cur_in_a ? ws.b_max : ws.a_max;
    nxt_buf = last ? nullptr : at_least(nb_vec, F * N);
    nxt_max_buf = last ? nullptr : at_least(nm_vec, F);
    float* nxt_max = nxt_max_buf;
    float* dst = last ? out : nxt_buf;
    const float* bias = is_proj ? (proj_.bias.empty() ? nullptr : proj_.bias.data())
                                : (l->bias.empty() ? nullptr : l->bias.data());
    const float* wscale = is_proj ? proj_.weight_scale.data() : l->weight_scale.data();
    const bool ln_after = !is_proj && l->norm == Norm::LayerChannel;
    const float* nw = ln_after && !l->norm_weight.empty() ? l->norm_weight.data() : nullptr;
    const float* nb = ln_after && !l->norm_bias.empty() ? l->norm_bias.data() : nullptr;
    const bool ln_before = is_proj && proj_.layer_norm;
    const int64_t panels = (F + kPanel - 1) / kPanel;
    std::atomic<int64_t> next{0};
    parallel_run(static_cast<int>(std::min<int64_t>(threads, panels)), [&](int) {
      Aligned<uint8_t> A(static_cast<size_t>(kPanel * P.kp), 128);
      Aligned<int32_t> acc(static_cast<size_t>(kPanel * N));
      std::vector<float> row_scale(kPanel), tmp(ln_before ? static_cast<size_t>(C_in) : 0);
      const bool from_layer0 = step == 0 && fuse0;
      const int64_t span = stride * (kPanel - 1) + kernel;  // input frames of one panel
      std::vector<float> src(from_layer0 ? static_cast<size_t>(span * C_in) : 0);
      std::vector<float> src_max(from_layer0 ? static_cast<size_t>(span) : 0);
      for (int64_t p; (p = next.fetch_add(1)) < panels;) {
        const int64_t j0 = p * kPanel, rows = std::min(kPanel, F - j0);
        const float* in = cur;
        const float* in_max = cur_max;
        if (from_layer0) {
          const int64_t f0 = stride * j0, n_in = stride * (rows - 1) + kernel;
          layer0_rows(f0, n_in, src.data(), src_max.data());
          in = src.data() - f0 * C_in;  // indexed by absolute frame below
          in_max = src_max.data() - f0;
        }
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t j = j0 + r;
          const float* x = in + stride * j * C_in;
          float amax = 0.f;
          if (ln_before) {
            std::memcpy(tmp.data(), x, static_cast<size_t>(C_in) * sizeof(float));
            L.layer_norm(tmp.data(), C_in,
                         proj_.ln_weight.empty() ? nullptr : proj_.ln_weight.data(),
                         proj_.ln_bias.empty() ? nullptr : proj_.ln_bias.data(), proj_.ln_eps);
            x = tmp.data();
            amax = L.absmax(x, C_in);
          } else {
            for (int64_t t = 0; t < kernel; ++t) amax = std::max(amax, in_max[stride * j + t]);
          }
          const bool live = amax > 1e-30f;
          row_scale[r] = live ? amax / 127.f : 0.f;
          L.quantize(x, kernel * C_in, live ? 127.f / amax : 0.f, A.data() + r * P.kp);
        }
        L.gemm(A.data(), P.kp, rows, P.b.data(), P.kp, N, acc.data());
        for (int64_t r = 0; r < rows; ++r) {
          float* y = dst + (j0 + r) * N;
          L.dequant(acc.data() + r * N, P.corr.data(), row_scale[r], wscale, bias, N, y);
          if (is_proj) continue;
          if (ln_after) L.layer_norm(y, N, nw, nb, l->norm_eps);
          L.gelu(y, N);
          if (!last) nxt_max[j0 + r] = L.absmax(y, N);
        }
      }
    });
    if (!last) {
      cur = nxt_buf;
      cur_max = nxt_max_buf;
    }
    F_in = F;
    C_in = N;
  }
  if (n_steps == 0)  // a single conv layer and no projection
    std::memcpy(out, cur, static_cast<size_t>(F0 * C0) * sizeof(float));
}

}  // namespace frontend
}  // namespace clapedge
