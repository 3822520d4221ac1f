"""The projected AdamW step on lists of tensors: validation, backend routing and the torch path.

Same math as :func:`ogpsa.reference.projected_adamw_step_` (the readable specification),
organised as the fused kernels are: moments are written once, in pass 1.

* ``scope="tensor"`` (no ``reduce_dots``): one tensor at a time, while it is in cache:
  moments, direction d, its k dots c = U d, weights w, then ``p <- p - lr (d - U^T w)``.
* ``scope="global"``, or any scope with ``reduce_dots``: pass 1 updates every tensor's moments
  and computes its dots (d is not stored); the pass-1 sums of all tensors are stacked into one
  table (``reduce_dots`` sums it across ranks); the tiny step turns it into weights (float64);
  pass 2 recomputes d from the stored moments (cheap, elementwise) and writes p. No fp32
  copy of the model is held.

Which backend runs which tensor: :mod:`ogpsa.optim.backends`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from ..config import MODES, SCOPES
from ..modes import mode_weights
from ..plan import gram_pinv
from ..stats import ProjectionStats
from . import backends as _be
from .backends import gram_of
from .rule import compute_dtype
from .triton_groups import triton_groups


@dataclass(frozen=True)
class StepHyper:
    """One param group's AdamW hyperparameters."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    maximize: bool = False
    amsgrad: bool = False


@dataclass
class StepResult:
    stats: Optional[ProjectionStats]
    updates: dict


def _update_moments(p: Tensor, state: dict, h: StepHyper) -> int:
    """m, v (and max v) from the raw gradient, in place; returns the new step count."""
    g = p.grad.neg() if h.maximize else p.grad
    m, v = state["exp_avg"], state["exp_avg_sq"]
    state["step"] += 1
    m.lerp_(g.to(m.dtype), 1 - h.beta1)
    gv = g.to(v.dtype)
    v.mul_(h.beta2).addcmul_(gv, gv, value=1 - h.beta2)
    if h.amsgrad:
        torch.maximum(state["max_exp_avg_sq"], v, out=state["max_exp_avg_sq"])
    return int(state["step"].item())


def _direction(p: Tensor, state: dict, h: StepHyper, step: int, with_decay: bool) -> Tensor:
    """Flattened d = m_hat / (sqrt(v_hat) + eps) (+ wd p when the decay is projected), in
    :func:`compute_dtype`."""
    dt = compute_dtype(p)
    v = state["max_exp_avg_sq"] if h.amsgrad else state["exp_avg_sq"]
    bc1 = 1 - h.beta1 ** step
    bc2_sqrt = math.sqrt(1 - h.beta2 ** step)
    d = state["exp_avg"].to(dt) / bc1
    d.div_((v.to(dt).sqrt() / bc2_sqrt).add_(h.eps))
    d = d.reshape(-1)
    if with_decay and h.weight_decay != 0:
        d.add_(p.detach().to(dt).reshape(-1), alpha=h.weight_decay)
    return d


def _apply(p: Tensor, d: Tensor, h: StepHyper, project_weight_decay: bool) -> None:
    if not project_weight_decay and h.weight_decay != 0:
        p.mul_(1 - h.lr * h.weight_decay)  # decoupled decay along p itself (torch AdamW)
    if p.dtype == d.dtype:
        p.add_(d.view(p.shape), alpha=-h.lr)
    else:
        p.copy_((p.to(d.dtype).reshape(-1) - h.lr * d).reshape(p.shape).to(p.dtype))


def _project_one(d: Tensor, basis: tuple, mode: str, aligned_scale: float) -> tuple[Tensor, Optional[Tensor]]:
    """``kappa d - U^T v`` for one tensor (the shared mode rule, w = M^+ c in float64), and for the
    orthogonal rule the removed squared norm ``||U^T w||^2 = w . c`` (float64, no pass over d;
    None otherwise: the caller measures it)."""
    u = basis[1].to(d.dtype)
    c = (u @ d).double()
    minv = gram_pinv(gram_of(basis)) if d.dtype == torch.float64 else basis[2].to(c.device, torch.float64)
    w = minv.to(c.device) @ c
    if mode == "orthogonal":  # the rule is the identity on w (kappa 1): skip its small ops
        return d - u.T @ w.to(d.dtype), w.dot(c).clamp_min(0)
    v, kappa = mode_weights(w[None], c[None], mode, aligned_scale, torch.tensor([u.shape[0]]))
    out = d * kappa[0].to(d.dtype) if mode in ("plane", "threshold") else d.clone()
    return out.sub_(u.T @ v[0].to(d.dtype)), None


