// A few fp32 vector operations over the widest registers the build targets: AVX-512 (16 lanes),
// AVX2 + FMA (8 lanes), or none (INFLLM_SIMD_WIDTH 0: callers take their portable loops).
// attend.cpp's per-row micro-kernel is written once against these.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

namespace infllm {

// e^x for x <= 0 (softmax terms): 2^n * P(r), x = n ln2 + r, |r| <= ln2/2, P the degree-6 Taylor
// polynomial (relative error < 2e-7, about that of libm's expf). Arguments below -87 give about
// 1e-38 instead of 0: a softmax term that small does not change a sum that includes e^0 = 1.
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693145751953125f;  // ln 2 = kLn2Hi + kLn2Lo, kLn2Hi exact in fp32
constexpr float kLn2Lo = 1.428606765330187e-06f;
constexpr float kExpFloor = -87.0f;

inline float exp_neg(float x) {
  x = x < kExpFloor ? kExpFloor : x;  // a NaN stays NaN: a broken key must show, not vanish
  const float n = std::nearbyint(x * kLog2e);
  const float r = std::fma(n, -kLn2Lo, std::fma(n, -kLn2Hi, x));
  float p = 1.f / 720.f;
  p = std::fma(p, r, 1.f / 120.f);
  p = std::fma(p, r, 1.f / 24.f);
  p = std::fma(p, r, 1.f / 6.f);
  p = std::fma(p, r, 0.5f);
  p = std::fma(p, r, 1.f);
  p = std::fma(p, r, 1.f);
  int32_t bits;
  std::memcpy(&bits, &p, sizeof bits);
  bits += static_cast<int32_t>(n) * (1 << 23);
  float y;
  std::memcpy(&y, &bits, sizeof y);
  return y;
}

// y <- R(sign * a) x for NeoX halves, with c/s the table row of |a| (sign -1: sine negated).
// y may be x: element i reads x[i] and x[i + half] before it writes them.
inline void rotate(const float* x, float* y, const float* c, const float* s, float sign, int64_t half) {
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) {
    const float a = x[i], b = x[i + half], sn = sign * s[i];
    y[i] = a * c[i] - b * sn;
    y[i + half] = b * c[i] + a * sn;
  }
}

