"""The projected AdamW step on lists of tensors (the torch backend, used by ProjectedAdamW).

Same math as :func:`ogpsa.reference.projected_adamw_step_` (the readable specification),
organised as the fused kernels are: moments are written once, in pass 1.

* ``scope="tensor"``: one tensor at a time, while it is in cache: moments, direction d, its
  k dots c = U d, weights w, then ``p <- p - lr (d - U^T w)``.
* ``scope="global"``: pass 1 updates every tensor's moments and accumulates c = sum_i U_i d_i
  (d is not stored); the weights come from the summed c; pass 2 recomputes d from the stored
  moments (cheap, elementwise) and writes p. No fp32 copy of the model is held.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..reference import mode_weights
from ..stats import ProjectionStats
from .backends import choose, cpu_step, cpu_supports


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
    """float32 flattened d = m_hat / (sqrt(v_hat) + eps) (+ wd p when the decay is projected)."""
    v = state["max_exp_avg_sq"] if h.amsgrad else state["exp_avg_sq"]
    bc1 = 1 - h.beta1 ** step
    bc2_sqrt = math.sqrt(1 - h.beta2 ** step)
    d = state["exp_avg"].float() / bc1
    d.div_((v.float().sqrt() / bc2_sqrt).add_(h.eps))
    d = d.reshape(-1)
    if with_decay and h.weight_decay != 0:
        d.add_(p.detach().float().reshape(-1), alpha=h.weight_decay)
    return d


def _apply(p: Tensor, d: Tensor, h: StepHyper, project_weight_decay: bool) -> None:
    if not project_weight_decay and h.weight_decay != 0:
        p.mul_(1 - h.lr * h.weight_decay)  # decoupled decay along p itself (torch AdamW)
    if p.dtype == torch.float32:
        p.add_(d.view(p.shape), alpha=-h.lr)
    else:
        p.copy_((p.float().reshape(-1) - h.lr * d).reshape(p.shape).to(p.dtype))


def projected_step(items: list, *, mode: str = "orthogonal", scope: str = "tensor", aligned_scale: float = 1.0,
                   project_weight_decay: bool = False, keep_updates: bool = False,
                   backend: str = "auto") -> StepResult:
    """Run one projected AdamW step.

    ``items``: ``(param, state, StepHyper, basis)`` with ``basis`` None (not projected) or
    ``(name, U [k, N], M^{-1} [k, k] float32)``. Returns per-tensor statistics of the
    projected tensors (||d||^2 and the removed ||U^T w||^2, float64) and, with
    ``keep_updates``, the applied directions by parameter. ``backend``: see
    :mod:`ogpsa.optim.backends` (the compiled CPU kernel takes the tensors it supports for the
    per-tensor orthogonal rule; ``keep_updates`` needs the torch path)."""
    updates: dict = {}
    names, before, removed = [], [], []
    if scope == "tensor" and mode == "orthogonal" and not keep_updates and choose(backend) == "cpu":
        rest, groups = [], {}
        for p, state, h, basis in items:
            if cpu_supports(p, state, basis, h.amsgrad):
                groups.setdefault(h, []).append((p, state, basis))
            else:
                rest.append((p, state, h, basis))
        for h, group in groups.items():
            out = cpu_step(group, h, project_weight_decay)
            for (_, _, basis), row in zip(group, out):
                if basis is not None:
                    names.append(basis[0])
                    before.append(row[0])
                    removed.append(row[1])
        items = rest
    if scope == "tensor":
        for p, state, h, basis in items:
            step = _update_moments(p, state, h)
            d = _direction(p, state, h, step, project_weight_decay)
            if basis is not None:
                name, u, m_inv = basis
                uf = u.float()
                c = uf @ d
                w, kappa = mode_weights(c, m_inv, mode, aligned_scale)
                new = (d * kappa).sub_(uf.T @ w)  # kappa d - U^T w
                names.append(name)
                before.append(d.dot(d).double())
                removed.append((d - new).square().sum().double())
                d = new
            _apply(p, d, h, project_weight_decay)
            if keep_updates:
                updates[p] = d
    elif scope == "global":
        steps, c_sum, m_sum, k = [], None, None, None
        for p, state, h, basis in items:  # pass 1: moments (written once) and the summed dots
            step = _update_moments(p, state, h)
            steps.append(step)
            if basis is None:
                continue
            _, u, _ = basis
            if k is None:
                k = u.shape[0]
            elif u.shape[0] != k:
                raise ValueError(f"scope='global' needs one rank for every tensor (got {k} and {u.shape[0]})")
            d = _direction(p, state, h, step, project_weight_decay)
            uf = u.float()
            c = uf @ d
            mm = (uf.double() @ uf.double().T)
            c_sum = c.double() if c_sum is None else c_sum + c.double()
            m_sum = mm if m_sum is None else m_sum + mm
        w = kappa = None
        if c_sum is not None:
            w, kappa = mode_weights(c_sum.float(), torch.linalg.inv(m_sum).float(), mode, aligned_scale)
        for (p, state, h, basis), step in zip(items, steps):  # pass 2: recompute d, subtract, write p
            d = _direction(p, state, h, step, project_weight_decay)
            if w is not None:
                new = d * kappa
                if basis is not None:
                    name, u, _ = basis
                    new.sub_(u.float().T @ w.to(d.device))
                    names.append(name)
                    before.append(d.dot(d).double())
                    removed.append((d - new).square().sum().double())
                d = new
            _apply(p, d, h, project_weight_decay)
            if keep_updates:
                updates[p] = d
    else:
        raise ValueError(f"scope={scope!r} is not one of ('tensor', 'global')")
    stats = None
    if names:
        sq_before = torch.stack(before)
        removed_sq = torch.stack(removed).clamp_min(0)
        sq_after = (sq_before - removed_sq).clamp_min(0)
        stats = ProjectionStats(sq_before=sq_before, sq_after=sq_after, removed_sq=removed_sq,
                                total_norm=sq_after.sum().sqrt(), clip_coef=torch.ones((), dtype=torch.float64),
                                names=names, backends=("torch",))
    return StepResult(stats=stats, updates=updates)
