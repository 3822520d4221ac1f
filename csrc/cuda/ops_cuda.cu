// CUDA ops of ogpsa (schema in csrc/ops.cpp): host side. The device code is in kernels.cuh
// (one multi-tensor kernel templated on a per-op functor, plus the second-stage reduction).
//
// Every launch carries its tensor table and its block -> (tensor, chunk) map by value in the
// kernel arguments (< 4 KB), so no pointer table is copied to the device and nothing about a
// gradient outlives the call. Reductions are deterministic: each block writes its own partial
// row, and a second kernel sums a tensor's partial rows with a fixed two-level tree (fp64),
// never float atomics. Arithmetic is fp32.
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
#include "kernels.cuh"

#include <algorithm>
#include <numeric>
#include <type_traits>
#include <vector>

namespace ogpsa {
namespace cuda {
namespace {

// A list of tensors as the launcher sees it: data pointers, row lengths, row counts and the index
// of each in the op's own output (the caller's list, or a subset of it).
struct Lists {
  std::vector<const void*> a, b;
  std::vector<int64_t> n;
  std::vector<int32_t> k, tid;
  size_t size() const { return a.size(); }
  void push(const void* pa, const void* pb, int64_t pn, int32_t pk, int32_t t) {
    a.push_back(pa);
    b.push_back(pb);
    n.push_back(pn);
    k.push_back(pk);
    tid.push_back(t);
  }
};

// Builds launch tables tensor by tensor, chunk by chunk, and calls launch(meta, blocks, first_row)
// whenever a table fills; rows of the partials buffer are numbered in the same order.
template <typename Launch>
int64_t for_each_launch(const Lists& L, Launch&& launch) {
  Meta meta;
  int nt = 0, nb = 0;
  int64_t rows = 0;
  const int64_t T = static_cast<int64_t>(L.size());
  for (int64_t t = 0; t < T; ++t) {
    meta.a[nt] = L.a[t];
    meta.b[nt] = L.b[t];
    meta.n[nt] = L.n[t];
    meta.k[nt] = L.k[t];
    meta.tid[nt] = L.tid[t];
    ++nt;
    const int64_t chunks = (L.n[t] + kChunk - 1) / kChunk;
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

// The one launcher: every op's functor goes through multi_tensor_kernel with Op::kBlock threads;
// `grid_y` > 1 only for the wide-m Gram (one block row per pair).
template <typename Op>
void launch_op(const Lists& L, Op op, cudaStream_t stream, unsigned grid_y = 1) {
  for_each_launch(L, [&](const Meta& meta, int blocks, int64_t row0) {
    op.row0 = row0;
    multi_tensor_kernel<Op><<<dim3(blocks, grid_y), Op::kBlock, 0, stream>>>(meta, op);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// Second stage: sums each tensor's partial rows (tree_reduce_kernel), kMaxReduce tensors a launch.
template <typename Out>
void reduce_rows(const Lists& L, const float* part, int W, Out out, cudaStream_t stream) {
  ReduceMeta meta;
  int nt = 0;
  int64_t row = 0;
  for (size_t t = 0; t < L.size(); ++t) {
    const int64_t chunks = (L.n[t] + kChunk - 1) / kChunk;
    meta.first[nt] = row;
    meta.count[nt] = static_cast<int32_t>(chunks);
    meta.tid[nt] = L.tid[t];
    row += chunks;
    if (++nt == kMaxReduce || t + 1 == L.size()) {
      tree_reduce_kernel<Out><<<nt, kReduceThreads, 0, stream>>>(meta, part, W, out);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      nt = 0;
    }
  }
}

int64_t total_rows(const Lists& L) {
  int64_t r = 0;
  for (auto v : L.n) r += (v + kChunk - 1) / kChunk;
  return r;
}

// calls f(std::integral_constant<int, K>) for the smallest rank bucket K in {2, 4, 8, 16} >= k:
// register arrays are sized by the bucket, so small k does not pay for 16 accumulators
template <typename F>
void dispatch_rank(int64_t k, F&& f) {
  if (k <= 2) return f(std::integral_constant<int, 2>{});
  if (k <= 4) return f(std::integral_constant<int, 4>{});
  if (k <= 8) return f(std::integral_constant<int, 8>{});
  return f(std::integral_constant<int, 16>{});
}

Lists collect(at::TensorList grads, at::TensorList bases, const char* op) {
  TORCH_CHECK(!grads.empty() && grads.size() == bases.size(), "ogpsa::", op, ": need as many bases as grads (",
              grads.size(), " vs ", bases.size(), "), at least one");
  const auto dev = grads[0].device();
  Lists L;
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
    L.push(g.data_ptr(), u.data_ptr(), g.numel(), static_cast<int32_t>(u.size(0)), static_cast<int32_t>(i));
  }
  return L;
}

int max_rank(const Lists& L) { return L.k.empty() ? 0 : *std::max_element(L.k.begin(), L.k.end()); }

// ------------------------------------------------------------------------------------
// dots
// ------------------------------------------------------------------------------------

// pass 1 of the tensors in L into rows L.tid of out ([*, W] float32)
void run_dots(const Lists& L, at::ScalarType gdt, at::ScalarType udt, int W, const at::Tensor& out,
              cudaStream_t stream) {
  at::Tensor part = at::empty({total_rows(L), W}, out.options());
  dispatch_gu(gdt, udt, "dots", [&](auto gtag, auto utag) {
    using G = decltype(gtag);
    using U = decltype(utag);
    dispatch_rank(W - 1, [&](auto kc) {
      launch_op(L, DotsOp<G, U, decltype(kc)::value>{part.data_ptr<float>(), W, 0}, stream);
    });
  });
  reduce_rows(L, part.data_ptr<float>(), W, RowsOut{out.data_ptr<float>(), W}, stream);
}

at::Tensor dots_cuda(at::TensorList grads, at::TensorList bases, int64_t k_max) {
  const Lists L = collect(grads, bases, "dots");
  const int kk = max_rank(L);
  TORCH_CHECK(k_max >= 1 && k_max >= kk && k_max <= kMaxRank, "ogpsa::dots: k_max=", k_max,
              " must be in [max(1, max k_i)=", std::max(1, kk), ", ", kMaxRank, "]");
  c10::cuda::CUDAGuard guard(grads[0].device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int W = static_cast<int>(k_max) + 1;
  at::Tensor out = at::empty({static_cast<int64_t>(grads.size()), W}, grads[0].options().dtype(at::kFloat));
  run_dots(L, grads[0].scalar_type(), bases[0].scalar_type(), W, out, stream);
  return out;
}

// ------------------------------------------------------------------------------------
// update_
// ------------------------------------------------------------------------------------

void run_update(const Lists& L, at::ScalarType gdt, at::ScalarType udt, const float* weights, int k_max, float kappa,
                const float* scale, cudaStream_t stream) {
  dispatch_gu(gdt, udt, "update_", [&](auto gtag, auto utag) {
    using G = decltype(gtag);
    using U = decltype(utag);
    launch_op(L, UpdateOp<G, U>{weights, k_max, kappa, scale, 0}, stream);
  });
}

void update_cuda(at::TensorList grads, at::TensorList bases, const at::Tensor& weights, double kappa,
                 const at::Tensor& scale) {
  const Lists L = collect(grads, bases, "update_");
  const int64_t T = grads.size();
  TORCH_CHECK(weights.scalar_type() == at::kFloat && weights.dim() == 2 && weights.size(0) == T &&
                  weights.is_contiguous() && weights.device() == grads[0].device() && weights.size(1) >= max_rank(L),
              "ogpsa::update_: weights must be a contiguous float32 [T=", T, ", k_max] tensor on ", grads[0].device(),
              ", got ", weights.scalar_type(), " ", weights.sizes(), " on ", weights.device());
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.dim() == 1 && scale.size(0) == T && scale.is_contiguous() &&
                  scale.device() == grads[0].device(),
              "ogpsa::update_: scale must be a contiguous float32 [T=", T, "] tensor on ", grads[0].device());
  c10::cuda::CUDAGuard guard(grads[0].device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  run_update(L, grads[0].scalar_type(), bases[0].scalar_type(), weights.data_ptr<float>(),
             static_cast<int>(weights.size(1)), static_cast<float>(kappa), scale.data_ptr<float>(), stream);
}

// ------------------------------------------------------------------------------------
// fused_project_: single pass for tensors of at most kSingleMax elements, two passes (with the
// same k x k step, done by tiny_step_kernel on the device) for the others
// ------------------------------------------------------------------------------------

// per large tensor j (index ids[j] in the caller's list): w = M^-1 c, the mode rule, into
// weights[j, :], and the pass-1 row copied to out[ids[j]]
constexpr int kMaxIds = 256;
struct Ids {
  int32_t id[kMaxIds];  // caller's index of large tensor j0 + blockIdx.x (by value: no host copy)
};

template <typename GI>
__global__ void tiny_step_kernel(const float* rows, Ids ids, int j0, const GI* gram_inv, int KM, int W, int mode,
                                 float aligned_scale, float* weights, float* out) {
  const int64_t j = j0 + blockIdx.x;
  const int64_t t = ids.id[blockIdx.x];
  for (int c = threadIdx.x; c < W; c += blockDim.x) out[t * W + c] = rows[static_cast<int64_t>(j) * W + c];
  for (int r = threadIdx.x; r < KM; r += blockDim.x) {
    double w = 0.0;
    for (int l = 0; l < KM; ++l) w += static_cast<double>(gram_inv[(t * KM + r) * KM + l]) * rows[j * W + l];
    float wf = static_cast<float>(w);
    if (mode == 1) wf = wf < 0.f ? wf : (1.f - aligned_scale) * wf;
    if (mode == 2) wf = -wf;
    weights[static_cast<int64_t>(j) * KM + r] = wf;
  }
}

int parse_mode_cuda(c10::string_view mode) {
  if (mode == "orthogonal") return 0;
  if (mode == "conflict") return 1;
  if (mode == "plane") return 2;
  TORCH_CHECK(false, "ogpsa::fused_project_: mode must be 'orthogonal', 'conflict' or 'plane', got '",
              std::string(mode), "'");
  return 0;
}

at::Tensor fused_project_cuda(at::TensorList grads, at::TensorList bases, const at::Tensor& gram_inv,
                              c10::string_view mode_name, double aligned_scale) {
  const Lists all = collect(grads, bases, "fused_project_");
  const int mode = parse_mode_cuda(mode_name);
  const int64_t T = grads.size();
  TORCH_CHECK((gram_inv.scalar_type() == at::kFloat || gram_inv.scalar_type() == at::kDouble) &&
                  gram_inv.dim() == 3 && gram_inv.size(0) == T && gram_inv.size(1) == gram_inv.size(2) &&
                  gram_inv.size(1) <= kMaxRank && gram_inv.is_contiguous() && gram_inv.device() == grads[0].device(),
              "ogpsa::fused_project_: gram_inv must be a contiguous float32/float64 [T=", T, ", k_max, k_max] tensor on ",
              grads[0].device(), ", got ", gram_inv.scalar_type(), " ", gram_inv.sizes());
  const int KM = static_cast<int>(gram_inv.size(1));
  TORCH_CHECK(KM >= max_rank(all), "ogpsa::fused_project_: gram_inv is ", KM, " wide but a basis has rank ",
              max_rank(all));
  const int W = std::max(1, KM) + 1;
  c10::cuda::CUDAGuard guard(grads[0].device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto fopts = grads[0].options().dtype(at::kFloat);
  at::Tensor out = at::empty({T, W}, fopts);
  Lists small, large;
  for (size_t i = 0; i < all.size(); ++i)
    (all.n[i] <= kSingleMax ? small : large).push(all.a[i], all.b[i], all.n[i], all.k[i], all.tid[i]);
  const auto gdt = grads[0].scalar_type(), udt = bases[0].scalar_type();
  auto with_gi = [&](auto&& f) {
    if (gram_inv.scalar_type() == at::kDouble) f(gram_inv.data_ptr<double>());
    else f(gram_inv.data_ptr<float>());
  };
  if (small.size()) {
    dispatch_gu(gdt, udt, "fused_project_", [&](auto gtag, auto utag) {
      using G = decltype(gtag);
      using U = decltype(utag);
      dispatch_rank(W - 1, [&](auto kc) {
        with_gi([&](auto* gi) {
          using GI = std::remove_const_t<std::remove_pointer_t<decltype(gi)>>;
          launch_op(small, FusedSmallOp<G, U, GI, decltype(kc)::value>{gi, KM, out.data_ptr<float>(), W, mode,
                                                                          static_cast<float>(aligned_scale), 0},
                    stream);
        });
      });
    });
  }
  if (large.size()) {
    const int64_t L = large.size();
    // the large tensors renumbered 0..L-1 for their own pass-1 rows and weights
    Lists local = large;
    std::iota(local.tid.begin(), local.tid.end(), 0);
    at::Tensor rows = at::empty({L, W}, fopts);
    run_dots(local, gdt, udt, W, rows, stream);
    at::Tensor weights = at::empty({L, std::max(1, KM)}, fopts);
    for (int64_t j0 = 0; j0 < L; j0 += kMaxIds) {
      Ids ids;
      const int64_t count = std::min<int64_t>(kMaxIds, L - j0);
      std::copy(large.tid.begin() + j0, large.tid.begin() + j0 + count, ids.id);
      with_gi([&](auto* gi) {
        tiny_step_kernel<<<static_cast<unsigned>(count), 32, 0, stream>>>(
            rows.data_ptr<float>(), ids, static_cast<int>(j0), gi, KM, W, mode, static_cast<float>(aligned_scale),
            weights.data_ptr<float>(), out.data_ptr<float>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
    // scale nullptr: 1 for every tensor (no clipping on this path)
    run_update(local, gdt, udt, weights.data_ptr<float>(), std::max(1, KM), mode == 2 ? 0.f : 1.f, nullptr, stream);
  }
  return out;
}

// ------------------------------------------------------------------------------------
// gram / combine
// ------------------------------------------------------------------------------------

template <typename F>
void dispatch_ref(at::ScalarType dt, const char* op, F&& f) {
  if (dt == at::kFloat) return f(float{});
  if (dt == at::kBFloat16) return f(c10::BFloat16{});
  if (dt == at::kHalf) return f(c10::Half{});
  TORCH_CHECK(false, "ogpsa::", op, ": dtype must be float32, bfloat16 or float16, got ", dt);
}

Lists collect_refs(at::TensorList refs, const char* op) {
  TORCH_CHECK(!refs.empty() && refs[0].dim() == 2 && refs[0].size(0) >= 1, "ogpsa::", op,
              ": refs must be a non-empty list of [m, N] tensors");
  const int64_t m = refs[0].size(0);
  Lists L;
  for (size_t i = 0; i < refs.size(); ++i) {
    const auto& r = refs[i];
    TORCH_CHECK(r.dim() == 2 && r.size(0) == m && r.size(1) >= 1 && r.is_contiguous() &&
                    r.device() == refs[0].device() && r.scalar_type() == refs[0].scalar_type(),
                "ogpsa::", op, ": refs[", i, "] must be a contiguous [", m, ", N>=1] ", refs[0].scalar_type(),
                " tensor on ", refs[0].device(), ", got ", r.sizes());
    L.push(r.data_ptr(), r.data_ptr(), r.size(1), static_cast<int32_t>(m), static_cast<int32_t>(i));
  }
  return L;
}

at::Tensor gram_cuda(at::TensorList refs) {
  const Lists L = collect_refs(refs, "gram");
  const int m = static_cast<int>(refs[0].size(0));
  const int P = m * (m + 1) / 2;
  TORCH_CHECK(P <= 65535, "ogpsa::gram: m=", m, " reference gradients is more than the CUDA kernel handles (361)");
  c10::cuda::CUDAGuard guard(refs[0].device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor part = at::empty({total_rows(L), P}, refs[0].options().dtype(at::kFloat));
  at::Tensor out = at::empty({static_cast<int64_t>(refs.size()), m, m}, refs[0].options().dtype(at::kDouble));
  float* p = part.data_ptr<float>();
  dispatch_ref(refs[0].scalar_type(), "gram", [&](auto rtag) {
    using R = decltype(rtag);
    // m <= 16: each row read once per chunk, all pairs in registers; wider: a block per pair
    if (m <= 4) launch_op(L, GramOp<R, 4>{p, m, P, 0}, stream);
    else if (m <= 8) launch_op(L, GramOp<R, 8>{p, m, P, 0}, stream);
    else if (m <= 16) launch_op(L, GramOp<R, 16>{p, m, P, 0}, stream);
    else launch_op(L, GramPairOp<R>{p, m, P, 0}, stream, static_cast<unsigned>(P));
  });
  reduce_rows(L, p, P, GramOut{out.data_ptr<double>(), m}, stream);
  return out;
}

std::vector<at::Tensor> combine_cuda(at::TensorList refs, const at::Tensor& coefficients, at::IntArrayRef ks,
                                     at::ScalarType out_dtype) {
  Lists L = collect_refs(refs, "combine");
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
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(ks[t] >= 0 && ks[t] <= k_max, "ogpsa::combine: ks[", t, "]=", ks[t], " is outside [0, ", k_max, "]");
    outs.push_back(at::empty({ks[t], L.n[t]}, refs[0].options().dtype(out_dtype)));
    L.b[t] = outs.back().data_ptr();
    L.k[t] = static_cast<int32_t>(ks[t]);
  }
  c10::cuda::CUDAGuard guard(refs[0].device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_ref(refs[0].scalar_type(), "combine", [&](auto rtag) {
    using R = decltype(rtag);
    dispatch_ref(out_dtype, "combine", [&](auto otag) {
      using O = decltype(otag);
      launch_op(L, CombineOp<R, O>{coefficients.data_ptr<float>(), k_max, m, 0}, stream);
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
  m.impl("fused_project_", &ogpsa::cuda::fused_project_cuda);
  m.impl("gram", &ogpsa::cuda::gram_cuda);
  m.impl("combine", &ogpsa::cuda::combine_cuda);
}