#if defined(__AVX512F__)
#define INFLLM_SIMD_WIDTH 16
using vfloat = __m512;
inline vfloat vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, vfloat x) { _mm512_storeu_ps(p, x); }
inline vfloat vset1(float x) { return _mm512_set1_ps(x); }
inline vfloat vmul(vfloat a, vfloat b) { return _mm512_mul_ps(a, b); }
inline vfloat vadd(vfloat a, vfloat b) { return _mm512_add_ps(a, b); }
inline vfloat vsub(vfloat a, vfloat b) { return _mm512_sub_ps(a, b); }
inline vfloat vfma(vfloat a, vfloat b, vfloat c) { return _mm512_fmadd_ps(a, b, c); }
inline vfloat vmax(vfloat a, vfloat b) { return _mm512_max_ps(a, b); }
// max(best, x) lane by lane in which a NaN sticks: maxps returns its second operand when
// either is NaN (so a NaN best stays), and an x that is NaN is blended in.
inline vfloat vmax_sticky(vfloat best, vfloat x) {
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_max_ps(x, best), x);
}
inline float vsum(vfloat a) { return _mm512_reduce_add_ps(a); }
inline vfloat vround(vfloat x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline vfloat vpow2i(vfloat p, vfloat n) { return _mm512_scalef_ps(p, n); }  // p * 2^n
// x where lo <= o < hi, else `fill` (lane by lane; the bounds are small integers held exactly)
inline vfloat vkeep_range(vfloat x, vfloat o, vfloat lo, vfloat hi, float fill) {
  const __mmask16 in = _mm512_cmp_ps_mask(lo, o, _CMP_LE_OQ) & _mm512_cmp_ps_mask(o, hi, _CMP_LT_OQ);
  return _mm512_mask_blend_ps(in, _mm512_set1_ps(fill), x);
}
// x, with the lanes that equal `value` replaced by `rep`
inline vfloat vreplace_eq(vfloat x, float value, float rep) {
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(value), _CMP_EQ_OQ), x, _mm512_set1_ps(rep));
}
// Lane j of the result = the sum of v[j]'s lanes, j < 16: a shuffle tree (46 instructions for
// 16 sums, a third of 16 separate reductions).
inline vfloat vsum_each(const vfloat* v) {
  __m512 w[8], z[4], t[2];
  for (int i = 0; i < 8; ++i)  // 128-bit lanes 0-1: v[2i]'s halves summed; 2-3: v[2i+1]'s
    w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  for (int i = 0; i < 4; ++i)  // 128-bit lane l: 4 partial sums of v[4i + l]
    z[i] = _mm512_add_ps(_mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  for (int i = 0; i < 2; ++i)  // lane l: 2 partial sums of v[8i + l], then 2 of v[8i + 4 + l]
    t[i] = _mm512_add_ps(_mm512_shuffle_ps(z[2 * i], z[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(z[2 * i], z[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  // element 4l + p: the sum of v[4p + l]; put the sum of v[j] at element j
  const __m512 s = _mm512_add_ps(_mm512_shuffle_ps(t[0], t[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm512_shuffle_ps(t[0], t[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512i idx = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(idx, s);
}
inline vfloat vabs(vfloat x) { return _mm512_abs_ps(x); }
inline vfloat vdiv(vfloat a, vfloat b) { return _mm512_div_ps(a, b); }
// |m| with the sign of s
inline vfloat vcopysign(vfloat m, vfloat s) {
  const __m512i sign = _mm512_set1_epi32(static_cast<int32_t>(0x80000000u));
  return _mm512_castsi512_ps(_mm512_or_si512(_mm512_andnot_si512(sign, _mm512_castps_si512(m)),
                                             _mm512_and_si512(sign, _mm512_castps_si512(s))));
}
#elif defined(__AVX2__) && defined(__FMA__)
#define INFLLM_SIMD_WIDTH 8
using vfloat = __m256;
inline vfloat vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, vfloat x) { _mm256_storeu_ps(p, x); }
inline vfloat vset1(float x) { return _mm256_set1_ps(x); }
inline vfloat vmul(vfloat a, vfloat b) { return _mm256_mul_ps(a, b); }
inline vfloat vadd(vfloat a, vfloat b) { return _mm256_add_ps(a, b); }
inline vfloat vsub(vfloat a, vfloat b) { return _mm256_sub_ps(a, b); }
inline vfloat vfma(vfloat a, vfloat b, vfloat c) { return _mm256_fmadd_ps(a, b, c); }
inline vfloat vmax(vfloat a, vfloat b) { return _mm256_max_ps(a, b); }
inline vfloat vmax_sticky(vfloat best, vfloat x) {
  return _mm256_blendv_ps(_mm256_max_ps(x, best), x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}
inline float vsum(vfloat a) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  return _mm_cvtss_f32(h);
}
inline vfloat vround(vfloat x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline vfloat vpow2i(vfloat p, vfloat n) {  // p * 2^n: n added to the exponent bits
  const __m256i e = _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23);
  return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), e));
}
inline vfloat vkeep_range(vfloat x, vfloat o, vfloat lo, vfloat hi, float fill) {
  const __m256 in = _mm256_and_ps(_mm256_cmp_ps(lo, o, _CMP_LE_OQ), _mm256_cmp_ps(o, hi, _CMP_LT_OQ));
  return _mm256_blendv_ps(_mm256_set1_ps(fill), x, in);
}
inline vfloat vreplace_eq(vfloat x, float value, float rep) {
  return _mm256_blendv_ps(x, _mm256_set1_ps(rep), _mm256_cmp_ps(x, _mm256_set1_ps(value), _CMP_EQ_OQ));
}
// Lane j of the result = the sum of v[j]'s lanes, j < 8.
inline vfloat vsum_each(const vfloat* v) {
  __m256 w[4], t[2];
  for (int i = 0; i < 4; ++i)  // 128-bit lane 0: v[2i]'s halves summed; lane 1: v[2i+1]'s
    w[i] = _mm256_add_ps(_mm256_permute2f128_ps(v[2 * i], v[2 * i + 1], 0x20),
                         _mm256_permute2f128_ps(v[2 * i], v[2 * i + 1], 0x31));
  for (int i = 0; i < 2; ++i)  // lane L: 2 partial sums of v[4i + L], then 2 of v[4i + 2 + L]
    t[i] = _mm256_add_ps(_mm256_shuffle_ps(w[2 * i], w[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm256_shuffle_ps(w[2 * i], w[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  // element 4L + p: the sum of v[2p + L]; put the sum of v[j] at element j
  const __m256 s = _mm256_add_ps(_mm256_shuffle_ps(t[0], t[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm256_shuffle_ps(t[0], t[1], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm256_permutevar8x32_ps(s, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}
inline vfloat vabs(vfloat x) { return _mm256_andnot_ps(_mm256_set1_ps(-0.f), x); }
inline vfloat vdiv(vfloat a, vfloat b) { return _mm256_div_ps(a, b); }
inline vfloat vcopysign(vfloat m, vfloat s) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  return _mm256_or_ps(_mm256_andnot_ps(sign, m), _mm256_and_ps(sign, s));
}
#else
#define INFLLM_SIMD_WIDTH 0
#endif

#if INFLLM_SIMD_WIDTH
constexpr int kW = INFLLM_SIMD_WIDTH;

// exp_neg on every lane (the same polynomial, so vector and scalar tails agree).
inline vfloat vexp_neg(vfloat x) {
  x = vmax(vset1(kExpFloor), x);  // max returns its second operand for a NaN: NaN stays NaN
  const vfloat n = vround(vmul(x, vset1(kLog2e)));
  vfloat r = vfma(n, vset1(-kLn2Hi), x);
  r = vfma(n, vset1(-kLn2Lo), r);
  vfloat p = vset1(1.f / 720.f);
  p = vfma(p, r, vset1(1.f / 120.f));
  p = vfma(p, r, vset1(1.f / 24.f));
  p = vfma(p, r, vset1(1.f / 6.f));
  p = vfma(p, r, vset1(0.5f));
  p = vfma(p, r, vset1(1.f));
  p = vfma(p, r, vset1(1.f));
  return vpow2i(p, n);
}

// Logit soft-capping on every lane: cap * tanh(x / cap), tanh(y) = (1 - e^-2|y|) / (1 + e^-2|y|)
// with y's sign (the scalar form in attend.cpp's per-row kernel).
inline vfloat vsoftcap(vfloat x, float cap) {
  const vfloat y = vdiv(x, vset1(cap));
  const vfloat e = vexp_neg(vmul(vabs(y), vset1(-2.f)));
  const vfloat th = vdiv(vsub(vset1(1.f), e), vadd(vset1(1.f), e));
  return vmul(vcopysign(th, y), vset1(cap));
}
#endif

// <a, b> over n floats: the inner loop of every logit. Written with intrinsics where the
// machine has them (the compiler's own vectorisation of this reduction ends in a scalar
// horizontal sum, which cost a third of a decode step), portable loop otherwise.
inline float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  int64_t i = 0;
  float s = 0.f;
#if defined(__AVX512F__)
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  for (; i + 32 <= n; i += 32) {
    acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc0);
    acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), acc1);
  }
  for (; i + 16 <= n; i += 16) acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc0);
  s = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
#elif defined(__AVX2__) && defined(__FMA__)
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
  const __m256 v = _mm256_add_ps(acc0, acc1);
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  s = _mm_cvtss_f32(h);
#else
  float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
  for (; i + 4 <= n; i += 4) {
    s0 += a[i] * b[i];
    s1 += a[i + 1] * b[i + 1];
    s2 += a[i + 2] * b[i + 2];
    s3 += a[i + 3] * b[i + 3];
  }
  s = (s0 + s1) + (s2 + s3);
#endif
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

}  // namespace infllm
