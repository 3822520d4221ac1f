"""Backend choice for the projected AdamW step, and the glue of its fused backends.

* ``cuda``: ``torch.ops.ogpsa.projected_adamw_`` with a kernel registered under the CUDA
  dispatch key (csrc/cuda): CUDA tensors, per-tensor scope, ``orthogonal`` rule.
* ``triton``: :mod:`ogpsa.kernels.adamw`: CUDA tensors (CPU tensors only under
  ``TRITON_INTERPRET=1`` and only when asked for by name, for testing); every mode, both
  scopes, the ``reduce_dots`` hook; all tensors of a (device, dtype, basis dtype, amsgrad)
  group in one launch per pass, tensors of up to ``SINGLE_PASS_MAX_NUMEL`` elements in a single
  pass (per-tensor scope). Its host side (groups, tables, launches): :mod:`ogpsa.optim.triton_groups`.
* ``cpu``: the compiled extension (csrc/adamw.cpp) on CPU tensors: ``projected_adamw_`` (both
  passes in one op) for the per-tensor ``orthogonal`` step, ``projected_adamw_pass1_`` /
  ``projected_adamw_pass2_`` around the shared tiny step (:mod:`ogpsa.modes`) for every other
  mode, the global scope and ``reduce_dots``.
* ``torch``: :mod:`ogpsa.optim.functional` (the reference math; every mode and scope).

Common to the fused ones: parameters and gradients of one float dtype (float32, bfloat16,
float16), contiguous, float32 moments, float32/bfloat16 basis with k <= 16. They are
deterministic (fixed chunks and launch configurations, ordered reductions, no float atomics).

Choice: :func:`requested` (``$OGPSA_BACKEND``, else the config's ``backend``: the one rule of
:func:`ogpsa.ops.requested_backend`, shared with gradient space). ``"auto"``: CPU tensors
take ``cpu``, CUDA tensors ``cuda`` (when that kernel is registered), else ``triton``; a
tensor the chosen kernel cannot take (a dtype above, ``keep_updates``, or for the compiled op
global scope, another mode or ``reduce_dots``) takes the next one that can, finally ``torch``.
A backend named explicitly that is unavailable is an error; one that is available takes the
tensors it supports and ``torch`` the rest (``cuda`` hands what it cannot do to ``triton``).
First contact (:mod:`ogpsa.selftest`, ``space="update"``): a compiled kernel the self-test
checks is tested once per (backend, device, dtype, basis dtype) before it steps anything;
one that fails warns once and is skipped under ``auto``, and raises
:class:`~ogpsa.errors.BackendUnavailableError` when named, as in gradient space.
"""

from __future__ import annotations

import functools
import weakref
from collections import OrderedDict
from types import SimpleNamespace
from typing import Callable, Optional

import torch
from torch import Tensor

from .. import ops as _ops
from .. import selftest
from ..errors import BackendUnavailableError
from ..ops import requested_backend

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_BASES = (torch.float32, torch.bfloat16)
MAX_RANK = 16
#: the order ``auto`` tries on CUDA tensors (CPU tensors: cpu, then torch)
GPU_PREFERENCE = ("cuda", "triton", "torch")


def requested(config_backend: str) -> str:
    """The backend name in force for the projected optimizer step, by THE precedence rule of
    both spaces (:func:`ogpsa.ops.requested_backend`: ``$OGPSA_BACKEND``, else the config's,
    else auto); a named kernel that cannot run here is an error."""
    name = requested_backend(config_backend)
    if name == "cpu" and not cpu_kernel_available():
        raise RuntimeError("OGPSA backend 'cpu' requested but the compiled extension with projected_adamw_ "
                           "is not available (rebuild: pip install -e .)")
    if name == "cuda" and not cuda_kernel_available():
        raise RuntimeError("OGPSA backend 'cuda' requested but ogpsa._C has no CUDA kernel for projected_adamw_ "
                           "(build it with OGPSA_BUILD_CUDA=1 on a machine with nvcc)")
    if name == "triton":
        ok, why = triton_status()
        if not ok:
            raise RuntimeError(f"OGPSA backend 'triton' requested but unavailable: {why}")
    return name


# -- availability ---------------------------------------------------------------------------


