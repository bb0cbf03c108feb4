// Weight-streaming matmuls for decode on a CPU: y = x @ W^T for a few rows of x.
//
// A decode step multiplies one token (or a few: speculative verification) by every weight
// matrix, so it is bound by how fast the weights stream from memory. ATen's packed int8 / int4
// kernels and its float GEMV reach a third to a half of this machine's read bandwidth at one
// row; these loops read each weight once, convert it in registers and keep up to four rows'
// accumulators. Built by llmcompile.ops.kernels at first use with -march=native (AVX-512 or
// AVX2 paths below, a scalar loop elsewhere). Larger x (prefill) goes to ATen.
#include <ATen/ATen.h>
#include <torch/library.h>
#include <ATen/Parallel.h>

#include <cstring>
#include <vector>

#include "vec.h"

namespace {

using namespace llmcompile_cpu;

constexpr int64_t MAX_ROWS = 4;  // rows of x per pass over a weight row

// sum over k of x[m, k] * w(k) for R rows of x, w converted 2V at a time by load(k, w0, w1);
// two accumulators per row hide the FMA latency
template <int R, typename Load>
inline void dot_rows(const float* x, int64_t ldx, int64_t K, Load load, float* out) {
  vec a0[R], a1[R];
  for (int m = 0; m < R; ++m) a0[m] = a1[m] = vzero();
  for (int64_t k = 0; k < K; k += 2 * V) {
    vec w0, w1;
    load(k, w0, w1);
    for (int m = 0; m < R; ++m) {
      a0[m] = vfma(vload(x + m * ldx + k), w0, a0[m]);
      a1[m] = vfma(vload(x + m * ldx + k + V), w1, a1[m]);
    }
  }
  for (int m = 0; m < R; ++m) out[m] = vsum(vadd(a0[m], a1[m]));
}

// calls f.template operator()<R>() with R = rows as a compile-time constant
template <typename F>
inline void with_rows(int64_t rows, F&& f) {
  switch (rows) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    default: f(std::integral_constant<int, 4>{}); break;
  }
}

void check(const at::Tensor& x, const at::Tensor& w, int64_t k_per_row) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "llmcompile_cpu: x must be a contiguous float32 [M, K] matrix");
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.size(1) * k_per_row == x.size(1),
              "llmcompile_cpu: weight [N, K] does not match x's K");
  TORCH_CHECK(x.size(1) % (2 * V) == 0, "llmcompile_cpu: K must be a multiple of ", 2 * V);
}

// y [M, N] from per-row dot products: rows of x in blocks of MAX_ROWS, weight rows in parallel
template <typename RowDot>
at::Tensor rows_times_weights(const at::Tensor& x, int64_t N, RowDot row_dot) {
  const int64_t M = x.size(0);
  auto y = at::empty({M, N}, x.options());
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    float out[MAX_ROWS];
    for (int64_t m0 = 0; m0 < M; m0 += MAX_ROWS) {
      const int64_t rows = std::min(MAX_ROWS, M - m0);
      for (int64_t n = n0; n < n1; ++n) {
        row_dot(m0, rows, n, out);
        for (int64_t m = 0; m < rows; ++m) yp[(m0 + m) * N + n] = out[m];
      }
    }
  });
  return y;
}

}  // namespace

namespace {

// y = x @ W^T for a dense weight [N, K] of float32 or int8, times a per-row scale if given
template <typename T>
at::Tensor dense_linear(const at::Tensor& x, const T* wp, int64_t N, const float* scales) {
  const int64_t K = x.size(1);
  const float* xp = x.data_ptr<float>();
  return rows_times_weights(x, N, [&](int64_t m0, int64_t rows, int64_t n, float* out) {
    const T* wr = wp + n * K;
    with_rows(rows, [&](auto r) {
      dot_rows<r>(xp + m0 * K, K, K, [&](int64_t k, vec& w0, vec& w1) {
        w0 = vconv(wr + k);
        w1 = vconv(wr + k + V);
      }, out);
    });
    if (scales != nullptr)
      for (int64_t m = 0; m < rows; ++m) out[m] *= scales[n];
  });
}

}  // namespace

