// ogpsa._C: the projected AdamW step (update-space OGPSA), CPU kernels.
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
//
// The two passes as separate ops, for a reduction between them (sharded parameters: sum the
// pass-1 rows of every shard with one all_reduce, then w = M^{-1} c, then pass 2 on each shard;
// also every rule and scope, since the caller computes w):
//
//   projected_adamw_pass1_(params, grads, exp_avgs!, exp_avg_sqs!, max_exp_avg_sqs!, bases, steps,
//                          k_max, beta1, beta2, eps, weight_decay, maximize, project_weight_decay)
//       -> [T, k_max + 1] fp64: row i = (c_i = U_i d_i in columns 0..k_i-1, zeros, ||d_i||^2)
//   projected_adamw_pass2_(params!, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, bases, weights, steps,
//                          lr, beta1, beta2, eps, weight_decay, kappa, project_weight_decay)
//       -> [T] fp64 ||d_i - new_i||^2, with new_i = kappa d_i - U_i^T w_i (weights: float32
//          [T, >= max k_i], row i's first k_i entries) and p <- p (1 - lr wd) [decoupled] - lr new
//
// pass1_ then pass2_ with w = M^{-1} c (fp64 accumulation, rounded to fp32) and kappa = 1 is
// projected_adamw_ exactly. Params/grads: float32, bfloat16 or float16 (same dtype); moments
// float32; basis float32 or bfloat16. Determinism: fixed-size chunks independent of the thread
// count, partial sums per chunk reduced in chunk order in fp64. Every input is validated before
// any buffer is written. The CUDA kernels (csrc/cuda/adamw_cuda.cu) compute the same.

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
  float beta1, beta2, one_minus_beta1, one_minus_beta2, eps, bc1, bc2_sqrt, lr, wd, kappa;
  bool maximize, project_wd;
};

Hyper make_hyper(int64_t step, double lr, double beta1, double beta2, double eps, double weight_decay, bool maximize,
                 bool project_weight_decay, double kappa = 1.0) {
  Hyper h;
  h.beta1 = static_cast<float>(beta1);
  h.beta2 = static_cast<float>(beta2);
  h.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  h.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  h.eps = static_cast<float>(eps);
  h.bc1 = static_cast<float>(1.0 - std::pow(beta1, static_cast<double>(step)));
  h.bc2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(beta2, static_cast<double>(step))));
  h.lr = static_cast<float>(lr);
  h.wd = static_cast<float>(weight_decay);
  h.kappa = static_cast<float>(kappa);
  h.maximize = maximize;
  h.project_wd = project_weight_decay;
  return h;
}

// One tensor's buffers; g is null in pass 2, vmax without amsgrad.
template <typename P, typename U>
struct View {
  P* p;
  const P* g;
  float* m;
  float* v;
  float* vmax;
  const U* u;
  int64_t n, k;
  View(const at::Tensor& p_t, const at::Tensor* g_t, const at::Tensor& m_t, const at::Tensor& v_t,
       const at::Tensor* vmax_t, const at::Tensor& u_t)
      : p(p_t.data_ptr<P>()),
        g(g_t ? g_t->data_ptr<P>() : nullptr),
        m(m_t.data_ptr<float>()),
        v(v_t.data_ptr<float>()),
        vmax(vmax_t ? vmax_t->data_ptr<float>() : nullptr),
        u(u_t.size(0) ? u_t.data_ptr<U>() : nullptr),
        n(p_t.numel()),
        k(u_t.size(0)) {}

  float direction(const Hyper& h, int64_t e) const {
    const float vv = vmax ? vmax[e] : v[e];
    float d = (m[e] / h.bc1) / (std::sqrt(vv) / h.bc2_sqrt + h.eps);
    if (h.project_wd) d += h.wd * static_cast<float>(p[e]);
    return d;
  }
};

