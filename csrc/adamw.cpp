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
// The CUDA kernels (csrc/cuda/adamw_cuda.cu) compute the same.
//
// Speed: the element-wise work runs over blocks of kBlock elements in loops the compiler
// vectorises (branches on amsgrad / maximize / projected decay are template parameters, 16-bit
// values converted into fp32 stack buffers, sqrt by SIMD intrinsics since -fmath-errno keeps
// std::sqrt scalar), compiled twice on x86-64 (baseline SSE2 and AVX2 without FMA, picked at run
// time; bit for bit the same), with software prefetch of the next block. Element-wise arithmetic is rounded step by step in a fixed order (no
// reciprocals, no FMA): moments, d and the parameters are bit for bit those of the scalar loop.
// Determinism: the dots and squared norms accumulate in kLanes fp32 lanes per block, folded
// (fixed pairwise order) into an fp64 partial per fixed-size chunk; chunk partials are summed in
// chunk order in fp64. No result depends on the thread count or on which thread ran what.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "dispatch.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#elif defined(__ARM_NEON) && defined(__aarch64__)
#include <arm_neon.h>
#endif

namespace ogpsa {
namespace {

constexpr int64_t kChunk = 16384;  // elements per chunk: fixes the summation order
constexpr int kMaxK = 16;
constexpr int64_t kBlock = 512;             // element-wise block (fp32 stack buffers, in L1)
constexpr int kLanes = 16;                  // independent fp32 accumulators per dot
constexpr int64_t kFuseMaxNumel = 1 << 18;  // projected_adamw_: one work item per tensor up to this

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

template <typename T>
inline float to_f(T v) {
  return static_cast<float>(v);
}

template <>
inline float to_f<c10::BFloat16>(c10::BFloat16 v) {
  // bf16 is the top half of an fp32 (exactly c10's conversion): a shift the compiler vectorises
  const uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

template <typename T>
inline void load_block(const T* __restrict src, float* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = to_f(src[i]);
}

// src[0..n) as fp32: the buffer itself for fp32 data, else converted into buf
template <typename T>
inline const float* as_f32(const T* src, float* buf, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    load_block(src, buf, n);
    return buf;
  }
}

// software prefetch of [x, x + n): the element-wise loops take one stream at a time, so the
// hardware prefetchers alone leave the next block's lines to demand misses
template <typename T>
inline void prefetch(const T* x, int64_t n) {
#if defined(__GNUC__)
  const char* c = reinterpret_cast<const char*>(x);
  for (int64_t o = 0; o < n * static_cast<int64_t>(sizeof(T)); o += 64) __builtin_prefetch(c + o);
#endif
}

#if defined(__x86_64__) && defined(__GNUC__)
#define OGPSA_AVX2 1
#include <immintrin.h>
// 8 lanes; never inlined into default-target code, called once per block
__attribute__((target("avx2"), noinline)) void sqrt_block_avx2(const float* __restrict src, float* __restrict dst,
                                                               int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, _mm256_sqrt_ps(_mm256_loadu_ps(src + i)));
  for (; i < n; ++i) dst[i] = std::sqrt(src[i]);
}
#else
#define OGPSA_AVX2 0
#endif

// dst = sqrt(src), correctly rounded (as std::sqrt) in SIMD registers
inline void sqrt_block(const float* __restrict src, float* __restrict dst, int64_t n) {
  int64_t i = 0;
#if defined(__SSE2__)
  for (; i + 8 <= n; i += 8) {
    const __m128 a = _mm_sqrt_ps(_mm_loadu_ps(src + i));
    const __m128 b = _mm_sqrt_ps(_mm_loadu_ps(src + i + 4));
    _mm_storeu_ps(dst + i, a);
    _mm_storeu_ps(dst + i + 4, b);
  }
#elif defined(__ARM_NEON) && defined(__aarch64__)
  for (; i + 4 <= n; i += 4) vst1q_f32(dst + i, vsqrtq_f32(vld1q_f32(src + i)));
#endif
  for (; i < n; ++i) dst[i] = std::sqrt(src[i]);
}

inline float reduce_lanes(const float* a) {
  // fixed pairwise order
  float t[kLanes];
  for (int l = 0; l < kLanes; ++l) t[l] = a[l];
  for (int w = kLanes / 2; w >= 1; w /= 2)
    for (int l = 0; l < w; ++l) t[l] += t[l + w];
  return t[0];
}

// sum_i u[i] * d[i] over n elements in kLanes fp32 lanes, folded in a fixed order
template <typename U>
inline float dot_block(const U* __restrict u, const float* __restrict d, int64_t n) {
  alignas(64) float a[kLanes] = {0};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) a[l] += to_f(u[i + l]) * d[i + l];
  for (int l = 0; i + l < n; ++l) a[l] += to_f(u[i + l]) * d[i + l];
  return reduce_lanes(a);
}

