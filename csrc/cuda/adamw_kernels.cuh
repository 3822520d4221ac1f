// Device code of ogpsa::projected_adamw_ (and of its two passes as separate ops) on CUDA. Free of
// torch headers: element types are template parameters, so tests compile it alone for sm_90 (SASS
// check) and as plain C++ on the CPU (tests/adamw_emu.cpp runs the kernels in an emulation of
// the CUDA threads). Launch order: adamw_launch.cuh; validation and registration: adamw_cuda.cu.
//
// The projected AdamW step (update-space OGPSA); schema and math as the CPU kernel csrc/adamw.cpp,
// with the same statistics. Per tensor i:
//   pass 1: m, v (and max v) from the raw gradient, written once; d = m_hat/(sqrt(v_hat)+eps)
//           (+ wd p when the decay is projected); per chunk, c = U d and ||d||^2 (fp32) into
//           its own partial row
//   step:   one block per tensor sums its partial rows (fixed fp64 tree) and solves w = M^{-1} c
//           (fp64 accumulation, M^{-1} given in fp32) on the device: no host sync
//   pass 2: d recomputed from the stored moments, p <- p (1 - lr wd) [decoupled] - lr (d - U^T w);
//           ||U^T w||^2 per chunk, summed by the same tree
// Tensors of at most kAdamSingleMax elements take one block and one pass (d kept in registers,
// the k x k step in the block). Returns [T, 2] fp64 on the device (||d||^2, ||U^T w||^2).
// The separate ops: projected_adamw_pass1_ runs pass 1 on every tensor and sums its partial rows
// into [T, k_max + 1]; projected_adamw_pass2_ runs pass 2 with the caller's w and kappa
// (new = kappa d - U^T w, removed part (1 - kappa) d + U^T w).
//
// Launch tables go by value in the kernel arguments: up to kAdamTensors tensors per launch and
// any number of chunks (a block finds its tensor from the per-slot first-block prefix), so a
// large model needs ceil(T / 32) launches per pass. Runs of V elements per thread (V = 4 for
// fp32 parameters, 8 for 16-bit ones) are 16-byte vector loads and stores when every buffer of
// the tensor starts on 16 bytes and V divides its length; otherwise the same elements go one by
// one (same thread assignment and summation order, so alignment never changes a result).
// Deterministic: no atomics; partial rows summed in a fixed order.

#pragma once

#include "kernels.cuh"

#include <cstring>

