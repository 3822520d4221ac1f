// ogpsa._C: the projected AdamW step (update-space OGPSA), CPU kernel.
//
//   projected_adamw_(params!, grads, exp_avgs!, exp_avg_sqs!, max_exp_avg_sqs!, bases, m_invs,
//                    steps, lr, beta1, beta2, eps, weight_decay, maximize, project_weight_decay)
//       -> [T, 2] fp64 (||d_i||^2 before projection, ||U_i^T w_i||^2 removed)
//
// Per tensor i (orthogonal rule, per-tensor scope; the math of
// ogpsa.reference.projected_adamw_step_):
//   pass 1: m, v (and max v) from the raw gradient, written once; d = m_hat/(sqrt(v_hat)+eps)
//           (+ wd p when the decay is projected); c = U d and ||d||^2 accumulated
//   host:   w = M^{-1} c (k x k, M^{-1} given in fp32)
//   pass 2: d recomputed from the stored moments (elementwise, no moment writes),
//           p <- p (1 - lr wd) [decoupled] - lr (d - U^T w)
// Tensors are processed one after another, so a tensor that fits in cache is still there
// for pass 2 (the single pass over memory the design asks for small tensors).
// Params/grads: float32, bfloat16 or float16 (same dtype); moments float32; basis float32 or
// bfloat16. Determinism: fixed-size chunks independent of the thread count, partial sums
// per chunk reduced in chunk order in fp64.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "dispatch.h"

#include <cmath>
#include <cstdint>
#include <vector>

namespace ogpsa {
namespace {

constexpr int64_t kChunk = 16384;
constexpr int kMaxK = 16;

struct Hyper {
  // 1 - beta in double, then rounded: 1 - (float)0.999 is off by 1.3e-5 relative
  float beta1, beta2, one_minus_beta1, one_minus_beta2, eps, bc1, bc2_sqrt, lr, wd;
  bool maximize, project_wd;
};

template <typename P, typename U>
void step_tensor(const at::Tensor& p_t, const at::Tensor& g_t, const at::Tensor& m_t, const at::Tensor& v_t,
                 const at::Tensor* vmax_t, const at::Tensor& u_t, const at::Tensor& minv_t, const Hyper& h,
                 double* stats) {
  const int64_t n = p_t.numel();
  const int64_t k = u_t.size(0);
  P* p = p_t.data_ptr<P>();
  const P* g = g_t.data_ptr<P>();
  float* m = m_t.data_ptr<float>();
  float* v = v_t.data_ptr<float>();
  float* vmax = vmax_t ? vmax_t->data_ptr<float>() : nullptr;
  const U* u = k ? u_t.data_ptr<U>() : nullptr;
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
  std::vector<double> part(static_cast<size_t>(nchunks) * (k + 1), 0.0);

  auto direction = [&](int64_t e) -> float {
    const float vv = vmax ? vmax[e] : v[e];
    float d = (m[e] / h.bc1) / (std::sqrt(vv) / h.bc2_sqrt + h.eps);
    if (h.project_wd) d += h.wd * static_cast<float>(p[e]);
    return d;
  };

  // pass 1: moments (written once), d, c = U d, ||d||^2
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t a = c * kChunk, b = std::min(n, a + kChunk);
      float acc[kMaxK + 1] = {0};
      for (int64_t e = a; e < b; ++e) {
        float gg = static_cast<float>(g[e]);
        if (h.maximize) gg = -gg;
        m[e] += h.one_minus_beta1 * (gg - m[e]);  // lerp, as torch's AdamW
        v[e] = v[e] * h.beta2 + h.one_minus_beta2 * gg * gg;
        if (vmax) vmax[e] = std::max(vmax[e], v[e]);
        const float d = direction(e);
        for (int64_t j = 0; j < k; ++j) acc[j] += static_cast<float>(u[j * n + e]) * d;
        acc[k] += d * d;
      }
      for (int64_t j = 0; j <= k; ++j) part[c * (k + 1) + j] = acc[j];
    }
  });
  double cs[kMaxK + 1] = {0};
  for (int64_t c = 0; c < nchunks; ++c)
    for (int64_t j = 0; j <= k; ++j) cs[j] += part[c * (k + 1) + j];
  float w[kMaxK] = {0};
  const float* minv = k ? minv_t.data_ptr<float>() : nullptr;
  for (int64_t a = 0; a < k; ++a) {
    double s = 0;
    for (int64_t b = 0; b < k; ++b) s += static_cast<double>(minv[a * k + b]) * cs[b];
    w[a] = static_cast<float>(s);
  }

  // pass 2: recompute d, subtract U^T w, write p; ||U^T w||^2 per chunk
  const float shrink = h.project_wd ? 1.0f : 1.0f - h.lr * h.wd;
  std::fill(part.begin(), part.end(), 0.0);
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t a = c * kChunk, b = std::min(n, a + kChunk);
      float rem = 0;
      for (int64_t e = a; e < b; ++e) {
        float sub = 0;
        for (int64_t j = 0; j < k; ++j) sub += static_cast<float>(u[j * n + e]) * w[j];
        const float d = direction(e) - sub;
        rem += sub * sub;
        p[e] = static_cast<P>(static_cast<float>(p[e]) * shrink - h.lr * d);
      }
      part[c * (k + 1)] = rem;
    }
  });
  double removed = 0;
  for (int64_t c = 0; c < nchunks; ++c) removed += part[c * (k + 1)];
  stats[0] = cs[k];
  stats[1] = removed;
}

