"""Optimizer rules on the shared projection core, and their registry.

Update space projects an optimizer's final direction ``d`` (what it would subtract, times lr) off
the subspace: ``d' = kappa d - U^T v`` with the dots ``c = U d``, ``w = M^+ c`` (the rank-revealing
pseudo-inverse of :func:`ogpsa.plan.gram_pinv`) and the one mode rule of :mod:`ogpsa.modes`. An
optimizer enters update space as a RULE: how its state turns a gradient into ``d`` and how ``d`` is
applied. AdamW is the first rule and has fused kernels (:mod:`ogpsa.optim.adamw`,
:mod:`ogpsa.optim.functional`, :mod:`ogpsa.optim.backends`); every other rule lives in ONE file of
:mod:`ogpsa.optim.rules` (a module there that defines ``RULE = MyRule()`` is found by
:func:`registered_rules`, nothing else to edit) and runs on the torch backend through :func:`rule_step`.

A rule reads the user's optimizer ``param_groups`` and ``state`` LIVE at every step and keeps its
state under the keys torch's own optimizer uses, so ``state_dict`` / ``load_state_dict``, LR
schedulers, ``add_param_group`` and resume behave exactly as with the torch optimizer.
"""

from __future__ import annotations

import importlib
import pkgutil
from abc import ABC, abstractmethod
from typing import Any, Optional

import torch
from torch import Tensor

from ..errors import ProjectionInputError
from ..modes import mode_weights
from ..plan import basis_entry, check_coverage, gram_pinv
from ..stats import ProjectionStats
from ..subspace import Subspace


class UpdateRule(ABC):
    """One optimizer's update, split at the point where update space projects it."""

    #: short name (errors, statistics)
    name: str = "rule"
    #: the torch optimizer classes this rule reproduces (subclasses match too)
    optimizer_types: tuple = ()

    def check_group(self, group: dict) -> None:  # noqa: B027  (optional hook: most rules take every option)
        """Raise ValueError naming a param-group option the rule cannot reproduce."""

    @abstractmethod
    def direction(self, p: Tensor, state: dict, group: dict) -> Tensor:
        """Update ``state`` in place from ``p.grad`` (exactly as the torch optimizer does) and
        return the flattened direction ``d`` (``p <- p - lr d`` without projection) in
        :func:`compute_dtype`. Must not return a tensor the state keeps (it may be rescaled)."""

    def apply(self, p: Tensor, d: Tensor, group: dict) -> None:
        """``p <- p - lr d'`` (a rule with decoupled decay overrides this)."""
        lr = float(group["lr"])
        if p.dtype == d.dtype:
            p.add_(d.view(p.shape), alpha=-lr)
        else:
            p.copy_((p.to(d.dtype).reshape(-1) - lr * d).reshape(p.shape).to(p.dtype))


def compute_dtype(p: Tensor) -> torch.dtype:
    """float64 parameters step in float64, every other float dtype in float32."""
    return torch.float64 if p.dtype == torch.float64 else torch.float32


# -- registry -------------------------------------------------------------------------------------

_RULES: Optional[list] = None


def registered_rules() -> list:
    """Every rule of :mod:`ogpsa.optim.rules` (each module's ``RULE``), found once."""
    global _RULES
    if _RULES is None:
        package = importlib.import_module(f"{__package__}.rules")
        found = []
        for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
            module = importlib.import_module(f"{package.__name__}.{info.name}")
            rule = getattr(module, "RULE", None)
            if isinstance(rule, UpdateRule):
                found.append(rule)
        _RULES = found
    return list(_RULES)


def rule_for(optimizer: Any) -> Optional[UpdateRule]:
    """The rule that reproduces ``optimizer``'s update (by class, most specific first), or None."""
    for cls in type(optimizer).__mro__:
        for rule in registered_rules():
            if cls in rule.optimizer_types:
                return rule
    return None


# -- the basis side (shared with ProjectedAdamW) ---------------------------------------------------