namespace ogpsa {
namespace cuda {

constexpr int kAdamThreads = 512;
constexpr int64_t kAdamChunk = 16384;      // elements per block in the two-pass path
constexpr int kAdamTensors = 32;           // tensors per launch table (AdamMeta: 2.7 KB)
constexpr int64_t kAdamSingleMax = 8192;   // one block, one pass: 16 values per thread
constexpr int kAdamReduce = 96;            // tensors per step-kernel launch (AdamReduceMeta: 3 KB)

struct AdamMeta {
  void* p[kAdamTensors];
  const void* g[kAdamTensors];
  float* m[kAdamTensors];
  float* v[kAdamTensors];
  float* vmax[kAdamTensors];  // nullptr without amsgrad
  const void* u[kAdamTensors];
  const float* minv[kAdamTensors];
  int64_t n[kAdamTensors];
  float bc1[kAdamTensors];   // 1 - beta1^step
  float bc2s[kAdamTensors];  // sqrt(1 - beta2^step)
  int32_t k[kAdamTensors];
  int32_t tid[kAdamTensors];         // single pass: the caller's index; two-pass: the weights row
  int32_t block0[kAdamTensors + 1];  // first block of each slot; block0[nt] = blocks in the launch
  int32_t nt;
};

struct AdamHyper {
  float beta1, beta2, omb1, omb2, eps, lr, wd, shrink;  // omb = 1 - beta rounded from double
  float kappa;  // pass 2: new = kappa d - U^T w (1 in projected_adamw_)
  bool maximize, project_wd;
};

// per large tensor of a step launch: its partial rows and where its results go
struct AdamReduceMeta {
  int64_t first[kAdamReduce];
  int32_t count[kAdamReduce];
  int32_t tid[kAdamReduce];    // caller's index (stats row)
  int32_t local[kAdamReduce];  // weights row
  int32_t k[kAdamReduce];
  const float* minv[kAdamReduce];
};

// 4 elements (16 bytes of fp32 moments) per run for fp32 parameters, 8 for 16-bit ones
template <typename P>
__host__ __device__ constexpr int adam_width() {
  return sizeof(P) >= 4 ? 4 : 8;
}

// raw bits of one 2- or 4-byte element
template <typename T>
__device__ __forceinline__ unsigned int bits_of(T x) {
  static_assert(sizeof(T) == 2 || sizeof(T) == 4, "2- or 4-byte elements");
  if constexpr (sizeof(T) == 4) {
    unsigned int b;
    memcpy(&b, &x, 4);
    return b;
  } else {
    unsigned short b;
    memcpy(&b, &x, 2);
    return b;
  }
}

// one 16-byte store of four words at a 16-byte aligned global address. PTX by hand: for 16-bit
// parameters the compiler split a struct copy, and even a uint4 / float4 store of the packed words,
// into narrow stores. No "memory" clobber: the loads that follow (other addresses) may still be
// scheduled ahead of it; the operands carry the dependence on the loads before it.
__device__ __forceinline__ void st_global_v4(void* p, const unsigned int (&w)[4]) {
#if defined(__CUDA_ARCH__)
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(w[0]), "r"(w[1]), "r"(w[2]), "r"(w[3]));
#else
  memcpy(p, w, 16);
#endif
}

// N elements from `in` to p: 16-byte vector stores when `vec` (p on 16 bytes, N sizeof(T) a
// multiple of 16), else one by one below `left`; the words are packed by hand.
template <typename T, int N>
__device__ __forceinline__ void store_pieces(T* p, bool vec, int64_t left, const float (&in)[N]) {
  constexpr int P = static_cast<int>(16 / sizeof(T));  // elements per 16-byte store
  static_assert(N % P == 0, "runs are whole 16-byte pieces");
  if (vec) {
#pragma unroll
    for (int q = 0; q < N / P; ++q) {
      unsigned int w[4] = {0u, 0u, 0u, 0u};
#pragma unroll
      for (int j = 0; j < P; ++j) {
        const unsigned int b = bits_of(static_cast<T>(in[q * P + j]));
        if constexpr (sizeof(T) == 4) w[j] = b;
        else w[j / 2] |= b << (16 * (j % 2));
      }
      st_global_v4(p + q * P, w);
    }
  } else {
#pragma unroll
    for (int e = 0; e < N; ++e)
      if (e < left) p[e] = static_cast<T>(in[e]);
  }
}

// m, v of one element from the raw gradient (as csrc/adamw.cpp and torch's AdamW: lerp for m).
// Element-wise arithmetic is rounded step by step in the CPU kernel's order (no FMA contraction),
// so moments and parameters match it exactly for the same w.
__device__ __forceinline__ void adam_moments(const AdamHyper& h, float g, float& m, float& v) {
  if (h.maximize) g = -g;
  m = __fadd_rn(m, __fmul_rn(h.omb1, __fsub_rn(g, m)));
  v = __fadd_rn(__fmul_rn(v, h.beta2), __fmul_rn(__fmul_rn(h.omb2, g), g));
}

// d = (m / bc1) / (sqrt(vv) / bc2s + eps) [+ wd p]; explicitly rounded (the CPU kernel's order) so
// that pass 1 and pass 2, and the CPU kernel, compute the same d bit for bit
__device__ __forceinline__ float adam_dir(const AdamHyper& h, float bc1, float bc2s, float m, float vv, float p) {
  float d = __fdiv_rn(__fdiv_rn(m, bc1), __fadd_rn(__fdiv_rn(__fsqrt_rn(vv), bc2s), h.eps));
  if (h.project_wd) d = __fadd_rn(d, __fmul_rn(h.wd, p));
  return d;
}

// One run of V elements at i of slot s: moments updated and stored, directions into d (zero
// beyond the tensor).
template <typename P, int V>
__device__ __forceinline__ void adam_run_pass1(const AdamHyper& h, const AdamMeta& meta, int s, int64_t i,
                                               bool vec, int64_t left, float (&d)[V]) {
  const P* p = static_cast<const P*>(meta.p[s]);
  const P* g = static_cast<const P*>(meta.g[s]);
  float* m = meta.m[s];
  float* v = meta.v[s];
  float* x = meta.vmax[s];
  float gv[V], mv[V], vv[V], xv[V], pv[V];
  load_run<P, V>(g + i, vec, left, gv);
  load_run<float, V>(m + i, vec, left, mv);
  load_run<float, V>(v + i, vec, left, vv);
  if (x != nullptr) load_run<float, V>(x + i, vec, left, xv);
  if (h.project_wd) {
    load_run<P, V>(p + i, vec, left, pv);
  } else {
#pragma unroll
    for (int e = 0; e < V; ++e) pv[e] = 0.f;
  }
#pragma unroll
  for (int e = 0; e < V; ++e) {
    adam_moments(h, gv[e], mv[e], vv[e]);
    float den = vv[e];
    if (x != nullptr) {
      xv[e] = xv[e] < vv[e] ? vv[e] : xv[e];  // std::max, as the CPU kernel
      den = xv[e];
    }
    d[e] = e < left ? adam_dir(h, meta.bc1[s], meta.bc2s[s], mv[e], den, pv[e]) : 0.f;
  }
  store_pieces<float, V>(m + i, vec, left, mv);
  store_pieces<float, V>(v + i, vec, left, vv);
  if (x != nullptr) store_pieces<float, V>(x + i, vec, left, xv);
}

// c_j += U_j[i..i+V) . d (j < k) and ||d||^2
template <typename U, int V, int K>
__device__ __forceinline__ void adam_dots(const U* u, int64_t n, int k, int64_t i, bool vec, int64_t left,
                                          const float (&d)[V], float (&acc)[K + 1]) {
#pragma unroll
  for (int e = 0; e < V; ++e) acc[K] += d[e] * d[e];
#pragma unroll
  for (int j = 0; j < K; ++j) {
    if (j < k) {
      float uv[V];
      load_run<U, V>(u + j * n + i, vec, left, uv);
#pragma unroll
      for (int e = 0; e < V; ++e) acc[j] += uv[e] * d[e];
    }
  }
}

// p <- p * shrink - lr (kappa d - U^T w) for one run (pv: p of the run, loaded by the caller);
// returns the run's ||(1 - kappa) d + U^T w||^2 (the removed part; ||U^T w||^2 when kappa = 1)
template <typename P, typename U, int V>
__device__ __forceinline__ float adam_run_pass2(const AdamHyper& h, const AdamMeta& meta, int s, int64_t i, bool vec,
                                                int64_t left, const float (&d)[V], float (&pv)[V], const float* w) {
  const U* u = static_cast<const U*>(meta.u[s]);
  const int64_t n = meta.n[s];
  const int k = meta.k[s];
  float sub[V];
#pragma unroll
  for (int e = 0; e < V; ++e) sub[e] = 0.f;
  for (int j = 0; j < k; ++j) {
    float uv[V];
    load_run<U, V>(u + j * n + i, vec, left, uv);
#pragma unroll
    for (int e = 0; e < V; ++e) sub[e] = __fadd_rn(sub[e], __fmul_rn(uv[e], w[j]));
  }
  float rem = 0.f;
  const float keep = 1.f - h.kappa;
#pragma unroll
  for (int e = 0; e < V; ++e) {
    const float r = __fadd_rn(__fmul_rn(keep, d[e]), sub[e]);
    rem += e < left ? r * r : 0.f;
    pv[e] = __fsub_rn(__fmul_rn(pv[e], h.shrink), __fmul_rn(h.lr, __fsub_rn(__fmul_rn(h.kappa, d[e]), sub[e])));
  }
  store_pieces<P, V>(static_cast<P*>(meta.p[s]) + i, vec, left, pv);
  return rem;
}

// every buffer of slot s on 16 bytes and V | n: the run loads and stores are 16-byte vectors
__device__ __forceinline__ bool adam_vec_ok(const AdamMeta& meta, int s, int V) {
  return aligned16(meta.p[s]) && aligned16(meta.g[s]) && aligned16(meta.m[s]) && aligned16(meta.v[s]) &&
         (meta.vmax[s] == nullptr || aligned16(meta.vmax[s])) && (meta.k[s] == 0 || aligned16(meta.u[s])) &&
         meta.n[s] % V == 0;
}

// block -> (slot, chunk) from the table's first-block prefix, then the functor
template <typename Op>
__global__ void __launch_bounds__(Op::kBlock, Op::kMinBlocks) adam_kernel(AdamMeta meta, Op op) {
  const int b = static_cast<int>(blockIdx.x);
  int s = 0;
#pragma unroll
  for (int q = 1; q < kAdamTensors; ++q) s += (q < meta.nt && meta.block0[q] <= b) ? 1 : 0;
  op(meta, s, static_cast<int64_t>(b - meta.block0[s]));
}

// ------------------------------------------------------------------------------------------
// pass 1 (two-pass path): per chunk, [c_0 .. c_{K-1}, ||d||^2] into its row of `part`
// ------------------------------------------------------------------------------------------
template <typename P, typename U, int K>
struct AdamPass1Op {
  static constexpr int kBlock = kAdamThreads;
  static constexpr int kMinBlocks = 1;  // up to ~110 registers at K = 16 (capped at 64 it spills)
  AdamHyper h;
  float* part;  // [rows, K + 1]
  int64_t row0;
  __device__ void operator()(const AdamMeta& meta, int s, int64_t chunk) const {
    __shared__ float sh[32 * (K + 1)];
    __shared__ float res[K + 1];
    constexpr int V = adam_width<P>();
    const U* u = static_cast<const U*>(meta.u[s]);
    const int64_t n = meta.n[s];
    const int k = meta.k[s];
    const int64_t begin = chunk * kAdamChunk;
    const int64_t end = n < begin + kAdamChunk ? n : begin + kAdamChunk;
    const bool vec = adam_vec_ok(meta, s, V);
    float acc[K + 1];
#pragma unroll
    for (int j = 0; j <= K; ++j) acc[j] = 0.f;
    for (int64_t i = begin + static_cast<int64_t>(threadIdx.x) * V; i < end; i += static_cast<int64_t>(blockDim.x) * V) {
      float d[V];
      adam_run_pass1<P, V>(h, meta, s, i, vec, end - i, d);
      adam_dots<U, V, K>(u, n, k, i, vec, end - i, d, acc);
    }
    block_sum<K + 1>(acc, sh, res);
    float* row = part + (row0 + blockIdx.x) * (K + 1);
    for (int c = threadIdx.x; c <= K; c += blockDim.x) row[c] = c == K ? res[K] : (c < k ? res[c] : 0.f);
  }
};

// ------------------------------------------------------------------------------------------
// pass 2 (two-pass path): d from the stored moments, p written; ||U^T w||^2 per chunk
// ------------------------------------------------------------------------------------------
template <typename P, typename U>
struct AdamPass2Op {
  static constexpr int kBlock = kAdamThreads;
  static constexpr int kMinBlocks = 2;  // 64 registers: no spills at any rank
  AdamHyper h;
  const float* weights;  // row meta.tid[s] of a [*, wstride] float32 matrix
  int wstride;
  float* part;  // [rows]
  int64_t row0;
  __device__ void operator()(const AdamMeta& meta, int s, int64_t chunk) const {
    __shared__ float w[kMaxRank];
    __shared__ float sh[32];
    __shared__ float res[1];
    constexpr int V = adam_width<P>();
    const int k = meta.k[s];
    if (static_cast<int>(threadIdx.x) < k)
      w[threadIdx.x] = weights[static_cast<int64_t>(meta.tid[s]) * wstride + threadIdx.x];
    __syncthreads();
    const float* m = meta.m[s];
    const float* vv = meta.vmax[s] != nullptr ? meta.vmax[s] : meta.v[s];
    const P* p = static_cast<const P*>(meta.p[s]);
    const int64_t n = meta.n[s];
    const int64_t begin = chunk * kAdamChunk;
    const int64_t end = n < begin + kAdamChunk ? n : begin + kAdamChunk;
    const bool vec = adam_vec_ok(meta, s, V);
    float acc[1] = {0.f};
    for (int64_t i = begin + static_cast<int64_t>(threadIdx.x) * V; i < end; i += static_cast<int64_t>(blockDim.x) * V) {
      const int64_t left = end - i;
      float mv[V], xv[V], pv[V], d[V];
      load_run<float, V>(m + i, vec, left, mv);
      load_run<float, V>(vv + i, vec, left, xv);
      load_run<P, V>(p + i, vec, left, pv);
#pragma unroll
      for (int e = 0; e < V; ++e) d[e] = e < left ? adam_dir(h, meta.bc1[s], meta.bc2s[s], mv[e], xv[e], pv[e]) : 0.f;
      acc[0] += adam_run_pass2<P, U, V>(h, meta, s, i, vec, left, d, pv, w);
    }
    block_sum<1>(acc, sh, res);
    if (threadIdx.x == 0) part[row0 + blockIdx.x] = res[0];
  }
};

// ------------------------------------------------------------------------------------------
// single pass, one block per tensor of at most kAdamSingleMax elements: moments and d once
// (d kept in registers), c and ||d||^2 summed in the block, w = M^{-1} c (fp64), p written;
// the basis rows are read a second time from L1/L2
// ------------------------------------------------------------------------------------------
template <typename P, typename U, int K>
struct AdamSmallOp {
  static constexpr int kBlock = kAdamThreads;
  static constexpr int kMinBlocks = 1;
  AdamHyper h;
  double* stats;  // [T, 2], row meta.tid[s]
  __device__ void operator()(const AdamMeta& meta, int s, int64_t) const {
    constexpr int V = adam_width<P>();
    constexpr int R = static_cast<int>(kAdamSingleMax / kAdamThreads) / V;  // runs per thread
    __shared__ float sh[32 * (K + 1)];
    __shared__ float res[K + 1];
    __shared__ float res2[1];
    __shared__ float w[K];
    const U* u = static_cast<const U*>(meta.u[s]);
    const int64_t n = meta.n[s];
    const int k = meta.k[s];
    const bool vec = adam_vec_ok(meta, s, V);
    float d[R][V];
    float acc[K + 1];
#pragma unroll
    for (int j = 0; j <= K; ++j) acc[j] = 0.f;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int64_t i = (static_cast<int64_t>(r) * blockDim.x + threadIdx.x) * V;
      if (i < n) {
        adam_run_pass1<P, V>(h, meta, s, i, vec, n - i, d[r]);
        adam_dots<U, V, K>(u, n, k, i, vec, n - i, d[r], acc);
      } else {
#pragma unroll
        for (int e = 0; e < V; ++e) d[r][e] = 0.f;
      }
    }
    block_sum<K + 1>(acc, sh, res);
    if (static_cast<int>(threadIdx.x) < K) {
      const int j = threadIdx.x;
      double wj = 0.0;
      if (j < k)
        for (int l = 0; l < k; ++l) wj += static_cast<double>(meta.minv[s][j * k + l]) * static_cast<double>(res[l]);
      w[j] = static_cast<float>(wj);
    }
    __syncthreads();
    float rem[1] = {0.f};
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int64_t i = (static_cast<int64_t>(r) * blockDim.x + threadIdx.x) * V;
      if (i < n) {
        float pv[V];
        load_run<P, V>(static_cast<const P*>(meta.p[s]) + i, vec, n - i, pv);
        rem[0] += adam_run_pass2<P, U, V>(h, meta, s, i, vec, n - i, d[r], pv, w);
      }
    }
    block_sum<1>(rem, sh, res2);
    if (threadIdx.x == 0) {
      stats[static_cast<int64_t>(meta.tid[s]) * 2] = res[K];
      stats[static_cast<int64_t>(meta.tid[s]) * 2 + 1] = res2[0];
    }
  }
};

