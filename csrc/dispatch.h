// Shared by the CPU (ops.cpp) and CUDA (cuda/ops_cuda.cu) kernels: dispatch on
// (gradient dtype, basis dtype) to a functor templated on both element types.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace ogpsa {

template <typename F>
void dispatch_gu(at::ScalarType gdt, at::ScalarType udt, const char* op, F&& f) {
  auto on_u = [&](auto gtag) {
    using G = decltype(gtag);
    if (udt == at::kFloat) return f(G{}, float{});
    if (udt == at::kBFloat16) return f(G{}, c10::BFloat16{});
    TORCH_CHECK(false, "ogpsa::", op, ": basis dtype must be float32 or bfloat16, got ", udt);
  };
  if (gdt == at::kFloat) return on_u(float{});
  if (gdt == at::kBFloat16) return on_u(c10::BFloat16{});
  if (gdt == at::kHalf) return on_u(c10::Half{});
  TORCH_CHECK(false, "ogpsa::", op, ": dtype must be float32, bfloat16 or float16, got ", gdt);
}

}  // namespace ogpsa
