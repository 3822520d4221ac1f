"""Backend choice for the projected AdamW step.

* ``cpu``: ``torch.ops.ogpsa.projected_adamw_`` from the compiled extension (csrc/adamw.cpp):
  per-tensor scope, ``orthogonal`` rule, CPU tensors, float32 moments, params/grads of one
  float dtype, k <= 16. Deterministic (fixed chunks, ordered reduction).
* ``torch``: :mod:`ogpsa.optim.functional` (the reference math; every mode and scope).

``backend="auto"`` (the config's) uses ``cpu`` for the tensors it supports and ``torch`` for
the rest; ``OGPSA_BACKEND`` overrides as for the gradient ops. Triton and CUDA kernels for
this step are not written yet, so those names fall back to ``torch`` for it.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch
from torch import Tensor

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


@functools.cache
def cpu_kernel_available() -> bool:
    """True when the compiled extension registers ``ogpsa::projected_adamw_``."""
    try:
        from ogpsa import _C  # noqa: F401  (loading it registers torch.ops.ogpsa.*)
    except ImportError:
        return False
    return hasattr(torch.ops.ogpsa, "projected_adamw_")


def choose(config_backend: str) -> str:
    """``"cpu"`` or ``"torch"`` for the projected step."""
    name = os.environ.get("OGPSA_BACKEND", "") or config_backend
    if name in ("auto", "cpu") and cpu_kernel_available():
        return "cpu"
    if name == "cpu":
        raise RuntimeError("OGPSA backend 'cpu' requested but the compiled extension with projected_adamw_ "
                           "is not available (rebuild: pip install -e .)")
    return "torch"


def cpu_supports(p: Tensor, state: dict, basis: Optional[tuple], amsgrad: bool) -> bool:
    """Whether the CPU kernel handles this tensor (else the torch path does)."""
    if p.device.type != "cpu" or p.dtype not in _FLOATS or p.grad.dtype != p.dtype:
        return False
    if not (p.is_contiguous() and p.grad.is_contiguous()):
        return False
    keys = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ())
    if any(state[k].dtype != torch.float32 or not state[k].is_contiguous() for k in keys):
        return False
    return basis is None or (basis[1].shape[0] <= 16 and basis[1].is_contiguous()
                             and basis[1].dtype in (torch.float32, torch.bfloat16))


def cpu_step(group: list, h, project_weight_decay: bool) -> Tensor:
    """Run the CPU kernel on ``group`` ([(p, state, basis)], one hyperparameter set ``h``);
    the step counters are incremented here. Returns [T, 2] float64 (||d||^2, removed)."""
    params, grads, ms, vs, vmax, us, minvs, steps = [], [], [], [], [], [], [], []
    for p, state, basis in group:
        state["step"] += 1
        steps.append(int(state["step"].item()))
        params.append(p.data)
        grads.append(p.grad)
        ms.append(state["exp_avg"])
        vs.append(state["exp_avg_sq"])
        if h.amsgrad:
            vmax.append(state["max_exp_avg_sq"])
        if basis is None:
            us.append(p.new_empty((0, p.numel()), dtype=torch.float32))
            minvs.append(p.new_empty((0, 0), dtype=torch.float32))
        else:
            us.append(basis[1])
            minvs.append(basis[2].contiguous())
    return torch.ops.ogpsa.projected_adamw_(params, grads, ms, vs, vmax, us, minvs, steps, h.lr, h.beta1, h.beta2,
                                            h.eps, h.weight_decay, h.maximize, project_weight_decay)
