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
// A tensor of at most kFuseMaxNumel elements is one work item (pass 1, w, pass 2 back to back on
// one thread, so pass 2 finds it in cache); the work items of a list go to the threads from a
// shared queue in one parallel region. Larger tensors are split into chunks: pass 1 of every
// chunk of every large tensor in one parallel region, w on the host, then pass 2 likewise.
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
// float32; basis float32 or bfloat16. Every input is validated before any buffer is written.
// The CUDA kernels (csrc/cuda/adamw_cuda.cu) compute the same math; they still divide by the
// bias corrections (see "Rounding" below): moments are bit for bit equal, d within a few ulp.
//
// Rounding: d = (m rbc1) / (sqrt(v) rbc2 + eps) [+ wd p], with rbc1 = 1/(1 - beta1^t) and
// rbc2 = 1/sqrt(1 - beta2^t) computed in double and rounded to fp32 once per step, each
// operation rounded to fp32 in this order, one division per element. torch's AdamW divides by
// the bias corrections instead ((m / bc1) / (sqrt(v) / bc2 + eps)); the two differ by at most
// 4 ulp of d (2M random elements at steps 1..10^4: 8-77 % of the elements differ, mostly by 1
// ulp) and are equally close to float64 (at most 3.8 vs 4.8 ulp). The update lr d is small
// against p, so parameters usually agree bit for bit and else by 1 ulp of p per step
// (tests/test_adamw.py: an empty subspace tracks torch.optim.AdamW to 1e-5 of the travel). No
// bit-exact-to-torch mode: it would cost two more divisions per element in both passes (the
// division unit was 26-36 % of the samples with three), so it is not kept. Moments (m, v, max v)
// do not involve d: they are bit for bit torch's (lerp for m, v beta2 + (1 - beta2) g g).
//
// Speed (block kernels: csrc/adamw_blocks.h): per block of kBlock elements, pass 1 is one loop
// (moments and d into an L1 buffer) then the k + 1 dots over that block; pass 2 builds U^T w over
// the block, then one loop for d, the update and what was removed. Branches on amsgrad /
// maximize / projected decay are template parameters. The bodies are compiled for the baseline
// ISA, AVX2 and AVX-512 (csrc/cpu_simd.h: helpers always inlined into each, no FMA contraction,
// so all three give bit-for-bit the same results), picked at run time (OGPSA_CPU_ISA forces
// one). No software prefetch: the streams are sequential and the hardware prefetchers keep up;
// measured on the 2-core EPYC, prefetching the next block of every stream made the step slower
// (1.3-1.9x, interleaved runs under load).
// Determinism: the dots and squared norms accumulate in kLanes fp32 lanes per block, folded
// (fixed pairwise order) into an fp64 partial per fixed-size chunk; chunk partials are summed in
// chunk order in fp64. No result depends on the thread count or on which thread ran what.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "adamw_blocks.h"
#include "dispatch.h"

#include <algorithm>
#include <cstdint>
#include <vector>

namespace ogpsa {
namespace {

// g_t null in pass 2, vmax_t null without amsgrad; dtypes checked by validate()
Job make_job(const at::Tensor& p_t, const at::Tensor* g_t, const at::Tensor& m_t, const at::Tensor& v_t,
             const at::Tensor* vmax_t, const at::Tensor& u_t, const Hyper& h, Isa isa, const char* op) {
  Job j;
  j.p = p_t.data_ptr();
  j.g = g_t ? g_t->data_ptr() : nullptr;
  j.m = m_t.data_ptr<float>();
  j.v = v_t.data_ptr<float>();
  j.vmax = vmax_t ? vmax_t->data_ptr<float>() : nullptr;
  j.u = u_t.size(0) ? u_t.data_ptr() : nullptr;
  j.n = p_t.numel();
  j.k = u_t.size(0);
  j.h = h;
  const bool ams = vmax_t != nullptr, pwd = h.project_wd;
  dispatch_gu(p_t.scalar_type(), u_t.scalar_type(), op, [&](auto ptag, auto utag) {
    using P = decltype(ptag);
    using U = decltype(utag);
    if (ams) {
      if (pwd) set_kernels<P, U, true, true>(j, isa);
      else set_kernels<P, U, true, false>(j, isa);
    } else {
      if (pwd) set_kernels<P, U, false, true>(j, isa);
      else set_kernels<P, U, false, false>(j, isa);
    }
  });
  return j;
}

int64_t num_chunks(int64_t n) { return (n + kChunk - 1) / kChunk; }

// f(0..count) on the intra-op threads, items taken from a shared counter in one parallel region.
// Which thread runs an item never changes its result: every item writes only its own outputs.
template <typename F>
void run_items(int64_t count, const F& f) {
  if (count <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), count);
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < count;
         i = next.fetch_add(1, std::memory_order_relaxed))
      f(i);
  });
}