// One tensor's buffers and hyperparameters, with its chunk kernels chosen once (element types
// and flags as template parameters). g is null in pass 2, vmax without amsgrad, u when k = 0.
struct Job {
  void* p;
  const void* g;
  float* m;
  float* v;
  float* vmax;
  const void* u;
  int64_t n, k;
  Hyper h;
  // pass 1 over elements [a, b): moments written, out[0..k) = U d, out[k] = ||d||^2 (fp64)
  void (*pass1)(const Job&, int64_t a, int64_t b, double* out);
  // pass 2 over [a, b): parameters written; returns ||d - new||^2 (fp64)
  double (*pass2)(const Job&, const float* w, int64_t a, int64_t b);
};

// d = (m / bc1) / (sqrt(vv) / bc2_sqrt + eps) [+ wd p], rounded step by step; sq holds sqrt(vv)
template <bool PWD>
inline void directions(const Hyper& h, const float* __restrict m, const float* __restrict sq,
                       const float* __restrict p, float* __restrict d, int64_t n) {
  const float bc1 = h.bc1, bc2 = h.bc2_sqrt, eps = h.eps, wd = h.wd;
  for (int64_t i = 0; i < n; ++i) {
    float x = (m[i] / bc1) / (sq[i] / bc2 + eps);
    if (PWD) x += wd * p[i];
    d[i] = x;
  }
}

template <typename P, typename U, bool AMS, bool MAX, bool PWD, bool AVX2>
__attribute__((always_inline)) inline void pass1_body(const Job& t, int64_t a, int64_t b, double* out) {
  const Hyper& h = t.h;
  const P* g = static_cast<const P*>(t.g);
  const P* p = static_cast<const P*>(t.p);
  const U* u = static_cast<const U*>(t.u);
  const int64_t k = t.k;
  const float beta2 = h.beta2, omb1 = h.one_minus_beta1, omb2 = h.one_minus_beta2;
  alignas(64) float gb[kBlock], vb[kBlock], sb[kBlock], pb[kBlock], db[kBlock];
  for (int64_t j = 0; j <= k; ++j) out[j] = 0.0;
  for (int64_t s = a; s < b; s += kBlock) {
    const int64_t n = std::min(kBlock, b - s);
    float* __restrict m = t.m + s;
    float* __restrict v = t.v + s;
    if (s + kBlock < b) {
      const int64_t nn = std::min(kBlock, b - s - kBlock);
      prefetch(g + s + kBlock, nn);
      prefetch(m + kBlock, nn);
      prefetch(v + kBlock, nn);
      if (AMS) prefetch(t.vmax + s + kBlock, nn);
      if (PWD) prefetch(p + s + kBlock, nn);
      for (int64_t j = 0; j < k; ++j) prefetch(u + j * t.n + s + kBlock, nn);
    }
    const float* __restrict gf = as_f32(g + s, gb, n);
    for (int64_t i = 0; i < n; ++i) {
      const float gg = MAX ? -gf[i] : gf[i];
      const float mi = m[i] + omb1 * (gg - m[i]);  // lerp, as torch's AdamW
      const float vi = v[i] * beta2 + omb2 * gg * gg;
      m[i] = mi;
      v[i] = vi;
      vb[i] = vi;
    }
    if (AMS) {
      float* __restrict x = t.vmax + s;
      for (int64_t i = 0; i < n; ++i) {
        const float xo = x[i], vi = vb[i];
        const float xi = xo < vi ? vi : xo;  // std::max(x, v)
        x[i] = xi;
        vb[i] = xi;
      }
    }
    if constexpr (AVX2) sqrt_block_avx2(vb, sb, n);
    else sqrt_block(vb, sb, n);
    const float* pf = PWD ? as_f32(p + s, pb, n) : nullptr;
    directions<PWD>(h, m, sb, pf, db, n);
    for (int64_t j = 0; j < k; ++j) out[j] += dot_block(u + j * t.n + s, db, n);
    out[k] += dot_block(db, db, n);
  }
}

