"""The ``cpu`` and ``cuda`` backends: the compiled extension ``ogpsa._C``.

``ogpsa._C`` registers the ops ``torch.ops.ogpsa.{dots, update_, gram, combine,
fused_project_}`` with torch.library (schema in ``csrc/ops.cpp``; CPU kernels there, CUDA
kernels in ``csrc/cuda``). This module wraps them in the :class:`~ogpsa.backends.base.Backend`
contract and registers fake (meta) kernels so ``torch.compile`` can trace calls to them.

Importing this module never fails for a missing or broken build: the backends then
report themselves unavailable with the import error as the reason.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from .base import Backend

try:
    from ogpsa import _C  # noqa: F401  (loading it registers torch.ops.ogpsa.*)

    _IMPORT_ERROR = ""
except Exception as exc:  # not built (pure-Python install) or built against another torch
    _C = None
    _IMPORT_ERROR = f"ogpsa._C is not built or failed to load ({type(exc).__name__}: {exc})"

GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BASIS_DTYPES = (torch.float32, torch.bfloat16)


def _decode_archs(token: str) -> list[str]:
    # setup.py encodes "8.0;9.0+PTX" as "80_90PTX" so it survives as a C macro
    out = []
    for part in filter(None, token.split("_")):
        ptx = part.endswith("PTX")
        digits = part[:-3] if ptx else part
        suffix = digits[-1] if digits and digits[-1].isalpha() else ""
        digits = digits[: len(digits) - len(suffix)]
        out.append(f"{digits[:-1]}.{digits[-1]}{suffix}{'+PTX' if ptx else ''}" if len(digits) >= 2 else part)
    return out


def build_info() -> dict:
    """What the compiled module contains (empty dict when it is not built)."""
    if _C is None:
        return {}
    raw = dict(_C.build_info())
    raw["cuda_archs"] = _decode_archs(raw.get("cuda_archs", ""))
    return raw


def build_record() -> dict:
    """``_C_build.json``, written next to ``_C`` by setup.py: whether the CUDA kernels were built,
    why (``cuda_reason``) and, when not, how to get them. Empty for a build without the record."""
    path = getattr(_C, "__file__", None)
    if not path:
        return {}
    try:
        return dict(json.loads(Path(path).with_name("_C_build.json").read_text()))
    except (OSError, ValueError, TypeError):
        return {}


def no_cuda_kernels_reason() -> str:
    """Why this ``_C`` has no CUDA kernels and how to get them (from the build record)."""
    rec = build_record()
    why = rec.get("cuda_reason") or "no CUDA device, nvcc or CUDA torch at build time"
    how = rec.get("how_to_get_cuda_kernels", "")
    return why if not how or how in why else f"{why}; {how}"


def info() -> dict:
    """The ``extension`` section of ``ogpsa info``."""
    if _C is None:
        return {"built": False, "error": _IMPORT_ERROR}
    b = build_info()
    return {
        "built": True,
        "path": getattr(_C, "__file__", None),
        "cuda_kernels": bool(b["cuda"]),
        **({} if b["cuda"] else {"cuda_kernels_not_built": no_cuda_kernels_reason()}),
        "cuda_archs": b["cuda_archs"],
        "openmp": bool(b["openmp"]),
        "cpu_threads": torch.get_num_threads(),
        "ops": sorted(n for n in ("dots", "update_", "gram", "combine", "fused_project_", "projected_adamw_",
                                  "projected_adamw_pass1_", "projected_adamw_pass2_")
                      if hasattr(torch.ops.ogpsa, n)),
    }


# ----------------------------------------------------------------------------------------
# Fake kernels: shapes and dtypes only, so torch.compile / FakeTensor tracing works.
# ----------------------------------------------------------------------------------------

if _C is not None:

    @torch.library.register_fake("ogpsa::dots")
    def _dots_fake(grads, bases, k_max):
        return grads[0].new_empty((len(grads), k_max + 1), dtype=torch.float32)

    @torch.library.register_fake("ogpsa::update_")
    def _update_fake(grads, bases, weights, kappa, scale):
        return None

    @torch.library.register_fake("ogpsa::gram")
    def _gram_fake(refs):
        m = refs[0].shape[0]
        return refs[0].new_empty((len(refs), m, m), dtype=torch.float64)

    @torch.library.register_fake("ogpsa::combine")
    def _combine_fake(refs, coefficients, ks, out_dtype):
        return [r.new_empty((k, r.shape[1]), dtype=out_dtype) for r, k in zip(refs, ks)]

    @torch.library.register_fake("ogpsa::fused_project_")
    def _fused_fake(grads, bases, gram_inv, rule, aligned_scale):
        return grads[0].new_empty((len(grads), gram_inv.shape[1] + 1), dtype=torch.float32)

    # the projected AdamW step (csrc/adamw.cpp, csrc/cuda/adamw_cuda.cu): statistics tables in float64
    if hasattr(torch.ops.ogpsa, "projected_adamw_"):

        @torch.library.register_fake("ogpsa::projected_adamw_")
        def _adamw_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, bases, m_invs, steps, lr, beta1,
                        beta2, eps, weight_decay, maximize, project_weight_decay):
            return params[0].new_empty((len(params), 2), dtype=torch.float64)

    if hasattr(torch.ops.ogpsa, "projected_adamw_pass1_"):

        @torch.library.register_fake("ogpsa::projected_adamw_pass1_")
        def _adamw_pass1_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, bases, steps, k_max, beta1,
                              beta2, eps, weight_decay, maximize, project_weight_decay):
            return params[0].new_empty((len(params), k_max + 1), dtype=torch.float64)

        @torch.library.register_fake("ogpsa::projected_adamw_pass2_")
        def _adamw_pass2_fake(params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, bases, weights, steps, lr, beta1,
                              beta2, eps, weight_decay, kappa, project_weight_decay):
            return params[0].new_empty((len(params),), dtype=torch.float64)


# ----------------------------------------------------------------------------------------
# Backends
# ----------------------------------------------------------------------------------------


class _ExtBackend(Backend):
    device_type = ""

    def supports(self, device, grad_dtype, basis_dtype, forced) -> bool:
        return device.type == self.device_type and grad_dtype in GRAD_DTYPES and basis_dtype in BASIS_DTYPES

    def dots(self, grads: Sequence[Tensor], bases: Sequence[Tensor], k_max: int) -> Tensor:
        return torch.ops.ogpsa.dots(list(grads), list(bases), int(k_max))

    def update_(self, grads, bases, weights: Tensor, kappa: float, scale: Tensor) -> None:
        torch.ops.ogpsa.update_(list(grads), list(bases), weights, float(kappa), scale)

    def gram(self, refs: Sequence[Tensor]) -> Tensor:
        return torch.ops.ogpsa.gram(list(refs))

    def combine(self, refs, coefficients: Tensor, ks, out_dtype) -> list[Tensor]:
        return list(torch.ops.ogpsa.combine(list(refs), coefficients.contiguous(), [int(k) for k in ks], out_dtype))


class CpuBackend(_ExtBackend):
    """Multi-tensor C++ kernels (at::parallel_for over fixed chunks; deterministic)."""

    name = "cpu"
    device_type = "cpu"
    #: tensors up to this many elements are projected in one work item by ``fused_project_``
    #: (``kFuseMaxNumel`` in csrc/ops.cpp); larger ones are chunked across threads
    single_pass_max_numel: int = 1 << 18

    def availability(self) -> tuple[bool, str]:
        if _C is None:
            return False, _IMPORT_ERROR
        return True, f"ogpsa._C C++ kernels, {torch.get_num_threads()} threads"

    def fused_project_(self, grads: Sequence[Tensor], bases: Sequence[Tensor], gram_inv: Tensor, mode: str,
                       aligned_scale: float) -> Tensor:
        """Single pass for ``scope="tensor"`` without clipping: per tensor, ``c = U g``, the mode
        step with ``gram_inv`` (``[T, k_max, k_max]``, ``M_i^{-1}`` zero padded) and the
        subtraction while the tensor is still in cache. Returns the pass-1 table ``[c, ||g||^2]``
        (``[T, k_max + 1]``) of the gradients as they were before the update."""
        return torch.ops.ogpsa.fused_project_(list(grads), list(bases), gram_inv, mode, float(aligned_scale))


class CudaBackend(_ExtBackend):
    """Multi-tensor CUDA kernels (multi_tensor_apply style, deterministic two-stage reductions)."""

    name = "cuda"
    device_type = "cuda"
    #: tensors up to this many elements are projected by one block in one pass by
    #: ``fused_project_`` (``kSingleMax`` in csrc/cuda/kernels.cuh); larger ones take two passes
    single_pass_max_numel: int = 8192

    def fused_project_(self, grads: Sequence[Tensor], bases: Sequence[Tensor], gram_inv: Tensor, mode: str,
                       aligned_scale: float) -> Tensor:
        """As :meth:`CpuBackend.fused_project_` (``gram_inv`` float32 or float64): one launch
        projects every tensor of at most :attr:`single_pass_max_numel` elements in a single
        pass (g read once, written once); the others get dots, a device-side k x k step and
        the update. Returns ``[c, ||g||^2]`` (``[T, k_max + 1]``) of the gradients before."""
        return torch.ops.ogpsa.fused_project_(list(grads), list(bases), gram_inv.contiguous(), mode,
                                              float(aligned_scale))

    def availability(self) -> tuple[bool, str]:
        if _C is None:
            return False, _IMPORT_ERROR
        b = build_info()
        if not b.get("cuda"):
            return False, f"ogpsa._C was built without CUDA kernels: {no_cuda_kernels_reason()}"
        if not torch.cuda.is_available():
            return False, f"CUDA kernels built for sm {', '.join(b['cuda_archs'])} but no CUDA device is visible"
        return True, f"ogpsa._C CUDA kernels ({', '.join(b['cuda_archs'])}) on {torch.cuda.get_device_name()}"
