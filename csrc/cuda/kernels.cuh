// Device code of the ogpsa CUDA kernels, free of torch headers so that a test can compile it
// for sm_90 in seconds and check the SASS (tests/test_kernels_compiled.py); csrc/cuda/ops_cuda.cu
// holds the host side (validation, launch tables, dispatch) and instantiates these templates.
//
// One kernel, many ops: `multi_tensor_kernel<Op>` looks up its block's (tensor slot, chunk) in
// the launch table and calls the functor `Op`, which holds the op's own arguments (dots, update,
// gram, combine, single-pass projection). Element types are template parameters; anything with
// static_cast to/from float works (float, c10::BFloat16, c10::Half, __nv_bfloat16, __half).
//
// 128-bit loads: each thread handles runs of V = 16 / sizeof(gradient element) consecutive
// elements. When the gradient and basis start on 16 bytes and the row length is a multiple of V
// (checked per tensor in the kernel, as ATen's foreach kernels do), a run is one 16-byte vector
// load of g (and 16-byte pieces of each basis row); otherwise the same elements are loaded one
// by one. The element -> thread assignment and the summation order are the same on both paths,
// so results do not depend on alignment.
#pragma once

#include <cstdint>

namespace ogpsa {
namespace cuda {

constexpr int kMaxRank = 16;
constexpr int kThreads = 512;
constexpr int64_t kChunk = 65536;
// launch table: 3 * 8 * 48 + 2 * 4 * 48 + 256 + 4 * 256 = 2816 bytes, under the 4 KB argument limit
constexpr int kMaxTensors = 48;
constexpr int kMaxBlocks = 256;
// tensors up to this many elements are projected by one block in one pass (fused_project_):
// 8192 / 512 threads = 16 gradient values per thread kept in registers
constexpr int64_t kSingleMax = 8192;
constexpr int kReduceThreads = 256;

struct Meta {
  const void* a[kMaxTensors];  // gradient (or reference) data
  const void* b[kMaxTensors];  // basis (or combine output) data
  int64_t n[kMaxTensors];      // elements per row
  int32_t k[kMaxTensors];      // basis rows (gram: m)
  int32_t tid[kMaxTensors];    // index in the caller's list
  uint8_t slot[kMaxBlocks];
  int32_t chunk[kMaxBlocks];
};

// per-tensor (first partial row, number of rows) for the second-stage reduction
constexpr int kMaxReduce = 160;
struct ReduceMeta {
  int64_t first[kMaxReduce];
  int32_t count[kMaxReduce];
  int32_t tid[kMaxReduce];
};

template <typename T>
__device__ __forceinline__ float to_f(T v) {
  return static_cast<float>(v);
}

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// elements per thread-run: 16 bytes of the gradient type
template <typename G>
__host__ __device__ constexpr int run_width() {
  return static_cast<int>(16 / sizeof(G));
}

__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// N consecutive elements at p as float: 16-byte vector pieces when `vec` (p aligned to
// min(16, N * sizeof(T)) bytes), else scalar loads of the elements below `left`.
template <typename T, int N>
__device__ __forceinline__ void load_run(const T* p, bool vec, int64_t left, float (&out)[N]) {
  constexpr int P = (N * sizeof(T) > 16) ? static_cast<int>(16 / sizeof(T)) : N;
  if (vec) {
#pragma unroll
    for (int q = 0; q < N / P; ++q) {
      const Vec<T, P> v = *reinterpret_cast<const Vec<T, P>*>(p + q * P);
#pragma unroll
      for (int j = 0; j < P; ++j) out[q * P + j] = to_f(v.v[j]);
    }
  } else {
#pragma unroll
    for (int e = 0; e < N; ++e) out[e] = e < left ? to_f(p[e]) : 0.f;
  }
}

template <typename T, int N>
__device__ __forceinline__ void store_run(T* p, bool vec, int64_t left, const float (&in)[N]) {
  if (vec) {
    Vec<T, N> v;
#pragma unroll
    for (int e = 0; e < N; ++e) v.v[e] = static_cast<T>(in[e]);
    *reinterpret_cast<Vec<T, N>*>(p) = v;
  } else {
#pragma unroll
    for (int e = 0; e < N; ++e)
      if (e < left) p[e] = static_cast<T>(in[e]);
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// Sums V per-thread values over the block in a fixed order; result valid in sh_out[0..V).
template <int V>
__device__ __forceinline__ void block_sum(const float (&acc)[V], float* sh /*[32 * V]*/, float* sh_out) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int j = 0; j < V; ++j) {
    const float s = warp_sum(acc[j]);
    if (lane == 0) sh[warp * V + j] = s;
  }
  __syncthreads();
  for (int j = threadIdx.x; j < V; j += blockDim.x) {
    float s = 0.f;
    for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) s += sh[w * V + j];
    sh_out[j] = s;
  }
  __syncthreads();
}

// The one multi-tensor kernel: block -> (tensor slot, first element of its chunk) -> functor.
// Op::kBlock threads per block (the launcher uses the same constant).
template <typename Op>
__global__ void __launch_bounds__(Op::kBlock) multi_tensor_kernel(Meta meta, Op op) {
  op(meta, meta.slot[blockIdx.x], static_cast<int64_t>(meta.chunk[blockIdx.x]) * kChunk);
}

// ------------------------------------------------------------------------------------------
// pass 1: per chunk, [U g (K_BUCKET rows, k used), ||g||^2] into its row of `part`
// ------------------------------------------------------------------------------------------
template <typename G, typename U, int K>
struct DotsOp {
  static constexpr int kBlock = kThreads;
  float* part;
  int W;
  int64_t row0;
  __device__ void operator()(const Meta& meta, int s, int64_t begin) const {
    __shared__ float sh[32 * (K + 1)];
    __shared__ float res[K + 1];
    constexpr int V = run_width<G>();
    const G* g = static_cast<const G*>(meta.a[s]);
    const U* u = static_cast<const U*>(meta.b[s]);
    const int64_t n = meta.n[s];
    const int k = meta.k[s];
    const int64_t end = n < begin + kChunk ? n : begin + kChunk;
    const bool vec = aligned16(g) && aligned16(u) && n % V == 0;
    float acc[K + 1];
#pragma unroll
    for (int j = 0; j <= K; ++j) acc[j] = 0.f;
    for (int64_t i = begin + static_cast<int64_t>(threadIdx.x) * V; i < end; i += static_cast<int64_t>(blockDim.x) * V) {
      float gv[V];
      load_run<G, V>(g + i, vec, end - i, gv);
#pragma unroll
      for (int e = 0; e < V; ++e) acc[K] += gv[e] * gv[e];
#pragma unroll
      for (int j = 0; j < K; ++j) {
        if (j < k) {
          float uv[V];
          load_run<U, V>(u + j * n + i, vec, end - i, uv);
#pragma unroll
          for (int e = 0; e < V; ++e) acc[j] += uv[e] * gv[e];
        }
      }
    }
    block_sum<K + 1>(acc, sh, res);
    float* row = part + (row0 + blockIdx.x) * W;
    for (int c = threadIdx.x; c < W; c += blockDim.x) row[c] = c == W - 1 ? res[K] : (c < k ? res[c] : 0.f);
  }
};

// ------------------------------------------------------------------------------------------
// pass 2: g <- scale_t * (kappa * g - U^T w_t), float32, rounded once
// ------------------------------------------------------------------------------------------
template <typename G, typename U>
struct UpdateOp {
  static constexpr int kBlock = kThreads;
  const float* weights;
  int k_max;
  float kappa;
  const float* scale;
  int64_t row0;
  __device__ void operator()(const Meta& meta, int s, int64_t begin) const {
    __shared__ float w[kMaxRank];
    constexpr int V = run_width<G>();
    G* g = static_cast<G*>(const_cast<void*>(meta.a[s]));
    const U* u = static_cast<const U*>(meta.b[s]);
    const int64_t n = meta.n[s];
    const int k = meta.k[s];
    const int64_t t = meta.tid[s];
    if (threadIdx.x < k) w[threadIdx.x] = weights[t * k_max + threadIdx.x];
    __syncthreads();
    const float sc = scale != nullptr ? scale[t] : 1.f;  // nullptr: no scaling (fused_project_)
    const int64_t end = n < begin + kChunk ? n : begin + kChunk;
    const bool vec = aligned16(g) && aligned16(u) && n % V == 0;
    for (int64_t i = begin + static_cast<int64_t>(threadIdx.x) * V; i < end; i += static_cast<int64_t>(blockDim.x) * V) {
      float v[V];
      load_run<G, V>(g + i, vec, end - i, v);
#pragma unroll
      for (int e = 0; e < V; ++e) v[e] *= kappa;
      for (int j = 0; j < k; ++j) {
        float uv[V];
        load_run<U, V>(u + j * n + i, vec, end - i, uv);
#pragma unroll
        for (int e = 0; e < V; ++e) v[e] -= w[j] * uv[e];
      }
#pragma unroll
      for (int e = 0; e < V; ++e) v[e] *= sc;
      store_run<G, V>(g + i, vec, end - i, v);
    }
  }
};

// ------------------------------------------------------------------------------------------
// single pass for a tensor of at most kSingleMax elements (one block, one chunk): g read once
// into registers, c = U g and ||g||^2, w = M^-1 c and the mode rule, g <- kappa g - U^T w written
// once; the basis rows are read a second time from L1/L2 for the subtraction.
// mode: 0 orthogonal, 1 conflict, 2 plane. GI: float or double (M^-1).
// ------------------------------------------------------------------------------------------
template <typename G, typename U, typename GI, int K>
struct FusedSmallOp {
  static constexpr int kBlock = kThreads;
  const GI* gram_inv;  // [T, KM, KM]
  int KM;
  float* out;  // [T, W]
  int W;
  int mode;
  float aligned_scale;
  int64_t row0;
  __device__ void operator()(const Meta& meta, int s, int64_t begin) const {
    constexpr int V = run_width<G>();
    constexpr int R = static_cast<int>(kSingleMax / kBlock) / V;  // runs per thread
    __shared__ float sh[32 * (K + 1)];
    __shared__ float res[K + 1];
    __shared__ float w[K];
    G* g = static_cast<G*>(const_cast<void*>(meta.a[s]));
    const U* u = static_cast<const U*>(meta.b[s]);
    const int64_t n = meta.n[s];
    const int k = meta.k[s];
    const int64_t t = meta.tid[s];
    const bool vec = aligned16(g) && aligned16(u) && n % V == 0;
    float gv[R][V];
    float acc[K + 1];
#pragma unroll
    for (int j = 0; j <= K; ++j) acc[j] = 0.f;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int64_t i = (static_cast<int64_t>(r) * blockDim.x + threadIdx.x) * V;
      if (i < n) {
        load_run<G, V>(g + i, vec, n - i, gv[r]);
      } else {
#pragma unroll
        for (int e = 0; e < V; ++e) gv[r][e] = 0.f;
      }
#pragma unroll
      for (int e = 0; e < V; ++e) acc[K] += gv[r][e] * gv[r][e];
#pragma unroll
      for (int j = 0; j < K; ++j) {
        if (j < k && i < n) {
          float uv[V];
          load_run<U, V>(u + j * n + i, vec, n - i, uv);
#pragma unroll
          for (int e = 0; e < V; ++e) acc[j] += uv[e] * gv[r][e];
        }
      }
    }
    block_sum<K + 1>(acc, sh, res);
    if (threadIdx.x < K) {
      const int j = threadIdx.x;
      double wj = 0.0;
      if (j < k)
        for (int l = 0; l < k; ++l) wj += static_cast<double>(gram_inv[(t * KM + j) * KM + l]) * res[l];
      float wf = static_cast<float>(wj);
      if (mode == 1) wf = wf < 0.f ? wf : (1.f - aligned_scale) * wf;
      if (mode == 2) wf = -wf;
      w[j] = wf;
    }
    __syncthreads();
    const float kappa = mode == 2 ? 0.f : 1.f;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int64_t i = (static_cast<int64_t>(r) * blockDim.x + threadIdx.x) * V;
      if (i >= n) continue;
      float y[V];
#pragma unroll
      for (int e = 0; e < V; ++e) y[e] = kappa * gv[r][e];
      for (int j = 0; j < k; ++j) {
        float uv[V];
        load_run<U, V>(u + j * n + i, vec, n - i, uv);
#pragma unroll
        for (int e = 0; e < V; ++e) y[e] -= w[j] * uv[e];
      }
      store_run<G, V>(g + i, vec, n - i, y);
    }
    float* row = out + t * W;
    for (int c = threadIdx.x; c < W; c += blockDim.x) row[c] = c == W - 1 ? res[K] : (c < k ? res[c] : 0.f);
  }
};