template <typename P, typename U, bool AMS, bool PWD, bool AVX2>
__attribute__((always_inline)) inline double pass2_body(const Job& t, const float* w, int64_t a, int64_t b) {
  const Hyper& h = t.h;
  P* p = static_cast<P*>(t.p);
  const U* u = static_cast<const U*>(t.u);
  const int64_t k = t.k;
  const float shrink = PWD ? 1.0f : 1.0f - h.lr * h.wd;
  const float kappa = h.kappa, omk = 1.0f - h.kappa, lr = h.lr;
  alignas(64) float sb[kBlock], pb[kBlock], db[kBlock], ub[kBlock], rb[kBlock];
  double removed = 0;
  for (int64_t s = a; s < b; s += kBlock) {
    const int64_t n = std::min(kBlock, b - s);
    if constexpr (AVX2) sqrt_block_avx2((AMS ? t.vmax : t.v) + s, sb, n);
    else sqrt_block((AMS ? t.vmax : t.v) + s, sb, n);
    if (s + kBlock < b) {
      const int64_t nn = std::min(kBlock, b - s - kBlock);
      prefetch(t.m + s + kBlock, nn);
      prefetch((AMS ? t.vmax : t.v) + s + kBlock, nn);
      prefetch(p + s + kBlock, nn);
      for (int64_t j = 0; j < k; ++j) prefetch(u + j * t.n + s + kBlock, nn);
    }
    const float* pf = PWD ? as_f32(p + s, pb, n) : nullptr;
    directions<PWD>(h, t.m + s, sb, pf, db, n);
    for (int64_t i = 0; i < n; ++i) ub[i] = 0.0f;
    for (int64_t j = 0; j < k; ++j) {
      const float wj = w[j];
      const U* __restrict ur = u + j * t.n + s;
      for (int64_t i = 0; i < n; ++i) ub[i] += to_f(ur[i]) * wj;
    }
    P* __restrict po = p + s;
    for (int64_t i = 0; i < n; ++i) {
      const float de = db[i], sub = ub[i];
      const float d = kappa * de - sub;
      rb[i] = omk * de + sub;
      po[i] = static_cast<P>(to_f(po[i]) * shrink - lr * d);
    }
    removed += dot_block(rb, rb, n);
  }
  return removed;
}

// The same bodies compiled for the baseline ISA and, on x86-64, for AVX2 (8-lane div/sqrt; no
// FMA, so no contraction: bit for bit the same results), chosen at run time.
template <typename P, typename U, bool AMS, bool MAX, bool PWD>
void pass1_chunk(const Job& t, int64_t a, int64_t b, double* out) {
  pass1_body<P, U, AMS, MAX, PWD, false>(t, a, b, out);
}
template <typename P, typename U, bool AMS, bool PWD>
double pass2_chunk(const Job& t, const float* w, int64_t a, int64_t b) {
  return pass2_body<P, U, AMS, PWD, false>(t, w, a, b);
}
#if OGPSA_AVX2
template <typename P, typename U, bool AMS, bool MAX, bool PWD>
__attribute__((target("avx2"))) void pass1_chunk_avx2(const Job& t, int64_t a, int64_t b, double* out) {
  pass1_body<P, U, AMS, MAX, PWD, true>(t, a, b, out);
}
template <typename P, typename U, bool AMS, bool PWD>
__attribute__((target("avx2"))) double pass2_chunk_avx2(const Job& t, const float* w, int64_t a, int64_t b) {
  return pass2_body<P, U, AMS, PWD, true>(t, w, a, b);
}
#endif

bool use_avx2() {
#if OGPSA_AVX2
  static const bool yes = __builtin_cpu_supports("avx2");
  return yes;
#else
  return false;
#endif
}

template <typename P, typename U, bool AMS, bool PWD>
void set_kernels(Job& j) {
#if OGPSA_AVX2
  if (use_avx2()) {
    j.pass1 = j.h.maximize ? &pass1_chunk_avx2<P, U, AMS, true, PWD> : &pass1_chunk_avx2<P, U, AMS, false, PWD>;
    j.pass2 = &pass2_chunk_avx2<P, U, AMS, PWD>;
    return;
  }
#endif
  j.pass1 = j.h.maximize ? &pass1_chunk<P, U, AMS, true, PWD> : &pass1_chunk<P, U, AMS, false, PWD>;
  j.pass2 = &pass2_chunk<P, U, AMS, PWD>;
}

// g_t null in pass 2, vmax_t null without amsgrad; dtypes checked by validate()
Job make_job(const at::Tensor& p_t, const at::Tensor* g_t, const at::Tensor& m_t, const at::Tensor& v_t,
             const at::Tensor* vmax_t, const at::Tensor& u_t, const Hyper& h, const char* op) {
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
      if (pwd) set_kernels<P, U, true, true>(j);
      else set_kernels<P, U, true, false>(j);
    } else {
      if (pwd) set_kernels<P, U, false, true>(j);
      else set_kernels<P, U, false, false>(j);
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
  const int64_t T = static_cast<int64_t>(params.size());
  auto out = at::zeros({T, 2}, at::TensorOptions().dtype(at::kDouble));
  double* st = out.data_ptr<double>();
  std::vector<Job> jobs;
  std::vector<const float*> minv(T, nullptr);
  std::vector<int64_t> small, large;
  for (int64_t i = 0; i < T; ++i) {
    const Hyper h = make_hyper(steps[i], lr, beta1, beta2, eps, weight_decay, maximize, project_weight_decay);
    jobs.push_back(make_job(params[i], &grads[i], exp_avgs[i], exp_avg_sqs[i], vmax_of(L, i), bases[i], h,
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
    jobs.push_back(make_job(params[i], &grads[i], exp_avgs[i], exp_avg_sqs[i], vmax_of(L, i), bases[i], h,
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
    jobs.push_back(make_job(params[i], nullptr, exp_avgs[i], exp_avg_sqs[i], vmax_of(L, i), bases[i], h,
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