// pass 1: moments (written once), d, c = U d, ||d||^2 into cs[0..k] (fp64, chunk order)
template <typename P, typename U>
void pass1(const View<P, U>& t, const Hyper& h, double* cs) {
  const int64_t n = t.n, k = t.k;
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
  std::vector<double> part(static_cast<size_t>(nchunks) * (k + 1), 0.0);
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t a = c * kChunk, b = std::min(n, a + kChunk);
      float acc[kMaxK + 1] = {0};
      for (int64_t e = a; e < b; ++e) {
        float gg = static_cast<float>(t.g[e]);
        if (h.maximize) gg = -gg;
        t.m[e] += h.one_minus_beta1 * (gg - t.m[e]);  // lerp, as torch's AdamW
        t.v[e] = t.v[e] * h.beta2 + h.one_minus_beta2 * gg * gg;
        if (t.vmax) t.vmax[e] = std::max(t.vmax[e], t.v[e]);
        const float d = t.direction(h, e);
        for (int64_t j = 0; j < k; ++j) acc[j] += static_cast<float>(t.u[j * n + e]) * d;
        acc[k] += d * d;
      }
      for (int64_t j = 0; j <= k; ++j) part[c * (k + 1) + j] = acc[j];
    }
  });
  for (int64_t j = 0; j <= k; ++j) cs[j] = 0.0;
  for (int64_t c = 0; c < nchunks; ++c)
    for (int64_t j = 0; j <= k; ++j) cs[j] += part[c * (k + 1) + j];
}

// pass 2: recompute d, new = kappa d - U^T w, write p; returns ||d - new||^2 (fp64, chunk order).
// With kappa = 1, new = d - U^T w and d - new is U^T w, rounded as such.
template <typename P, typename U>
double pass2(const View<P, U>& t, const Hyper& h, const float* w) {
  const int64_t n = t.n, k = t.k;
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
  std::vector<double> part(static_cast<size_t>(nchunks), 0.0);
  const float shrink = h.project_wd ? 1.0f : 1.0f - h.lr * h.wd;
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t a = c * kChunk, b = std::min(n, a + kChunk);
      float rem = 0;
      for (int64_t e = a; e < b; ++e) {
        float sub = 0;
        for (int64_t j = 0; j < k; ++j) sub += static_cast<float>(t.u[j * n + e]) * w[j];
        const float de = t.direction(h, e);
        const float d = h.kappa * de - sub;
        const float r = (1.0f - h.kappa) * de + sub;
        rem += r * r;
        t.p[e] = static_cast<P>(static_cast<float>(t.p[e]) * shrink - h.lr * d);
      }
      part[c] = rem;
    }
  });
  double removed = 0;
  for (int64_t c = 0; c < nchunks; ++c) removed += part[c];
  return removed;
}

// What each op passes; validate() checks every tensor before anything is written.
struct Lists {
  at::TensorList params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, bases, m_invs;
  at::IntArrayRef steps;
  bool has_grads, has_m_invs;
};

