"""Backend dispatch for the OGPSA ops: ``project_``, ``gram`` and ``combine``.

``project_`` validates everything before touching a gradient, groups tensors by
(device, grad dtype, basis dtype), runs pass 1 (``dots``) on each group's backend, does
the tiny batched step on [T, K] tensors on the device (mode rule, global sums, clip
coefficient: no host synchronisation), then runs pass 2 (``update_``).

Backend choice: ``backend=`` argument, else the environment variable ``OGPSA_BACKEND``,
else ``"auto"``, which takes the first of cuda > triton > cpu > torch that is available
and supports the group. A named backend that is unavailable or cannot handle a group is
an error, never a silent fallback.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import Tensor

from .backends.base import Backend
from .config import MODES, SCOPES
from .reference import CLIP_EPS

#: Largest basis rank the kernels handle; the torch backend takes any, but every backend
#: is held to the same limit so that results do not depend on which one ran.
MAX_RANK = 16
GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BASIS_DTYPES = (torch.float32, torch.bfloat16)

# name -> "module:Class"; order is the "auto" preference.
_REGISTRY: dict[str, str] = {
    "torch": "ogpsa.backends.torch_backend:TorchBackend",
    "triton": "ogpsa.backends.triton_backend:TritonBackend",
    "cuda": "ogpsa.backends.cext:CudaBackend",
    "cpu": "ogpsa.backends.cext:CpuBackend",
}
_PREFERENCE = ("cuda", "triton", "cpu", "torch")
_instances: dict[str, Optional[Backend]] = {}
_import_errors: dict[str, str] = {}


class ProjectionInputError(ValueError):
    """Bad input to a projection op; raised before any gradient is modified."""


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name but cannot run here."""


class UnsupportedSetupError(RuntimeError):
    """A training setup OGPSA does not handle (e.g. DeepSpeed ZeRO-3); the message names
    the supported alternatives."""


def _load(name: str) -> Optional[Backend]:
    if name not in _instances:
        module_name, cls_name = _REGISTRY[name].split(":")
        try:
            _instances[name] = getattr(importlib.import_module(module_name), cls_name)()
        except Exception as exc:  # an optional dependency missing or a broken build
            _instances[name] = None
            _import_errors[name] = f"{type(exc).__name__}: {exc}"
    return _instances[name]


def backends() -> dict[str, tuple[bool, str]]:
    """Every known backend: name -> (available, reason it is or is not)."""
    out = {}
    for name in _PREFERENCE:
        if name not in _REGISTRY:
            out[name] = (False, "not part of this build")
            continue
        be = _load(name)
        out[name] = be.availability() if be is not None else (False, _import_errors[name])
    return out


def get_backend(name: str) -> Backend:
    """The backend called ``name``, or :class:`BackendUnavailableError` saying why not."""
    if name not in _PREFERENCE:
        raise ValueError(f"backend={name!r} is not one of {('auto',) + _PREFERENCE}")
    if name not in _REGISTRY:
        raise BackendUnavailableError(f"OGPSA backend {name!r} is not part of this build")
    be = _load(name)
    if be is None:
        raise BackendUnavailableError(f"OGPSA backend {name!r} failed to load: {_import_errors[name]}")
    ok, why = be.availability()
    if not ok:
        raise BackendUnavailableError(f"OGPSA backend {name!r} is unavailable: {why}")
    return be


def requested_backend(backend: Optional[str] = None) -> str:
    """The backend name in force: the argument, else $OGPSA_BACKEND, else "auto"."""
    env = os.environ.get("OGPSA_BACKEND", "").strip()
    name = backend if backend not in (None, "auto") else (env or "auto")
    if name != "auto" and name not in _PREFERENCE:
        raise ValueError(f"backend {name!r} (from {'OGPSA_BACKEND' if env else 'argument'}) is not one of "
                         f"{('auto',) + _PREFERENCE}")
    return name


