// ogpsa._C: the element-wise block kernels of the projected AdamW step on the CPU (passes 1 and 2
// over a range of one tensor, the SIMD helpers, and their run-time AVX2 / baseline selection).
// Included by csrc/adamw.cpp only (everything here has internal linkage); the op-level driver,
// validation, chunking and the torch.library registration are there. See that file's header for
// the math, the rounding order and the determinism rules these kernels follow.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

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

}  // namespace
}  // namespace ogpsa
