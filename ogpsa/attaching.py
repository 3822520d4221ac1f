"""``ogpsa.attach``: THE attach table, the one place that decides which projector a model gets.

=====================  ================================  ==========================================
setup                  space="gradient"                  space="update"
=====================  ================================  ==========================================
single process / DDP   :class:`~ogpsa.Projector`         :class:`~ogpsa.optim.UpdateSpaceProjector`
FSDP2 (DTensor)        :class:`~ogpsa.distributed.       :class:`~ogpsa.optim.UpdateSpaceProjector`
                       ShardedProjector`                 (shard-local step, one all_reduce)
DeepSpeed ZeRO-0       :class:`~ogpsa.Projector` on      :class:`~ogpsa.optim.UpdateSpaceProjector`
                       the engine's torch optimizer      on the engine's torch AdamW
DeepSpeed ZeRO-1/2     :class:`~ogpsa.distributed.       :class:`~ogpsa.optim.distributed.
                       ZeroProjector`                    ZeroUpdateProjector`
ZeRO-3, FSDP1          UnsupportedSetupError             UnsupportedSetupError
=====================  ================================  ==========================================

The TRL trainers, the callback, :class:`ogpsa.OGPSA` and :func:`ogpsa.distributed.attach_deepspeed`
(the DeepSpeed rows, kept as a public name) all come here. Kept apart from
:mod:`ogpsa.projector`, :mod:`ogpsa.distributed` and :mod:`ogpsa.optim` so that none of them
imports another's caller.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from .config import OGPSAConfig
from .distributed import ShardedProjector, attach_deepspeed, is_dtensor
from .projector import Projector
from .subspace import Subspace


def is_deepspeed_engine(obj: Any) -> bool:
    """A DeepSpeed engine (by its class' module and its ZeRO stage method; DeepSpeed itself is
    never imported here)."""
    return type(obj).__module__.split(".")[0] == "deepspeed" and hasattr(obj, "zero_optimization_stage")


def attach(model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer], subspace: Subspace,
           config: Optional[OGPSAConfig] = None) -> Any:
    """Attach OGPSA: ``model``'s gradients (``space="gradient"``) or ``optimizer``'s update
    (``space="update"``) are projected off ``subspace`` once per ``optimizer.step()``; the
    table in the module docs picks the projector (every one implements
    :class:`ogpsa.interface.ProjectorLike`).

    ``config`` defaults to the subspace's config (mode, scope, backend, max_norm, space,
    allow_partial...). Every basis is validated here (a bad one raises now, not at the first
    step); the subspace must cover every trainable parameter unless ``allow_partial``
    (:class:`~ogpsa.SubspaceMismatchError`); a meta-device model, or an optimizer that
    already has a projector (either space), is an error naming it.

    Gradient space: parameters without a gradient are skipped, parameters without a basis (with
    ``allow_partial``) and parameters the optimizer steps outside the model still count towards
    clipping. Pass ``optimizer=None`` to call :meth:`Projector.project` or
    :meth:`Projector.clip_grad_norm_` yourself. Under DDP the averaged gradient is projected.

    Update space: see :func:`ogpsa.optim.attach_update_space` (AdamW / ProjectedAdamW).

    DeepSpeed: pass the ENGINE as ``model`` (``optimizer``: None or the engine's own).
    """
    from .presets import resolve_space  # space="auto" (preset rich): update if the optimizer supports it

    config = resolve_space(model, optimizer, config if config is not None else subspace.config)
    if is_deepspeed_engine(model):
        zero = getattr(model, "optimizer", None)
        if optimizer is not None and optimizer is not zero and optimizer is not getattr(zero, "optimizer", None):
            raise ValueError("ogpsa.attach(engine, optimizer, ...) under DeepSpeed: pass the engine's own optimizer "
                             "(or None); the projection hooks the optimizer inside the engine")
        return attach_deepspeed(model, subspace, config)
    if config.space == "update":
        from .optim import attach_update_space  # ogpsa.optim builds on the core; imported on use

        return attach_update_space(model, optimizer, subspace, config)
    if any(is_dtensor(p) for p in model.parameters()):
        return ShardedProjector(model, optimizer, subspace, config)
    return Projector(model, optimizer, subspace, config)
