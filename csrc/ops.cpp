// ogpsa._C: the operator schema (declared once, here) and the CPU kernels.
//
// Ops (all multi-tensor: one call handles every tensor of a (device, dtype) group):
//   dots(grads, bases, k_max) -> [T, k_max+1] fp32      c_i = U_i g_i (zero padded), ||g_i||^2 last
//   update_(grads!, bases, weights, kappa, scale)       g_i <- scale_i * (kappa g_i - U_i^T w_i)
//   gram(refs) -> [T, m, m] fp64                        R_i R_i^T
//   combine(refs, coefficients, ks, out_dtype)          U_i = A_i[:k_i] R_i
//   fused_project_(grads!, bases, gram_inv, rule, aligned_scale) -> [T, k_max+1] fp32
//       per-tensor scope without clipping: dots, the k x k mode step and the subtraction,
//       with each small tensor still in cache between its dots and its update.
//
// Determinism: work is split into fixed-size chunks that do not depend on the thread
// count; each chunk writes its own partial sums, and partials are reduced in chunk order.
// Arithmetic is fp32 (lane-parallel accumulators the compiler can vectorise without
// -ffast-math) and per-tensor totals are summed in fp64.

#include <Python.h>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "cpu_simd.h"
#include "dispatch.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace ogpsa {
namespace {

constexpr int64_t kMaxRank = 16;
// Chunk of one work item; fixed so results do not depend on the number of threads.
constexpr int64_t kChunk = 32768;
// Inner block converted to fp32 in a stack buffer (stays in L1).
constexpr int64_t kBlock = 1024;
// fused_project_: tensors up to this many elements are projected in one work item
// (dots and subtraction back to back, so the second read hits cache); larger ones are
// split into chunks across threads like dots/update_.
constexpr int64_t kFuseMaxNumel = 1 << 18;

// out[0..k) = U[:, begin:end] g[begin:end], out[k] = ||g[begin:end]||^2 (fp32 partials).
template <typename G, typename U>
OGPSA_INLINE void dots_body(const G* g, const U* u, int64_t ld, int64_t k, int64_t begin, int64_t end, float* out) {
  alignas(64) float gbuf[kBlock];
  alignas(64) float acc[kMaxRank + 1][kLanes];
  std::memset(acc, 0, sizeof(acc));
  for (int64_t b = begin; b < end; b += kBlock) {
    const int64_t n = std::min(kBlock, end - b);
    load_block(g + b, gbuf, n);
    dot_acc(gbuf, gbuf, n, acc[k]);
    dot_rows_k(u + b, ld, k, gbuf, n, acc);
  }
  for (int64_t j = 0; j <= k; ++j) out[j] = reduce_lanes(acc[j]);
}

// g[begin:end] <- scale * (kappa * g - sum_j w[j] U[j]) in fp32, rounded once.
template <typename G, typename U>
OGPSA_INLINE void update_body(G* g, const U* u, int64_t ld, int64_t k, const float* w, float kappa, float scale,
                  int64_t begin, int64_t end) {
  alignas(64) float buf[kBlock];
  for (int64_t b = begin; b < end; b += kBlock) {
    const int64_t n = std::min(kBlock, end - b);
    const G* gb = g + b;
    for (int64_t i = 0; i < n; ++i) buf[i] = kappa * to_f(gb[i]);
    axpy_rows_k<true>(u + b, ld, k, w, buf, n);
    G* go = g + b;
    for (int64_t i = 0; i < n; ++i) go[i] = static_cast<G>(scale * buf[i]);
  }
}

// dots_body / update_body compiled for each ISA (csrc/cpu_simd.h), picked per op call
template <typename G, typename U>
struct RangeKernels {
  void (*dots)(const G* g, const U* u, int64_t ld, int64_t k, int64_t begin, int64_t end, float* out);
  void (*update)(G* g, const U* u, int64_t ld, int64_t k, const float* w, float kappa, float scale, int64_t begin,
                 int64_t end);
};

template <typename G, typename U>
void dots_base(const G* g, const U* u, int64_t ld, int64_t k, int64_t begin, int64_t end, float* out) {
  dots_body(g, u, ld, k, begin, end, out);
}
template <typename G, typename U>
void update_base(G* g, const U* u, int64_t ld, int64_t k, const float* w, float kappa, float scale, int64_t begin,
                 int64_t end) {
  update_body(g, u, ld, k, w, kappa, scale, begin, end);
}
#if OGPSA_X86
template <typename G, typename U>
OGPSA_TARGET_AVX2 void dots_avx2(const G* g, const U* u, int64_t ld, int64_t k, int64_t begin, int64_t end,
                                 float* out) {
  dots_body(g, u, ld, k, begin, end, out);
}
template <typename G, typename U>
OGPSA_TARGET_AVX2 void update_avx2(G* g, const U* u, int64_t ld, int64_t k, const float* w, float kappa, float scale,
                                   int64_t begin, int64_t end) {
  update_body(g, u, ld, k, w, kappa, scale, begin, end);
}
template <typename G, typename U>
OGPSA_TARGET_AVX512 void dots_avx512(const G* g, const U* u, int64_t ld, int64_t k, int64_t begin, int64_t end,
                                     float* out) {
  dots_body(g, u, ld, k, begin, end, out);
}
template <typename G, typename U>
OGPSA_TARGET_AVX512 void update_avx512(G* g, const U* u, int64_t ld, int64_t k, const float* w, float kappa,
                                       float scale, int64_t begin, int64_t end) {
  update_body(g, u, ld, k, w, kappa, scale, begin, end);
}
#endif

template <typename G, typename U>
RangeKernels<G, U> range_kernels(Isa isa) {
#if OGPSA_X86
  if (isa == Isa::kAvx512) return {&dots_avx512<G, U>, &update_avx512<G, U>};
  if (isa == Isa::kAvx2) return {&dots_avx2<G, U>, &update_avx2<G, U>};
#endif
  (void)isa;
  return {&dots_base<G, U>, &update_base<G, U>};
}

struct Item {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

std::vector<Item> make_items(const std::vector<int64_t>& numel, int64_t chunk) {
  std::vector<Item> items;
  for (int64_t t = 0; t < static_cast<int64_t>(numel.size()); ++t)
    for (int64_t b = 0; b < numel[t]; b += chunk) items.push_back({t, b, std::min(numel[t], b + chunk)});
  return items;
}

// Second stage of every reduction: the chunk partials of a tensor are adjacent in `items`;
// sum them in chunk order in fp64, so results do not depend on the thread count, and hand
// each tensor's sums to `emit(t, sums)`.
template <typename Emit>
void sum_partials_in_order(const std::vector<Item>& items, const std::vector<float>& part, int64_t width,
                           Emit&& emit) {
  std::vector<double> sum(width);
  const int64_t I = static_cast<int64_t>(items.size());
  for (int64_t it = 0; it < I;) {
    const int64_t t = items[it].tensor;
    std::fill(sum.begin(), sum.end(), 0.0);
    for (; it < I && items[it].tensor == t; ++it)
      for (int64_t j = 0; j < width; ++j) sum[j] += part[it * width + j];
    emit(t, sum.data());
  }
}


// Light O(T) metadata checks: ogpsa.ops validates fully, but the ops are public as torch.ops.ogpsa.*
void check_pairs(at::TensorList grads, at::TensorList bases, const char* op, c10::DeviceType dev) {
  TORCH_CHECK(!grads.empty(), "ogpsa::", op, ": grads is empty");
  TORCH_CHECK(grads.size() == bases.size(), "ogpsa::", op, ": ", grads.size(), " grads but ", bases.size(), " bases");
  const auto gdt = grads[0].scalar_type();
  const auto udt = bases[0].scalar_type();
  for (size_t i = 0; i < grads.size(); ++i) {
    const auto& g = grads[i];
    const auto& u = bases[i];
    TORCH_CHECK(g.device().type() == dev && u.device().type() == dev, "ogpsa::", op, ": tensor ", i,
                " is not on the expected device type ", dev);
    TORCH_CHECK(g.scalar_type() == gdt && u.scalar_type() == udt, "ogpsa::", op, ": tensor ", i,
                " has dtypes (", g.scalar_type(), ", ", u.scalar_type(), "); every tensor must share (", gdt, ", ",
                udt, ")");
    TORCH_CHECK(g.is_contiguous() && u.is_contiguous(), "ogpsa::", op, ": tensor ", i, " is not contiguous");
    TORCH_CHECK(g.numel() >= 1, "ogpsa::", op, ": grads[", i, "] has no elements");
    TORCH_CHECK(u.dim() == 2 && u.size(1) == g.numel(), "ogpsa::", op, ": bases[", i, "] has shape ", u.sizes(),
                ", expected [k, ", g.numel(), "]");
    TORCH_CHECK(u.size(0) <= kMaxRank, "ogpsa::", op, ": bases[", i, "] has k=", u.size(0), " > ", kMaxRank);
  }
}

int64_t max_rank(at::TensorList bases) {
  int64_t k = 0;
  for (const auto& u : bases) k = std::max<int64_t>(k, u.size(0));
  return k;
}

// ------------------------------------------------------------------------------------
// dots
// ------------------------------------------------------------------------------------

at::Tensor dots_cpu(at::TensorList grads, at::TensorList bases, int64_t k_max) {
  check_pairs(grads, bases, "dots", c10::DeviceType::CPU);
  const Isa isa = cpu_isa();
  TORCH_CHECK(k_max >= 1 && k_max >= max_rank(bases), "ogpsa::dots: k_max=", k_max,
              " must be >= 1 and >= every basis rank (", max_rank(bases), ")");
  const int64_t T = grads.size();
  const int64_t W = k_max + 1;
  std::vector<int64_t> numel(T);
  for (int64_t t = 0; t < T; ++t) numel[t] = grads[t].numel();
  const auto items = make_items(numel, kChunk);
  const int64_t I = items.size();
  std::vector<float> part(I * W, 0.f);
  dispatch_gu(grads[0].scalar_type(), bases[0].scalar_type(), "dots", [&](auto gtag, auto utag) {
    using G = decltype(gtag);
    using U = decltype(utag);
    const auto K = range_kernels<G, U>(isa);
    at::parallel_for(0, I, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t it = lo; it < hi; ++it) {
        const Item& w = items[it];
        const auto& u = bases[w.tensor];
        const int64_t k = u.size(0);
        float tmp[kMaxRank + 1];
        K.dots(grads[w.tensor].const_data_ptr<G>(), u.const_data_ptr<U>(), numel[w.tensor], k, w.begin, w.end,
                   tmp);
        float* row = part.data() + it * W;
        for (int64_t j = 0; j < k; ++j) row[j] = tmp[j];
        row[k_max] = tmp[k];
      }
    });
  });
  // second stage: chunk partials of a tensor are adjacent; sum them in order, in fp64
  at::Tensor out = at::empty({T, W}, at::TensorOptions().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  sum_partials_in_order(items, part, W, [&](int64_t t, const double* sum) {
    for (int64_t j = 0; j < W; ++j) o[t * W + j] = static_cast<float>(sum[j]);
  });
  return out;
}

// ------------------------------------------------------------------------------------
// update_
// ------------------------------------------------------------------------------------

void check_tables(at::TensorList grads, const at::Tensor& weights, const at::Tensor& scale, const char* op) {
  const int64_t T = grads.size();
  TORCH_CHECK(weights.scalar_type() == at::kFloat && weights.dim() == 2 && weights.size(0) == T &&
                  weights.size(1) >= 1 && weights.is_contiguous(),
              "ogpsa::", op, ": weights must be a contiguous float32 [T=", T, ", k_max] tensor, got ",
              weights.scalar_type(), " ", weights.sizes());
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.dim() == 1 && scale.size(0) == T && scale.is_contiguous(),
              "ogpsa::", op, ": scale must be a contiguous float32 [T=", T, "] tensor, got ", scale.scalar_type(), " ",
              scale.sizes());
  TORCH_CHECK(weights.device() == grads[0].device() && scale.device() == grads[0].device(), "ogpsa::", op,
              ": weights and scale must be on the gradients' device ", grads[0].device());
}

