// CUDA kernels for the ogpsa ops (schema in csrc/ops.cpp), multi_tensor_apply style.
//
// Every launch carries its tensor table and its block -> (tensor, chunk) map by value in the
// kernel arguments (< 4 KB), so no pointer table is copied to the device. Reductions are
// deterministic: each block writes its own partial row, and a second kernel sums a tensor's
// partial rows in chunk order (fp64), never float atomics. Arithmetic is fp32.
//
// Headers kept minimal on purpose (ATen/cuda/CUDAContext.h needs cusparse.h, absent from
// the system toolkit, and torch/extension.h doubles the compile time).

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "../dispatch.h"

#include <algorithm>
#include <vector>

namespace ogpsa {
namespace cuda {
namespace {

constexpr int kMaxRank = 16;
constexpr int kThreads = 512;
constexpr int64_t kChunk = 65536;
// launch table: 3 * 8 * 48 + 2 * 4 * 48 + 256 + 4 * 256 = 2816 bytes, under the 4 KB argument limit
constexpr int kMaxTensors = 48;
constexpr int kMaxBlocks = 256;

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
  if (threadIdx.x < V) {
    float s = 0.f;
    for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) s += sh[w * V + threadIdx.x];
    sh_out[threadIdx.x] = s;
  }
  __syncthreads();
}

// Builds launch tables tensor by tensor, chunk by chunk, and calls launch(meta, blocks, first_row)
// whenever a table fills; rows of the partials buffer are numbered in the same order.
template <typename Launch>
int64_t for_each_launch(const std::vector<const void*>& a, const std::vector<const void*>& b,
                        const std::vector<int64_t>& n, const std::vector<int32_t>& k, Launch&& launch) {
  Meta meta;
  int nt = 0, nb = 0;
  int64_t rows = 0;
  const int64_t T = static_cast<int64_t>(a.size());
  for (int64_t t = 0; t < T; ++t) {
    meta.a[nt] = a[t];
    meta.b[nt] = b[t];
    meta.n[nt] = n[t];
    meta.k[nt] = k[t];
    meta.tid[nt] = static_cast<int32_t>(t);
    ++nt;
    const int64_t chunks = (n[t] + kChunk - 1) / kChunk;
    for (int64_t c = 0; c < chunks; ++c) {
      meta.slot[nb] = static_cast<uint8_t>(nt - 1);
      meta.chunk[nb] = static_cast<int32_t>(c);
      ++nb;
      const bool last_chunk = c == chunks - 1;
      if (nb == kMaxBlocks || (nt == kMaxTensors && last_chunk) || (t == T - 1 && last_chunk)) {
        launch(meta, nb, rows);
        rows += nb;
        nb = 0;
        if (last_chunk) {
          nt = 0;
        } else {  // the current tensor continues in the next launch
          meta.a[0] = meta.a[nt - 1];
          meta.b[0] = meta.b[nt - 1];
          meta.n[0] = meta.n[nt - 1];
          meta.k[0] = meta.k[nt - 1];
          meta.tid[0] = meta.tid[nt - 1];
          nt = 1;
        }
      }
    }
  }
  return rows;
}

// Calls launch(meta, tensors) with per-tensor partial-row ranges, kMaxReduce tensors at a time.
template <typename Launch>
void for_each_reduce(const std::vector<int64_t>& n, Launch&& launch) {
  ReduceMeta meta;
  int nt = 0;
  int64_t row = 0;
  for (size_t t = 0; t < n.size(); ++t) {
    const int64_t chunks = (n[t] + kChunk - 1) / kChunk;
    meta.first[nt] = row;
    meta.count[nt] = static_cast<int32_t>(chunks);
    meta.tid[nt] = static_cast<int32_t>(t);
    row += chunks;
    if (++nt == kMaxReduce || t + 1 == n.size()) {
      launch(meta, nt);
      nt = 0;
    }
  }
}

// ------------------------------------------------------------------------------------
// dots
// ------------------------------------------------------------------------------------

template <typename G, typename U, int K>
__global__ void __launch_bounds__(kThreads) dots_kernel(Meta meta, float* part, int W, int64_t row0) {
  __shared__ float sh[32 * (K + 1)];
  __shared__ float res[K + 1];
  const int s = meta.slot[blockIdx.x];
  const G* g = static_cast<const G*>(meta.a[s]);
  const U* u = static_cast<const U*>(meta.b[s]);
  const int64_t n = meta.n[s];
  const int k = meta.k[s];
  const int64_t begin = static_cast<int64_t>(meta.chunk[blockIdx.x]) * kChunk;
  const int64_t end = min(n, begin + kChunk);
  float acc[K + 1];
#pragma unroll
  for (int j = 0; j <= K; ++j) acc[j] = 0.f;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const float gv = to_f(g[i]);
    acc[K] += gv * gv;
#pragma unroll
    for (int j = 0; j < K; ++j)
      if (j < k) acc[j] += to_f(u[j * n + i]) * gv;
  }
  block_sum<K + 1>(acc, sh, res);
  float* row = part + (row0 + blockIdx.x) * W;
  for (int c = threadIdx.x; c < W; c += blockDim.x) row[c] = c == W - 1 ? res[K] : (c < k ? res[c] : 0.f);
}