def _sq64(x: Tensor) -> Tensor:
    """``||x||^2`` as a float64 scalar: one BLAS dot in x's dtype (measured on x itself, so no
    cancellation however much of the direction was removed)."""
    return x.dot(x).double()


def _validate(items: list, mode: str, scope: str) -> None:
    """Every check a step makes, before any parameter, moment or step count changes."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {MODES}")
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r} is not one of {SCOPES}")
    k_global = None
    for i, (p, state, h, basis) in enumerate(items):
        what = f"tensor {i}" if basis is None else f"tensor {i} ({basis[0]!r})"
        if p.grad is None or p.grad.shape != p.shape:
            raise ValueError(f"projected AdamW: {what} needs a gradient of shape {tuple(p.shape)}")
        keys = ("step", "exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if h.amsgrad else ())
        for key in keys:
            if key not in state:
                raise ValueError(f"projected AdamW: {what} has no state[{key!r}]")
            if key != "step" and state[key].shape != p.shape:
                raise ValueError(f"projected AdamW: state[{key!r}] of {what} has shape {tuple(state[key].shape)}, "
                                 f"expected {tuple(p.shape)}")
        if basis is None:
            continue
        u, m_inv = basis[1], basis[2]
        if u.dim() != 2 or u.shape[1] != p.numel() or not u.is_floating_point():
            raise ValueError(f"projected AdamW: basis of {what} has shape {tuple(u.shape)}, expected "
                             f"[k, {p.numel()}]")
        if m_inv.shape != (u.shape[0], u.shape[0]):
            raise ValueError(f"projected AdamW: M^-1 of {what} has shape {tuple(m_inv.shape)}, expected "
                             f"[{u.shape[0]}, {u.shape[0]}]")
        if len(basis) > 3 and basis[3] is not None and basis[3].shape != m_inv.shape:
            raise ValueError(f"projected AdamW: M of {what} has shape {tuple(basis[3].shape)}, expected "
                             f"[{u.shape[0]}, {u.shape[0]}]")
        if u.device != p.device:
            raise ValueError(f"projected AdamW: basis of {what} is on {u.device}, the parameter on {p.device}")
        if scope == "global":
            if k_global is not None and u.shape[0] != k_global:
                raise ValueError(f"scope='global' needs one rank for every tensor (got {k_global} and "
                                 f"{u.shape[0]} at {what})")
            k_global = u.shape[0]


def projected_step(items: list, *, mode: str = "orthogonal", scope: str = "tensor", aligned_scale: float = 1.0,
                   project_weight_decay: bool = False, keep_updates: bool = False, backend: str = "auto",
                   reduce_dots: Optional[Callable[[Tensor], None]] = None) -> StepResult:
    """Run one projected AdamW step.

    ``items``: ``(param, state, StepHyper, basis)`` with ``basis`` None (not projected) or
    ``(name, U [k, N], M^{-1} [k, k] float32)`` or ``(name, U, M^{-1}, M)``, M the Gram
    ``U U^T`` of the whole tensor's basis (needed when U is a shard of it, see ``reduce_dots``;
    else computed from U once and cached). ``N`` may be 0 (an empty shard). Returns per-tensor
    statistics of the projected tensors (||d||^2 and the removed ||d - d'||^2, float64; with
    ``reduce_dots`` the whole tensors', from the summed table and M) and, with
    ``keep_updates``, the applied directions by parameter (``keep_updates`` needs the torch
    path). ``backend``: see :mod:`ogpsa.optim.backends`. Bad input raises ``ValueError``
    before anything changes.

    ``reduce_dots`` (distributed training, e.g. parameters sharded across ranks): called
    exactly once per step, after pass 1 of every tensor and before any parameter is written,
    with ONE float64 tensor ``[T, K + 1]`` on the device of the first projected parameter (CPU
    when there is none): row t belongs to the t-th projected item (basis not None, in item
    order), columns ``0..k_t-1`` hold ``c_t = U_t d_t`` (zero beyond k_t; ``K`` is the
    largest k), column ``K`` holds ``||d_t||^2``. It must sum the table in place across ranks
    (``dist.all_reduce``); the step then uses the summed dots (both scopes). It is called even
    with ``T = 0`` (a ``[0, 1]`` table), so every rank joins the collective.
    """
    _validate(items, mode, scope)
    name = _be.requested(backend)
    routes = [_be.route(it, name, scope=scope, mode=mode, reduce_dots=reduce_dots, keep_updates=keep_updates)
              for it in items]
    groups = triton_groups([(i, it) for i, (it, r) in enumerate(zip(items, routes)) if r == "triton"],
                               project_weight_decay)
    updates: dict = {}
    stats: dict = {}  # item position -> (||d||^2, removed), float64 0-d tensors
    used = sorted(set(routes))
    single = 0  # projected tensors the Triton kernels stepped in one pass
    # the fused op takes the per-tensor orthogonal step; other modes on CPU tensors take its two pass ops
    one_op = mode == "orthogonal" or "cpu" not in routes
    if scope == "tensor" and reduce_dots is None and one_op:
        ops: dict = {}
        for i, (it, r) in enumerate(zip(items, routes)):
            if r in ("cpu", "cuda"):
                ops.setdefault((r, it[2]), []).append(i)
        for grp in groups:
            grp.begin()
            for idx, sq, rem in grp.tensor_step(mode, aligned_scale):
                for j, a, b in zip(idx, sq, rem):
                    stats[grp.positions[j]] = (a, b)
            single += sum(1 for j in grp.single_pass if grp.items[j][3] is not None)
        for (_, h), pos in ops.items():
            out = _be.op_step([(items[i][0], items[i][1], items[i][3]) for i in pos], h, project_weight_decay)
            for i, row in zip(pos, out):
                stats[i] = (row[0], row[1])
        for i, (p, state, h, basis) in enumerate(items):
            if routes[i] != "torch":
                continue
            step = _update_moments(p, state, h)
            d = _direction(p, state, h, step, project_weight_decay)
            if basis is not None:
                new, removed = _project_one(d, basis, mode, aligned_scale)  # kappa d - U^T v
                if removed is None:
                    removed = _sq64(d - new)
                stats[i] = (_sq64(d), removed, _sq64(new))
                d = new
            _apply(p, d, h, project_weight_decay)
            if keep_updates:
                updates[p] = d
    else:
        _two_passes(items, routes, groups, stats, updates, mode=mode, scope=scope, aligned_scale=aligned_scale,
                    project_weight_decay=project_weight_decay, keep_updates=keep_updates, reduce_dots=reduce_dots)
    names = [basis[0] for basis in (it[3] for it in items) if basis is not None]
    result = None
    if names:
        pos = [i for i, it in enumerate(items) if it[3] is not None]
        home = items[pos[0]][0].device
        sq_before = torch.stack([stats[i][0].to(home, torch.float64) for i in pos])
        removed_sq = torch.stack([stats[i][1].to(home, torch.float64) for i in pos]).clamp_min(0)
        # the torch path measures ||d'||^2 directly (exact when almost all of d is removed);
        # the fused paths report ||d||^2 and the removed part, from which it follows
        sq_after = sq_before - removed_sq
        measured = [(j, stats[i][2]) for j, i in enumerate(pos) if len(stats[i]) > 2]
        if measured:
            sq_after[[j for j, _ in measured]] = torch.stack([t.to(home, torch.float64) for _, t in measured])
        sq_after = sq_after.clamp_min(0)
        result = ProjectionStats(sq_before=sq_before, sq_after=sq_after, removed_sq=removed_sq,
                                 total_norm=sq_after.sum().sqrt(),
                                 clip_coef=torch.ones((), dtype=torch.float64, device=home), names=names,
                                 backends=tuple(used), single_pass=single)
    return StepResult(stats=result, updates=updates)


def _two_passes(items: list, routes: list, groups: list, stats: dict, updates: dict, *, mode: str, scope: str,
                aligned_scale: float, project_weight_decay: bool, keep_updates: bool,
                reduce_dots: Optional[Callable[[Tensor], None]]) -> None:
    """Pass 1 for every tensor, the stacked pass-1 table (``reduce_dots``), the tiny step, pass 2."""
    proj = [i for i, it in enumerate(items) if it[3] is not None]
    home = items[proj[0]][0].device if proj else (items[0][0].device if items else torch.device("cpu"))
    k = max([items[i][3][1].shape[0] for i in proj] + [0])
    row_of = {i: r for r, i in enumerate(proj)}
    table = torch.zeros(len(proj), k + 1, dtype=torch.float64, device=home)
    # pass 1: moments written once, dots into the table
    steps: dict = {}
    for i, (p, state, h, basis) in enumerate(items):
        if routes[i] != "torch":
            continue
        steps[i] = _update_moments(p, state, h)
        if basis is None:
            continue
        d = _direction(p, state, h, steps[i], project_weight_decay)
        c = basis[1].to(d.dtype) @ d
        r = row_of[i]
        table[r, :c.numel()] = c.to(home, torch.float64)
        table[r, k] = _sq64(d).to(home)
    op_groups: dict = {}  # hyper -> positions of the items the compiled pass ops step
    for i, it in enumerate(items):
        if routes[i] == "cpu":
            op_groups.setdefault(it[2], []).append(i)
    for h, pos in op_groups.items():
        rows, got = _be.op_pass1([(items[i][0], items[i][1], items[i][3]) for i in pos], h, project_weight_decay)
        for i, row, st in zip(pos, rows, got):
            steps[i] = st
            if i in row_of:
                ki = items[i][3][1].shape[0]
                table[row_of[i], :ki] = row[:ki].to(home)
                table[row_of[i], k] = row[-1].to(home)
    for grp in groups:
        grp.begin()
        rows, _ = grp.dots()
        sel = [j for j, pos in enumerate(grp.positions) if pos in row_of]
        if sel:
            part = rows[sel].to(home)
            gk = grp.k_max  # <= k when the group has a projected tensor
            block = torch.zeros(len(sel), k + 1, dtype=torch.float64, device=home)
            block[:, :gk] = part[:, :gk]
            block[:, k] = part[:, gk]
            table.index_copy_(0, torch.tensor([row_of[grp.positions[j]] for j in sel], device=home), block)
    if reduce_dots is not None:
        reduce_dots(table)  # exactly once: sums the pass-1 table across ranks, in place
    c, sq = table[:, :k], table[:, k]
    # the tiny step (float64)
    kappa_all = 1.0  # global scope: the factor of every tensor, projected or not
    if proj:
        grams = _be.padded_stack([_be.gram_of(items[i][3]) for i in proj], k, home)
        if scope == "global":
            c_all = c.sum(0)
            w1, kappa1 = mode_weights(gram_pinv(grams.sum(0), "scope='global' subspace") @ c_all, c_all, mode,
                                      aligned_scale, torch.tensor(k))
            kappa_all = float(kappa1)
            w = w1.expand(len(proj), k)
            kappa = torch.full((len(proj),), kappa_all, dtype=torch.float64, device=home)
        else:
            minv = _be.padded_stack([items[i][3][2] for i in proj], k, home)
            ks = torch.tensor([items[i][3][1].shape[0] for i in proj], dtype=torch.int64, device=home)
            w, kappa = _be.tensor_weights(c, minv, ks, mode, aligned_scale)
        rem = _be.removed_sq(sq, c, w, kappa, grams)
        for i in proj:
            stats[i] = (sq[row_of[i]], rem[row_of[i]])
    # pass 2
    for i, (p, state, h, basis) in enumerate(items):
        if routes[i] != "torch":
            continue
        d = _direction(p, state, h, steps[i], project_weight_decay)
        if basis is not None:
            r = row_of[i]
            wi = w[r, :basis[1].shape[0]].to(d.device, d.dtype)
            d = (d * kappa[r].to(d.device, d.dtype)).sub_(basis[1].to(d.dtype).T @ wi)
        elif kappa_all != 1.0:
            d = d * kappa_all
        _apply(p, d, h, project_weight_decay)
        if keep_updates:
            updates[p] = d
    for h, pos in op_groups.items():
        # one call per distinct kappa (threshold / plane give per-tensor factors; CPU: no device sync)
        kap = [float(kappa[row_of[i]]) if i in row_of else float(kappa_all) for i in pos]
        for value in sorted(set(kap)):
            sel = [i for i, kv in zip(pos, kap) if kv == value]
            wk = torch.zeros(len(sel), max(k, 1), dtype=torch.float32)
            for j, i in enumerate(sel):
                if i in row_of:
                    wk[j, :k] = w[row_of[i], :k].float().cpu()
            _be.op_pass2([(items[i][0], items[i][1], items[i][3]) for i in sel], h, [steps[i] for i in sel], wk,
                         value, project_weight_decay)
    for grp in groups:
        n = len(grp.positions)
        gw = torch.zeros(n, grp.k_max, dtype=torch.float64, device=home)
        gk = torch.full((n,), float(kappa_all), dtype=torch.float64, device=home)
        sel = [j for j, pos in enumerate(grp.positions) if pos in row_of]
        if sel:
            src = torch.tensor([row_of[grp.positions[j]] for j in sel], device=home)
            dst = torch.tensor(sel, device=home)
            kw = min(k, grp.k_max)
            gw[dst, :kw] = w[src, :kw]
            gk[dst] = kappa[src]
        grp.apply_(gw, gk)