void update_cpu(at::TensorList grads, at::TensorList bases, const at::Tensor& weights, double kappa,
                const at::Tensor& scale) {
  check_pairs(grads, bases, "update_", c10::DeviceType::CPU);
  const Isa isa = cpu_isa();
  check_tables(grads, weights, scale, "update_");
  const int64_t k_max = weights.size(1);
  TORCH_CHECK(k_max >= max_rank(bases), "ogpsa::update_: weights has ", k_max, " columns but a basis has rank ",
              max_rank(bases));
  const int64_t T = grads.size();
  std::vector<int64_t> numel(T);
  for (int64_t t = 0; t < T; ++t) numel[t] = grads[t].numel();
  const auto items = make_items(numel, kChunk);
  const float* wt = weights.const_data_ptr<float>();
  const float* sc = scale.const_data_ptr<float>();
  const float kap = static_cast<float>(kappa);
  dispatch_gu(grads[0].scalar_type(), bases[0].scalar_type(), "update_", [&](auto gtag, auto utag) {
    using G = decltype(gtag);
    using U = decltype(utag);
    const auto K = range_kernels<G, U>(isa);
    at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t lo, int64_t hi) {
      for (int64_t it = lo; it < hi; ++it) {
        const Item& w = items[it];
        const auto& u = bases[w.tensor];
        K.update(grads[w.tensor].mutable_data_ptr<G>(), u.const_data_ptr<U>(), numel[w.tensor], u.size(0),
                     wt + w.tensor * k_max, kap, sc[w.tensor], w.begin, w.end);
      }
    });
  });
}