// ------------------------------------------------------------------------------------------
// the k x k step of the two-pass path: one block per tensor sums its partial rows (thread j
// takes rows j, j + 256, ... in fp64, then a fixed tree, as tree_reduce_kernel), then
// w = M^{-1} c into weights[local] and ||d||^2 into stats[tid, 0]
// ------------------------------------------------------------------------------------------
template <int K>
__global__ void __launch_bounds__(kReduceThreads)
    adam_step_kernel(AdamReduceMeta meta, const float* part, float* weights, double* stats) {
  __shared__ double red[kReduceThreads];
  __shared__ double sums[K + 1];
  const int64_t first = meta.first[blockIdx.x];
  const int count = meta.count[blockIdx.x];
  for (int c = 0; c <= K; ++c) {
    double s = 0.0;
    for (int r = threadIdx.x; r < count; r += kReduceThreads) s += part[(first + r) * (K + 1) + c];
    red[threadIdx.x] = s;
    __syncthreads();
#pragma unroll
    for (int stride = kReduceThreads / 2; stride > 0; stride /= 2) {
      if (static_cast<int>(threadIdx.x) < stride) red[threadIdx.x] += red[threadIdx.x + stride];
      __syncthreads();
    }
    if (threadIdx.x == 0) sums[c] = red[0];
    __syncthreads();
  }
  const int k = meta.k[blockIdx.x];
  if (static_cast<int>(threadIdx.x) < kMaxRank) {
    const int j = threadIdx.x;
    double wj = 0.0;
    if (j < k)
      for (int l = 0; l < k; ++l) wj += static_cast<double>(meta.minv[blockIdx.x][j * k + l]) * sums[l];
    weights[static_cast<int64_t>(meta.local[blockIdx.x]) * kMaxRank + j] = static_cast<float>(wj);
  }
  if (threadIdx.x == 0) stats[static_cast<int64_t>(meta.tid[blockIdx.x]) * 2] = sums[K];
}

// second stage of pass 2's partial rows (tree_reduce_kernel's Out): the removed norm into
// out[t * stride + col] (projected_adamw_: stats [T, 2], column 1; pass2_: [T])
struct RemovedOut {
  double* out;
  int stride, col;
  __device__ void operator()(int64_t t, int, double v) const { out[t * stride + col] = v; }
};

// second stage of pass 1's partial rows [c_0 .. c_{K-1}, ||d||^2] (bucket K) for pass1_: into
// out [T, KM + 1] (c in columns < KM, ||d||^2 in column KM; columns k_t..KM-1 are zero rows)
struct DotsOut {
  double* out;
  int KM, K;
  __device__ void operator()(int64_t t, int c, double v) const {
    if (c == K) out[t * (KM + 1) + KM] = v;
    else if (c < KM) out[t * (KM + 1) + c] = v;
  }
};

}  // namespace cuda
}  // namespace ogpsa