__global__ void reduce_rows_kernel(ReduceMeta meta, const float* part, int W, float* out) {
  const int64_t first = meta.first[blockIdx.x];
  const int count = meta.count[blockIdx.x];
  for (int c = threadIdx.x; c < W; c += blockDim.x) {
    double s = 0.0;
    for (int r = 0; r < count; ++r) s += part[(first + r) * W + c];
    out[static_cast<int64_t>(meta.tid[blockIdx.x]) * W + c] = static_cast<float>(s);
  }
}

void collect(at::TensorList grads, at::TensorList bases, std::vector<const void*>& a, std::vector<const void*>& b,
             std::vector<int64_t>& n, std::vector<int32_t>& k, const char* op) {
  TORCH_CHECK(!grads.empty() && grads.size() == bases.size(), "ogpsa::", op, ": need as many bases as grads (",
              grads.size(), " vs ", bases.size(), "), at least one");
  const auto dev = grads[0].device();
  for (size_t i = 0; i < grads.size(); ++i) {
    const auto& g = grads[i];
    const auto& u = bases[i];
    TORCH_CHECK(g.device() == dev && u.device() == dev, "ogpsa::", op, ": tensor ", i, " is not on ", dev);
    TORCH_CHECK(g.scalar_type() == grads[0].scalar_type() && u.scalar_type() == bases[0].scalar_type(), "ogpsa::", op,
                ": tensor ", i, " has a different dtype from tensor 0");
    TORCH_CHECK(g.is_contiguous() && u.is_contiguous(), "ogpsa::", op, ": tensor ", i, " is not contiguous");
    // an empty tensor has no chunk, and the launch loop flushes a table on a tensor's last chunk
    TORCH_CHECK(g.numel() >= 1, "ogpsa::", op, ": grads[", i, "] has no elements");
    TORCH_CHECK(u.dim() == 2 && u.size(1) == g.numel() && u.size(0) <= kMaxRank, "ogpsa::", op, ": bases[", i,
                "] has shape ", u.sizes(), ", expected [k<=", kMaxRank, ", ", g.numel(), "]");
    a.push_back(g.data_ptr());
    b.push_back(u.data_ptr());
    n.push_back(g.numel());
    k.push_back(static_cast<int32_t>(u.size(0)));
  }
}