// ------------------------------------------------------------------------------------------
// Gram: for m <= M (a bucket <= 16), one block per chunk reads each of the m rows once and
// accumulates all m(m+1)/2 products; wider m: one block per (chunk, pair) (blockIdx.y).
// Partial row layout: the upper triangle row-major (pair p = (a, c), a <= c).
// ------------------------------------------------------------------------------------------
__host__ __device__ __forceinline__ int pair_index(int a, int c, int m) { return a * m - a * (a - 1) / 2 + (c - a); }

__device__ __forceinline__ void pair_of(int p, int m, int* a, int* c) {
  int row = 0;
  while (p >= m - row) {
    p -= m - row;
    ++row;
  }
  *a = row;
  *c = row + p;
}

template <typename R, int M>
struct GramOp {
  // all m(m+1)/2 sums live in registers: 256 threads leave room for 136 of them at m = 16
  static constexpr int kBlock = M <= 4 ? kThreads : 256;
  float* part;
  int m;
  int P;
  int64_t row0;
  __device__ void operator()(const Meta& meta, int s, int64_t begin) const {
    constexpr int Q = M * (M + 1) / 2;
    __shared__ float sh[32 * Q];
    __shared__ float res[Q];
    const R* r = static_cast<const R*>(meta.a[s]);
    const int64_t n = meta.n[s];
    const int64_t end = n < begin + kChunk ? n : begin + kChunk;
    float acc[Q];
#pragma unroll
    for (int q = 0; q < Q; ++q) acc[q] = 0.f;
    for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
      float v[M];
#pragma unroll
      for (int a = 0; a < M; ++a) v[a] = a < m ? to_f(r[a * n + i]) : 0.f;
      int q = 0;
#pragma unroll
      for (int a = 0; a < M; ++a)
#pragma unroll
        for (int c = a; c < M; ++c) acc[q++] += v[a] * v[c];
    }
    block_sum<Q>(acc, sh, res);
    float* row = part + (row0 + blockIdx.x) * P;
    for (int q = threadIdx.x; q < Q; q += blockDim.x) {
      int a, c;
      pair_of(q, M, &a, &c);
      if (c < m) row[pair_index(a, c, m)] = res[q];
    }
  }
};

