"""Small pieces shared by :class:`ogpsa.OGPSA` and the trainer integrations (no TRL needed).

The subspace life cycle itself (build, refresh, attach, save/restore, timing) lives in one
object, :class:`ogpsa.OGPSA` (:mod:`ogpsa.session`); the TRL trainers
(:mod:`ogpsa.integrations.trl`) and the plain-Trainer callback
(:mod:`ogpsa.integrations.transformers`) drive that same object from Trainer events. This
module holds what they share: file names, stage defaults, optimizer/tokenizer unwrapping,
subspace loading, the reference batch-size rule and the projection-statistics accumulator.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Union

import torch

from ..config import OGPSAConfig
from ..ops import ProjectionStats
from ..subspace import Subspace

SUBSPACE_FILE = "ogpsa_subspace.safetensors"
"""Name of the basis file written into every checkpoint (and the final output directory)."""
STATE_FILE = "ogpsa_state.json"
"""Name of the small JSON file next to it: step count, the step the basis was built at, refresh history."""

SFT_REFRESH_EVERY = 30
"""Default refresh interval (optimizer steps) of the SFT stage, as in the original work."""
DPO_REFRESH_EVERY = 5
"""Default refresh interval (optimizer steps) of the DPO stage, as in the original work."""


def unwrap_optimizer(optimizer: Any) -> Optional[torch.optim.Optimizer]:
    """The innermost ``torch.optim.Optimizer`` (accelerate wraps it in ``.optimizer``), or None."""
    # AcceleratedOptimizer subclasses torch.optim.Optimizer without initialising it: always unwrap.
    for _ in range(8):
        inner = getattr(optimizer, "optimizer", None)
        if inner is None:
            break
        optimizer = inner
    ok = isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "_optimizer_step_pre_hooks")
    return optimizer if ok else None


def tokenizer_of(processing_class: Any) -> Any:
    """A text tokenizer from a tokenizer or a multimodal processor (``.tokenizer``)."""
    if processing_class is None:
        return None
    return getattr(processing_class, "tokenizer", None) or processing_class


def load_subspace(source: Union[Subspace, str, os.PathLike]) -> Subspace:
    """A :class:`Subspace` from an object, a ``.safetensors`` file, or a directory holding one."""
    if isinstance(source, Subspace):
        return source
    path = os.fspath(source)
    if os.path.isdir(path):
        path = os.path.join(path, SUBSPACE_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no OGPSA subspace at {os.fspath(source)!r} (expected a file written by "
                                f"Subspace.save or a directory holding {SUBSPACE_FILE})")
    return Subspace.load(path)


def trainer_reference_batch_size(explicit: Optional[int], config: OGPSAConfig,
                                 train_batch_size: Optional[int]) -> Optional[int]:
    """Reference-collection batch size inside a Trainer.

    ``explicit`` (the trainer's ``reference_batch_size`` argument) wins; else a
    ``config.reference_batch_size`` that is set (not None; returns None: the collection
    reads it from the config); else the Trainer's ``per_device_train_batch_size`` (what the
    original used for ``reference_averaging="batch"``, and a size known to fit in memory)."""
    if explicit is not None:
        return explicit
    if getattr(config, "reference_batch_size", None) is not None:
        return None
    return train_batch_size


class ProjectionMetrics:
    """Accumulates projection statistics between logging steps, on the device (no host sync
    on the training step): ``ogpsa/removed_fraction`` (fraction of the gradient's squared norm
    removed) and ``ogpsa/cosine`` (mean over tensors with a basis of ||removed|| / ||g||)."""

    def __init__(self) -> None:
        self._mask_key: Any = None
        self._mask: Optional[torch.Tensor] = None
        self.reset()

    def reset(self) -> None:
        self.count = 0
        self._removed: Any = 0.0
        self._cosine: Any = 0.0

    def record(self, stats: Optional[ProjectionStats], subspace: Optional[Subspace]) -> None:
        """Add one projection's statistics (``subspace``: the basis it used)."""
        if stats is None or subspace is None:
            return
        names = stats.names or []
        key = (tuple(names), id(subspace))
        if self._mask_key != key:
            ranks = subspace.ranks()
            self._mask = torch.tensor([ranks.get(n, 0) > 0 for n in names], dtype=torch.bool,
                                      device=stats.sq_before.device)
            self._mask_key = key
        before = stats.sq_before.float()
        removed = stats.removed_sq.float()
        total = before.sum()
        self._removed = self._removed + torch.where(total > 0, removed.sum() / total.clamp_min(1e-30),
                                                    torch.zeros_like(total))
        mask = self._mask
        if mask is not None and mask.numel() == before.numel():
            cos = (removed / before.clamp_min(1e-30)).clamp(0, 1).sqrt()
            n = mask.sum()
            self._cosine = self._cosine + torch.where(n > 0, (cos * mask).sum() / n.clamp_min(1),
                                                      torch.zeros_like(total))
        self.count += 1

    def pop(self) -> dict[str, float]:
        """Means since the last call (empty if nothing was recorded); resets."""
        out: dict[str, float] = {}
        if self.count:
            out["ogpsa/removed_fraction"] = float(self._removed) / self.count
            out["ogpsa/cosine"] = float(self._cosine) / self.count
        self.reset()
        return out
