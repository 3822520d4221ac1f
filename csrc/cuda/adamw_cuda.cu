// ogpsa::projected_adamw_ (and its two passes as separate ops, projected_adamw_pass1_ and
// projected_adamw_pass2_) on CUDA, host side: validation of every input before anything is
// written, grouping by (parameter dtype, basis dtype), buffers, launches and the CUDA
// registration. Schemas, math and the CPU kernels: csrc/adamw.cpp; device code:
// adamw_kernels.cuh; launch order: adamw_launch.cuh. Results stay on the device (fp64); no host
// sync. Headers kept minimal as in ops_cuda.cu (no ATen/cuda/CUDAContext.h: needs cusparse.h).

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "../dispatch.h"
#include "adamw_launch.cuh"

#include <cmath>
#include <map>
#include <utility>
#include <vector>

namespace ogpsa {
namespace cuda {
namespace {

// the driver's launcher: <<<>>> on the current stream, checked
struct StreamLaunch {
  cudaStream_t stream;
  template <typename... KA, typename... A>
  void operator()(void (*kernel)(KA...), int64_t blocks, int threads, A&&... args) const {
    kernel<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(std::forward<A>(args)...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

bool float_like(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

// The lists an op receives (grads only in pass 1 and the fused op, m_invs only in the fused op).
struct Inputs {
  at::TensorList params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, bases, m_invs;
  at::IntArrayRef steps;
  bool has_grads, has_m_invs;
};

// every check before any launch; returns the device
c10::Device validate(const Inputs& in, const char* op) {
  const size_t T = in.params.size();
  TORCH_CHECK((!in.has_grads || in.grads.size() == T) && in.exp_avgs.size() == T && in.exp_avg_sqs.size() == T &&
                  in.bases.size() == T && (!in.has_m_invs || in.m_invs.size() == T) && in.steps.size() == T,
              "ogpsa::", op, ": params, ", in.has_grads ? "grads, " : "", "exp_avgs, exp_avg_sqs, bases, ",
              in.has_m_invs ? "m_invs " : "", "and steps must have one entry per tensor (params has ", T, ")");
  TORCH_CHECK(in.max_exp_avg_sqs.empty() || in.max_exp_avg_sqs.size() == T, "ogpsa::", op,
              ": max_exp_avg_sqs must be empty (no amsgrad) or one per tensor");
  TORCH_CHECK(T >= 1, "ogpsa::", op, ": no tensors");
  const bool amsgrad = !in.max_exp_avg_sqs.empty();
  const auto dev = in.params[0].device();
  TORCH_CHECK(dev.is_cuda(), "ogpsa::", op, " (CUDA): params[0] is on ", dev, ", expected a CUDA device");
  for (size_t i = 0; i < T; ++i) {
    const at::Tensor& p = in.params[i];
    const auto n = p.numel();
    auto on_dev = [&](const at::Tensor& t) { return t.device() == dev; };
    TORCH_CHECK(on_dev(p) && (!in.has_grads || on_dev(in.grads[i])) && on_dev(in.exp_avgs[i]) &&
                    on_dev(in.exp_avg_sqs[i]) && (!amsgrad || on_dev(in.max_exp_avg_sqs[i])),
                "ogpsa::", op, ": params/grads/moments of tensor ", i, " must all be on ", dev);
    TORCH_CHECK(p.is_contiguous() && (!in.has_grads || in.grads[i].is_contiguous()) &&
                    in.exp_avgs[i].is_contiguous() && in.exp_avg_sqs[i].is_contiguous() &&
                    in.bases[i].is_contiguous() && (!in.has_m_invs || in.m_invs[i].is_contiguous()),
                "ogpsa::", op, ": tensor ", i, " is not contiguous");
    TORCH_CHECK(float_like(p.scalar_type()), "ogpsa::", op, ": params[", i,
                "] must be float32, bfloat16 or float16, got ", p.scalar_type());
    if (in.has_grads)
      TORCH_CHECK(in.grads[i].scalar_type() == p.scalar_type() && in.grads[i].numel() == n, "ogpsa::", op,
                  ": grads[", i, "] must match params[", i, "] in dtype and size");
    TORCH_CHECK(in.exp_avgs[i].scalar_type() == at::kFloat && in.exp_avg_sqs[i].scalar_type() == at::kFloat &&
                    in.exp_avgs[i].numel() == n && in.exp_avg_sqs[i].numel() == n,
                "ogpsa::", op, ": moments of tensor ", i, " must be float32 with the parameter's size");
    if (amsgrad)
      TORCH_CHECK(in.max_exp_avg_sqs[i].scalar_type() == at::kFloat && in.max_exp_avg_sqs[i].numel() == n &&
                      in.max_exp_avg_sqs[i].is_contiguous(),
                  "ogpsa::", op, ": max_exp_avg_sqs[", i, "] must be contiguous float32 of the size");
    const at::Tensor& u = in.bases[i];
    TORCH_CHECK(u.dim() == 2 && u.size(1) == n && u.size(0) <= kMaxRank, "ogpsa::", op, ": bases[", i,
                "] has shape ", u.sizes(), ", expected [k <= ", kMaxRank, ", ", n, "]");
    TORCH_CHECK(u.scalar_type() == at::kFloat || u.scalar_type() == at::kBFloat16, "ogpsa::", op, ": bases[", i,
                "] must be float32 or bfloat16, got ", u.scalar_type());
    const auto k = u.size(0);
    TORCH_CHECK(k == 0 || on_dev(u), "ogpsa::", op, ": bases[", i, "] must be on ", dev);
    if (in.has_m_invs) {
      TORCH_CHECK(in.m_invs[i].scalar_type() == at::kFloat && in.m_invs[i].numel() == k * k, "ogpsa::", op,
                  ": m_invs[", i, "] must be float32 [k, k] with k=", k, " (bases[", i, "])");
      TORCH_CHECK(k == 0 || on_dev(in.m_invs[i]), "ogpsa::", op, ": m_invs[", i, "] must be on ", dev);
    }
    TORCH_CHECK(in.steps[i] >= 1, "ogpsa::", op, ": steps[", i, "] must be >= 1 (counted after increment)");
  }
  return dev;
}

AdamHyper make_hyper(double lr, double beta1, double beta2, double eps, double weight_decay, bool maximize,
                     bool project_weight_decay, double kappa) {
  AdamHyper h;
  h.beta1 = static_cast<float>(beta1);
  h.beta2 = static_cast<float>(beta2);
  h.omb1 = static_cast<float>(1.0 - beta1);
  h.omb2 = static_cast<float>(1.0 - beta2);
  h.eps = static_cast<float>(eps);
  h.lr = static_cast<float>(lr);
  h.wd = static_cast<float>(weight_decay);
  h.shrink = project_weight_decay ? 1.0f : 1.0f - h.lr * h.wd;  // as the CPU kernel (fp32)
  h.kappa = static_cast<float>(kappa);
  h.maximize = maximize;
  h.project_wd = project_weight_decay;
  return h;
}

// Non-empty tensors grouped by (parameter dtype, basis dtype), in the caller's order; within a
// group `small` holds those for the single pass (when asked), `large` the others with their
// caller indices. AdamTensor::tid: the caller's index, except in the fused op's two-pass list
// (its position there: the row of its weights).
struct Group {
  std::vector<AdamTensor> small, large;
  std::vector<int32_t> large_ids;
};

std::map<std::pair<int, int>, Group> group(const Inputs& in, double beta1, double beta2, bool single_pass,
                                           bool local_weights) {
  std::map<std::pair<int, int>, Group> groups;
  for (size_t i = 0; i < in.params.size(); ++i) {
    const int64_t n = in.params[i].numel();
    if (n == 0) continue;  // nothing to do; its results stay 0
    AdamTensor t;
    t.p = in.params[i].data_ptr();
    t.g = in.has_grads ? in.grads[i].data_ptr() : nullptr;
    t.m = in.exp_avgs[i].data_ptr<float>();
    t.v = in.exp_avg_sqs[i].data_ptr<float>();
    t.vmax = in.max_exp_avg_sqs.empty() ? nullptr : in.max_exp_avg_sqs[i].data_ptr<float>();
    t.k = static_cast<int32_t>(in.bases[i].size(0));
    t.u = t.k ? in.bases[i].data_ptr() : nullptr;
    t.minv = t.k && in.has_m_invs ? in.m_invs[i].data_ptr<float>() : nullptr;
    t.n = n;
    t.bc1 = static_cast<float>(1.0 - std::pow(beta1, static_cast<double>(in.steps[i])));
    t.bc2s = static_cast<float>(std::sqrt(1.0 - std::pow(beta2, static_cast<double>(in.steps[i]))));
    t.tid = static_cast<int32_t>(i);
    Group& grp = groups[{static_cast<int>(in.params[i].scalar_type()), static_cast<int>(in.bases[i].scalar_type())}];
    if (single_pass && n <= kAdamSingleMax) {
      grp.small.push_back(t);
    } else {
      if (local_weights) t.tid = static_cast<int32_t>(grp.large.size());
      grp.large.push_back(t);
      grp.large_ids.push_back(static_cast<int32_t>(i));
    }
  }
  return groups;
}

at::Tensor projected_adamw_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList bases,
                                at::TensorList m_invs, at::IntArrayRef steps, double lr, double beta1, double beta2,
                                double eps, double weight_decay, bool maximize, bool project_weight_decay) {
  const Inputs in{params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, bases, m_invs, steps, true, true};
  const auto dev = validate(in, "projected_adamw_");
  c10::cuda::CUDAGuard guard(dev);
  const StreamLaunch launch{c10::cuda::getCurrentCUDAStream()};
  const auto fopts = params[0].options().dtype(at::kFloat);
  at::Tensor out = at::zeros({static_cast<int64_t>(params.size()), 2}, params[0].options().dtype(at::kDouble));
  double* stats = out.data_ptr<double>();
  const AdamHyper h = make_hyper(lr, beta1, beta2, eps, weight_decay, maximize, project_weight_decay, 1.0);
  for (const auto& entry : group(in, beta1, beta2, true, true)) {
    const Group& grp = entry.second;
    // the two-pass path's buffers (caching allocator, stream-ordered: no sync)
    at::Tensor part, weights, removed;
    if (!grp.large.empty()) {
      const size_t L = grp.large.size();
      const int64_t rows = adam_rows(grp.large.data(), L);
      part = at::empty({rows, adam_bucket(grp.large.data(), L) + 1}, fopts);
      weights = at::empty({static_cast<int64_t>(L), kMaxRank}, fopts);
      removed = at::empty({rows}, fopts);
    }
    dispatch_gu(static_cast<at::ScalarType>(entry.first.first), static_cast<at::ScalarType>(entry.first.second),
                "projected_adamw_", [&](auto ptag, auto utag) {
                  using P = decltype(ptag);
                  using U = decltype(utag);
                  adam_run_small<P, U>(grp.small.data(), grp.small.size(), h, stats, launch);
                  if (!grp.large.empty())
                    adam_run_large<P, U>(grp.large.data(), grp.large_ids.data(), grp.large.size(), h, stats,
                                         part.data_ptr<float>(), weights.data_ptr<float>(),
                                         removed.data_ptr<float>(), launch);
                });
  }
  return out;
}

at::Tensor projected_adamw_pass1_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                      at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                                      at::TensorList bases, at::IntArrayRef steps, int64_t k_max, double beta1,
                                      double beta2, double eps, double weight_decay, bool maximize,
                                      bool project_weight_decay) {
  const Inputs in{params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, bases, {}, steps, true, false};
  const auto dev = validate(in, "projected_adamw_pass1_");
  for (size_t i = 0; i < params.size(); ++i)
    TORCH_CHECK(bases[i].size(0) <= k_max, "ogpsa::projected_adamw_pass1_: bases[", i, "] has k=", bases[i].size(0),
                " > k_max=", k_max);
  TORCH_CHECK(k_max >= 0 && k_max <= kMaxRank, "ogpsa::projected_adamw_pass1_: k_max=", k_max, " is outside [0, ",
              kMaxRank, "]");
  c10::cuda::CUDAGuard guard(dev);
  const StreamLaunch launch{c10::cuda::getCurrentCUDAStream()};
  const auto fopts = params[0].options().dtype(at::kFloat);
  at::Tensor out = at::zeros({static_cast<int64_t>(params.size()), k_max + 1}, params[0].options().dtype(at::kDouble));
  const AdamHyper h = make_hyper(0.0, beta1, beta2, eps, weight_decay, maximize, project_weight_decay, 1.0);
  for (const auto& entry : group(in, beta1, beta2, false, false)) {
    const Group& grp = entry.second;
    const size_t L = grp.large.size();
    at::Tensor part = at::empty({adam_rows(grp.large.data(), L), adam_bucket(grp.large.data(), L) + 1}, fopts);
    dispatch_gu(static_cast<at::ScalarType>(entry.first.first), static_cast<at::ScalarType>(entry.first.second),
                "projected_adamw_pass1_", [&](auto ptag, auto utag) {
                  adam_run_pass1<decltype(ptag), decltype(utag)>(grp.large.data(), grp.large_ids.data(), L, h,
                                                                 out.data_ptr<double>(), static_cast<int>(k_max),
                                                                 part.data_ptr<float>(), launch);
                });
  }
  return out;
}

at::Tensor projected_adamw_pass2_cuda(at::TensorList params, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                                      at::TensorList max_exp_avg_sqs, at::TensorList bases, const at::Tensor& weights,
                                      at::IntArrayRef steps, double lr, double beta1, double beta2, double eps,
                                      double weight_decay, double kappa, bool project_weight_decay) {
  const Inputs in{params, {}, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, bases, {}, steps, false, false};
  const auto dev = validate(in, "projected_adamw_pass2_");
  const int64_t T = static_cast<int64_t>(params.size());
  int64_t kk = 0;
  for (int64_t i = 0; i < T; ++i) kk = std::max(kk, bases[i].size(0));
  TORCH_CHECK(weights.scalar_type() == at::kFloat && weights.dim() == 2 && weights.size(0) == T &&
                  weights.size(1) >= kk && weights.is_contiguous() && weights.device() == dev,
              "ogpsa::projected_adamw_pass2_: weights must be a contiguous float32 [T=", T, ", k_max >= ", kk,
              "] tensor on ", dev, ", got ", weights.scalar_type(), " ", weights.sizes(), " on ", weights.device());
  c10::cuda::CUDAGuard guard(dev);
  const StreamLaunch launch{c10::cuda::getCurrentCUDAStream()};
  const auto fopts = params[0].options().dtype(at::kFloat);
  at::Tensor out = at::zeros({T}, params[0].options().dtype(at::kDouble));
  const AdamHyper h = make_hyper(lr, beta1, beta2, eps, weight_decay, false, project_weight_decay, kappa);
  for (const auto& entry : group(in, beta1, beta2, false, false)) {
    const Group& grp = entry.second;
    const size_t L = grp.large.size();
    at::Tensor removed = at::empty({adam_rows(grp.large.data(), L)}, fopts);
    dispatch_gu(static_cast<at::ScalarType>(entry.first.first), static_cast<at::ScalarType>(entry.first.second),
                "projected_adamw_pass2_", [&](auto ptag, auto utag) {
                  adam_run_pass2<decltype(ptag), decltype(utag)>(
                      grp.large.data(), grp.large_ids.data(), L, h, weights.data_ptr<float>(),
                      static_cast<int>(weights.size(1)), removed.data_ptr<float>(),
                      RemovedOut{out.data_ptr<double>(), 1, 0}, launch);
                });
  }
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace ogpsa

TORCH_LIBRARY_IMPL(ogpsa, CUDA, m) {
  m.impl("projected_adamw_", &ogpsa::cuda::projected_adamw_cuda);
  m.impl("projected_adamw_pass1_", &ogpsa::cuda::projected_adamw_pass1_cuda);
  m.impl("projected_adamw_pass2_", &ogpsa::cuda::projected_adamw_pass2_cuda);
}