template <typename G, typename U, int K>
void launch_dots(const std::vector<const void*>& a, const std::vector<const void*>& b, const std::vector<int64_t>& n,
                 const std::vector<int32_t>& k, float* part, int W, cudaStream_t stream) {
  for_each_launch(a, b, n, k, [&](const Meta& meta, int blocks, int64_t row0) {
    dots_kernel<G, U, K><<<blocks, kThreads, 0, stream>>>(meta, part, W, row0);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

int64_t total_rows(const std::vector<int64_t>& n) {
  int64_t r = 0;
  for (auto v : n) r += (v + kChunk - 1) / kChunk;
  return r;
}

at::Tensor dots_cuda(at::TensorList grads, at::TensorList bases, int64_t k_max) {
  std::vector<const void*> a, b;
  std::vector<int64_t> n;
  std::vector<int32_t> k;
  collect(grads, bases, a, b, n, k, "dots");
  const int kk = *std::max_element(k.begin(), k.end());
  TORCH_CHECK(k_max >= 1 && k_max >= kk && k_max <= kMaxRank, "ogpsa::dots: k_max=", k_max,
              " must be in [max(1, max k_i)=", std::max(1, kk), ", ", kMaxRank, "]");
  c10::cuda::CUDAGuard guard(grads[0].device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int W = static_cast<int>(k_max) + 1;
  const auto opts = grads[0].options().dtype(at::kFloat);
  at::Tensor part = at::empty({total_rows(n), W}, opts);
  at::Tensor out = at::empty({static_cast<int64_t>(grads.size()), W}, opts);
  dispatch_gu(grads[0].scalar_type(), bases[0].scalar_type(), "dots", [&](auto gtag, auto utag) {
    using G = decltype(gtag);
    using U = decltype(utag);
    // the register array is sized by a rank bucket so small k does not pay for 16 accumulators
    float* p = part.data_ptr<float>();
    if (k_max <= 2) launch_dots<G, U, 2>(a, b, n, k, p, W, stream);
    else if (k_max <= 4) launch_dots<G, U, 4>(a, b, n, k, p, W, stream);
    else if (k_max <= 8) launch_dots<G, U, 8>(a, b, n, k, p, W, stream);
    else launch_dots<G, U, 16>(a, b, n, k, p, W, stream);
  });
  for_each_reduce(n, [&](const ReduceMeta& meta, int tensors) {
    reduce_rows_kernel<<<tensors, 32, 0, stream>>>(meta, part.data_ptr<float>(), W, out.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// ------------------------------------------------------------------------------------
// update_
// ------------------------------------------------------------------------------------

template <typename G, typename U>
__global__ void __launch_bounds__(kThreads)
    update_kernel(Meta meta, const float* weights, int k_max, float kappa, const float* scale) {
  __shared__ float w[kMaxRank];
  const int s = meta.slot[blockIdx.x];
  G* g = static_cast<G*>(const_cast<void*>(meta.a[s]));
  const U* u = static_cast<const U*>(meta.b[s]);
  const int64_t n = meta.n[s];
  const int k = meta.k[s];
  const int64_t t = meta.tid[s];
  if (threadIdx.x < k) w[threadIdx.x] = weights[t * k_max + threadIdx.x];
  __syncthreads();
  const float sc = scale[t];
  const int64_t begin = static_cast<int64_t>(meta.chunk[blockIdx.x]) * kChunk;
  const int64_t end = min(n, begin + kChunk);
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    float v = kappa * to_f(g[i]);
    for (int j = 0; j < k; ++j) v -= w[j] * to_f(u[j * n + i]);
    g[i] = static_cast<G>(sc * v);
  }
}

void update_cuda(at::TensorList grads, at::TensorList bases, const at::Tensor& weights, double kappa,
                 const at::Tensor& scale) {
  std::vector<const void*> a, b;
  std::vector<int64_t> n;
  std::vector<int32_t> k;
  collect(grads, bases, a, b, n, k, "update_");
  const int64_t T = grads.size();
  TORCH_CHECK(weights.scalar_type() == at::kFloat && weights.dim() == 2 && weights.size(0) == T &&
                  weights.is_contiguous() && weights.device() == grads[0].device() &&
                  weights.size(1) >= *std::max_element(k.begin(), k.end()),
              "ogpsa::update_: weights must be a contiguous float32 [T=", T, ", k_max] tensor on ", grads[0].device(),
              ", got ", weights.scalar_type(), " ", weights.sizes(), " on ", weights.device());
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.dim() == 1 && scale.size(0) == T && scale.is_contiguous() &&
                  scale.device() == grads[0].device(),
              "ogpsa::update_: scale must be a contiguous float32 [T=", T, "] tensor on ", grads[0].device());
  c10::cuda::CUDAGuard guard(grads[0].device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int k_max = static_cast<int>(weights.size(1));
  dispatch_gu(grads[0].scalar_type(), bases[0].scalar_type(), "update_", [&](auto gtag, auto utag) {
    using G = decltype(gtag);
    using U = decltype(utag);
    for_each_launch(a, b, n, k, [&](const Meta& meta, int blocks, int64_t) {
      update_kernel<G, U><<<blocks, kThreads, 0, stream>>>(meta, weights.data_ptr<float>(), k_max,
                                                           static_cast<float>(kappa), scale.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

// ------------------------------------------------------------------------------------
// gram / combine
// ------------------------------------------------------------------------------------

__device__ __forceinline__ void pair_of(int p, int m, int* a, int* c) {
  int row = 0;
  while (p >= m - row) {
    p -= m - row;
    ++row;
  }
  *a = row;
  *c = row + p;
}

template <typename R>
__global__ void __launch_bounds__(kThreads) gram_kernel(Meta meta, int m, float* part, int P, int64_t row0) {
  __shared__ float sh[32];
  __shared__ float res[1];
  const int s = meta.slot[blockIdx.x];
  const R* r = static_cast<const R*>(meta.a[s]);
  const int64_t n = meta.n[s];
  int a, c;
  pair_of(blockIdx.y, m, &a, &c);
  const int64_t begin = static_cast<int64_t>(meta.chunk[blockIdx.x]) * kChunk;
  const int64_t end = min(n, begin + kChunk);
  float acc[1] = {0.f};
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) acc[0] += to_f(r[a * n + i]) * to_f(r[c * n + i]);
  block_sum<1>(acc, sh, res);
  if (threadIdx.x == 0) part[(row0 + blockIdx.x) * P + blockIdx.y] = res[0];
}

__global__ void gram_reduce_kernel(ReduceMeta meta, const float* part, int m, int P, double* out) {
  const int64_t first = meta.first[blockIdx.x];
  const int count = meta.count[blockIdx.x];
  double* o = out + static_cast<int64_t>(meta.tid[blockIdx.x]) * m * m;
  for (int p = threadIdx.x; p < P; p += blockDim.x) {
    double s = 0.0;
    for (int r = 0; r < count; ++r) s += part[(first + r) * P + p];
    int a, c;
    pair_of(p, m, &a, &c);
    o[a * m + c] = s;
    o[c * m + a] = s;
  }
}

template <typename F>
void dispatch_ref(at::ScalarType dt, const char* op, F&& f) {
  if (dt == at::kFloat) return f(float{});
  if (dt == at::kBFloat16) return f(c10::BFloat16{});
  if (dt == at::kHalf) return f(c10::Half{});
  TORCH_CHECK(false, "ogpsa::", op, ": dtype must be float32, bfloat16 or float16, got ", dt);
}

void collect_refs(at::TensorList refs, std::vector<const void*>& a, std::vector<int64_t>& n, const char* op) {
  TORCH_CHECK(!refs.empty() && refs[0].dim() == 2 && refs[0].size(0) >= 1, "ogpsa::", op,
              ": refs must be a non-empty list of [m, N] tensors");
  const int64_t m = refs[0].size(0);
  for (size_t i = 0; i < refs.size(); ++i) {
    const auto& r = refs[i];
    TORCH_CHECK(r.dim() == 2 && r.size(0) == m && r.size(1) >= 1 && r.is_contiguous() &&
                    r.device() == refs[0].device() && r.scalar_type() == refs[0].scalar_type(),
                "ogpsa::", op, ": refs[", i, "] must be a contiguous [", m, ", N>=1] ", refs[0].scalar_type(),
                " tensor on ", refs[0].device(), ", got ", r.sizes());
    a.push_back(r.data_ptr());
    n.push_back(r.size(1));
  }
}

at::Tensor gram_cuda(at::TensorList refs) {
  std::vector<const void*> a;
  std::vector<int64_t> n;
  collect_refs(refs, a, n, "gram");
  const int m = static_cast<int>(refs[0].size(0));
  const int P = m * (m + 1) / 2;
  TORCH_CHECK(P <= 65535, "ogpsa::gram: m=", m, " reference gradients is more than the CUDA kernel handles (361)");
  c10::cuda::CUDAGuard guard(refs[0].device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor part = at::empty({total_rows(n), P}, refs[0].options().dtype(at::kFloat));
  at::Tensor out = at::empty({static_cast<int64_t>(refs.size()), m, m}, refs[0].options().dtype(at::kDouble));
  std::vector<int32_t> ms(refs.size(), m);
  dispatch_ref(refs[0].scalar_type(), "gram", [&](auto rtag) {
    using R = decltype(rtag);
    for_each_launch(a, a, n, ms, [&](const Meta& meta, int blocks, int64_t row0) {
      gram_kernel<R><<<dim3(blocks, P), kThreads, 0, stream>>>(meta, m, part.data_ptr<float>(), P, row0);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  for_each_reduce(n, [&](const ReduceMeta& meta, int tensors) {
    gram_reduce_kernel<<<tensors, 128, 0, stream>>>(meta, part.data_ptr<float>(), m, P, out.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

template <typename R, typename O>
__global__ void __launch_bounds__(kThreads) combine_kernel(Meta meta, const float* coef, int k_max, int m) {
  const int s = meta.slot[blockIdx.x];
  const R* r = static_cast<const R*>(meta.a[s]);
  O* u = static_cast<O*>(const_cast<void*>(meta.b[s]));
  const int64_t n = meta.n[s];
  const int k = meta.k[s];
  const float* A = coef + static_cast<int64_t>(meta.tid[s]) * k_max * m;
  const int64_t begin = static_cast<int64_t>(meta.chunk[blockIdx.x]) * kChunk;
  const int64_t end = min(n, begin + kChunk);
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    for (int row = 0; row < k; ++row) {
      float acc = 0.f;
      for (int j = 0; j < m; ++j) acc += A[row * m + j] * to_f(r[j * n + i]);
      u[row * n + i] = static_cast<O>(acc);
    }
  }
}

std::vector<at::Tensor> combine_cuda(at::TensorList refs, const at::Tensor& coefficients, at::IntArrayRef ks,
                                     at::ScalarType out_dtype) {
  std::vector<const void*> a, b;
  std::vector<int64_t> n;
  collect_refs(refs, a, n, "combine");
  const int64_t T = refs.size();
  const int m = static_cast<int>(refs[0].size(0));
  TORCH_CHECK(static_cast<int64_t>(ks.size()) == T, "ogpsa::combine: ks has ", ks.size(), " entries for ", T, " refs");
  TORCH_CHECK(coefficients.scalar_type() == at::kFloat && coefficients.dim() == 3 && coefficients.size(0) == T &&
                  coefficients.size(2) == m && coefficients.is_contiguous() &&
                  coefficients.device() == refs[0].device(),
              "ogpsa::combine: coefficients must be a contiguous float32 [T=", T, ", k_max, m=", m, "] tensor on ",
              refs[0].device(), ", got ", coefficients.sizes());
  const int k_max = static_cast<int>(coefficients.size(1));
  std::vector<at::Tensor> outs;
  std::vector<int32_t> k;
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(ks[t] >= 0 && ks[t] <= k_max, "ogpsa::combine: ks[", t, "]=", ks[t], " is outside [0, ", k_max, "]");
    outs.push_back(at::empty({ks[t], n[t]}, refs[0].options().dtype(out_dtype)));
    b.push_back(outs.back().data_ptr());
    k.push_back(static_cast<int32_t>(ks[t]));
  }
  c10::cuda::CUDAGuard guard(refs[0].device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_ref(refs[0].scalar_type(), "combine", [&](auto rtag) {
    using R = decltype(rtag);
    dispatch_ref(out_dtype, "combine", [&](auto otag) {
      using O = decltype(otag);
      for_each_launch(a, b, n, k, [&](const Meta& meta, int blocks, int64_t) {
        combine_kernel<R, O><<<blocks, kThreads, 0, stream>>>(meta, coefficients.data_ptr<float>(), k_max, m);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return outs;
}

}  // namespace
}  // namespace cuda
}  // namespace ogpsa

TORCH_LIBRARY_IMPL(ogpsa, CUDA, m) {
  m.impl("dots", &ogpsa::cuda::dots_cuda);
  m.impl("update_", &ogpsa::cuda::update_cuda);
  m.impl("gram", &ogpsa::cuda::gram_cuda);
  m.impl("combine", &ogpsa::cuda::combine_cuda);
}