at::Tensor projected_adamw_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                               at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList bases,
                               at::TensorList m_invs, at::IntArrayRef steps, double lr, double beta1, double beta2,
                               double eps, double weight_decay, bool maximize, bool project_weight_decay) {
  const size_t T = params.size();
  TORCH_CHECK(grads.size() == T && exp_avgs.size() == T && exp_avg_sqs.size() == T && bases.size() == T &&
                  m_invs.size() == T && steps.size() == T,
              "ogpsa::projected_adamw_: params, grads, exp_avgs, exp_avg_sqs, bases, m_invs and steps must have "
              "one entry per tensor");
  TORCH_CHECK(max_exp_avg_sqs.empty() || max_exp_avg_sqs.size() == T,
              "ogpsa::projected_adamw_: max_exp_avg_sqs must be empty (no amsgrad) or one per tensor");
  // validate everything before any buffer is modified
  for (size_t i = 0; i < T; ++i) {
    const auto n = params[i].numel();
    TORCH_CHECK(params[i].is_contiguous() && grads[i].is_contiguous() && exp_avgs[i].is_contiguous() &&
                    exp_avg_sqs[i].is_contiguous() && bases[i].is_contiguous() && m_invs[i].is_contiguous(),
                "ogpsa::projected_adamw_: tensor ", i, " is not contiguous");
    TORCH_CHECK(grads[i].scalar_type() == params[i].scalar_type() && grads[i].numel() == n,
                "ogpsa::projected_adamw_: grads[", i, "] must match params[", i, "] in dtype and size");
    TORCH_CHECK(exp_avgs[i].scalar_type() == at::kFloat && exp_avg_sqs[i].scalar_type() == at::kFloat &&
                    exp_avgs[i].numel() == n && exp_avg_sqs[i].numel() == n,
                "ogpsa::projected_adamw_: moments of tensor ", i, " must be float32 with the parameter's size");
    if (!max_exp_avg_sqs.empty())
      TORCH_CHECK(max_exp_avg_sqs[i].scalar_type() == at::kFloat && max_exp_avg_sqs[i].numel() == n &&
                      max_exp_avg_sqs[i].is_contiguous(),
                  "ogpsa::projected_adamw_: max_exp_avg_sqs[", i, "] must be contiguous float32 of the size");
    TORCH_CHECK(bases[i].dim() == 2 && bases[i].size(1) == n && bases[i].size(0) <= kMaxK,
                "ogpsa::projected_adamw_: bases[", i, "] must be [k <= 16, ", n, "]");
    const auto k = bases[i].size(0);
    TORCH_CHECK(m_invs[i].scalar_type() == at::kFloat && m_invs[i].numel() == k * k,
                "ogpsa::projected_adamw_: m_invs[", i, "] must be float32 [k, k]");
    TORCH_CHECK(steps[i] >= 1, "ogpsa::projected_adamw_: steps[", i, "] must be >= 1 (counted after increment)");
    TORCH_CHECK(params[i].device().is_cpu(), "ogpsa::projected_adamw_: CPU tensors expected");
  }
  auto out = at::zeros({static_cast<int64_t>(T), 2}, at::TensorOptions().dtype(at::kDouble));
  double* st = out.data_ptr<double>();
  for (size_t i = 0; i < T; ++i) {
    Hyper h;
    h.beta1 = static_cast<float>(beta1);
    h.beta2 = static_cast<float>(beta2);
    h.one_minus_beta1 = static_cast<float>(1.0 - beta1);
    h.one_minus_beta2 = static_cast<float>(1.0 - beta2);
    h.eps = static_cast<float>(eps);
    h.bc1 = static_cast<float>(1.0 - std::pow(beta1, static_cast<double>(steps[i])));
    h.bc2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(beta2, static_cast<double>(steps[i]))));
    h.lr = static_cast<float>(lr);
    h.wd = static_cast<float>(weight_decay);
    h.maximize = maximize;
    h.project_wd = project_weight_decay;
    const at::Tensor* vmax = max_exp_avg_sqs.empty() ? nullptr : &max_exp_avg_sqs[i];
    dispatch_gu(params[i].scalar_type(), bases[i].scalar_type(), "projected_adamw_", [&](auto ptag, auto utag) {
      using P = decltype(ptag);
      using U = decltype(utag);
      step_tensor<P, U>(params[i], grads[i], exp_avgs[i], exp_avg_sqs[i], vmax, bases[i], m_invs[i], h,
                        st + 2 * i);
    });
  }
  return out;
}

}  // namespace
}  // namespace ogpsa

TORCH_LIBRARY_FRAGMENT(ogpsa, m) {
  m.def(
      "projected_adamw_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] max_exp_avg_sqs, Tensor[] bases, Tensor[] m_invs, int[] steps, float lr, float beta1, "
      "float beta2, float eps, float weight_decay, bool maximize, bool project_weight_decay) -> Tensor");
}

TORCH_LIBRARY_IMPL(ogpsa, CPU, m) {
  m.impl("projected_adamw_", &ogpsa::projected_adamw_cpu);
}
