// AVX-512 (+ VNNI) level of the native front end: vpdpbusd GEMM panels and the vector
// epilogue (dequantise, LayerNorm, GELU, quantise, absolute maximum). The AMX level reuses
// everything here except the GEMM.
#include <immintrin.h>

#include <cmath>

#include "frontend.h"

namespace clapedge {
namespace frontend {
namespace {

inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1u);
}

// Rows [r0, r0 + R) x column blocks [nb0, nb0 + NB) of 16: R x NB accumulators.
template <int R, int NB>
inline void vnni_tile(const uint8_t* A, int64_t lda, const int8_t* B, int64_t kp, int64_t n_cols,
                      int64_t nb0, int32_t* C) {
  __m512i acc[R][NB];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < NB; ++b) acc[r][b] = _mm512_setzero_si512();
  const int8_t* Bb = B + nb0 * kp * 16;
  for (int64_t k4 = 0; k4 < kp / 4; ++k4) {
    __m512i bv[NB];
    for (int b = 0; b < NB; ++b) bv[b] = _mm512_loadu_si512(Bb + b * kp * 16 + k4 * 64);
    for (int r = 0; r < R; ++r) {
      int32_t a4;
      __builtin_memcpy(&a4, A + r * lda + k4 * 4, 4);
      const __m512i av = _mm512_set1_epi32(a4);
      for (int b = 0; b < NB; ++b) acc[r][b] = _mm512_dpbusd_epi32(acc[r][b], av, bv[b]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < NB; ++b) _mm512_storeu_si512(C + r * n_cols + (nb0 + b) * 16, acc[r][b]);
}

template <int R>
inline void vnni_rows(const uint8_t* A, int64_t lda, const int8_t* B, int64_t kp, int64_t n_cols,
                      int32_t* C) {
  const int64_t blocks = n_cols / 16;
  int64_t nb = 0;
  for (; nb + 4 <= blocks; nb += 4) vnni_tile<R, 4>(A, lda, B, kp, n_cols, nb, C);
  for (; nb < blocks; ++nb) vnni_tile<R, 1>(A, lda, B, kp, n_cols, nb, C);
}

void gemm_vnni(const uint8_t* A, int64_t lda, int64_t rows, const int8_t* B, int64_t kp,
               int64_t n_cols, int32_t* C) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) vnni_rows<4>(A + r * lda, lda, B, kp, n_cols, C + r * n_cols);
  for (; r < rows; ++r) vnni_rows<1>(A + r * lda, lda, B, kp, n_cols, C + r * n_cols);
}

void dequant_avx512(const int32_t* acc, const int32_t* corr, float row_scale, const float* w_scale,
                    const float* bias, int64_t n, float* out) {
  const __m512 rs = _mm512_set1_ps(row_scale);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    const __m512i a = _mm512_sub_epi32(_mm512_maskz_loadu_epi32(m, acc + i),
                                       _mm512_maskz_loadu_epi32(m, corr + i));
    __m512 y = _mm512_mul_ps(_mm512_cvtepi32_ps(a),
                             _mm512_mul_ps(rs, _mm512_maskz_loadu_ps(m, w_scale + i)));
    if (bias) y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(m, bias + i));
    _mm512_mask_storeu_ps(out + i, m, y);
  }
}

void layer_norm_avx512(float* x, int64_t n, const float* w, const float* b, float eps) {
  __m512 s = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) s = _mm512_add_ps(s, _mm512_maskz_loadu_ps(tail_mask(n - i), x + i));
  const float mean = _mm512_reduce_add_ps(s) / static_cast<float>(n);
  const __m512 mv = _mm512_set1_ps(mean);
  __m512 q = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    const __m512 d = _mm512_maskz_sub_ps(m, _mm512_maskz_loadu_ps(m, x + i), mv);
    q = _mm512_fmadd_ps(d, d, q);
  }
  const float inv = 1.0f / std::sqrt(_mm512_reduce_add_ps(q) / static_cast<float>(n) + eps);
  const __m512 iv = _mm512_set1_ps(inv);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    __m512 y = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + i), mv), iv);
    if (w) y = _mm512_mul_ps(y, _mm512_maskz_loadu_ps(m, w + i));
    if (b) y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(m, b + i));
    _mm512_mask_storeu_ps(x + i, m, y);
  }
}