def select_backend(device: torch.device, grad_dtype: torch.dtype, basis_dtype: torch.dtype,
                   backend: Optional[str] = None) -> Backend:
    """Resolve the backend for one (device, grad dtype, basis dtype) group."""
    name = requested_backend(backend)
    if name != "auto":
        be = get_backend(name)
        if not be.supports(device, grad_dtype, basis_dtype, True):
            raise BackendUnavailableError(
                f"OGPSA backend {name!r} does not handle {device.type} tensors with grad dtype {grad_dtype} "
                f"and basis dtype {basis_dtype}"
            )
        return be
    for cand in _PREFERENCE:
        if cand not in _REGISTRY:
            continue
        be = _load(cand)
        if be is not None and be.availability()[0] and be.supports(device, grad_dtype, basis_dtype, False):
            return be
    raise BackendUnavailableError(f"no OGPSA backend handles {device} {grad_dtype}/{basis_dtype}")


# ----------------------------------------------------------------------------------------
# Validation and planning
# ----------------------------------------------------------------------------------------


def _label(i: int, names: Optional[Sequence[str]]) -> str:
    return f"tensor {i} ({names[i]!r})" if names is not None else f"tensor {i}"


@dataclass
class _Group:
    backend: Backend
    index: list[int]  # positions in the caller's list
    grads: list[Tensor]
    bases: list[Tensor]
    k_max: int
    gram: Tensor  # [T, K, K] float32, M_i = U_i U_i^T (zero padded)
    gram_inv: Tensor  # [T, K, K] float32, M_i^{-1} on the k_i block (zero padded)
    positions: Tensor  # int64 [T] on the plan's home device: where each row goes in the stats


@dataclass
class ProjectionPlan:
    """Validated, grouped, backend-resolved inputs for :func:`project_`.

    Building one checks shapes, dtypes, devices, contiguity and finiteness of the bases
    and computes the k x k matrices M_i = U_i U_i^T. Reuse it while the gradient tensors
    and bases stay the same (the Projector caches it by the gradients' data pointers).
    """

    groups: list[_Group]
    count: int
    ks: list[int]
    names: Optional[list[str]] = None
    key: tuple = field(default_factory=tuple)

    def matches(self, grads: Sequence[Tensor]) -> bool:
        return len(grads) == self.count and self.key == _grad_key(grads)


def _grad_key(grads: Sequence[Tensor]) -> tuple:
    return tuple((g.data_ptr(), g.dtype, g.device, tuple(g.shape)) for g in grads)


def _padded_grams(bases: Sequence[Tensor], k_max: int, device, grams: Optional[Sequence[Optional[Tensor]]]):
    t = len(bases)
    m = torch.zeros(t, k_max, k_max, dtype=torch.float32, device=device)
    for i, u in enumerate(bases):
        k = u.shape[0]
        if k:
            given = grams[i] if grams is not None else None
            m[i, :k, :k] = given.to(device, torch.float32) if given is not None else (u.float() @ u.float().T)
    m_inv = torch.zeros_like(m)
    ks = torch.tensor([u.shape[0] for u in bases])
    for k in ks.unique().tolist():
        if k:
            sel = (ks == k).nonzero().flatten().to(device)
            block = m[sel, :k, :k].double()
            # pinv: rows that are (numerically) dependent still give the projection onto their span;
            # global-scope slices are singular per tensor and their inverse is never used
            m_inv[sel, :k, :k] = torch.linalg.pinv(block, hermitian=True).float()
    return m, m_inv