// ------------------------------------------------------------------------------------
// fused_project_
// ------------------------------------------------------------------------------------

enum class Mode { kOrthogonal, kConflict, kPlane };

Mode parse_mode(c10::string_view mode) {
  if (mode == "orthogonal") return Mode::kOrthogonal;
  if (mode == "conflict") return Mode::kConflict;
  if (mode == "plane") return Mode::kPlane;
  TORCH_CHECK(false, "ogpsa::fused_project_: mode must be 'orthogonal', 'conflict' or 'plane', got '",
              std::string(mode), "'");
}

// The same tiny step as ogpsa.ops.execute for scope="tensor": w = M^{-1} c, then the mode rule.
float mode_weights(const float* m_inv, int64_t ld, const float* c, int64_t k, Mode mode, float aligned_scale,
                   float* w) {
  for (int64_t a = 0; a < k; ++a) {
    float s = 0.f;
    for (int64_t b = 0; b < k; ++b) s += m_inv[a * ld + b] * c[b];
    w[a] = s;
  }
  if (mode == Mode::kConflict) {
    for (int64_t a = 0; a < k; ++a) w[a] = w[a] < 0.f ? w[a] : (1.f - aligned_scale) * w[a];
    return 1.f;
  }
  if (mode == Mode::kPlane) {
    for (int64_t a = 0; a < k; ++a) w[a] = -w[a];
    return 0.f;
  }
  return 1.f;
}