@functools.cache
def cpu_kernel_available() -> bool:
    """True when the compiled extension registers ``ogpsa::projected_adamw_``."""
    try:
        from ogpsa import _C  # noqa: F401  (loading it registers torch.ops.ogpsa.*)
    except ImportError:
        return False
    return hasattr(torch.ops.ogpsa, "projected_adamw_")


@functools.cache
def cuda_kernel_available() -> bool:
    """True when ``ogpsa::projected_adamw_`` has a kernel for the CUDA dispatch key."""
    return cpu_kernel_available() and torch._C._dispatch_has_kernel_for_dispatch_key("ogpsa::projected_adamw_",
                                                                                       "CUDA")


@functools.cache
def _triton():
    """(module ogpsa.kernels.adamw or None, why not)."""
    try:
        from ogpsa.kernels import adamw
    except Exception as exc:  # triton missing or broken
        return None, f"{type(exc).__name__}: {exc}"
    return adamw, ""


def triton_status() -> tuple[bool, str]:
    """Whether the Triton kernels can run here at all, and on what."""
    mod, why = _triton()
    if mod is None:
        return False, why
    from ogpsa.kernels import common

    if common.INTERPRETED:
        return True, "interpreter mode (CPU tensors, only when asked for by name; for testing)"
    if not torch.cuda.is_available():
        return False, "Triton is installed but no CUDA GPU is visible"
    return True, f"on {torch.cuda.get_device_name()}"


def info() -> dict:
    """What ``ogpsa info`` reports about the projected AdamW step's backends."""
    ok, why = triton_status()
    out = {"cpu": cpu_kernel_available(), "cuda": cuda_kernel_available(), "triton": why if ok else f"no ({why})",
           "torch": True}
    try:
        out["requested"] = requested("auto")
    except (ValueError, RuntimeError) as exc:
        out["requested"] = f"error: {exc}"
    out["auto"] = "CPU tensors: cpu > torch; CUDA tensors: " + " > ".join(GPU_PREFERENCE)
    return out


# -- routing --------------------------------------------------------------------------------


def _common_ok(p: Tensor, state: dict, basis: Optional[tuple], amsgrad: bool) -> bool:
    if p.dtype not in _FLOATS or p.grad.dtype != p.dtype or p.numel() == 0:
        return False
    if not (p.is_contiguous() and p.grad.is_contiguous() and p.grad.device == p.device):
        return False
    keys = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ())
    if any(state[k].dtype != torch.float32 or not state[k].is_contiguous() or state[k].device != p.device
           for k in keys):
        return False
    return basis is None or (basis[1].shape[0] <= MAX_RANK and basis[1].is_contiguous()
                             and basis[1].dtype in _BASES and basis[1].device == p.device)


def op_supports(p: Tensor, state: dict, basis: Optional[tuple], amsgrad: bool) -> bool:
    """Whether the compiled op (cpu or cuda kernel) handles this tensor (else another backend does)."""
    return _common_ok(p, state, basis, amsgrad)



def route(item: tuple, name: str, *, scope: str, mode: str, reduce_dots: Optional[Callable],
          keep_updates: bool) -> str:
    """The backend (cuda, triton, cpu, torch) that runs one ``(p, state, hyper, basis)`` item,
    for the requested ``name`` (see the module docstring)."""
    p, state, h, basis = item
    if keep_updates or name == "torch" or not _common_ok(p, state, basis, h.amsgrad):
        return "torch"
    op_ok = scope == "tensor" and mode == "orthogonal" and reduce_dots is None
    if p.device.type == "cpu":
        # the fused op (per-tensor orthogonal) or its pass1_/pass2_ ops (every mode and scope)
        if name in ("auto", "cpu") and cpu_kernel_available() and _trusted("cpu", name, p, basis):
            return "cpu"
        if name == "triton" and _interpreted():  # CPU tensors: the interpreter only, and only by name
            return "triton"
        return "torch"
    if p.device.type == "cuda":
        if name in ("auto", "cuda") and op_ok and cuda_kernel_available() and _trusted("cuda", name, p, basis):
            return "cuda"
        if (name in ("auto", "cuda", "triton") and triton_status()[0] and not _interpreted()
                and _trusted("triton", name, p, basis)):
            return "triton"
    return "torch"