def plan_projection(
    grads: Sequence[Tensor],
    bases: Sequence[Tensor],
    *,
    scope: str = "tensor",
    backend: Optional[str] = None,
    names: Optional[Sequence[str]] = None,
    grams: Optional[Sequence[Optional[Tensor]]] = None,
) -> ProjectionPlan:
    """Validate and group inputs. Raises :class:`ProjectionInputError` on bad input."""
    if not isinstance(grads, (list, tuple)) or not isinstance(bases, (list, tuple)):
        raise ProjectionInputError(f"grads and bases must be lists of tensors, got {type(grads).__name__} "
                                   f"and {type(bases).__name__}")
    if len(grads) == 0:
        raise ProjectionInputError("grads is an empty list: nothing to project")
    if len(grads) != len(bases):
        raise ProjectionInputError(f"grads has {len(grads)} tensors but bases has {len(bases)}")
    if names is not None and len(names) != len(grads):
        raise ProjectionInputError(f"names has {len(names)} entries for {len(grads)} tensors")
    if scope not in SCOPES:
        raise ProjectionInputError(f"scope={scope!r} is not one of {SCOPES}")
    for i, (g, u) in enumerate(zip(grads, bases)):
        what = _label(i, names)
        if not isinstance(g, Tensor):
            raise ProjectionInputError(f"grads[{i}] is a {type(g).__name__}, not a torch.Tensor")
        if not isinstance(u, Tensor):
            raise ProjectionInputError(f"bases[{i}] is a {type(u).__name__}, not a torch.Tensor")
        if g.dtype not in GRAD_DTYPES:
            raise ProjectionInputError(f"{what}: gradient dtype {g.dtype} is not one of {GRAD_DTYPES}")
        if u.dtype not in BASIS_DTYPES:
            raise ProjectionInputError(f"{what}: basis dtype {u.dtype} is not one of {BASIS_DTYPES}")
        if g.numel() == 0:
            raise ProjectionInputError(f"{what}: gradient has no elements")
        if not g.is_contiguous():
            raise ProjectionInputError(f"{what}: gradient is not contiguous (stride {tuple(g.stride())})")
        if not u.is_contiguous():
            raise ProjectionInputError(f"{what}: basis is not contiguous")
        if u.dim() != 2 or u.shape[1] != g.numel():
            raise ProjectionInputError(
                f"{what}: basis shape {tuple(u.shape)} does not match gradient shape {tuple(g.shape)}; "
                f"expected [k, {g.numel()}]")
        if u.shape[0] > MAX_RANK:
            raise ProjectionInputError(f"{what}: basis rank k={u.shape[0]} exceeds the maximum {MAX_RANK}")
        if scope == "tensor" and u.shape[0] > g.numel():  # global slices may be wider than tall
            raise ProjectionInputError(f"{what}: basis rank k={u.shape[0]} exceeds numel={g.numel()}")
        if u.device != g.device:
            raise ProjectionInputError(f"{what}: basis is on {u.device} but gradient is on {g.device}")
        if u.shape[0] and not bool(torch.isfinite(u).all()):
            raise ProjectionInputError(f"{what}: basis contains NaN or Inf")
    ks = [int(u.shape[0]) for u in bases]
    if scope == "global" and len(set(k for k in ks if k)) > 1:
        raise ProjectionInputError(f"scope='global' needs the same number of directions for every tensor, got {sorted(set(ks))}")

    buckets: dict[tuple, list[int]] = {}
    for i, (g, u) in enumerate(zip(grads, bases)):
        buckets.setdefault((g.device, g.dtype, u.dtype), []).append(i)
    groups = []
    k_all = max(1, max(ks))
    for (device, gdt, udt), idx in buckets.items():
        be = select_backend(device, gdt, udt, backend)
        k_max = k_all if scope == "global" else max(1, max(ks[i] for i in idx))
        gb = [bases[i] for i in idx]
        m, m_inv = _padded_grams(gb, k_max, device, [grams[i] for i in idx] if grams is not None else None)
        positions = torch.tensor(idx, dtype=torch.int64, device=grads[0].device)
        groups.append(_Group(be, idx, [grads[i] for i in idx], gb, k_max, m, m_inv, positions))
    return ProjectionPlan(groups, len(grads), ks, list(names) if names is not None else None, _grad_key(grads))