template <typename R>
struct GramPairOp {
  static constexpr int kBlock = kThreads;
  float* part;
  int m;
  int P;
  int64_t row0;
  __device__ void operator()(const Meta& meta, int s, int64_t begin) const {
    __shared__ float sh[32];
    __shared__ float res[1];
    const R* r = static_cast<const R*>(meta.a[s]);
    const int64_t n = meta.n[s];
    int a, c;
    pair_of(blockIdx.y, m, &a, &c);
    const int64_t end = n < begin + kChunk ? n : begin + kChunk;
    float acc[1] = {0.f};
    for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) acc[0] += to_f(r[a * n + i]) * to_f(r[c * n + i]);
    block_sum<1>(acc, sh, res);
    if (threadIdx.x == 0) part[(row0 + blockIdx.x) * P + blockIdx.y] = res[0];
  }
};

// combine: U_t = A_t R_t (rows < k_t), accumulated in float32
template <typename R, typename O>
struct CombineOp {
  static constexpr int kBlock = kThreads;
  const float* coef;
  int k_max;
  int m;
  int64_t row0;
  __device__ void operator()(const Meta& meta, int s, int64_t begin) const {
    const R* r = static_cast<const R*>(meta.a[s]);
    O* u = static_cast<O*>(const_cast<void*>(meta.b[s]));
    const int64_t n = meta.n[s];
    const int k = meta.k[s];
    const float* A = coef + static_cast<int64_t>(meta.tid[s]) * k_max * m;
    const int64_t end = n < begin + kChunk ? n : begin + kChunk;
    for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
      for (int row = 0; row < k; ++row) {
        float acc = 0.f;
        for (int j = 0; j < m; ++j) acc += A[row * m + j] * to_f(r[j * n + i]);
        u[row * n + i] = static_cast<O>(acc);
      }
    }
  }
};

