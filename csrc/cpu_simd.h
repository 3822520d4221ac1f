// ogpsa._C: what the CPU kernels of csrc/ops.cpp and csrc/adamw.cpp share: element conversion,
// lane-parallel dot products, and the run-time choice of the instruction set (ISA).
//
// Every kernel body is a template on `Isa` and is compiled once per ISA: the baseline build
// (SSE2 on x86-64, NEON on aarch64), and on x86-64 also inside functions marked
// __attribute__((target("avx2"))) and target(avx512...). The helpers here are always_inline, so
// they are compiled into each of those bodies with its ISA (a plain `inline` helper may stay an
// out-of-line baseline function that the AVX2 code calls: measured, the AdamW dots then ran as
// 4-wide SSE2). The loops are written for the auto-vectoriser: kLanes independent fp32
// accumulators per dot, so 4-, 8- and 16-wide vectors all sum lane l over the elements i = l mod
// kLanes in the same order. setup.py compiles with -ffp-contract=off (no FMA contraction) and
// -fno-math-errno (std::sqrt vectorises to sqrtps; it is still correctly rounded): every ISA
// gives bit-for-bit the same results, which tests/test_cext.py checks per ISA.
//
// Choice at run time: the widest ISA that both the CPU and this build have, or the one named by
// OGPSA_CPU_ISA (baseline, avx2, avx512 or auto; read at every op call, so a test can switch it;
// naming one the CPU lacks is an error, never a silent fallback).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#if !defined(__NO_MATH_ERRNO__) && defined(__GNUC__)
#error "ogpsa._C: compile with -fno-math-errno (setup.py does), else std::sqrt stays scalar in the kernels"
#endif

#define OGPSA_INLINE __attribute__((always_inline)) inline

#if defined(__x86_64__) && defined(__GNUC__)
#define OGPSA_X86 1
#define OGPSA_TARGET_AVX2 __attribute__((target("avx2")))
// 512-bit vectors (GCC otherwise prefers 256-bit ones for generic tuning); no FMA contraction
// (-ffp-contract=off), so the results are the baseline's bit for bit
#define OGPSA_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,prefer-vector-width=512")))
#else
#define OGPSA_X86 0
#endif

namespace ogpsa {
namespace {

enum class Isa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

inline const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx2:
      return "avx2";
    case Isa::kAvx512:
      return "avx512";
    default:
      return "baseline";
  }
}

// The widest ISA this CPU and this build both have.
inline Isa best_isa() {
#if OGPSA_X86
  static const Isa best = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
      return Isa::kAvx512;
    if (__builtin_cpu_supports("avx2")) return Isa::kAvx2;
    return Isa::kBaseline;
  }();
  return best;
#else
  return Isa::kBaseline;
#endif
}

// The ISA the kernels run with now: OGPSA_CPU_ISA if set (checked), else best_isa().
inline Isa cpu_isa() {
  const char* env = std::getenv("OGPSA_CPU_ISA");
  if (env == nullptr || *env == '\0' || std::strcmp(env, "auto") == 0) return best_isa();
  Isa want;
  if (std::strcmp(env, "baseline") == 0) {
    want = Isa::kBaseline;
  } else if (std::strcmp(env, "avx2") == 0) {
    want = Isa::kAvx2;
  } else if (std::strcmp(env, "avx512") == 0) {
    want = Isa::kAvx512;
  } else {
    TORCH_CHECK(false, "OGPSA_CPU_ISA=", std::string(env),
                " is not one of auto, baseline, avx2, avx512 (the instruction set of ogpsa's CPU kernels)");
  }
  TORCH_CHECK(static_cast<int>(want) <= static_cast<int>(best_isa()), "OGPSA_CPU_ISA=", std::string(env),
              ": this CPU (or this build) has at most ", isa_name(best_isa()));
  return want;
}

template <typename T>
OGPSA_INLINE float to_f(T v) {
  return static_cast<float>(v);
}

template <>
OGPSA_INLINE float to_f<c10::BFloat16>(c10::BFloat16 v) {
  // bf16 is the top half of an fp32 (exactly c10's conversion): a shift the compiler vectorises
  const uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

template <typename T>
OGPSA_INLINE void load_block(const T* __restrict src, float* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = to_f(src[i]);
}

constexpr int kLanes = 16;  // independent fp32 accumulators per dot

OGPSA_INLINE float reduce_lanes(const float* a) {
  // fixed pairwise order
  float t[kLanes];
  for (int l = 0; l < kLanes; ++l) t[l] = a[l];
  for (int w = kLanes / 2; w >= 1; w /= 2)
    for (int l = 0; l < w; ++l) t[l] += t[l + w];
  return t[0];
}

// acc[0..kLanes) += lane sums of u[i] * d[i] over n elements (d fp32, u any element type)
template <typename U>
OGPSA_INLINE void dot_acc(const U* __restrict u, const float* __restrict d, int64_t n, float* __restrict acc) {
  alignas(64) float a[kLanes];
  for (int l = 0; l < kLanes; ++l) a[l] = acc[l];
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) a[l] += to_f(u[i + l]) * d[i + l];
  for (int l = 0; i + l < n; ++l) a[l] += to_f(u[i + l]) * d[i + l];
  for (int l = 0; l < kLanes; ++l) acc[l] = a[l];
}