def cached_plan(cache: dict, grads: Sequence[Tensor], bases: Sequence[Tensor], *, clipping: bool,
                scope: str = "tensor", backend: Optional[str] = None, names: Optional[Sequence[str]] = None,
                grams: Optional[Sequence[Optional[Tensor]]] = None, max_entries: int = 8) -> ProjectionPlan:
    """A plan from ``cache`` keyed by the gradients' (data_ptr, dtype, device, shape), built
    and stored on a miss. Gradient buffers are stable across steps in a training loop, so
    validation and pointer tables are paid once; the cache is bounded (cleared when full)."""
    key = (clipping,) + _grad_key(grads)
    plan = cache.get(key)
    if plan is None:
        if len(cache) >= max_entries:
            cache.clear()
        plan = plan_projection(grads, bases, scope=scope, backend=backend, names=names, grams=grams)
        cache[key] = plan
    return plan


# ----------------------------------------------------------------------------------------
# Projection
# ----------------------------------------------------------------------------------------


@dataclass
class ProjectionStats:
    """What one projection did. Tensors stay on the device; the float properties sync.

    ``sq_before``/``sq_after``: per-tensor squared norms before projection and after it
    (before clipping); ``removed_sq``: ||g - g'||^2 per tensor; ``total_norm``: the
    post-projection, pre-clip global norm (what clip_grad_norm_ returns);
    ``clip_coef``: the factor applied (1 without clipping).
    """

    sq_before: Tensor
    sq_after: Tensor
    removed_sq: Tensor
    total_norm: Tensor
    clip_coef: Tensor
    names: Optional[list[str]] = None
    backends: tuple = ()

    @property
    def norm_before(self) -> float:
        return float(self.sq_before.sum().sqrt())

    @property
    def norm_after(self) -> float:
        """Norm after projection and clipping."""
        return float(self.total_norm * self.clip_coef)

    @property
    def removed_fraction(self) -> float:
        """Fraction of the gradient's squared norm removed by the projection (whole model)."""
        total = float(self.sq_before.sum())
        return float(self.removed_sq.sum()) / total if total > 0 else 0.0

    def removed_fraction_per_tensor(self) -> Tensor:
        return torch.where(self.sq_before > 0, self.removed_sq / self.sq_before.clamp_min(1e-30), torch.zeros_like(self.sq_before))

    def as_dict(self) -> dict:
        return {
            "norm_before": self.norm_before,
            "norm_after": self.norm_after,
            "total_norm": float(self.total_norm),
            "removed_fraction": self.removed_fraction,
            "clip_coef": float(self.clip_coef),
            "num_tensors": int(self.sq_before.numel()),
            "backends": list(self.backends),
        }


def _mode_weights(w: Tensor, mode: str, aligned_scale: float) -> tuple[Tensor, float]:
    if mode == "orthogonal":
        return w, 1.0
    if mode == "conflict":
        return torch.where(w < 0, w, (1.0 - aligned_scale) * w), 1.0
    return -w, 0.0  # plane


def _check_call(mode: str, max_norm: Optional[float], aligned_scale: float) -> None:
    if mode not in MODES:
        raise ProjectionInputError(f"mode={mode!r} is not one of {MODES}")
    if max_norm is not None and not float(max_norm) > 0:
        raise ProjectionInputError(f"max_norm={max_norm!r} must be None or > 0")
    if not float(aligned_scale) >= 0:
        raise ProjectionInputError(f"aligned_scale={aligned_scale!r} must be >= 0")


