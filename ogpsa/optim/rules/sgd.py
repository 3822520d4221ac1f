"""SGD (with momentum, dampening, Nesterov, coupled weight decay, maximize) as an update-space
rule: the direction ``torch.optim.SGD`` would subtract (times lr) is projected, so with it the
WHOLE applied update is orthogonal to the subspace (the decay is part of the gradient in SGD).

State: ``momentum_buffer`` exactly as torch's SGD keeps it (the parameter's shape and dtype,
created from the first gradient), so ``state_dict`` loads into ``torch.optim.SGD`` and back.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..rule import UpdateRule, compute_dtype


class SGDRule(UpdateRule):
    """``torch.optim.SGD``'s update (foreach and single-tensor give the same numbers)."""

    name = "sgd"
    optimizer_types = (torch.optim.SGD,)

    def check_group(self, group: dict) -> None:
        for key in ("fused", "differentiable"):
            if group.get(key):
                raise ValueError(f"space='update' with SGD: {key}=True is not supported (the projected step is its "
                                 f"own loop); create the SGD with {key}=False")
        if group.get("nesterov") and (group.get("momentum", 0) <= 0 or group.get("dampening", 0) != 0):
            raise ValueError("SGD: Nesterov momentum requires a momentum and zero dampening")

    def direction(self, p: Tensor, state: dict, group: dict) -> Tensor:
        g = p.grad
        if group.get("maximize", False):
            g = -g
        wd = float(group.get("weight_decay", 0.0))
        if wd != 0:
            g = g.add(p.detach(), alpha=wd)
        momentum = float(group.get("momentum", 0.0))
        if momentum != 0:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = torch.clone(g).detach()
                state["momentum_buffer"] = buf
            else:
                buf.mul_(momentum).add_(g, alpha=1 - float(group.get("dampening", 0.0)))
            g = g.add(buf, alpha=momentum) if group.get("nesterov", False) else buf
        # a fresh flat tensor in the compute dtype (never the momentum buffer itself)
        return g.to(compute_dtype(p)).reshape(-1).clone()


RULE = SGDRule()