void validate(const Lists& L, const char* op) {
  const size_t T = L.params.size();
  TORCH_CHECK((!L.has_grads || L.grads.size() == T) && L.exp_avgs.size() == T && L.exp_avg_sqs.size() == T &&
                  L.bases.size() == T && (!L.has_m_invs || L.m_invs.size() == T) && L.steps.size() == T,
              "ogpsa::", op, ": params, ", L.has_grads ? "grads, " : "", "exp_avgs, exp_avg_sqs, bases, ",
              L.has_m_invs ? "m_invs " : "", "and steps must have one entry per tensor (params has ", T, ")");
  TORCH_CHECK(L.max_exp_avg_sqs.empty() || L.max_exp_avg_sqs.size() == T, "ogpsa::", op,
              ": max_exp_avg_sqs must be empty (no amsgrad) or one per tensor");
  for (size_t i = 0; i < T; ++i) {
    const auto n = L.params[i].numel();
    TORCH_CHECK(L.params[i].device().is_cpu() && (!L.has_grads || L.grads[i].device().is_cpu()) &&
                    L.exp_avgs[i].device().is_cpu() && L.exp_avg_sqs[i].device().is_cpu(),
                "ogpsa::", op, ": tensor ", i, ": CPU tensors expected");
    TORCH_CHECK(L.params[i].is_contiguous() && (!L.has_grads || L.grads[i].is_contiguous()) &&
                    L.exp_avgs[i].is_contiguous() && L.exp_avg_sqs[i].is_contiguous() && L.bases[i].is_contiguous() &&
                    (!L.has_m_invs || L.m_invs[i].is_contiguous()),
                "ogpsa::", op, ": tensor ", i, " is not contiguous");
    if (L.has_grads)
      TORCH_CHECK(L.grads[i].scalar_type() == L.params[i].scalar_type() && L.grads[i].numel() == n, "ogpsa::", op,
                  ": grads[", i, "] must match params[", i, "] in dtype and size");
    TORCH_CHECK(L.exp_avgs[i].scalar_type() == at::kFloat && L.exp_avg_sqs[i].scalar_type() == at::kFloat &&
                    L.exp_avgs[i].numel() == n && L.exp_avg_sqs[i].numel() == n,
                "ogpsa::", op, ": moments of tensor ", i, " must be float32 with the parameter's size");
    if (!L.max_exp_avg_sqs.empty())
      TORCH_CHECK(L.max_exp_avg_sqs[i].scalar_type() == at::kFloat && L.max_exp_avg_sqs[i].numel() == n &&
                      L.max_exp_avg_sqs[i].is_contiguous() && L.max_exp_avg_sqs[i].device().is_cpu(),
                  "ogpsa::", op, ": max_exp_avg_sqs[", i, "] must be contiguous float32 of the size");
    TORCH_CHECK(L.bases[i].dim() == 2 && L.bases[i].size(1) == n && L.bases[i].size(0) <= kMaxK, "ogpsa::", op,
                ": bases[", i, "] must be [k <= 16, ", n, "]");
    const auto k = L.bases[i].size(0);
    if (L.has_m_invs)
      TORCH_CHECK(L.m_invs[i].scalar_type() == at::kFloat && L.m_invs[i].numel() == k * k, "ogpsa::", op,
                  ": m_invs[", i, "] must be float32 [k, k]");
    TORCH_CHECK(L.steps[i] >= 1, "ogpsa::", op, ": steps[", i, "] must be >= 1 (counted after increment)");
  }
}

const at::Tensor* vmax_of(const Lists& L, size_t i) {
  return L.max_exp_avg_sqs.empty() ? nullptr : &L.max_exp_avg_sqs[i];
}

at::Tensor projected_adamw_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                               at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList bases,
                               at::TensorList m_invs, at::IntArrayRef steps, double lr, double beta1, double beta2,
                               double eps, double weight_decay, bool maximize, bool project_weight_decay) {
  const Lists L{params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, bases, m_invs, steps, true, true};
  validate(L, "projected_adamw_");
  const size_t T = params.size();
  auto out = at::zeros({static_cast<int64_t>(T), 2}, at::TensorOptions().dtype(at::kDouble));
  double* st = out.data_ptr<double>();
  for (size_t i = 0; i < T; ++i) {
    const Hyper h = make_hyper(steps[i], lr, beta1, beta2, eps, weight_decay, maximize, project_weight_decay);
    dispatch_gu(params[i].scalar_type(), bases[i].scalar_type(), "projected_adamw_", [&](auto ptag, auto utag) {
      using P = decltype(ptag);
      using U = decltype(utag);
      const View<P, U> t(params[i], &grads[i], exp_avgs[i], exp_avg_sqs[i], vmax_of(L, i), bases[i]);
      double cs[kMaxK + 1];
      pass1(t, h, cs);
      float w[kMaxK] = {0};
      const float* minv = t.k ? m_invs[i].data_ptr<float>() : nullptr;
      for (int64_t a = 0; a < t.k; ++a) {
        double s = 0;
        for (int64_t b = 0; b < t.k; ++b) s += static_cast<double>(minv[a * t.k + b]) * cs[b];
        w[a] = static_cast<float>(s);
      }
      st[2 * i] = cs[t.k];
      st[2 * i + 1] = pass2(t, h, w);
    });
  }
  return out;
}