def execute(
    plan: ProjectionPlan,
    grads: Sequence[Tensor],
    *,
    mode: str = "orthogonal",
    scope: str = "tensor",
    max_norm: Optional[float] = None,
    aligned_scale: float = 1.0,
    process_group=None,
) -> ProjectionStats:
    """Run a planned projection on ``grads`` (the same tensors the plan was built for).

    ``process_group``: for sharded gradients (FSDP2), the pass-1 partials of all tensors
    are summed across ranks with ONE all_reduce before the tiny step.
    """
    _check_call(mode, max_norm, aligned_scale)
    if not plan.matches(grads):
        raise ProjectionInputError("the gradients changed since the plan was built; build a new plan")
    home = plan.groups[0].grads[0].device
    # Single-pass path: a backend with `fused_project_` projects each tensor right after its dots
    # (small tensors still in cache) using the same w = M^-1 c and mode rule as below. Only when
    # nothing global is pending between the passes: per-tensor scope, no clip, no all_reduce.
    # It returns the pass-1 table, so the statistics below are computed exactly as on the 2-pass path.
    fusable = scope == "tensor" and max_norm is None and process_group is None
    fused = [fusable and hasattr(grp.backend, "fused_project_") for grp in plan.groups]
    partials = [grp.backend.fused_project_(grp.grads, grp.bases, grp.gram_inv, mode, aligned_scale) if f
                else grp.backend.dots(grp.grads, grp.bases, grp.k_max) for grp, f in zip(plan.groups, fused)]
    if process_group is not None:
        import torch.distributed as dist

        flat = torch.cat([p.reshape(-1).to(home) for p in partials])
        dist.all_reduce(flat, group=process_group)
        out, offset = [], 0
        for p in partials:
            out.append(flat[offset:offset + p.numel()].view_as(p).to(p.device))
            offset += p.numel()
        partials = out

    if scope == "global":
        c_total = sum(p[:, :-1].sum(0).to(home) for p in partials)
        m_total = sum(grp.gram.sum(0).to(home) for grp in plan.groups)
        k = max(1, max(plan.ks))
        w_global = torch.zeros_like(c_total)
        inv, _info = torch.linalg.inv_ex(m_total[:k, :k].double())  # no host sync
        w_global[:k] = (inv.float() @ c_total[:k]) if max(plan.ks) else 0.0
        w_global, kappa = _mode_weights(w_global, mode, aligned_scale)

    per_group = []
    for grp, p in zip(plan.groups, partials):
        c, sq = p[:, :-1], p[:, -1]
        if scope == "global":
            w = w_global.to(c.device).expand_as(c)
        else:
            w, kappa = _mode_weights(torch.bmm(grp.gram_inv, c.unsqueeze(-1)).squeeze(-1), mode, aligned_scale)
        wc = (w * c).sum(-1)
        wmw = (w * torch.bmm(grp.gram, w.unsqueeze(-1)).squeeze(-1)).sum(-1)
        sq_after = (kappa * kappa * sq - 2 * kappa * wc + wmw).clamp_min(0)
        removed = ((1 - kappa) ** 2 * sq + 2 * (1 - kappa) * wc + wmw).clamp_min(0)
        per_group.append((w.contiguous(), sq, sq_after, removed))

    total_norm = sum(sa.sum().to(home) for _, _, sa, _ in per_group).sqrt()
    if max_norm is not None:
        clip_coef = (max_norm / (total_norm + CLIP_EPS)).clamp(max=1.0)
    else:
        clip_coef = torch.ones((), device=home)
    for grp, (w, _, _, _), f in zip(plan.groups, per_group, fused):
        if f:
            continue  # already projected by fused_project_
        scale = clip_coef.to(w.device).expand(len(grp.grads)).contiguous()
        grp.backend.update_(grp.grads, grp.bases, w, kappa, scale)

    def gather(j: int) -> Tensor:
        out = torch.empty(plan.count, dtype=torch.float32, device=home)
        for grp, vals in zip(plan.groups, per_group):
            out[grp.positions] = vals[j].to(home)
        return out

    return ProjectionStats(gather(1), gather(2), gather(3), total_norm, clip_coef, plan.names,
                           tuple(sorted({grp.backend.name for grp in plan.groups})))


