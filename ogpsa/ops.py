"""Backend dispatch for the OGPSA ops: ``project_``, ``gram`` and ``combine``.

``project_`` validates everything before touching a gradient, groups tensors by
(device, grad dtype, basis dtype) (a :class:`~ogpsa.plan.ProjectionPlan`), runs pass 1
(``dots``) on each group's backend, does the tiny batched step on [T, K] tensors on the
device in float64 (mode rule, global sums, clip coefficient: no host synchronisation),
then runs pass 2 (``update_``). :func:`execute` runs a plan on a step's gradients; the
plan holds bases only, so one plan serves every step however often the gradient tensors
are re-created.

Backend choice: ``backend=`` argument, else the environment variable ``OGPSA_BACKEND``,
else ``"auto"``, which takes the first of cuda > triton > cpu > torch that is available
and supports the group. A named backend that is unavailable or cannot handle a group is
an error, never a silent fallback. The first time a compiled backend serves a key it checks
itself against the torch backend (:mod:`ogpsa.selftest`): ``auto`` skips one that fails
(with a warning), a named one raises.
"""

from __future__ import annotations

import importlib
import os
from typing import Optional, Sequence

import torch
from torch import Tensor

from . import selftest
from .backends.base import Backend
from .config import MODES, SCOPES
from .errors import BackendUnavailableError, ProjectionInputError, UnsupportedSetupError
from .modes import mode_weights
from .plan import (
    BASIS_DTYPES,
    GRAD_DTYPES,
    MAX_RANK,
    BasisEntry,
    ProjectionPlan,
    basis_entry,
    build_plan,
    check_grad,
    label,
)
from .reference import CLIP_EPS
from .stats import ProjectionStats, recover_fused_sq, rescue_overflow, sq_norms64

__all__ = ["MAX_RANK", "GRAD_DTYPES", "BASIS_DTYPES", "ProjectionInputError", "BackendUnavailableError",
           "UnsupportedSetupError", "ProjectionPlan", "ProjectionStats", "backends", "get_backend",
           "select_backend", "requested_backend", "plan_projection", "plan_from_entries", "execute", "project_",
           "gram", "combine"]

#: Post-projection squared norm below this fraction of the pre-projection one: the fused
#: ``||g||^2 - 2 w.c + w^T M w`` has lost most of its digits to cancellation (pass-1 sums
#: are float32), so a clipped projection on the CPU measures the projected norm directly.
EXACT_NORM_FRACTION = 1e-2

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
    """THE backend precedence rule, for both spaces (the gradient projection here, the
    projected optimizer step in :mod:`ogpsa.optim.backends`): ``$OGPSA_BACKEND`` when set (the
    operator's switch, e.g. to run a whole job or test suite on one backend), else ``backend``
    (the argument, i.e. ``OGPSAConfig.backend``), else ``"auto"`` (chosen per device and dtype).
    Returns the name, checked against the known names (ValueError naming its source)."""
    env = os.environ.get("OGPSA_BACKEND", "").strip()
    name = env or (backend if backend is not None else "auto") or "auto"
    if name != "auto" and name not in _PREFERENCE:
        raise ValueError(f"backend {name!r} (from {'OGPSA_BACKEND' if env else 'the backend argument / config'}) is "
                         f"not one of {('auto',) + _PREFERENCE}")
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
        if (why := selftest.failure(be, device, grad_dtype, basis_dtype)) is not None:  # never silently wrong
            raise BackendUnavailableError(why)
        return be
    for cand in _PREFERENCE:
        if cand not in _REGISTRY:
            continue
        be = _load(cand)
        if (be is not None and be.availability()[0] and be.supports(device, grad_dtype, basis_dtype, False)
                and selftest.passes(be, device, grad_dtype, basis_dtype)):  # first contact: checked once per key
            return be
    raise BackendUnavailableError(f"no OGPSA backend handles {device} {grad_dtype}/{basis_dtype}")


# ----------------------------------------------------------------------------------------
# Planning (the basis side; see ogpsa.plan)
# ----------------------------------------------------------------------------------------