// ------------------------------------------------------------------------------------------
// Second stage: one block per tensor sums its partial rows. Thread j takes rows j, j + 256, ...
// (independent loads, float64), then a fixed binary tree over the block: deterministic, no
// atomics, and a tensor's serial depth is count / 256 + 8 instead of count.
// Out: functor (tensor index, column, value).
// ------------------------------------------------------------------------------------------
struct RowsOut {
  float* out;
  int W;
  __device__ void operator()(int64_t t, int c, double v) const { out[t * W + c] = static_cast<float>(v); }
};

struct GramOut {
  double* out;
  int m;
  __device__ void operator()(int64_t t, int p, double v) const {
    int a, c;
    pair_of(p, m, &a, &c);
    double* o = out + t * m * m;
    o[a * m + c] = v;
    o[c * m + a] = v;
  }
};

template <typename Out>
__global__ void __launch_bounds__(kReduceThreads) tree_reduce_kernel(ReduceMeta meta, const float* part, int W, Out out) {
  __shared__ double red[kReduceThreads];
  const int64_t first = meta.first[blockIdx.x];
  const int count = meta.count[blockIdx.x];
  for (int c = 0; c < W; ++c) {
    double s = 0.0;
    for (int r = threadIdx.x; r < count; r += kReduceThreads) s += part[(first + r) * W + c];
    red[threadIdx.x] = s;
    __syncthreads();
#pragma unroll
    for (int stride = kReduceThreads / 2; stride > 0; stride /= 2) {
      if (threadIdx.x < stride) red[threadIdx.x] += red[threadIdx.x + stride];
      __syncthreads();
    }
    if (threadIdx.x == 0) out(meta.tid[blockIdx.x], c, red[0]);
    __syncthreads();
  }
}

}  // namespace cuda
}  // namespace ogpsa