def match_bases(model: torch.nn.Module, subspace: Subspace, params: list, *, allow_partial: bool) -> dict:
    """``{param: (name, U, M^+ float32, M float64)}`` for the optimizer's ``params`` that the
    subspace names. The subspace must match the model (SubspaceMismatchError for a basis
    without a parameter or of another shape) and cover every trainable parameter the optimizer
    steps unless ``allow_partial``; every basis is validated as in gradient space
    (:func:`ogpsa.plan.basis_entry`: dtype, shape, rank <= 16, finiteness; a rank-revealing
    float64 pseudo-inverse of the Gram, so nearly dependent rows project onto their span)."""
    subspace.check_model(model)
    mine = set(params)
    named = [(n, p) for n, p in model.named_parameters() if p in mine]
    in_model = {p for _, p in named}
    check_coverage(named, subspace.names, [p for p in params if p not in in_model], allow_partial=allow_partial,
                   what="update space (space='update')")
    bases: dict[Tensor, tuple] = {}
    for name, p in named:
        if name not in subspace:
            continue
        u = subspace.basis(name)
        if u.dim() != 2 or u.shape[1] != p.numel():
            raise ProjectionInputError(f"update space: basis of {name!r} has shape {tuple(u.shape)}, expected "
                                       f"[k, {p.numel()}] for parameter shape {tuple(p.shape)}")
        if u.shape[0] == 0:
            continue
        # float64 parameters: M from the stored rows in float64 (the subspace's M may carry float32 rounding)
        e = basis_entry(u.to(p.device).contiguous(), p.numel(), p.device, f"parameter {name!r}",
                        gram=None if p.dtype == torch.float64 else subspace.gram(name))
        bases[p] = (name, e.basis, e.gram_inv.to(p.device, torch.float32), e.gram.to(p.device))
    return bases


# -- the step of a rule on the torch backend -------------------------------------------------------


def _weights(c: Tensor, minv: Tensor, k: int, mode: str, aligned_scale: float) -> tuple[Tensor, Tensor]:
    w = minv.to(c.device, torch.float64) @ c
    v, kappa = mode_weights(w[None], c[None], mode, aligned_scale, torch.tensor([k]))
    return v[0], kappa[0]


@torch.no_grad()
def rule_step(rule: UpdateRule, param_groups: list, state: Any, bases: dict, *, mode: str, scope: str,
              aligned_scale: float, paused: bool = False) -> Optional[ProjectionStats]:
    """One step of ``rule`` over the (live) ``param_groups`` / ``state``, each direction
    projected with its basis (per tensor, or one subspace over all tensors for
    ``scope="global"``). Returns the statistics (float64 ``||d||^2``, ``||d'||^2`` measured,
    removed) of the projected tensors, or None when none was projected."""
    items = []
    for group in param_groups:
        rule.check_group(group)
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise ProjectionInputError(f"update space ({rule.name}): sparse gradients are not supported")
            d = rule.direction(p, state[p], group)
            items.append((p, group, d, None if paused else bases.get(p)))
    projected = [(i, it) for i, it in enumerate(items) if it[3] is not None]
    news: dict[int, Tensor] = {}
    if scope == "global" and projected:
        k = projected[0][1][3][1].shape[0]
        c = sum(it[3][1].to(it[2].dtype) @ it[2] for _, it in projected).double()
        grams = sum(it[3][3].to("cpu", torch.float64) for _, it in projected)
        v, kappa = _weights(c, gram_pinv(grams, "scope='global' subspace"), k, mode, aligned_scale)
        for i, (_p, _group, d, basis) in enumerate(items):
            new = d * kappa.to(d.dtype)
            if basis is not None:
                new.sub_(basis[1].to(d.dtype).T @ v.to(d.device, d.dtype))
            news[i] = new
    else:
        for i, (_p, _group, d, basis) in projected:
            u = basis[1].to(d.dtype)
            c = (u @ d).double()
            minv = gram_pinv(basis[3]) if d.dtype == torch.float64 else basis[2]
            v, kappa = _weights(c, minv, u.shape[0], mode, aligned_scale)
            news[i] = (d * kappa.to(d.dtype)).sub_(u.T @ v.to(d.device, d.dtype))
    sq, after, removed, names = [], [], [], []
    for i, (p, group, d, basis) in enumerate(items):
        new = news.get(i, d)
        if basis is not None:
            sq.append(d.double().dot(d.double()))
            after.append(new.double().dot(new.double()))
            removed.append((d - new).double().square().sum())
            names.append(basis[0])
        rule.apply(p, new, group)
    if not names:
        return None
    home = items[projected[0][0]][0].device
    s_after = torch.stack([t.to(home) for t in after])
    return ProjectionStats(sq_before=torch.stack([t.to(home) for t in sq]), sq_after=s_after,
                           removed_sq=torch.stack([t.to(home) for t in removed]), total_norm=s_after.sum().sqrt(),
                           clip_coef=torch.ones((), dtype=torch.float64, device=home), names=names,
                           backends=("torch",))