def _trusted(kernel: str, name: str, p: Tensor, basis: Optional[tuple]) -> bool:
    """The first-contact self-test of :mod:`ogpsa.selftest` in update space, as
    :func:`ogpsa.ops.select_backend` runs it in gradient space: whether ``kernel`` may step
    ``p`` (checked once per (backend, device, dtype, basis dtype); a dict lookup afterwards).
    Under ``auto`` a failing kernel warns once and the caller takes the next one; a kernel the
    user named raises :class:`~ogpsa.errors.BackendUnavailableError` (``route`` runs before
    anything is written, so nothing is modified)."""
    if kernel not in selftest.checked_backends():  # the default cpu, OGPSA_SELFTEST=0: nothing to look up
        return True
    be = _ops._load(kernel) or SimpleNamespace(name=kernel)  # the update-space check calls the op by name
    u_dtype = basis[1].dtype if basis is not None else torch.float32
    if name == "auto":
        return selftest.passes(be, p.device, p.dtype, u_dtype, space="update")
    why = selftest.failure(be, p.device, p.dtype, u_dtype, space="update")
    if why is not None:  # never silently wrong, never silently replaced
        raise BackendUnavailableError(why)
    return True


def _interpreted() -> bool:
    """The Triton kernels were decorated under TRITON_INTERPRET=1 (CPU tensors only)."""
    if _triton()[0] is None:
        return False
    from ogpsa.kernels import common

    return bool(common.INTERPRETED)


def op_step(group: list, h, project_weight_decay: bool) -> Tensor:
    """Run the compiled op (its CPU or CUDA kernel, by the tensors' device) on ``group``
    ([(p, state, basis)], one hyperparameter set ``h``); the step counters are incremented
    here. Returns [T, 2] float64 (||d||^2, removed)."""
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
            minvs.append(basis[2].to(p.device).contiguous())
    return torch.ops.ogpsa.projected_adamw_(params, grads, ms, vs, vmax, us, minvs, steps, h.lr, h.beta1, h.beta2,
                                            h.eps, h.weight_decay, h.maximize, project_weight_decay)



def _op_lists(group: list, amsgrad: bool) -> tuple:
    params, ms, vs, vmax, us = [], [], [], [], []
    for p, state, basis in group:
        params.append(p.data)
        ms.append(state["exp_avg"])
        vs.append(state["exp_avg_sq"])
        if amsgrad:
            vmax.append(state["max_exp_avg_sq"])
        us.append(p.new_empty((0, p.numel()), dtype=torch.float32) if basis is None else basis[1])
    return params, ms, vs, vmax, us


def op_pass1(group: list, h, project_weight_decay: bool) -> tuple[Tensor, list]:
    """Pass 1 of the compiled op on ``group`` ([(p, state, basis)], one hyperparameter set
    ``h``): moments written once, the step counters incremented here. Returns
    ``([T, k_max + 1] float64 rows [c, ||d||^2], steps)``."""
    steps = []
    for _, state, _ in group:
        state["step"] += 1
        steps.append(int(state["step"].item()))
    params, ms, vs, vmax, us = _op_lists(group, h.amsgrad)
    k_max = max([u.shape[0] for u in us] + [0])
    rows = torch.ops.ogpsa.projected_adamw_pass1_(params, [p.grad for p, _, _ in group], ms, vs, vmax, us, steps,
                                                  k_max, h.beta1, h.beta2, h.eps, h.weight_decay, h.maximize,
                                                  project_weight_decay)
    return rows, steps


def op_pass2(group: list, h, steps: list, weights: Tensor, kappa: float, project_weight_decay: bool) -> Tensor:
    """Pass 2 of the compiled op: ``p <- p (1 - lr wd) [decoupled] - lr (kappa d - U^T w)``;
    ``weights`` float32 ``[T, >= k]``. Returns ``[T]`` float64 ``||d - new||^2``."""
    params, ms, vs, vmax, us = _op_lists(group, h.amsgrad)
    k_max = max([u.shape[0] for u in us] + [1])
    w = torch.zeros(len(group), k_max, dtype=torch.float32)
    w[:, :weights.shape[1]] = weights[:, :k_max].to("cpu", torch.float32)
    return torch.ops.ogpsa.projected_adamw_pass2_(params, ms, vs, vmax, us, w.contiguous(), steps, h.lr, h.beta1,
                                                  h.beta2, h.eps, h.weight_decay, float(kappa), project_weight_decay)


# -- small caches keyed by stable tensors (bases, M^-1, parameters, moments) ----------------