// The chunks of a set of tensors, as work items (a tensor's chunks adjacent, in order).
struct Item {
  int64_t job, a, b;
};

std::vector<Item> chunk_items(const std::vector<Job>& jobs, const std::vector<int64_t>& which) {
  std::vector<Item> items;
  for (const int64_t i : which)
    for (int64_t a = 0; a < jobs[i].n; a += kChunk) items.push_back({i, a, std::min(jobs[i].n, a + kChunk)});
  return items;
}

// pass 1 of the given tensors, chunks in parallel; cs[i * W + j] = chunk partials summed in order
void pass1_all(const std::vector<Job>& jobs, const std::vector<int64_t>& which, int64_t W, double* cs) {
  const auto items = chunk_items(jobs, which);
  const int64_t I = static_cast<int64_t>(items.size());
  std::vector<double> part(static_cast<size_t>(I) * (kMaxK + 1));
  run_items(I, [&](int64_t it) {
    const Item& c = items[it];
    jobs[c.job].pass1(jobs[c.job], c.a, c.b, part.data() + it * (kMaxK + 1));
  });
  for (const int64_t i : which)
    for (int64_t j = 0; j <= jobs[i].k; ++j) cs[i * W + j] = 0.0;
  for (int64_t it = 0; it < I; ++it) {
    const Job& t = jobs[items[it].job];
    for (int64_t j = 0; j <= t.k; ++j) cs[items[it].job * W + j] += part[it * (kMaxK + 1) + j];
  }
}

// pass 2 of the given tensors with weights row i at w + i * ldw, chunks in parallel; removed[i]
void pass2_all(const std::vector<Job>& jobs, const std::vector<int64_t>& which, const float* w, int64_t ldw,
               double* removed) {
  const auto items = chunk_items(jobs, which);
  const int64_t I = static_cast<int64_t>(items.size());
  std::vector<double> part(static_cast<size_t>(I));
  run_items(I, [&](int64_t it) {
    const Item& c = items[it];
    part[it] = jobs[c.job].pass2(jobs[c.job], w + c.job * ldw, c.a, c.b);
  });
  for (const int64_t i : which) removed[i] = 0.0;
  for (int64_t it = 0; it < I; ++it) removed[items[it].job] += part[it];
}

// w = M^{-1} c (fp64 accumulation, rounded to fp32)
void solve(const float* minv, const double* cs, int64_t k, float* w) {
  for (int64_t a = 0; a < k; ++a) {
    double s = 0;
    for (int64_t b = 0; b < k; ++b) s += static_cast<double>(minv[a * k + b]) * cs[b];
    w[a] = static_cast<float>(s);
  }
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
  const Isa isa = cpu_isa();  // may raise (a bad OGPSA_CPU_ISA) before anything is written
  const int64_t T = static_cast<int64_t>(params.size());
  auto out = at::zeros({T, 2}, at::TensorOptions().dtype(at::kDouble));
  double* st = out.data_ptr<double>();
  std::vector<Job> jobs;
  std::vector<const float*> minv(T, nullptr);
  std::vector<int64_t> small, large;
  for (int64_t i = 0; i < T; ++i) {
    const Hyper h = make_hyper(steps[i], lr, beta1, beta2, eps, weight_decay, maximize, project_weight_decay);
    jobs.push_back(make_job(params[i], &grads[i], exp_avgs[i], exp_avg_sqs[i], vmax_of(L, i), bases[i], h, isa,
                            "projected_adamw_"));
    if (jobs[i].k) minv[i] = m_invs[i].data_ptr<float>();
    (jobs[i].n <= kFuseMaxNumel ? small : large).push_back(i);
  }
  // small tensors: pass 1, w and pass 2 of a tensor on one thread (chunks in order, as below)
  run_items(static_cast<int64_t>(small.size()), [&](int64_t s) {
    const int64_t i = small[s];
    const Job& t = jobs[i];
    double cs[kMaxK + 1] = {0}, part[kMaxK + 1];
    for (int64_t a = 0; a < t.n; a += kChunk) {
      t.pass1(t, a, std::min(t.n, a + kChunk), part);
      for (int64_t j = 0; j <= t.k; ++j) cs[j] += part[j];
    }
    float w[kMaxK] = {0};
    solve(minv[i], cs, t.k, w);
    double removed = 0;
    for (int64_t a = 0; a < t.n; a += kChunk) removed += t.pass2(t, w, a, std::min(t.n, a + kChunk));
    st[2 * i] = cs[t.k];
    st[2 * i + 1] = removed;
  });
  // large tensors: each pass over the chunks of all of them
  if (!large.empty()) {
    constexpr int64_t W = kMaxK + 1;
    std::vector<double> cs(static_cast<size_t>(T) * W), removed(T);
    std::vector<float> w(static_cast<size_t>(T) * kMaxK, 0.0f);
    pass1_all(jobs, large, W, cs.data());
    for (const int64_t i : large) {
      solve(minv[i], cs.data() + i * W, jobs[i].k, w.data() + i * kMaxK);
      st[2 * i] = cs[i * W + jobs[i].k];
    }
    pass2_all(jobs, large, w.data(), kMaxK, removed.data());
    for (const int64_t i : large) st[2 * i + 1] = removed[i];
  }
  return out;
}