def plan_from_entries(entries: Sequence[BasisEntry], numels: Sequence[int], dtypes: Sequence[torch.dtype],
                      devices: Sequence[torch.device], *, scope: str = "tensor", backend: Optional[str] = None,
                      names: Optional[Sequence[str]] = None) -> ProjectionPlan:
    """A :class:`ProjectionPlan` from already validated basis entries (what the projectors
    keep per subspace) and the expected gradient metadata."""
    return build_plan(entries, numels, dtypes, devices, scope=scope, backend=backend, names=names,
                      select=select_backend)


def plan_projection(
    grads: Sequence[Tensor],
    bases: Sequence[Tensor],
    *,
    scope: str = "tensor",
    backend: Optional[str] = None,
    names: Optional[Sequence[str]] = None,
    grams: Optional[Sequence[Optional[Tensor]]] = None,
) -> ProjectionPlan:
    """Validate and group inputs. Raises :class:`ProjectionInputError` on bad input.

    The plan keeps the bases and only the metadata of ``grads`` (numel, dtype, device):
    :func:`execute` accepts any gradients that match it, e.g. next step's new tensors."""
    if not isinstance(grads, (list, tuple)) or not isinstance(bases, (list, tuple)):
        raise ProjectionInputError(f"grads and bases must be lists of tensors, got {type(grads).__name__} "
                                   f"and {type(bases).__name__}")
    if len(grads) == 0:
        raise ProjectionInputError("grads is an empty list: nothing to project")
    if len(grads) != len(bases):
        raise ProjectionInputError(f"grads has {len(grads)} tensors but bases has {len(bases)}")
    if names is not None and len(names) != len(grads):
        raise ProjectionInputError(f"names has {len(names)} entries for {len(grads)} tensors")
    if grams is not None and len(grams) != len(grads):
        raise ProjectionInputError(f"grams has {len(grams)} entries for {len(grads)} tensors")
    if scope not in SCOPES:
        raise ProjectionInputError(f"scope={scope!r} is not one of {SCOPES}")
    for i, g in enumerate(grads):
        check_grad(i, g, names)
    entries = [basis_entry(u, g.numel(), g.device, label(i, names), scope=scope,
                           gram=grams[i] if grams is not None else None)
               for i, (g, u) in enumerate(zip(grads, bases))]
    return plan_from_entries(entries, [g.numel() for g in grads], [g.dtype for g in grads],
                             [g.device for g in grads], scope=scope, backend=backend, names=names)