// exp(v) for v <= 0: v = n ln2 + r, |r| <= ln2 / 2, e^r by its degree-6 Taylor polynomial
// (relative error < 2e-7 there), times 2^n by scalef.
inline __m512 exp_nonpositive(__m512 v) {
  v = _mm512_max_ps(v, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(v, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), v);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// GELU(x) = x/2 (1 + erf(x / sqrt 2)); erf by Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7).
inline __m512 gelu16(__m512 x) {
  const __m512 z = _mm512_mul_ps(x, _mm512_set1_ps(0.70710678118654752f));
  const __m512 az = _mm512_abs_ps(z);
  // t = 1 / (1 + p |z|): the 14-bit reciprocal estimate and one Newton step (relative error
  // about 1e-8 here, as a division's), a few cycles instead of a vector division's dozen.
  const __m512 d = _mm512_fmadd_ps(az, _mm512_set1_ps(0.3275911f), _mm512_set1_ps(1.0f));
  const __m512 r0 = _mm512_rcp14_ps(d);
  const __m512 t = _mm512_mul_ps(r0, _mm512_fnmadd_ps(d, r0, _mm512_set1_ps(2.0f)));
  __m512 poly = _mm512_set1_ps(1.061405429f);
  poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(-1.453152027f));
  poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(1.421413741f));
  poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(-0.284496736f));
  poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(0.254829592f));
  poly = _mm512_mul_ps(poly, t);
  const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(az, az)));
  const __m512 erf_abs = _mm512_fnmadd_ps(poly, e, _mm512_set1_ps(1.0f));  // erf(|z|)
  // 1 + erf(z): for z < 0 that is 1 - erf(|z|) = poly * e, computed without cancellation.
  const __mmask16 neg = _mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_LT_OQ);
  const __m512 one_plus = _mm512_mask_mov_ps(_mm512_add_ps(_mm512_set1_ps(1.0f), erf_abs), neg,
                                             _mm512_mul_ps(poly, e));
  return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), x), one_plus);
}

void gelu_avx512(float* x, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    _mm512_mask_storeu_ps(x + i, m, gelu16(_mm512_maskz_loadu_ps(m, x + i)));
  }
}

void quantize_avx512(const float* x, int64_t n, float inv_scale, uint8_t* u) {
  const __m512 s = _mm512_set1_ps(inv_scale);
  // |x * inv_scale| <= 127 (1 + 2^-23) by construction (inv_scale = 127 / max|x| of the
  // row), so the rounded code is within [-127, 127] without a clamp; the unsigned
  // saturating narrow would catch anything else.
  const __m512i off = _mm512_set1_epi32(128);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + i), s));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(u + i), _mm512_cvtusepi32_epi8(_mm512_add_epi32(q, off)));
  }
  if (i < n) {
    const __mmask16 m = tail_mask(n - i);
    const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), s));
    _mm_mask_storeu_epi8(u + i, m, _mm512_cvtusepi32_epi8(_mm512_add_epi32(q, off)));
  }
}

float absmax_avx512(const float* x, int64_t n) {
  __m512 m = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16)
    m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_maskz_loadu_ps(tail_mask(n - i), x + i)));
  return _mm512_reduce_max_ps(m);
}

// Four channel blocks at a time: four independent FMA chains instead of one (a single
// chain of `kernel` dependent FMAs per 16 channels ran at a quarter of the FMA throughput).
void conv0_avx512(const float* x, int64_t stride, int64_t kernel, int64_t rows, const float* w,
                  const float* b, int64_t channels, float* out) {
  for (int64_t t = 0; t < rows; ++t) {
    const float* xt = x + stride * t;
    float* o = out + t * channels;
    int64_t c = 0;
    for (; c + 64 <= channels; c += 64) {
      __m512 a0 = b ? _mm512_loadu_ps(b + c) : _mm512_setzero_ps();
      __m512 a1 = b ? _mm512_loadu_ps(b + c + 16) : _mm512_setzero_ps();
      __m512 a2 = b ? _mm512_loadu_ps(b + c + 32) : _mm512_setzero_ps();
      __m512 a3 = b ? _mm512_loadu_ps(b + c + 48) : _mm512_setzero_ps();
      for (int64_t i = 0; i < kernel; ++i) {
        const __m512 xv = _mm512_set1_ps(xt[i]);
        const float* wi = w + i * channels + c;
        a0 = _mm512_fmadd_ps(xv, _mm512_loadu_ps(wi), a0);
        a1 = _mm512_fmadd_ps(xv, _mm512_loadu_ps(wi + 16), a1);
        a2 = _mm512_fmadd_ps(xv, _mm512_loadu_ps(wi + 32), a2);
        a3 = _mm512_fmadd_ps(xv, _mm512_loadu_ps(wi + 48), a3);
      }
      _mm512_storeu_ps(o + c, a0);
      _mm512_storeu_ps(o + c + 16, a1);
      _mm512_storeu_ps(o + c + 32, a2);
      _mm512_storeu_ps(o + c + 48, a3);
    }
    for (; c < channels; c += 16) {
      const __mmask16 m = tail_mask(channels - c);
      __m512 acc = b ? _mm512_maskz_loadu_ps(m, b + c) : _mm512_setzero_ps();
      for (int64_t i = 0; i < kernel; ++i)
        acc = _mm512_fmadd_ps(_mm512_set1_ps(xt[i]), _mm512_maskz_loadu_ps(m, w + i * channels + c), acc);
      _mm512_mask_storeu_ps(o + c, m, acc);
    }
  }
}

const FrontLevel kAvx512{SimdLevel::Avx512, gemm_vnni,      dequant_avx512, layer_norm_avx512,
                         gelu_avx512,       quantize_avx512, absmax_avx512, conv0_avx512};

}  // namespace

const FrontLevel* avx512_front_level() { return &kAvx512; }

}  // namespace frontend
}  // namespace clapedge