// float32 weight [N, K]
at::Tensor linear_f32(const at::Tensor& x, const at::Tensor& w) {
  check(x, w, 1);
  return dense_linear(x, w.data_ptr<float>(), w.size(0), nullptr);
}

// int8 weight [N, K], per-row scales [N] (float32): w = q * scale
at::Tensor linear_int8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales) {
  check(x, w, 1);
  TORCH_CHECK(w.scalar_type() == at::kChar && scales.scalar_type() == at::kFloat &&
              scales.is_contiguous() && scales.numel() == w.size(0),
              "llmcompile_cpu: int8 weight and float32 scales [N]");
  return dense_linear(x, w.data_ptr<int8_t>(), w.size(0), scales.data_ptr<float>());
}

// int4 weight as bytes [N, K/2]: in group g (G values along K), byte j holds value j (low
// nibble) and value j + G/2 (high nibble); w = q * scale[n, g] + low[n, g] (float16 [N, K/G]:
// 4 bytes per group of 64 instead of 8 in float32, a tenth of what the weight streams).
// x is quantized to int8 per (row, group) (as llama.cpp's Q8 activations) so a group's sum of
// q * x is an exact integer dot product (VNNI, or AVX2's maddubs): y = sum over groups of
// scale * x_scale * sum(q * xq) + low * sum(x).
namespace {

#if defined(__AVX2__)
constexpr int64_t CHUNK = 32;  // bytes of q per step: 64 int4 values
inline __m256i dot_u8s8(__m256i acc, __m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(acc, u, s);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(acc, u, s);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s),
                                                 _mm256_set1_epi16(1)));
#endif
}
inline float hsum8(__m256 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(s);
}