# ----------------------------------------------------------------------------------------
# Projection
# ----------------------------------------------------------------------------------------


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
    scope: Optional[str] = None,
    max_norm: Optional[float] = None,
    aligned_scale: float = 1.0,
    process_group=None,
    error_if_nonfinite: bool = False,
    extra_sq: Optional[Tensor] = None,
) -> ProjectionStats:
    """Run a planned projection on ``grads`` (any tensors matching the plan's metadata).

    ``process_group``: for sharded gradients (FSDP2), the pass-1 partials of all tensors
    are summed across ranks with ONE all_reduce before the tiny step.
    ``error_if_nonfinite``: raise ``RuntimeError`` before any gradient changes when the
    post-projection total norm is NaN or Inf (one host sync).
    ``extra_sq``: squared norm (float64 scalar on the plan's home device) of gradients
    outside the plan that count towards clipping (the caller scales them by ``clip_coef``).
    """
    _check_call(mode, max_norm, aligned_scale)
    if scope is not None and scope != plan.scope:
        raise ProjectionInputError(f"scope={scope!r} but the plan was built for scope={plan.scope!r}")
    scope = plan.scope
    grouped = plan.bind(grads)
    home = plan.home
    # Single-pass path: a backend with `fused_project_` projects each tensor right after its dots
    # (small tensors still in cache). Only when nothing global is pending between the passes:
    # per-tensor scope, no clip, no all_reduce, no non-finite check to make before writing.
    fusable = (scope == "tensor" and max_norm is None and process_group is None and not error_if_nonfinite
               and mode != "threshold")  # no single-pass kernel scales whole tensors
    fused = [fusable and hasattr(grp.backend, "fused_project_") for grp in plan.groups]
    partials = [grp.backend.fused_project_(gs, grp.bases, grp.gram_inv32, mode, aligned_scale) if f
                else grp.backend.dots(gs, grp.bases, grp.k_max) for grp, gs, f in zip(plan.groups, grouped, fused)]
    if process_group is not None:
        import torch.distributed as dist

        flat = torch.cat([p.reshape(-1).to(home) for p in partials])
        dist.all_reduce(flat, group=process_group)
        out, offset = [], 0
        for p in partials:
            out.append(flat[offset:offset + p.numel()].view_as(p).to(p.device))
            offset += p.numel()
        partials = out
    # float64 from here on: the tiny step never runs in float32 (nor in TF32, whatever
    # torch.backends.cuda.matmul.allow_tf32 says)
    tables = [p.double() for p in partials]
    cpu = home.type == "cpu" and process_group is None
    if cpu:
        rescue_overflow(tables, grouped, fused)

    if scope == "global":
        c_total = sum(t[:, :-1].sum(0).to(home) for t in tables)
        k_total = int(max(plan.ks)) if plan.ks else 0
        w_global, kappa_global = mode_weights(plan.gram_total_inv @ c_total, c_total, mode, aligned_scale,
                                              torch.tensor(k_total))

    per_group = []
    for grp, gs, t, f in zip(plan.groups, grouped, tables, fused):
        c, sq = t[:, :-1], t[:, -1]
        if scope == "global":  # one factor for the whole gradient, tensors without rows included
            w = w_global.to(c.device).expand_as(c)
            kappa = kappa_global.to(c.device).expand(c.shape[0])
        else:
            w, kappa = mode_weights(torch.bmm(grp.gram_inv, c.unsqueeze(-1)).squeeze(-1), c, mode, aligned_scale,
                                    grp.ks)
        wc = (w * c).sum(-1)
        wmw = (w * torch.bmm(grp.gram, w.unsqueeze(-1)).squeeze(-1)).sum(-1)
        if cpu and f and mode in ("orthogonal", "conflict"):  # single-pass kernels: kappa = 1
            sq = recover_fused_sq(sq, gs, 1.0, wc, wmw)
        sq_after = (kappa * kappa * sq - 2 * kappa * wc + wmw).clamp_min(0)
        removed = ((1 - kappa) ** 2 * sq + 2 * (1 - kappa) * wc + wmw).clamp_min(0)
        per_group.append([w.float().contiguous(), sq, sq_after, removed, kappa])

    total_sq = sum(v[2].sum().to(home) for v in per_group)
    if extra_sq is not None:
        total_sq = total_sq + extra_sq.to(home, torch.float64)
    total_norm = total_sq.sqrt()
    if error_if_nonfinite and not bool(torch.isfinite(total_norm)):
        raise RuntimeError(f"the total norm of order 2.0 of the projected gradients is non-finite "
                           f"({float(total_norm)}), so they cannot be clipped; no gradient was changed. "
                           f"Set error_if_nonfinite=False to clip anyway")
    exact = (cpu and max_norm is not None
             and bool(total_sq < EXACT_NORM_FRACTION * sum(v[1].sum().to(home) for v in per_group)))
    if max_norm is not None and not exact:
        clip_coef = (max_norm / (total_norm + CLIP_EPS)).clamp(max=1.0)
    else:
        clip_coef = torch.ones((), dtype=torch.float64, device=home)
    for grp, gs, vals, f in zip(plan.groups, grouped, per_group, fused):
        if not f:
            _apply_group(grp, gs, vals[0], vals[4], clip_coef, mode, scope)
    if cpu and not exact:
        # statistics without clipping: a tensor that lost almost all of its norm has a float64
        # ||g'||^2 = kappa^2 ||g||^2 - 2 kappa w.c + w^T M w that cancelled down to the float32
        # rounding of the pass-1 sums; measure those few tensors directly (CPU: no device sync)
        for gs, vals in zip(grouped, per_group):
            low = vals[2] < EXACT_NORM_FRACTION * vals[1]
            if bool(low.any()):
                idx = low.nonzero().flatten().tolist()
                vals[2] = vals[2].clone()
                vals[2][idx] = sq_norms64([gs[i] for i in idx]).to(vals[2].device)
                if max_norm is not None:
                    vals[2][idx] = vals[2][idx] / clip_coef.to(vals[2].device) ** 2
        if max_norm is None:
            total_sq = sum(v[2].sum().to(home) for v in per_group)
            if extra_sq is not None:
                total_sq = total_sq + extra_sq.to(home, torch.float64)
            total_norm = total_sq.sqrt()
    if exact:
        # almost all of g was in the subspace: measure the projected norm, then scale
        for gs, vals in zip(grouped, per_group):
            vals[2] = sq_norms64(gs).to(vals[2].device)
        total_sq = sum(v[2].sum().to(home) for v in per_group)
        if extra_sq is not None:
            total_sq = total_sq + extra_sq.to(home, torch.float64)
        total_norm = total_sq.sqrt()
        clip_coef = (max_norm / (total_norm + CLIP_EPS)).clamp(max=1.0)
        if bool(clip_coef < 1.0):
            for gs in grouped:
                torch._foreach_mul_(gs, float(clip_coef))

    def gather(j: int) -> Tensor:
        out = torch.empty(plan.count, dtype=torch.float64, device=home)
        for grp, vals in zip(plan.groups, per_group):
            out.index_copy_(0, grp.positions, vals[j].to(home))  # integer index: no device sync
        return out

    single = sum(grp.single_pass for grp, f in zip(plan.groups, fused) if f)
    return ProjectionStats(gather(1), gather(2), gather(3), total_norm, clip_coef, plan.names,
                           tuple(sorted({grp.backend.name for grp in plan.groups})), single)