at::Tensor fused_project_cpu(at::TensorList grads, at::TensorList bases, const at::Tensor& gram_inv,
                             c10::string_view mode_name, double aligned_scale) {
  check_pairs(grads, bases, "fused_project_", c10::DeviceType::CPU);
  const Isa isa = cpu_isa();
  const Mode mode = parse_mode(mode_name);
  const int64_t T = grads.size();
  TORCH_CHECK(gram_inv.scalar_type() == at::kFloat && gram_inv.dim() == 3 && gram_inv.size(0) == T &&
                  gram_inv.size(1) == gram_inv.size(2) && gram_inv.size(1) >= 1 && gram_inv.is_contiguous() &&
                  gram_inv.device().is_cpu(),
              "ogpsa::fused_project_: gram_inv must be a contiguous float32 CPU [T=", T, ", k_max, k_max] tensor, got ",
              gram_inv.scalar_type(), " ", gram_inv.sizes());
  const int64_t k_max = gram_inv.size(1);
  TORCH_CHECK(k_max >= max_rank(bases), "ogpsa::fused_project_: gram_inv is ", k_max, " wide but a basis has rank ",
              max_rank(bases));
  const int64_t W = k_max + 1;
  const float as = static_cast<float>(aligned_scale);
  const float* minv = gram_inv.const_data_ptr<float>();

  std::vector<int64_t> numel(T);
  for (int64_t t = 0; t < T; ++t) numel[t] = grads[t].numel();
  // phase 1 items: a whole small tensor (fused), or a dots chunk of a large one
  std::vector<Item> items, big_items;
  std::vector<char> fused(T);
  for (int64_t t = 0; t < T; ++t) {
    fused[t] = numel[t] <= kFuseMaxNumel;
    if (fused[t]) {
      items.push_back({t, 0, numel[t]});
    } else {
      for (int64_t b = 0; b < numel[t]; b += kChunk) {
        items.push_back({t, b, std::min(numel[t], b + kChunk)});
        big_items.push_back(items.back());
      }
    }
  }
  const int64_t I = items.size();
  std::vector<float> part(I * W, 0.f);
  std::vector<float> weights(T * k_max, 0.f);
  std::vector<float> kappas(T, 1.f);
  at::Tensor out = at::empty({T, W}, at::TensorOptions().dtype(at::kFloat));
  float* o = out.data_ptr<float>();

  dispatch_gu(grads[0].scalar_type(), bases[0].scalar_type(), "fused_project_", [&](auto gtag, auto utag) {
    using G = decltype(gtag);
    using U = decltype(utag);
    const auto K = range_kernels<G, U>(isa);
    at::parallel_for(0, I, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t it = lo; it < hi; ++it) {
        const Item& w = items[it];
        const int64_t t = w.tensor;
        const auto& u = bases[t];
        const int64_t k = u.size(0);
        float tmp[kMaxRank + 1];
        K.dots(grads[t].const_data_ptr<G>(), u.const_data_ptr<U>(), numel[t], k, w.begin, w.end, tmp);
        float* row = part.data() + it * W;
        for (int64_t j = 0; j < k; ++j) row[j] = tmp[j];
        row[k_max] = tmp[k];
        if (fused[t]) {
          float* wt = weights.data() + t * k_max;
          const float kap = mode_weights(minv + t * k_max * k_max, k_max, tmp, k, mode, as, wt);
          K.update(grads[t].mutable_data_ptr<G>(), u.const_data_ptr<U>(), numel[t], k, wt, kap, 1.f, 0,
                       numel[t]);
        }
      }
    });
    // reduce partials in chunk order; large tensors get their weights here
    sum_partials_in_order(items, part, W, [&](int64_t t, const double* sum) {
      for (int64_t j = 0; j < W; ++j) o[t * W + j] = static_cast<float>(sum[j]);
      if (!fused[t])
        kappas[t] = mode_weights(minv + t * k_max * k_max, k_max, o + t * W, bases[t].size(0), mode, as,
                                 weights.data() + t * k_max);
    });
    const int64_t B = big_items.size();
    at::parallel_for(0, B, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t it = lo; it < hi; ++it) {
        const Item& w = big_items[it];
        const int64_t t = w.tensor;
        const auto& u = bases[t];
        K.update(grads[t].mutable_data_ptr<G>(), u.const_data_ptr<U>(), numel[t], u.size(0),
                     weights.data() + t * k_max, kappas[t], 1.f, w.begin, w.end);
      }
    });
  });
  return out;
}

