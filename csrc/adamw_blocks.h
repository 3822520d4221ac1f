// ogpsa._C: the element-wise block kernels of the projected AdamW step on the CPU (passes 1 and 2
// over a range of one tensor) and their run-time ISA selection (baseline / AVX2 / AVX-512, see
// csrc/cpu_simd.h). Included by csrc/adamw.cpp only (everything here has internal linkage); the
// op-level driver, validation, chunking and the torch.library registration are there. See that
// file's header for the math, the rounding order and the determinism rules these kernels follow.
#pragma once

#include "cpu_simd.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace ogpsa {
namespace {

constexpr int64_t kChunk = 16384;  // elements per chunk: fixes the summation order
constexpr int kMaxK = 16;
constexpr int64_t kBlock = 512;             // element-wise block (fp32 stack buffers, in L1)
constexpr int64_t kFuseMaxNumel = 1 << 18;  // projected_adamw_: one work item per tensor up to this

struct Hyper {
  // 1 - beta in double, then rounded: 1 - (float)0.999 is off by 1.3e-5 relative.
  // rbc1 = 1 / (1 - beta1^t), rbc2 = 1 / sqrt(1 - beta2^t): computed in double, rounded once, and
  // multiplied (no division by the bias corrections; see adamw.cpp's header for the ulps)
  float beta1, beta2, one_minus_beta1, one_minus_beta2, eps, rbc1, rbc2, lr, wd, kappa;
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
  h.rbc1 = static_cast<float>(1.0 / (1.0 - std::pow(beta1, static_cast<double>(step))));
  h.rbc2 = static_cast<float>(1.0 / std::sqrt(1.0 - std::pow(beta2, static_cast<double>(step))));
  h.lr = static_cast<float>(lr);
  h.wd = static_cast<float>(weight_decay);
  h.kappa = static_cast<float>(kappa);
  h.maximize = maximize;
  h.project_wd = project_weight_decay;
  return h;
}

// One tensor's buffers and hyperparameters, with its chunk kernels chosen once (element types,
// flags and ISA as template parameters). g is null in pass 2, vmax without amsgrad, u when k = 0.
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

// d = (m rbc1) / (sqrt(vv) rbc2 + eps): one division, rounded step by step in this order
OGPSA_INLINE float direction(float m, float vv, float rbc1, float rbc2, float eps) {
  return (m * rbc1) / (std::sqrt(vv) * rbc2 + eps);
}

template <typename P, typename U, bool AMS, bool MAX, bool PWD>
OGPSA_INLINE void pass1_body(const Job& t, int64_t a, int64_t b, double* out) {
  const Hyper& h = t.h;
  const P* g = static_cast<const P*>(t.g);
  const P* p = static_cast<const P*>(t.p);
  const U* u = static_cast<const U*>(t.u);
  const int64_t k = t.k;
  const float beta2 = h.beta2, omb1 = h.one_minus_beta1, omb2 = h.one_minus_beta2;
  const float rbc1 = h.rbc1, rbc2 = h.rbc2, eps = h.eps, wd = h.wd;
  alignas(64) float db[kBlock];
  for (int64_t j = 0; j <= k; ++j) out[j] = 0.0;
  for (int64_t s = a; s < b; s += kBlock) {
    const int64_t n = std::min(kBlock, b - s);
    float* __restrict m = t.m + s;
    float* __restrict v = t.v + s;
    float* __restrict x = AMS ? t.vmax + s : nullptr;
    const P* __restrict gs = g + s;
    const P* __restrict ps = PWD ? p + s : nullptr;
    // moments and d in one loop (vectorised: sqrt and the one division are SIMD instructions)
    for (int64_t i = 0; i < n; ++i) {
      const float gg = MAX ? -to_f(gs[i]) : to_f(gs[i]);
      const float mi = m[i] + omb1 * (gg - m[i]);  // lerp, as torch's AdamW
      float vi = v[i] * beta2 + omb2 * gg * gg;
      m[i] = mi;
      v[i] = vi;
      if (AMS) {
        const float xo = x[i];
        vi = xo < vi ? vi : xo;  // std::max(x, v)
        x[i] = vi;
      }
      float d = direction(mi, vi, rbc1, rbc2, eps);
      if (PWD) d += wd * to_f(ps[i]);
      db[i] = d;
    }
    alignas(64) float acc[kMaxK + 1][kLanes] = {};
    dot_rows_k(u + s, t.n, k, db, n, acc);
    dot_acc(db, db, n, acc[k]);
    for (int64_t j = 0; j <= k; ++j) out[j] += reduce_lanes(acc[j]);
  }
}

template <typename P, typename U, bool AMS, bool PWD>
OGPSA_INLINE double pass2_body(const Job& t, const float* w, int64_t a, int64_t b) {
  const Hyper& h = t.h;
  P* p = static_cast<P*>(t.p);
  const U* u = static_cast<const U*>(t.u);
  const int64_t k = t.k;
  const float shrink = PWD ? 1.0f : 1.0f - h.lr * h.wd;
  const float kappa = h.kappa, omk = 1.0f - h.kappa, lr = h.lr;
  const float rbc1 = h.rbc1, rbc2 = h.rbc2, eps = h.eps, wd = h.wd;
  const float* vsrc = AMS ? t.vmax : t.v;
  alignas(64) float ub[kBlock], rb[kBlock];
  double removed = 0;
  for (int64_t s = a; s < b; s += kBlock) {
    const int64_t n = std::min(kBlock, b - s);
    // U^T w over the block first (k streams), then one loop: d, the update, what was removed
    for (int64_t i = 0; i < n; ++i) ub[i] = 0.0f;
    axpy_rows_k<false>(u + s, t.n, k, w, ub, n);
    const float* __restrict ms = t.m + s;
    const float* __restrict vs = vsrc + s;
    P* __restrict po = p + s;
    for (int64_t i = 0; i < n; ++i) {
      const float pi = to_f(po[i]);
      float de = direction(ms[i], vs[i], rbc1, rbc2, eps);
      if (PWD) de += wd * pi;
      const float sub = ub[i];
      const float d = kappa * de - sub;
      rb[i] = omk * de + sub;
      po[i] = static_cast<P>(pi * shrink - lr * d);
    }
    removed += dot_block(rb, rb, n);
  }
  return removed;
}

// The same bodies compiled for the baseline ISA and, on x86-64, for AVX2 and AVX-512 (no FMA
// contraction: bit for bit the same results), chosen at run time (cpu_isa()).
template <typename P, typename U, bool AMS, bool MAX, bool PWD>
void pass1_chunk(const Job& t, int64_t a, int64_t b, double* out) {
  pass1_body<P, U, AMS, MAX, PWD>(t, a, b, out);
}
template <typename P, typename U, bool AMS, bool PWD>
double pass2_chunk(const Job& t, const float* w, int64_t a, int64_t b) {
  return pass2_body<P, U, AMS, PWD>(t, w, a, b);
}
#if OGPSA_X86
template <typename P, typename U, bool AMS, bool MAX, bool PWD>
OGPSA_TARGET_AVX2 void pass1_chunk_avx2(const Job& t, int64_t a, int64_t b, double* out) {
  pass1_body<P, U, AMS, MAX, PWD>(t, a, b, out);
}
template <typename P, typename U, bool AMS, bool PWD>
OGPSA_TARGET_AVX2 double pass2_chunk_avx2(const Job& t, const float* w, int64_t a, int64_t b) {
  return pass2_body<P, U, AMS, PWD>(t, w, a, b);
}
template <typename P, typename U, bool AMS, bool MAX, bool PWD>
OGPSA_TARGET_AVX512 void pass1_chunk_avx512(const Job& t, int64_t a, int64_t b, double* out) {
  pass1_body<P, U, AMS, MAX, PWD>(t, a, b, out);
}
template <typename P, typename U, bool AMS, bool PWD>
OGPSA_TARGET_AVX512 double pass2_chunk_avx512(const Job& t, const float* w, int64_t a, int64_t b) {
  return pass2_body<P, U, AMS, PWD>(t, w, a, b);
}
#endif

template <typename P, typename U, bool AMS, bool PWD>
void set_kernels(Job& j, Isa isa) {
#if OGPSA_X86
  if (isa == Isa::kAvx512) {
    j.pass1 = j.h.maximize ? &pass1_chunk_avx512<P, U, AMS, true, PWD> : &pass1_chunk_avx512<P, U, AMS, false, PWD>;
    j.pass2 = &pass2_chunk_avx512<P, U, AMS, PWD>;
    return;
  }
  if (isa == Isa::kAvx2) {
    j.pass1 = j.h.maximize ? &pass1_chunk_avx2<P, U, AMS, true, PWD> : &pass1_chunk_avx2<P, U, AMS, false, PWD>;
    j.pass2 = &pass2_chunk_avx2<P, U, AMS, PWD>;
    return;
  }
#endif
  (void)isa;
  j.pass1 = j.h.maximize ? &pass1_chunk<P, U, AMS, true, PWD> : &pass1_chunk<P, U, AMS, false, PWD>;
  j.pass2 = &pass2_chunk<P, U, AMS, PWD>;
}

}  // namespace
}  // namespace ogpsa