def _apply_group(grp, gs: list, w: Tensor, kappa: Tensor, clip_coef: Tensor, mode: str, scope: str) -> None:
    """Pass 2 of one group: ``g <- scale (kappa g - U^T w)``. The backends take one scalar kappa
    per call; per-tensor factors are folded into the scale where w is 0 (threshold), and under
    ``plane`` (kappa 0 for tensors with rows) a tensor without rows (kappa 1, w 0) is only scaled."""
    scale = clip_coef.to(device=w.device, dtype=torch.float32).expand(len(gs)).contiguous()
    if mode in ("orthogonal", "conflict"):
        grp.backend.update_(gs, grp.bases, w, 1.0, scale)
    elif mode == "threshold" or scope == "global":
        # threshold: w = 0 wherever kappa != 1; global plane: kappa is 0 for every tensor
        if mode == "plane":
            grp.backend.update_(gs, grp.bases, w, 0.0, scale)
        else:
            grp.backend.update_(gs, grp.bases, w, 1.0, scale * kappa.to(device=scale.device, dtype=torch.float32))
    else:  # plane, per-tensor scope
        rows = [i for i, u in enumerate(grp.bases) if u.shape[0]]
        bare = [i for i, u in enumerate(grp.bases) if not u.shape[0]]
        if len(rows) == len(gs):
            grp.backend.update_(gs, grp.bases, w, 0.0, scale)
            return
        if rows:
            sel = torch.tensor(rows, device=w.device)
            grp.backend.update_([gs[i] for i in rows], [grp.bases[i] for i in rows], w.index_select(0, sel), 0.0,
                                scale.index_select(0, sel))
        if bare:
            torch._foreach_mul_([gs[i] for i in bare], clip_coef.to(gs[bare[0]].device, torch.float32))


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
    error_if_nonfinite: bool = False,
) -> ProjectionStats:
    """Project gradients in place onto the orthogonal complement of their bases.

    Args:
        grads: contiguous gradient tensors (float32/bfloat16/float16), any shapes.
        bases: ``bases[i]`` is ``[k_i, grads[i].numel()]`` (float32/bfloat16, same device,
            rows orthonormal up to storage rounding; ``k_i = 0`` means no projection for
            that tensor, but it still counts towards clipping).
        mode: ``"orthogonal"``, ``"conflict"``, ``"plane"`` or ``"threshold"`` (see :mod:`ogpsa.reference`).
        scope: ``"tensor"`` (one subspace per tensor) or ``"global"`` (one for all).
        max_norm: clip the projected gradients to this global L2 norm (None: no clipping).
        aligned_scale: in conflict mode, factor for components aligned with the reference.
        backend: force a backend (default: ``$OGPSA_BACKEND`` or automatic).
        names: optional tensor names, used in error messages and statistics.
        grams: optional ``U_i U_i^T`` per tensor (the full one when ``bases[i]`` is one
            rank's slice of a sharded basis); default: computed here in float64.
        process_group: all-reduce the pass-1 partials over this group (sharded grads).
        error_if_nonfinite: raise before any change when the projected norm is NaN/Inf.

    Returns:
        :class:`ProjectionStats`. Bad input raises :class:`ProjectionInputError` before any
        gradient is modified. NaN/Inf gradients follow the policy in :mod:`ogpsa.projector`.
    """
    _check_call(mode, max_norm, aligned_scale)
    plan = plan_projection(grads, bases, scope=scope, backend=backend, names=names, grams=grams)
    return execute(plan, grads, mode=mode, max_norm=max_norm, aligned_scale=aligned_scale,
                   process_group=process_group, error_if_nonfinite=error_if_nonfinite)