// ------------------------------------------------------------------------------------
// gram / combine (basis building)
// ------------------------------------------------------------------------------------

template <typename F>
void dispatch_ref(at::ScalarType dt, const char* op, F&& f) {
  if (dt == at::kFloat) return f(float{});
  if (dt == at::kBFloat16) return f(c10::BFloat16{});
  if (dt == at::kHalf) return f(c10::Half{});
  TORCH_CHECK(false, "ogpsa::", op, ": refs dtype must be float32, bfloat16 or float16, got ", dt);
}

void check_refs(at::TensorList refs, const char* op, c10::DeviceType dev) {
  TORCH_CHECK(!refs.empty(), "ogpsa::", op, ": refs is empty");
  const int64_t m = refs[0].dim() == 2 ? refs[0].size(0) : -1;
  TORCH_CHECK(m >= 1, "ogpsa::", op, ": refs[0] must be a [m, N] tensor with m >= 1, got ", refs[0].sizes());
  for (size_t i = 0; i < refs.size(); ++i) {
    const auto& r = refs[i];
    TORCH_CHECK(r.dim() == 2 && r.size(0) == m && r.size(1) >= 1, "ogpsa::", op, ": refs[", i, "] has shape ",
                r.sizes(), ", expected [", m, ", N>=1]");
    TORCH_CHECK(r.is_contiguous() && r.device().type() == dev && r.scalar_type() == refs[0].scalar_type(), "ogpsa::",
                op, ": refs[", i, "] must be contiguous, on ", dev, ", with dtype ", refs[0].scalar_type());
  }
}

