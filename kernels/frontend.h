// Native INT8 conv front end of wav2vec2 / HuBERT / WavLM audio towers.
//
// The front end is a stack of strided 1-D convolutions (first: 1 -> C channels, kernel 10,
// stride 5; then C -> C, kernel 3 or 2, stride 2), each followed by an optional norm and
// GELU, then the feature projection (LayerNorm + Linear). Expressed as ONNX ops, every conv
// is a dozen full passes over a [frames, C] tensor (gather, min/max, quantize, cast, two
// scale multiplies, bias, GELU): on a 10 s clip those passes cost several times the int8
// GEMMs themselves. Here each conv layer is one pass: for a panel of 32 output frames the
// input rows (contiguous in [time, channel] layout: frame j reads input frames
// s*j .. s*j+k-1, tap-major, channel-minor) are quantised per row into a small u8 buffer,
// multiplied with the packed int8 weights on the tile unit (AMX) or VNNI, and the epilogue
// (scales, bias, norm, GELU, the row's absolute maximum for the next layer) writes the float
// output row while it is still in cache.
//
// Arithmetic (the same as the exporter's per-row dynamic ONNX form, export/rowwise.py):
//   row scale  s_j = max|x_j| / 127 over the row's k*C inputs,
//   codes      u = round(x / s_j) + 128 (u8), weights q symmetric per output channel,
//   y[j, n]    = (sum_k u*q - 128 * sum_k q[:, n]) * s_j * w_scale[n] + bias[n].
// The first conv (one input channel, 10 taps) stays float: int8 does not pay off at K = 10.
// A GroupNorm over time in the first layer (wav2vec2 "group" mode, one group per channel)
// folds into that conv's weights per clip from the 10 x 10 covariance of its input frames.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "topk.h"

namespace clapedge {
namespace frontend {

enum class Norm { None = 0, GroupTime = 1, LayerChannel = 2 };

struct LayerSpec {
  int64_t kernel = 0, stride = 0, cin = 0, cout = 0;
  // Layer 0 (cin == 1): float weights [kernel][cout]. Other layers: int8 [kernel*cin][cout]
  // with one scale per output channel.
  std::vector<float> weight_f32;
  std::vector<int8_t> weight_i8;
  std::vector<float> weight_scale;
  std::vector<float> bias;  // [cout] or empty
  Norm norm = Norm::None;
  std::vector<float> norm_weight, norm_bias;  // [cout] or empty (no affine)
  float norm_eps = 1e-5f;
};

struct ProjectionSpec {
  bool present = false;
  bool layer_norm = false;
  std::vector<float> ln_weight, ln_bias;
  float ln_eps = 1e-5f;
  int64_t din = 0, dout = 0;
  std::vector<int8_t> weight_i8;  // [din][dout]
  std::vector<float> weight_scale;  // [dout]
  std::vector<float> bias;  // [dout] or empty
};

// One SIMD level's pieces (frontend_avx512.cc, frontend_amx.cc; scalar in frontend.cc).
struct FrontLevel {
  SimdLevel level;
  // C[r][n] = sum_k A[r][k] * B[k][n] for r < rows (rows <= 32), A u8 with row stride lda
  // (rows up to the next multiple of 16 must be readable), B packed (pack_weights),
  // C row stride n_cols.
  void (*gemm)(const uint8_t* A, int64_t lda, int64_t rows, const int8_t* B, int64_t kp,
               int64_t n_cols, int32_t* C);
  // out[n] = (acc[n] - corr[n]) * row_scale * w_scale[n] (+ bias[n])
  void (*dequant)(const int32_t* acc, const int32_t* corr, float row_scale, const float* w_scale,
                  const float* bias, int64_t n, float* out);
  // x = LayerNorm(x) over n values (weight/bias may be null)
  void (*layer_norm)(float* x, int64_t n, const float* w, const float* b, float eps);
  // x = GELU(x) (exact, erf form), in place
  void (*gelu)(float* x, int64_t n);
  // u[i] = clamp(round(x[i] * inv_scale), -127, 127) + 128
  void (*quantize)(const float* x, int64_t n, float inv_scale, uint8_t* u);
  float (*absmax)(const float* x, int64_t n);
  // out[t][c] = sum_i x[stride*t + i] * w[i][c] + b[c] for t < rows (first conv)
  void (*conv0)(const float* x, int64_t stride, int64_t kernel, int64_t rows, const float* w,
                const float* b, int64_t channels, float* out);
};

const FrontLevel* scalar_front_level();
const FrontLevel* avx512_front_level();
const FrontLevel* amx_front_level();

class FrontEnd {
 public:
  FrontEnd(std::vector<LayerSpec> layers, ProjectionSpec projection);

  int64_t out_channels() const;
  // Frames out of `samples` samples.
  int64_t frames(int64_t samples) const;
  // wave [samples] -> out [frames(samples)][out_channels]. `valid_samples` (<= samples): the
  // GroupNorm statistics of the first layer cover only the frames of the first
  // valid_samples samples (the rest is padding of a batch), like the exported graph.
  void run(const float* wave, int64_t samples, int64_t valid_samples, float* out, int threads,
           SimdLevel simd) const;

 private:
  struct Packed {
    int64_t k = 0, n = 0, kp = 0;  // K, N, K padded to 64
    std::vector<int8_t> b;         // [n/16][kp/4][16][4]
    std::vector<int32_t> corr;     // 128 * column sums
  };
  static Packed pack(const std::vector<int8_t>& w, int64_t k, int64_t n);
  std::vector<LayerSpec> layers_;
  ProjectionSpec proj_;
  std::vector<Packed> packed_;  // per layer (layer 0 empty)
  Packed proj_packed_;
  // Activations of two consecutive layers, kept between calls: a 10 s clip's first layer
  // alone is 65 MB, and fresh pages cost a fault and a zeroing each (a quarter of the time
  // when allocated per call). A concurrent call that finds it busy allocates its own.
  struct Workspace {
    std::vector<float> a, b, a_max, b_max;
  };
  mutable std::mutex workspace_mutex_;
  mutable Workspace workspace_;
  void run_with(Workspace& ws, const FrontLevel& L, const float* wave, int64_t samples,
                int64_t valid_samples, float* out, int threads) const;
};

}  // namespace frontend
}  // namespace clapedge