# ----------------------------------------------------------------------------------------
# Basis building
# ----------------------------------------------------------------------------------------


def _group_refs(refs: Sequence[Tensor], backend: Optional[str]):
    buckets: dict[tuple, list[int]] = {}
    for i, r in enumerate(refs):
        buckets.setdefault((r.device, r.dtype), []).append(i)
    return [(select_backend(dev, dt, torch.float32, backend), idx) for (dev, dt), idx in buckets.items()]


#: rows whose largest magnitude lies outside [2^-SAFE_EXP, 2^SAFE_EXP] are rescaled by a power
#: of two before a backend's float32 products (squares of 1e-25 underflow, of 1e20 overflow)
SAFE_EXP = 30


def _row_scales(r: Tensor) -> Optional[Tensor]:
    """Power-of-two factors (float64, CPU, [m]) that bring each row's max |value| into
    [0.5, 1) when it lies outside the float32-safe range; None when every row is safe."""
    top = torch.linalg.vector_norm(r, ord=float("inf"), dim=1).to("cpu", torch.float64)
    finite = torch.isfinite(top) & (top > 0)
    _, exp = torch.frexp(torch.where(finite, top, torch.ones_like(top)))
    unsafe = finite & (exp.abs() > SAFE_EXP)
    if not bool(unsafe.any()):
        return None
    return torch.where(unsafe, torch.ldexp(torch.ones_like(top), -exp), torch.ones_like(top))


def gram(refs: Sequence[Tensor], *, backend: Optional[str] = None) -> Tensor:
    """Gram matrices ``R_i R_i^T`` (float64, on the CPU) for ``refs[i]: [m, N_i]``.

    Every backend gets float64-exact diagonals for any float32 range: rows too small or too
    large for float32 products are scaled by a power of two in place for the backend pass
    and restored after it (exact: a power-of-two product only moves the exponent), and the
    Gram matrix is unscaled in float64."""
    if not refs:
        raise ProjectionInputError("refs is an empty list")
    m = refs[0].shape[0]
    for i, r in enumerate(refs):
        if r.dim() != 2 or r.shape[0] != m or not r.is_contiguous():
            raise ProjectionInputError(f"refs[{i}] must be a contiguous [m={m}, N] tensor, got {tuple(r.shape)}")
    out = torch.empty(len(refs), m, m, dtype=torch.float64)
    for be, idx in _group_refs(refs, backend):
        scales = [_row_scales(refs[i]) if be.name != "torch" and refs[i].numel() else None for i in idx]
        try:
            for i, s in zip(idx, scales):
                if s is not None:
                    refs[i].mul_(s.to(refs[i].device, refs[i].dtype)[:, None])
            out[idx] = be.gram([refs[i] for i in idx]).to("cpu", torch.float64)
        finally:
            for i, s in zip(idx, scales):
                if s is not None:
                    refs[i].mul_((1.0 / s).to(refs[i].device, refs[i].dtype)[:, None])
        for i, s in zip(idx, scales):
            if s is not None:
                out[i] = out[i] / (s[:, None] * s[None, :])
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