def project_(
    grads: Sequence[Tensor],
    bases: Sequence[Tensor],
    *,
    mode: str = "orthogonal",
    scope: str = "tensor",
    max_norm: Optional[float] = None,
    aligned_scale: float = 1.0,
    backend: Optional[str] = None,
    names: Optional[Sequence[str]] = None,
    grams: Optional[Sequence[Optional[Tensor]]] = None,
    process_group=None,
) -> ProjectionStats:
    """Project gradients in place onto the orthogonal complement of their bases.

    Args:
        grads: contiguous gradient tensors (float32/bfloat16/float16), any shapes.
        bases: ``bases[i]`` is ``[k_i, grads[i].numel()]`` (float32/bfloat16, same device,
            rows orthonormal up to storage rounding; ``k_i = 0`` means no projection for
            that tensor, but it still counts towards clipping).
        mode: ``"orthogonal"``, ``"conflict"`` or ``"plane"`` (see :mod:`ogpsa.reference`).
        scope: ``"tensor"`` (one subspace per tensor) or ``"global"`` (one for all).
        max_norm: clip the projected gradients to this global L2 norm (None: no clipping).
        aligned_scale: in conflict mode, factor for components aligned with the reference.
        backend: force a backend (default: ``$OGPSA_BACKEND`` or automatic).
        names: optional tensor names, used in error messages and statistics.
        grams: optional precomputed ``U_i U_i^T`` per tensor (saves a pass over U).
        process_group: all-reduce the pass-1 partials over this group (sharded grads).

    Returns:
        :class:`ProjectionStats`. Bad input raises :class:`ProjectionInputError` before any
        gradient is modified.
    """
    _check_call(mode, max_norm, aligned_scale)
    plan = plan_projection(grads, bases, scope=scope, backend=backend, names=names, grams=grams)
    return execute(plan, grads, mode=mode, scope=scope, max_norm=max_norm, aligned_scale=aligned_scale,
                   process_group=process_group)


# ----------------------------------------------------------------------------------------
# Basis building
# ----------------------------------------------------------------------------------------


def _group_refs(refs: Sequence[Tensor], backend: Optional[str]):
    buckets: dict[tuple, list[int]] = {}
    for i, r in enumerate(refs):
        buckets.setdefault((r.device, r.dtype), []).append(i)
    return [(select_backend(dev, dt, torch.float32, backend), idx) for (dev, dt), idx in buckets.items()]


def gram(refs: Sequence[Tensor], *, backend: Optional[str] = None) -> Tensor:
    """Gram matrices ``R_i R_i^T`` (float64, on the CPU) for ``refs[i]: [m, N_i]``."""
    if not refs:
        raise ProjectionInputError("refs is an empty list")
    m = refs[0].shape[0]
    for i, r in enumerate(refs):
        if r.dim() != 2 or r.shape[0] != m or not r.is_contiguous():
            raise ProjectionInputError(f"refs[{i}] must be a contiguous [m={m}, N] tensor, got {tuple(r.shape)}")
    out = torch.empty(len(refs), m, m, dtype=torch.float64)
    for be, idx in _group_refs(refs, backend):
        out[idx] = be.gram([refs[i] for i in idx]).to("cpu", torch.float64)
    return out


def combine(refs: Sequence[Tensor], coefficients: Sequence[Tensor], *, out_dtype=torch.float32,
            backend: Optional[str] = None) -> list[Tensor]:
    """``U_i = A_i R_i`` for every tensor; ``coefficients[i]``: ``[k_i, m]``."""
    out: list[Optional[Tensor]] = [None] * len(refs)
    for be, idx in _group_refs(refs, backend):
        ks = [int(coefficients[i].shape[0]) for i in idx]
        k_max = max(1, max(ks))
        m = refs[idx[0]].shape[0]
        dev = refs[idx[0]].device
        table = torch.zeros(len(idx), k_max, m, dtype=torch.float32, device=dev)
        for j, i in enumerate(idx):
            table[j, :ks[j]] = coefficients[i].to(dev, torch.float32)
        for i, u in zip(idx, be.combine([refs[i] for i in idx], table, ks, out_dtype)):
            out[i] = u
    return out  # type: ignore[return-value]