class _LRU:
    """LRU of values derived from stable tensors (bases, M^+, parameters, moments). A hit must
    find the very tensor objects the value was built from (weak references, checked), and an
    entry is dropped as soon as any of its tensors is freed (weak-reference callback), so
    values built for a freed basis (a refreshed subspace) are never kept, whatever the
    capacity. Callers put the ``_version`` of tensors whose VALUES the entry depends on into
    ``extra`` (in-place edits)."""

    def __init__(self, capacity: int) -> None:
        self.capacity, self.builds, self._d = capacity, 0, OrderedDict()

    def __len__(self) -> int:
        return len(self._d)

    def get(self, tensors: list, extra: tuple, build: Callable):
        key = extra + key_of(tensors)
        hit = self._d.get(key)
        if hit is not None and all((r is None and t is None) or (r is not None and r() is t)
                                   for r, t in zip(hit[0], tensors)):
            self._d.move_to_end(key)
            return hit[1]
        value = build()
        cache = weakref.ref(self._d)

        def drop(_ref, key=key) -> None:  # a tensor of this entry was freed: the entry goes too
            d = cache()
            if d is not None:
                d.pop(key, None)

        self._d[key] = ([None if t is None else weakref.ref(t, drop) for t in tensors], value)
        self.builds += 1
        while len(self._d) > self.capacity:
            self._d.popitem(last=False)
        return value


_CACHE = _LRU(64)  # tables and padded stacks: a few per param group
_GRAMS = _LRU(1 << 14)  # k x k per basis given without its Gram (functional API): one per live basis


def key_of(tensors) -> tuple:
    """Identity of stable tensors for caching (None for a missing one)."""
    return tuple(None if t is None else (t.data_ptr(), tuple(t.shape), t.dtype, t.device) for t in tensors)


def gram64(u: Tensor) -> Tensor:
    """``U U^T`` in float64 (:func:`ogpsa.plan.gram64`), cached while the basis lives."""
    from ..plan import gram64 as _gram64

    return _GRAMS.get([u], ("gram64", u._version), lambda: _gram64(u))


def gram_of(basis: tuple) -> Tensor:
    """M = U U^T of a ``(name, U, M^-1[, M])`` basis: the given M (the whole tensor's, when U is
    a shard), else computed from U (float64, cached)."""
    if len(basis) > 3 and basis[3] is not None:
        return basis[3]
    return gram64(basis[1])


def padded_stack(mats: list, k: int, device: torch.device, dtype: torch.dtype = torch.float64) -> Tensor:
    """``[T, k, k]`` of the matrices (zero padded; None gives zeros), cached by their identity."""
    def build() -> Tensor:
        out = torch.zeros(len(mats), k, k, dtype=dtype, device=device)
        for i, m in enumerate(mats):
            if m is not None and m.numel():
                out[i, :m.shape[0], :m.shape[1]] = m.to(device=device, dtype=dtype)
        return out
    versions = tuple(None if m is None else m._version for m in mats)
    return _CACHE.get(list(mats), ("stack", k, dtype, device) + versions, build)


def tensor_weights(c: Tensor, minv: Tensor, ks: Tensor, mode: str, aligned_scale: float) -> tuple[Tensor, Tensor]:
    """The per-tensor tiny step on ``[T, K]`` float64 dots: ``w = M_i^+ c_i`` and the shared mode
    rule (:func:`ogpsa.modes.mode_weights`; no device sync). Returns float64 ``w`` ``[T, K]``
    and ``kappa`` ``[T]``; a tensor without basis rows (k = 0) keeps kappa = 1."""
    from ..modes import mode_weights

    w = torch.bmm(minv, c.unsqueeze(-1)).squeeze(-1)
    return mode_weights(w, c, mode, aligned_scale, ks)


def removed_sq(sq: Tensor, c: Tensor, w: Tensor, kappa: Tensor, gram: Tensor) -> Tensor:
    """``||d - (kappa d - U^T w)||^2 = (1-kappa)^2 ||d||^2 + 2 (1-kappa) w.c + w^T M w`` (float64)."""
    wmw = (w * torch.bmm(gram, w.unsqueeze(-1)).squeeze(-1)).sum(-1)
    return ((1 - kappa) ** 2 * sq + 2 * (1 - kappa) * (w * c).sum(-1) + wmw).clamp_min(0)
