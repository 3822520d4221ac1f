"""``ogpsa.attach``: the one place that decides which projector a model gets.

Kept apart from :mod:`ogpsa.projector` and :mod:`ogpsa.distributed` so that neither
imports the other's caller: ``distributed`` builds on ``projector``; this module uses both.
"""

from __future__ import annotations

from typing import Optional

import torch

from .config import OGPSAConfig
from .distributed import ShardedProjector, is_dtensor
from .projector import Projector
from .subspace import Subspace


def attach(model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer], subspace: Subspace,
           config: Optional[OGPSAConfig] = None) -> Projector:
    """Project ``model``'s gradients onto the orthogonal complement of ``subspace`` once per
    ``optimizer.step()``. Parameters without a gradient or without a basis are skipped
    (they still count towards clipping).

    ``config`` defaults to the subspace's config (mode, scope, backend, max_norm...).
    Pass ``optimizer=None`` to call :meth:`Projector.project` or
    :meth:`Projector.clip_grad_norm_` yourself. Every basis is validated here (a bad one
    raises now, not at the first step); a meta-device model, or an optimizer that already
    has a projector, is an error.

    Under DDP this projects the averaged gradient (the step runs after DDP's all-reduce).
    A model with DTensor parameters (FSDP2 ``fully_shard``) gets a
    :class:`ogpsa.distributed.ShardedProjector`: each rank projects its own gradient shards
    with its slice of the basis, with one all_reduce per projection. DeepSpeed engines use
    :func:`ogpsa.distributed.attach_deepspeed`.

    With ``config.space == "update"`` the optimizer's update is projected instead of the
    gradient: see :func:`ogpsa.optim.attach_update_space` (AdamW / ProjectedAdamW only).
    """
    if (config if config is not None else subspace.config).space == "update":
        # update space: project AdamW's final direction (ogpsa.optim), not the gradient
        from .optim import attach_update_space

        return attach_update_space(model, optimizer, subspace, config)
    if any(is_dtensor(p) for p in model.parameters()):
        return ShardedProjector(model, optimizer, subspace, config)
    return Projector(model, optimizer, subspace, config)
