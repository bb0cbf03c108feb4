// Attention of a few query rows over a KV cache (a decode step, a draft, a verification):
//   out[b, h, s] = softmax(q[b, h, s] . k[b, h / g, t] * scale + mask[b, h, s, t]) @ v[b, h / g]
// over the keys t that the mask (False or -inf) and causality (bottom-right aligned) keep;
// the others are never read, so a static cache costs only the positions in use. Query heads
// share KV heads in groups of g = H / H_kv (grouped-query attention, no copies). float32.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "vec.h"

namespace {

using namespace llmcompile_cpu;

inline float dot(const float* a, const float* b, int64_t D) {
  vec acc = vzero();
  int64_t d = 0;
  for (; d + V <= D; d += V) acc = vfma(vload(a + d), vload(b + d), acc);
  float s = vsum(acc);
  for (; d < D; ++d) s += a[d] * b[d];
  return s;
}

inline void axpy(float a, const float* x, float* y, int64_t D) {  // y += a x
  const vec va = vset(a);
  int64_t d = 0;
  for (; d + V <= D; d += V) vstore(y + d, vfma(va, vload(x + d), vload(y + d)));
  for (; d < D; ++d) y[d] += a * x[d];
}

// p[t] = exp(p[t] - mx) in place (0 for -inf); returns their sum
inline float exp_shifted(float* p, int64_t n, float mx) {
  const vec shift = vset(-mx);
  vec acc = vzero();
  int64_t t = 0;
  for (; t + V <= n; t += V) {
    const vec e = vexp(vadd(vload(p + t), shift));
    vstore(p + t, e);
    acc = vadd(acc, e);
  }
  float sum = vsum(acc);
  for (; t < n; ++t) {
    p[t] = std::isinf(p[t]) ? 0.f : std::exp(p[t] - mx);
    sum += p[t];
  }
  return sum;
}

}  // namespace

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const c10::optional<at::Tensor>& mask, double scale, bool causal) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "llmcompile_cpu.decode_attention: q, k, v must be [B, H, S, D]");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat &&
              v.scalar_type() == at::kFloat, "llmcompile_cpu.decode_attention: float32 only");
  const int64_t B = q.size(0), H = q.size(1), S = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), T = k.size(2), Dv = v.size(3);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && v.size(1) == Hkv && v.size(2) == T &&
              k.size(3) == D && Hkv > 0 && H % Hkv == 0,
              "llmcompile_cpu.decode_attention: k / v [B, H_kv, T, D] do not match q");
  const auto qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  at::Tensor m;
  bool bool_mask = false;
  if (mask.has_value() && mask->defined()) {
    TORCH_CHECK(mask->dim() <= 4 && (mask->scalar_type() == at::kBool ||
                                     mask->scalar_type() == at::kFloat),
                "llmcompile_cpu.decode_attention: the mask must be bool or float32, <= 4-d");
    m = mask->expand({B, H, S, T});  // strides of 0 where it broadcasts
    bool_mask = m.scalar_type() == at::kBool;
  }
  auto out = at::empty({B, H, S, Dv}, q.options());
  const float* qp = qc.data_ptr<float>();
  const float* kp = kc.data_ptr<float>();
  const float* vp = vc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const bool* mb = m.defined() && bool_mask ? m.data_ptr<bool>() : nullptr;
  const float* mf = m.defined() && !bool_mask ? m.data_ptr<float>() : nullptr;
  const int64_t ms0 = m.defined() ? m.stride(0) : 0, ms1 = m.defined() ? m.stride(1) : 0;
  const int64_t ms2 = m.defined() ? m.stride(2) : 0, ms3 = m.defined() ? m.stride(3) : 0;
  const int64_t group = H / Hkv;
  const float minus_inf = -std::numeric_limits<float>::infinity();
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, B * H * S, 1, [&](int64_t r0, int64_t r1) {
    std::vector<float> p(T);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t s = r % S, h = (r / S) % H, b = r / (S * H);
      const float* qr = qp + r * D;
      const float* kh = kp + (b * Hkv + h / group) * T * D;
      const float* vh = vp + (b * Hkv + h / group) * T * Dv;
      const int64_t keys = causal ? std::min(T, std::max<int64_t>(0, s + T - S + 1)) : T;
      const int64_t mrow = b * ms0 + h * ms1 + s * ms2;
      float mx = minus_inf;
      for (int64_t t = 0; t < keys; ++t) {
        float add = 0.f;
        if (mb != nullptr && !mb[mrow + t * ms3]) {
          p[t] = minus_inf;
          continue;
        }
        if (mf != nullptr) {
          add = mf[mrow + t * ms3];
          if (std::isinf(add) && add < 0) {
            p[t] = minus_inf;
            continue;
          }
        }
        p[t] = dot(qr, kh + t * D, D) * sc + add;
        mx = std::max(mx, p[t]);
      }
      float* o = op + r * Dv;
      std::fill(o, o + Dv, 0.f);
      if (mx == minus_inf) continue;  // no key kept: zeros, as SDPA's CPU kernels give
      const float sum = exp_shifted(p.data(), keys, mx);
      for (int64_t t = 0; t < keys; ++t)
        if (p[t] != 0.f) axpy(p[t], vh + t * Dv, o, Dv);
      const vec inv = vset(1.f / sum);
      int64_t d = 0;
      for (; d + V <= Dv; d += V) vstore(o + d, vmul(vload(o + d), inv));
      for (; d < Dv; ++d) o[d] /= sum;
    }
  });
  return out;
}

TORCH_LIBRARY_FRAGMENT(llmcompile_cpu, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, "
        "bool causal) -> Tensor");
}

TORCH_LIBRARY_IMPL(llmcompile_cpu, CPU, m) {
  m.impl("decode_attention", decode_attention);
}
