// Vector helpers shared by llmcompile's CPU kernels: one float vector type `vec` of V lanes,
// chosen when the kernels are built (-march=native): AVX-512 (16), AVX2 (8) or scalar (1).
#pragma once

#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace llmcompile_cpu {

#if defined(__AVX512F__)
constexpr int V = 16;
using vec = __m512;
inline vec vzero() { return _mm512_setzero_ps(); }
inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, vec a) { _mm512_storeu_ps(p, a); }
inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
inline vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
inline vec vmul(vec a, vec b) { return _mm512_mul_ps(a, b); }
inline vec vmax(vec a, vec b) { return _mm512_max_ps(a, b); }
inline vec vmin(vec a, vec b) { return _mm512_min_ps(a, b); }
inline vec vset(float a) { return _mm512_set1_ps(a); }
inline float vsum(vec a) { return _mm512_reduce_add_ps(a); }
inline vec vi8(const int8_t* p) {  // V signed bytes -> floats
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
}
inline vec vround_down(vec a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEG_INF); }
inline vec vpow2i(vec n) {  // 2^n for integral n in [-126, 127]
  __m512i e = _mm512_add_epi32(_mm512_cvttps_epi32(n), _mm512_set1_epi32(127));
  return _mm512_castsi512_ps(_mm512_slli_epi32(e, 23));
}
inline vec vzero_below(vec x, vec r, float lo) {  // r where x >= lo, else 0
  return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, vset(lo), _CMP_GE_OQ), r);
}
inline vec vabs(vec a) { return _mm512_abs_ps(a); }
inline void vstore_i8(int8_t* p, vec a) {  // rounded to nearest even, saturated, V bytes
  _mm_storeu_si128((__m128i*)p, _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(a)));
}
#elif defined(__AVX2__)
constexpr int V = 8;
using vec = __m256;
inline vec vzero() { return _mm256_setzero_ps(); }
inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, vec a) { _mm256_storeu_ps(p, a); }
inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
inline vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
inline vec vmul(vec a, vec b) { return _mm256_mul_ps(a, b); }
inline vec vmax(vec a, vec b) { return _mm256_max_ps(a, b); }
inline vec vmin(vec a, vec b) { return _mm256_min_ps(a, b); }
inline vec vset(float a) { return _mm256_set1_ps(a); }
inline float vsum(vec a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(s);
}
inline vec vi8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}
inline vec vround_down(vec a) { return _mm256_floor_ps(a); }
inline vec vpow2i(vec n) {
  __m256i e = _mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127));
  return _mm256_castsi256_ps(_mm256_slli_epi32(e, 23));
}
inline vec vzero_below(vec x, vec r, float lo) {
  return _mm256_and_ps(r, _mm256_cmp_ps(x, vset(lo), _CMP_GE_OQ));
}
inline vec vabs(vec a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.f), a); }
inline void vstore_i8(int8_t* p, vec a) {
  const __m256i i = _mm256_cvtps_epi32(a);
  const __m128i s16 = _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
  _mm_storel_epi64((__m128i*)p, _mm_packs_epi16(s16, s16));
}
#else
constexpr int V = 1;
using vec = float;
inline vec vzero() { return 0.f; }
inline vec vload(const float* p) { return *p; }
inline void vstore(float* p, vec a) { *p = a; }
inline vec vfma(vec a, vec b, vec c) { return a * b + c; }
inline vec vadd(vec a, vec b) { return a + b; }
inline vec vmul(vec a, vec b) { return a * b; }
inline vec vmax(vec a, vec b) { return a > b ? a : b; }
inline vec vmin(vec a, vec b) { return a < b ? a : b; }
inline vec vset(float a) { return a; }
inline float vsum(vec a) { return a; }
inline vec vi8(const int8_t* p) { return (float)*p; }
inline vec vround_down(vec a) { return std::floor(a); }
inline vec vpow2i(vec n) { return std::ldexp(1.f, (int)n); }
inline vec vzero_below(vec x, vec r, float lo) { return x >= lo ? r : 0.f; }
inline vec vabs(vec a) { return std::fabs(a); }
inline void vstore_i8(int8_t* p, vec a) {
  *p = (int8_t)std::fmax(-128.f, std::fmin(127.f, std::nearbyint(a)));
}
#endif

inline float h2f(c10::Half h) {  // one float16 -> float32 (one instruction with F16C)
#if defined(__F16C__)
  return _cvtsh_ss(h.x);
#else
  return static_cast<float>(h);
#endif
}

// V consecutive weights as floats, whatever their storage
inline vec vconv(const float* p) { return vload(p); }
inline vec vconv(const int8_t* p) { return vi8(p); }

// e^x, relative error ~2e-7 (Cephes' polynomial on x - n ln 2); 0 below -87 (and for -inf)
inline vec vexp(vec x) {
  const vec xs = vmin(vmax(x, vset(-87.f)), vset(88.f));
  const vec n = vround_down(vfma(xs, vset(1.44269504088896341f), vset(0.5f)));
  vec r = vfma(n, vset(-0.693359375f), xs);
  r = vfma(n, vset(2.12194440e-4f), r);
  vec p = vset(1.9875691500e-4f);
  p = vfma(p, r, vset(1.3981999507e-3f));
  p = vfma(p, r, vset(8.3334519073e-3f));
  p = vfma(p, r, vset(4.1665795894e-2f));
  p = vfma(p, r, vset(1.6666665459e-1f));
  p = vfma(p, r, vset(5.0000001201e-1f));
  p = vfma(p, vmul(r, r), vadd(r, vset(1.f)));
  return vzero_below(x, vmul(p, vpow2i(n)), -87.f);
}

}  // namespace llmcompile_cpu