at::Tensor projected_adamw_pass1_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                     at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList bases,
                                     at::IntArrayRef steps, int64_t k_max, double beta1, double beta2, double eps,
                                     double weight_decay, bool maximize, bool project_weight_decay) {
  const Lists L{params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, bases, {}, steps, true, false};
  validate(L, "projected_adamw_pass1_");
  const size_t T = params.size();
  for (size_t i = 0; i < T; ++i)
    TORCH_CHECK(bases[i].size(0) <= k_max, "ogpsa::projected_adamw_pass1_: bases[", i, "] has k=", bases[i].size(0),
                " > k_max=", k_max);
  TORCH_CHECK(k_max >= 0 && k_max <= kMaxK, "ogpsa::projected_adamw_pass1_: k_max=", k_max, " is outside [0, 16]");
  auto out = at::zeros({static_cast<int64_t>(T), k_max + 1}, at::TensorOptions().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  for (size_t i = 0; i < T; ++i) {
    const Hyper h = make_hyper(steps[i], 0.0, beta1, beta2, eps, weight_decay, maximize, project_weight_decay);
    dispatch_gu(params[i].scalar_type(), bases[i].scalar_type(), "projected_adamw_pass1_", [&](auto ptag, auto utag) {
      using P = decltype(ptag);
      using U = decltype(utag);
      const View<P, U> t(params[i], &grads[i], exp_avgs[i], exp_avg_sqs[i], vmax_of(L, i), bases[i]);
      double cs[kMaxK + 1];
      pass1(t, h, cs);
      double* row = o + i * (k_max + 1);
      for (int64_t j = 0; j < t.k; ++j) row[j] = cs[j];
      row[k_max] = cs[t.k];
    });
  }
  return out;
}

at::Tensor projected_adamw_pass2_cpu(at::TensorList params, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                                     at::TensorList max_exp_avg_sqs, at::TensorList bases, const at::Tensor& weights,
                                     at::IntArrayRef steps, double lr, double beta1, double beta2, double eps,
                                     double weight_decay, double kappa, bool project_weight_decay) {
  const Lists L{params, {}, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, bases, {}, steps, false, false};
  validate(L, "projected_adamw_pass2_");
  const int64_t T = static_cast<int64_t>(params.size());
  int64_t kk = 0;
  for (int64_t i = 0; i < T; ++i) kk = std::max(kk, bases[i].size(0));
  TORCH_CHECK(weights.scalar_type() == at::kFloat && weights.dim() == 2 && weights.size(0) == T &&
                  weights.size(1) >= kk && weights.is_contiguous() && weights.device().is_cpu(),
              "ogpsa::projected_adamw_pass2_: weights must be a contiguous float32 CPU tensor [T=", T,
              ", k_max >= ", kk, "], got ", weights.scalar_type(), " ", weights.sizes(), " on ", weights.device());
  auto out = at::zeros({T}, at::TensorOptions().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  const float* w = weights.data_ptr<float>();
  const int64_t KM = weights.size(1);
  for (int64_t i = 0; i < T; ++i) {
    const Hyper h = make_hyper(steps[i], lr, beta1, beta2, eps, weight_decay, false, project_weight_decay, kappa);
    dispatch_gu(params[i].scalar_type(), bases[i].scalar_type(), "projected_adamw_pass2_", [&](auto ptag, auto utag) {
      using P = decltype(ptag);
      using U = decltype(utag);
      const View<P, U> t(params[i], nullptr, exp_avgs[i], exp_avg_sqs[i], vmax_of(L, i), bases[i]);
      o[i] = pass2(t, h, w + i * KM);
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
  m.def(
      "projected_adamw_pass1_(Tensor[] params, Tensor[] grads, Tensor(a!)[] exp_avgs, Tensor(b!)[] exp_avg_sqs, "
      "Tensor(c!)[] max_exp_avg_sqs, Tensor[] bases, int[] steps, int k_max, float beta1, float beta2, float eps, "
      "float weight_decay, bool maximize, bool project_weight_decay) -> Tensor");
  m.def(
      "projected_adamw_pass2_(Tensor(a!)[] params, Tensor[] exp_avgs, Tensor[] exp_avg_sqs, "
      "Tensor[] max_exp_avg_sqs, Tensor[] bases, Tensor weights, int[] steps, float lr, float beta1, float beta2, "
      "float eps, float weight_decay, float kappa, bool project_weight_decay) -> Tensor");
}

TORCH_LIBRARY_IMPL(ogpsa, CPU, m) {
  m.impl("projected_adamw_", &ogpsa::projected_adamw_cpu);
  m.impl("projected_adamw_pass1_", &ogpsa::projected_adamw_pass1_cpu);
  m.impl("projected_adamw_pass2_", &ogpsa::projected_adamw_pass2_cpu);
}