// one weight row (NG groups of H bytes) times R quantized rows of x
template <int R>
inline void int4_row(const uint8_t* qr, const int8_t* xq, const float* xsc, const float* xsum,
                     const at::Half* sr, const at::Half* lr, int64_t K, int64_t NG, int64_t H,
                     float* out) {
  const int64_t G = 2 * H;
  const __m256i mask = _mm256_set1_epi8(15);
  __m256 total[R];
  for (int m = 0; m < R; ++m) total[m] = _mm256_setzero_ps();
  for (int64_t g = 0; g < NG; ++g) {
    __m256i acc[R];
    for (int m = 0; m < R; ++m) acc[m] = _mm256_setzero_si256();
    for (int64_t j = 0; j < H; j += CHUNK) {
      const __m256i b = _mm256_loadu_si256((const __m256i*)(qr + g * H + j));
      const __m256i lo = _mm256_and_si256(b, mask);
      const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), mask);
      for (int m = 0; m < R; ++m) {
        const int8_t* xg = xq + m * K + g * G + j;
        acc[m] = dot_u8s8(acc[m], lo, _mm256_loadu_si256((const __m256i*)xg));
        acc[m] = dot_u8s8(acc[m], hi, _mm256_loadu_si256((const __m256i*)(xg + H)));
      }
    }
    for (int m = 0; m < R; ++m)
      total[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[m]),
                                 _mm256_set1_ps(h2f(sr[g]) * xsc[m * NG + g]), total[m]);
  }
  for (int m = 0; m < R; ++m) {
    float acc = hsum8(total[m]);
    for (int64_t g = 0; g < NG; ++g) acc += h2f(lr[g]) * xsum[m * NG + g];
    out[m] = acc;
  }
}
#else
constexpr int64_t CHUNK = 1;
template <int R>
inline void int4_row(const uint8_t* qr, const int8_t* xq, const float* xsc, const float* xsum,
                     const at::Half* sr, const at::Half* lr, int64_t K, int64_t NG, int64_t H,
                     float* out) {
  const int64_t G = 2 * H;
  for (int m = 0; m < R; ++m) {
    float total = 0.f;
    for (int64_t g = 0; g < NG; ++g) {
      int32_t acc = 0;
      for (int64_t j = 0; j < H; ++j) {
        const int8_t* xg = xq + m * K + g * G + j;
        acc += (qr[g * H + j] & 15) * xg[0] + (qr[g * H + j] >> 4) * xg[H];
      }
      total += acc * h2f(sr[g]) * xsc[m * NG + g] + h2f(lr[g]) * xsum[m * NG + g];
    }
    out[m] = total;
  }
}
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
constexpr bool PAIRS = true;
// Groups of 64 two at a time in 512-bit registers: 64 bytes of q hold groups g and g + 1
// ([g: 0..31 | g+1: 0..31], low nibbles = their first halves, high = their second halves), and
// the quantized x of a pair is laid out to match ([g lo | g+1 lo | g hi | g+1 hi], see
// x_offset); lanes 0-7 of the dot products are group g, 8-15 group g + 1, each scaled by its
// own (weight scale x activation scale). Half the instructions of one group at a time. An odd
// last group goes through 256-bit registers (its x in natural order).
template <int R>
inline void int4_row_pairs(const uint8_t* qr, const int8_t* xq, const float* xsc,
                           const float* xsum, const at::Half* sr, const at::Half* lr, int64_t K,
                           int64_t NG, float* out) {
  const __m512i mask = _mm512_set1_epi8(15);
  const __m512i blocks = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  __m512 total[R];
  float tail[R];
  for (int m = 0; m < R; ++m) {
    total[m] = _mm512_setzero_ps();
    tail[m] = 0.f;
  }
  int64_t g = 0;
  for (; g + 2 <= NG; g += 2) {
    const __m512i b = _mm512_loadu_si512(qr + g * 32);
    const __m512i lo = _mm512_and_si512(b, mask);
    const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), mask);
    int32_t s2;
    std::memcpy(&s2, sr + g, 4);
    const __m128 ws = _mm_cvtph_ps(_mm_cvtsi32_si128(s2));
    for (int m = 0; m < R; ++m) {
      const int8_t* xg = xq + m * K + g * 64;
      __m512i acc = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(xg));
      acc = _mm512_dpbusd_epi32(acc, hi, _mm512_loadu_si512(xg + 64));
      const __m128 xs = _mm_castpd_ps(_mm_load_sd((const double*)(xsc + m * NG + g)));
      const __m512 both = _mm512_permutexvar_ps(blocks,
                                                _mm512_castps128_ps512(_mm_mul_ps(ws, xs)));
      total[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), both, total[m]);
    }
  }
  if (g < NG) {
    const __m256i mask8 = _mm256_set1_epi8(15);
    const __m256i b = _mm256_loadu_si256((const __m256i*)(qr + g * 32));
    const __m256i lo = _mm256_and_si256(b, mask8);
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), mask8);
    for (int m = 0; m < R; ++m) {
      const int8_t* xg = xq + m * K + g * 64;
      __m256i acc = dot_u8s8(_mm256_setzero_si256(), lo, _mm256_loadu_si256((const __m256i*)xg));
      acc = dot_u8s8(acc, hi, _mm256_loadu_si256((const __m256i*)(xg + 32)));
      tail[m] = hsum8(_mm256_cvtepi32_ps(acc)) * h2f(sr[g]) * xsc[m * NG + g];
    }
  }
  for (int m = 0; m < R; ++m) {
    float acc = _mm512_reduce_add_ps(total[m]) + tail[m];
    for (int64_t gg = 0; gg < NG; ++gg) acc += h2f(lr[gg]) * xsum[m * NG + gg];
    out[m] = acc;
  }
}
#else
constexpr bool PAIRS = false;
template <int R>
inline void int4_row_pairs(const uint8_t*, const int8_t*, const float*, const float*,
                           const at::Half*, const at::Half*, int64_t, int64_t, float*) {}
#endif

// where value j of group g (of 64) of a row of x goes in the pair layout (see int4_row_pairs)
inline int64_t x_offset(int64_t g, int64_t j, int64_t NG) {
  if (g == NG - 1 && NG % 2) return g * 64 + j;  // an odd last group: natural order
  return (g / 2) * 128 + (j / 32) * 64 + (g % 2) * 32 + j % 32;
}