at::Tensor gram_cpu(at::TensorList refs) {
  check_refs(refs, "gram", c10::DeviceType::CPU);
  const int64_t T = refs.size();
  const int64_t m = refs[0].size(0);
  const int64_t P = m * (m + 1) / 2;
  std::vector<int64_t> numel(T);
  for (int64_t t = 0; t < T; ++t) numel[t] = refs[t].size(1);
  const auto items = make_items(numel, kChunk);
  const int64_t I = items.size();
  std::vector<float> part(I * P);
  dispatch_ref(refs[0].scalar_type(), "gram", [&](auto rtag) {
    using R = decltype(rtag);
    at::parallel_for(0, I, 1, [&](int64_t lo, int64_t hi) {
      std::vector<float> buf(m * kBlock);
      std::vector<float> acc(P * kLanes);
      for (int64_t it = lo; it < hi; ++it) {
        const Item& w = items[it];
        const R* r = refs[w.tensor].const_data_ptr<R>();
        const int64_t N = numel[w.tensor];
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t b = w.begin; b < w.end; b += kBlock) {
          const int64_t n = std::min(kBlock, w.end - b);
          for (int64_t a = 0; a < m; ++a) load_block(r + a * N + b, buf.data() + a * kBlock, n);
          int64_t p = 0;
          for (int64_t a = 0; a < m; ++a)
            for (int64_t c = a; c < m; ++c, ++p)
              dot_acc(buf.data() + a * kBlock, buf.data() + c * kBlock, n, acc.data() + p * kLanes);
        }
        for (int64_t p = 0; p < P; ++p) part[it * P + p] = reduce_lanes(acc.data() + p * kLanes);
      }
    });
  });
  at::Tensor out = at::empty({T, m, m}, at::TensorOptions().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  sum_partials_in_order(items, part, P, [&](int64_t t, const double* sum) {
    int64_t p = 0;
    for (int64_t a = 0; a < m; ++a)
      for (int64_t c = a; c < m; ++c, ++p) o[(t * m + a) * m + c] = o[(t * m + c) * m + a] = sum[p];
  });
  return out;
}

std::vector<at::Tensor> combine_cpu(at::TensorList refs, const at::Tensor& coefficients, at::IntArrayRef ks,
                                    at::ScalarType out_dtype) {
  check_refs(refs, "combine", c10::DeviceType::CPU);
  const int64_t T = refs.size();
  const int64_t m = refs[0].size(0);
  TORCH_CHECK(static_cast<int64_t>(ks.size()) == T, "ogpsa::combine: ks has ", ks.size(), " entries for ", T,
              " refs");
  TORCH_CHECK(coefficients.scalar_type() == at::kFloat && coefficients.dim() == 3 && coefficients.size(0) == T &&
                  coefficients.size(2) == m && coefficients.is_contiguous() && coefficients.device().is_cpu(),
              "ogpsa::combine: coefficients must be a contiguous float32 CPU [T=", T, ", k_max, m=", m,
              "] tensor, got ", coefficients.scalar_type(), " ", coefficients.sizes());
  const int64_t k_max = coefficients.size(1);
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(ks[t] >= 0 && ks[t] <= k_max, "ogpsa::combine: ks[", t, "]=", ks[t], " is outside [0, ", k_max, "]");
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kBFloat16 || out_dtype == at::kHalf,
              "ogpsa::combine: out_dtype must be float32, bfloat16 or float16, got ", out_dtype);
  std::vector<at::Tensor> outs;
  std::vector<int64_t> numel(T);
  for (int64_t t = 0; t < T; ++t) {
    numel[t] = refs[t].size(1);
    outs.push_back(at::empty({ks[t], numel[t]}, at::TensorOptions().dtype(out_dtype)));
  }
  const auto items = make_items(numel, kChunk);
  const float* coef = coefficients.const_data_ptr<float>();
  dispatch_ref(refs[0].scalar_type(), "combine", [&](auto rtag) {
    using R = decltype(rtag);
    dispatch_ref(out_dtype, "combine", [&](auto otag) {
      using O = decltype(otag);
      at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t lo, int64_t hi) {
        std::vector<float> buf(m * kBlock);
        alignas(64) float acc[kBlock];
        for (int64_t it = lo; it < hi; ++it) {
          const Item& w = items[it];
          const int64_t k = ks[w.tensor];
          if (k == 0) continue;
          const R* r = refs[w.tensor].const_data_ptr<R>();
          O* u = outs[w.tensor].mutable_data_ptr<O>();
          const int64_t N = numel[w.tensor];
          const float* a = coef + w.tensor * k_max * m;
          for (int64_t b = w.begin; b < w.end; b += kBlock) {
            const int64_t n = std::min(kBlock, w.end - b);
            for (int64_t j = 0; j < m; ++j) load_block(r + j * N + b, buf.data() + j * kBlock, n);
            for (int64_t row = 0; row < k; ++row) {
              std::fill(acc, acc + n, 0.f);
              for (int64_t j = 0; j < m; ++j) {
                const float s = a[row * m + j];
                const float* __restrict src = buf.data() + j * kBlock;
                for (int64_t i = 0; i < n; ++i) acc[i] += s * src[i];
              }
              O* dst = u + row * N + b;
              for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<O>(acc[i]);
            }
          }
        }
      });
    });
  });
  return outs;
}

}  // namespace
}  // namespace ogpsa

