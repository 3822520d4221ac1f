"""AdamW as an update-space rule: moments from the raw gradient, direction
``d = m_hat / (sqrt(v_hat) + eps)``, decoupled decay ``p <- p (1 - lr wd)`` outside the projection,
then ``p <- p - lr d'``; state under torch AdamW's keys (``step``, ``exp_avg``, ``exp_avg_sq``,
``max_exp_avg_sq``).

``fused = True``: ``ogpsa.attach`` steps AdamW with its fused engine (the compiled CPU/CUDA op and
the Triton kernels through :mod:`ogpsa.optim.backends`, :class:`ogpsa.optim.ProjectedAdamW` /
:class:`ogpsa.optim.attach.LiveAdamW`), whose torch path is these same functions
(:mod:`ogpsa.optim.functional`); :func:`ogpsa.optim.rule.rule_step` with this rule gives the same
step on the torch backend (``tests/test_update_rules.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..functional import StepHyper, _apply, _direction, _update_moments
from ..rule import UpdateRule


def hyper_row(group: dict) -> StepHyper:
    """The hyperparameter row of one param group."""
    beta1, beta2 = group["betas"]
    return StepHyper(lr=float(group["lr"]), beta1=float(beta1), beta2=float(beta2), eps=float(group["eps"]),
                     weight_decay=float(group["weight_decay"]), maximize=bool(group.get("maximize", False)),
                     amsgrad=bool(group.get("amsgrad", False)))


class AdamWRule(UpdateRule):
    """``torch.optim.AdamW``'s update (and :class:`ogpsa.optim.ProjectedAdamW`'s, a subclass)."""

    name = "adamw"
    optimizer_types = (torch.optim.AdamW,)
    fused = True  # attach uses the fused engine (kernels), not rule_step

    def check_group(self, group: dict) -> None:
        for key in ("fused", "capturable", "differentiable"):
            if group.get(key):
                raise ValueError(f"ogpsa space='update': the AdamW has {key}=True, which the projected step does not "
                                 f"support; create it with {key}=False")

    def direction(self, p: Tensor, state: dict, group: dict) -> Tensor:
        h = hyper_row(group)
        if len(state) == 0:  # as torch AdamW creates it
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if h.amsgrad and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        step = _update_moments(p, state, h)
        return _direction(p, state, h, step, with_decay=False)

    def apply(self, p: Tensor, d: Tensor, group: dict) -> None:
        _apply(p, d, hyper_row(group), project_weight_decay=False)


RULE = AdamWRule()