// rows of x [M, K] to int8 per group of G (scale amax / 127, nearest even as
// std::nearbyint), in the pair layout when `pairs`; the groups' scales and float sums
void quantize_groups(const float* xp, int64_t M, int64_t K, int64_t G, bool pairs, int8_t* xq,
                     float* xsc, float* xsum) {
  const int64_t NG = K / G;
  for (int64_t i = 0; i < M * NG; ++i) {
    const float* xg = xp + i * G;
    vec amax = vzero(), sum = vzero();
    for (int64_t j = 0; j < G; j += V) {
      const vec a = vload(xg + j);
      amax = vmax(amax, vabs(a));
      sum = vadd(sum, a);
    }
    float m = 0.f;
    alignas(64) float lanes[V];
    vstore(lanes, amax);
    for (int l = 0; l < V; ++l) m = std::max(m, lanes[l]);
    const float sc = m > 0.f ? m / 127.f : 1.f;
    const vec inv = vset(1.f / sc);
    const int64_t row = i / NG, g = i % NG;
    for (int64_t j = 0; j < G; j += V)  // V <= 32 values stay contiguous in either layout
      vstore_i8(xq + (pairs ? row * K + x_offset(g, j, NG) : i * G + j),
                vmul(vload(xg + j), inv));
    xsc[i] = sc;
    xsum[i] = vsum(sum);
  }
}

}  // namespace

at::Tensor linear_int4(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale,
                       const at::Tensor& low, int64_t G) {
  check(x, q, 2);
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  TORCH_CHECK(q.scalar_type() == at::kByte && G % (2 * CHUNK) == 0 && K % G == 0,
              "llmcompile_cpu: int4 bytes [N, K/2] with a group size that is a multiple of ",
              2 * CHUNK);
  const int64_t NG = K / G, H = G / 2;
  TORCH_CHECK(scale.is_contiguous() && low.is_contiguous() && scale.numel() == N * NG &&
              low.numel() == N * NG && scale.scalar_type() == at::kHalf &&
              low.scalar_type() == at::kHalf, "llmcompile_cpu: float16 scale / low [N, K/G]");
  // x per (row, group): int8 values, their scale and the group's float sum (buffers kept per
  // calling thread: no allocation per call)
  thread_local std::vector<int8_t> xq;
  thread_local std::vector<float> xsc, xsum;
  xq.resize(M * K);
  xsc.resize(M * NG);
  xsum.resize(M * NG);
  int8_t* xqp = xq.data();
  float* xscp = xsc.data();
  float* xsp = xsum.data();
  quantize_groups(x.data_ptr<float>(), M, K, G, PAIRS && G == 64, xqp, xscp, xsp);
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const at::Half* sp = scale.data_ptr<at::Half>();
  const at::Half* lp = low.data_ptr<at::Half>();
  return rows_times_weights(x, N, [&](int64_t m0, int64_t rows, int64_t n, float* out) {
    with_rows(rows, [&](auto r) {
      if (PAIRS && G == 64)
        int4_row_pairs<r>(qp + n * (K / 2), xqp + m0 * K, xscp + m0 * NG, xsp + m0 * NG,
                          sp + n * NG, lp + n * NG, K, NG, out);
      else
        int4_row<r>(qp + n * (K / 2), xqp + m0 * K, xscp + m0 * NG, xsp + m0 * NG,
                    sp + n * NG, lp + n * NG, K, NG, H, out);
    });
  });
}

int64_t vector_width() { return V; }

TORCH_LIBRARY(llmcompile_cpu, m) {
  m.def("linear_f32(Tensor x, Tensor w) -> Tensor");
  m.def("linear_int8(Tensor x, Tensor w, Tensor scales) -> Tensor");
  m.def("linear_int4(Tensor x, Tensor q, Tensor scale, Tensor low, int group_size) -> Tensor");
  m.def("vector_width() -> int");
}

TORCH_LIBRARY_IMPL(llmcompile_cpu, CPU, m) {
  m.impl("linear_f32", linear_f32);
  m.impl("linear_int8", linear_int8);
  m.impl("linear_int4", linear_int4);
}

TORCH_LIBRARY_IMPL(llmcompile_cpu, CompositeExplicitAutograd, m) {
  m.impl("vector_width", vector_width);
}
