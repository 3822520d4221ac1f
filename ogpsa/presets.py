"""Presets at run time: which space ``space="auto"`` means for a given optimizer, and the
start-of-run log line that says which preset runs.

``space="auto"`` (preset ``"rich"``) projects the optimizer's update when the optimizer supports
it (torch AdamW without fused/capturable/differentiable, :class:`ogpsa.optim.ProjectedAdamW`,
an optimizer with an update-space rule in :mod:`ogpsa.optim.rules` such as ``torch.optim.SGD``,
a DeepSpeed engine whose ZeRO optimizer holds a torch AdamW) and otherwise falls back to
gradient space with one warning naming the optimizer. This is a fallback, not an error: the rich
preset's directions still cut forgetting in gradient space (docs/demo/rich-gradient/table.md, arm
``rich-gradient``: -69 % in SFT, -65 % in DPO vs plain at matched refusal, against -98 % in update
space and -5 % / -4 % for the paper's recipe), so gradient space is the best available choice
there. An explicit ``space="update"`` with such an optimizer still raises.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Optional

import torch

from .config import OGPSAConfig

logger = logging.getLogger("ogpsa")


def update_space_reason(model: Any, optimizer: Any) -> Optional[str]:
    """None when update space can project ``optimizer``'s steps; otherwise why not."""
    from .optim import ProjectedAdamW
    from .optim.distributed import is_deepspeed_object

    if is_deepspeed_object(model) and hasattr(model, "zero_optimization_stage"):
        zero = getattr(model, "optimizer", None)
        inner = getattr(zero, "optimizer", zero)
        if isinstance(inner, torch.optim.AdamW):
            return None
        return f"the DeepSpeed engine's optimizer is {type(inner).__name__}, not torch.optim.AdamW"
    if optimizer is None:
        return "no optimizer was given (update space projects the optimizer's step)"
    if isinstance(optimizer, ProjectedAdamW):
        return None
    if not isinstance(optimizer, torch.optim.AdamW):
        from .optim.rule import rule_for  # optimizers with an update-space rule (ogpsa/optim/rules/), e.g. SGD

        if rule_for(optimizer) is not None:
            return None
        return f"the optimizer is {type(optimizer).__name__}, neither AdamW nor one with an update-space rule"
    for group in optimizer.param_groups:
        for key in ("fused", "capturable", "differentiable"):
            if group.get(key):
                return f"the AdamW has {key}=True"
    return None


def resolve_space(model: Any, optimizer: Any, config: OGPSAConfig) -> OGPSAConfig:
    """``config`` with ``space="auto"`` replaced by ``"update"`` or (with a warning) ``"gradient"``."""
    if config.space != "auto":
        return config
    why = update_space_reason(model, optimizer)
    if why is None:
        return config.replace(space="update")
    msg = (f"ogpsa: preset {config.preset!r} projects in update space, but {why}: falling back to gradient space "
           "(pass space='gradient' to silence this, or train with torch.optim.AdamW / ogpsa.optim.ProjectedAdamW)")
    logger.warning(msg)
    warnings.warn(msg, stacklevel=3)
    return config.replace(space="gradient")


def log_preset(config: OGPSAConfig) -> str:
    """Log (INFO, logger ``ogpsa``) and return the one line saying which preset runs."""
    line = config.describe()
    logger.info(line)
    return line


__all__ = ["resolve_space", "update_space_reason", "log_preset"]