at::Tensor projected_adamw_pass1_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                     at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList bases,
                                     at::IntArrayRef steps, int64_t k_max, double beta1, double beta2, double eps,
                                     double weight_decay, bool maximize, bool project_weight_decay) {
  const Lists L{params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, bases, {}, steps, true, false};
  validate(L, "projected_adamw_pass1_");
  const Isa isa = cpu_isa();
  const int64_t T = static_cast<int64_t>(params.size());
  for (int64_t i = 0; i < T; ++i)
    TORCH_CHECK(bases[i].size(0) <= k_max, "ogpsa::projected_adamw_pass1_: bases[", i, "] has k=", bases[i].size(0),
                " > k_max=", k_max);
  TORCH_CHECK(k_max >= 0 && k_max <= kMaxK, "ogpsa::projected_adamw_pass1_: k_max=", k_max, " is outside [0, 16]");
  auto out = at::zeros({T, k_max + 1}, at::TensorOptions().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  std::vector<Job> jobs;
  std::vector<int64_t> all(T);
  for (int64_t i = 0; i < T; ++i) {
    const Hyper h = make_hyper(steps[i], 0.0, beta1, beta2, eps, weight_decay, maximize, project_weight_decay);
    jobs.push_back(make_job(params[i], &grads[i], exp_avgs[i], exp_avg_sqs[i], vmax_of(L, i), bases[i], h, isa,
                            "projected_adamw_pass1_"));
    all[i] = i;
  }
  constexpr int64_t W = kMaxK + 1;
  std::vector<double> cs(static_cast<size_t>(T) * W);
  pass1_all(jobs, all, W, cs.data());
  for (int64_t i = 0; i < T; ++i) {
    double* row = o + i * (k_max + 1);
    for (int64_t j = 0; j < jobs[i].k; ++j) row[j] = cs[i * W + j];
    row[k_max] = cs[i * W + jobs[i].k];
  }
  return out;
}

at::Tensor projected_adamw_pass2_cpu(at::TensorList params, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                                     at::TensorList max_exp_avg_sqs, at::TensorList bases, const at::Tensor& weights,
                                     at::IntArrayRef steps, double lr, double beta1, double beta2, double eps,
                                     double weight_decay, double kappa, bool project_weight_decay) {
  const Lists L{params, {}, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, bases, {}, steps, false, false};
  validate(L, "projected_adamw_pass2_");
  const Isa isa = cpu_isa();
  const int64_t T = static_cast<int64_t>(params.size());
  int64_t kk = 0;
  for (int64_t i = 0; i < T; ++i) kk = std::max(kk, bases[i].size(0));
  TORCH_CHECK(weights.scalar_type() == at::kFloat && weights.dim() == 2 && weights.size(0) == T &&
                  weights.size(1) >= kk && weights.is_contiguous() && weights.device().is_cpu(),
              "ogpsa::projected_adamw_pass2_: weights must be a contiguous float32 CPU tensor [T=", T,
              ", k_max >= ", kk, "], got ", weights.scalar_type(), " ", weights.sizes(), " on ", weights.device());
  auto out = at::zeros({T}, at::TensorOptions().dtype(at::kDouble));
  std::vector<Job> jobs;
  std::vector<int64_t> all(T);
  for (int64_t i = 0; i < T; ++i) {
    const Hyper h = make_hyper(steps[i], lr, beta1, beta2, eps, weight_decay, false, project_weight_decay, kappa);
    jobs.push_back(make_job(params[i], nullptr, exp_avgs[i], exp_avg_sqs[i], vmax_of(L, i), bases[i], h, isa,
                            "projected_adamw_pass2_"));
    all[i] = i;
  }
  pass2_all(jobs, all, weights.data_ptr<float>(), weights.size(1), out.data_ptr<double>());
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