// sum_i u[i] * d[i] over n elements in kLanes fp32 lanes, folded in a fixed order
template <typename U>
OGPSA_INLINE float dot_block(const U* __restrict u, const float* __restrict d, int64_t n) {
  alignas(64) float a[kLanes] = {0};
  dot_acc(u, d, n, a);
  return reduce_lanes(a);
}


// Basis rows side by side: rows r < R of U at stride ld, read in one loop. Reading the k rows one
// after the other (a block of each in turn) made the cost grow faster than the bytes in k (LoRA
// list: 14.6x the time from k=1 to 16 for 7x the bytes): each row's block starts cold on a new
// page, and with the rows at a power-of-two stride every row block falls on the same cache sets;
// R concurrent streams keep R pages in flight. Each row's lanes see the same elements in the same
// order as dot_acc, so the results are those of the row-by-row loops bit for bit.
constexpr int kRowTile = 4;

// acc[r][0..kLanes) += lane sums of u_r[i] * d[i], r < R
template <int R, typename U>
OGPSA_INLINE void dot_rows(const U* __restrict u, int64_t ld, const float* __restrict d, int64_t n,
                           float (*__restrict acc)[kLanes]) {
  alignas(64) float a[R][kLanes];
  for (int r = 0; r < R; ++r)
    for (int l = 0; l < kLanes; ++l) a[r][l] = acc[r][l];
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int r = 0; r < R; ++r)
      for (int l = 0; l < kLanes; ++l) a[r][l] += to_f(u[r * ld + i + l]) * d[i + l];
  for (int l = 0; i + l < n; ++l)
    for (int r = 0; r < R; ++r) a[r][l] += to_f(u[r * ld + i + l]) * d[i + l];
  for (int r = 0; r < R; ++r)
    for (int l = 0; l < kLanes; ++l) acc[r][l] = a[r][l];
}

// acc[j] += lane sums of u_j . d for the k rows j < k, in tiles of kRowTile rows
template <typename U>
OGPSA_INLINE void dot_rows_k(const U* u, int64_t ld, int64_t k, const float* d, int64_t n, float (*acc)[kLanes]) {
  int64_t j = 0;
  for (; j + kRowTile <= k; j += kRowTile) dot_rows<kRowTile>(u + j * ld, ld, d, n, acc + j);
  if (k - j >= 2) {
    dot_rows<2>(u + j * ld, ld, d, n, acc + j);
    j += 2;
  }
  if (j < k) dot_rows<1>(u + j * ld, ld, d, n, acc + j);
}

// x[i] -= sum_{r<R} w[r] u_r[i] (SUB) or x[i] += sum_{r<R} u_r[i] w[r], one row after the other
// per element (the order of the row-by-row loops)
template <int R, bool SUB, typename U>
OGPSA_INLINE void axpy_rows(const U* __restrict u, int64_t ld, const float* w, float* __restrict x, int64_t n) {
  float ws[R];
  for (int r = 0; r < R; ++r) ws[r] = w[r];
  for (int64_t i = 0; i < n; ++i) {
    float y = x[i];
    for (int r = 0; r < R; ++r) {
      if (SUB) y -= ws[r] * to_f(u[r * ld + i]);
      else y += to_f(u[r * ld + i]) * ws[r];
    }
    x[i] = y;
  }
}

template <bool SUB, typename U>
OGPSA_INLINE void axpy_rows_k(const U* u, int64_t ld, int64_t k, const float* w, float* x, int64_t n) {
  int64_t j = 0;
  for (; j + kRowTile <= k; j += kRowTile) axpy_rows<kRowTile, SUB>(u + j * ld, ld, w + j, x, n);
  if (k - j >= 2) {
    axpy_rows<2, SUB>(u + j * ld, ld, w + j, x, n);
    j += 2;
  }
  if (j < k) axpy_rows<1, SUB>(u + j * ld, ld, w + j, x, n);
}

}  // namespace
}  // namespace ogpsa