TORCH_LIBRARY(ogpsa, m) {
  m.def("dots(Tensor[] grads, Tensor[] bases, int k_max) -> Tensor");
  m.def("update_(Tensor(a!)[] grads, Tensor[] bases, Tensor weights, float kappa, Tensor scale) -> ()");
  m.def("gram(Tensor[] refs) -> Tensor");
  m.def("combine(Tensor[] refs, Tensor coefficients, int[] ks, ScalarType out_dtype) -> Tensor[]");
  // `rule` is the projection mode; an argument named `mode` collides with torch's FakeTensor-mode
  // redirection (opcheck fails with "got multiple values for argument 'mode'")
  m.def("fused_project_(Tensor(a!)[] grads, Tensor[] bases, Tensor gram_inv, str rule, float aligned_scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(ogpsa, CPU, m) {
  m.impl("dots", &ogpsa::dots_cpu);
  m.impl("update_", &ogpsa::update_cpu);
  m.impl("gram", &ogpsa::gram_cpu);
  m.impl("combine", &ogpsa::combine_cpu);
  m.impl("fused_project_", &ogpsa::fused_project_cpu);
}

// ------------------------------------------------------------------------------------
// Python module: importing ogpsa._C loads the library above; build_info() says what is in it.
// ------------------------------------------------------------------------------------

#define OGPSA_STR2(x) #x
#define OGPSA_STR(x) OGPSA_STR2(x)

static PyObject* build_info(PyObject*, PyObject*) {
#ifdef OGPSA_WITH_CUDA
  PyObject* cuda = Py_True;
#ifdef OGPSA_CUDA_ARCHS
  const char* archs = OGPSA_STR(OGPSA_CUDA_ARCHS);
#else
  const char* archs = "";
#endif
#else
  PyObject* cuda = Py_False;
  const char* archs = "";
#endif
#ifdef _OPENMP
  PyObject* omp = Py_True;
#else
  PyObject* omp = Py_False;
#endif
#ifdef OGPSA_TORCH_VERSION  // set by setup.py: the torch this build compiled against
  const char* torch_version = OGPSA_STR(OGPSA_TORCH_VERSION);
#else
  const char* torch_version = "";
#endif
  // cpu_isa: what the CPU kernels run with now (OGPSA_CPU_ISA or the widest available); an invalid
  // OGPSA_CPU_ISA is reported here as "invalid: <message>" rather than raised
  std::string isa;
  try {
    isa = ogpsa::isa_name(ogpsa::cpu_isa());
  } catch (const std::exception& e) {
    isa = std::string("invalid: ") + e.what();
    isa = isa.substr(0, isa.find('\n'));
  }
  return Py_BuildValue("{s:O,s:s,s:O,s:i,s:s,s:s,s:s,s:s}", "cuda", cuda, "cuda_archs", archs, "openmp", omp,
                       "max_rank", static_cast<int>(ogpsa::kMaxRank), "compiler", __VERSION__, "torch_version",
                       torch_version, "cpu_isa", isa.c_str(), "cpu_isa_best", ogpsa::isa_name(ogpsa::best_isa()));
}

static PyMethodDef kMethods[] = {
    {"build_info", build_info, METH_NOARGS,
     "dict: cuda (CUDA kernels compiled in), cuda_archs (encoded TORCH_CUDA_ARCH_LIST), openmp, max_rank, compiler, "
     "torch_version (the torch it was built against), cpu_isa (the CPU kernels' instruction set now: baseline, avx2 "
     "or avx512; OGPSA_CPU_ISA forces one), cpu_isa_best (the widest this CPU and build have)"},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_C", "ogpsa compiled ops (registered as torch.ops.ogpsa)",
                                     -1, kMethods};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&kModule); }
