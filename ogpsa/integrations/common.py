"""The part of the trainer integrations that does not depend on TRL or on the Trainer class.

:class:`OGPSAEngine` owns the subspace life cycle of one training run: build it (or load
it) before the first optimizer step, refresh it every ``refresh_every`` optimizer steps,
attach the :class:`~ogpsa.Projector`, accumulate projection statistics between logging
steps, and save/restore ``ogpsa_subspace.safetensors`` (+ ``ogpsa_state.json``) in a
checkpoint directory. The TRL trainers (:mod:`ogpsa.integrations.trl`) and the plain
Trainer callback (:mod:`ogpsa.integrations.transformers`) are thin layers over it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Callable, Optional, Sequence, Union

import torch

from ..attaching import attach
from ..collect import CollectInfo, collect_reference_gradients
from ..config import OGPSAConfig
from ..ops import ProjectionStats
from ..projector import Projector
from ..subspace import Subspace

logger = logging.getLogger("ogpsa")

SUBSPACE_FILE = "ogpsa_subspace.safetensors"
"""Name of the basis file written into every checkpoint (and the final output directory)."""
STATE_FILE = "ogpsa_state.json"
"""Name of the small JSON file next to it: the step the basis was built at, refresh history."""

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


class OGPSAEngine:
    """Subspace life cycle of one run; see the module docs.

    Args:
        config: the projection settings; ``config.max_norm`` must be None (the trainer's
            ``max_grad_norm`` does the clipping, fused with the projection).
        reference_datasets: reference datasets for :func:`~ogpsa.collect.collect_reference_gradients`.
            May be None when ``subspace`` is given and ``refresh_every`` is 0.
        refresh_every: rebuild every this many optimizer steps (0: never after the first).
        subspace: an initial :class:`~ogpsa.Subspace` (or a path to a saved one, or a
            directory holding ``ogpsa_subspace.safetensors``) used at step 0 instead of
            building one; e.g. the basis saved by an SFT stage for a DPO stage.
        tokenizer, loss_fn, batch_size, num_samples, progress: passed to the collection.
    """

    def __init__(self, config: OGPSAConfig, reference_datasets: Optional[Sequence[Any]], *, refresh_every: int,
                 subspace: Union[Subspace, str, os.PathLike, None] = None, tokenizer: Any = None,
                 loss_fn: Optional[Callable] = None, batch_size: int = 8, num_samples: Optional[int] = None,
                 progress: bool = True):
        if not isinstance(config, OGPSAConfig):
            raise TypeError(f"ogpsa_config must be an ogpsa.OGPSAConfig, got {type(config).__name__}")
        if config.max_norm is not None:
            raise ValueError(f"ogpsa_config.max_norm={config.max_norm!r}: in a trainer, clipping is set by "
                             "TrainingArguments.max_grad_norm (it is fused with the projection); leave max_norm=None")
        if not isinstance(refresh_every, int) or isinstance(refresh_every, bool) or refresh_every < 0:
            raise ValueError(f"refresh_every={refresh_every!r} must be an integer >= 0")
        if reference_datasets is not None:
            if isinstance(reference_datasets, (str, dict)) or not isinstance(reference_datasets, (list, tuple)):
                raise TypeError("reference_datasets must be a list of datasets (wrap a single one in a list), "
                                f"got {type(reference_datasets).__name__}")
            if not reference_datasets:
                raise ValueError("reference_datasets is empty")
        if reference_datasets is None and (subspace is None or refresh_every):
            raise ValueError("OGPSA needs reference_datasets to build and refresh the capability subspace "
                             "(or pass subspace= with refresh_every=0)")
        self.config = config
        self.reference_datasets = list(reference_datasets) if reference_datasets is not None else None
        self.refresh_every = refresh_every
        self.initial_subspace = load_subspace(subspace) if subspace is not None else None
        self.tokenizer = tokenizer
        self.loss_fn = loss_fn
        self.batch_size = batch_size
        self.num_samples = config.num_reference_samples if num_samples is None else num_samples
        self.progress = progress
        self.grad_mode = "backward"  # "autograd" under DeepSpeed ZeRO-1/2 (see collect_reference_gradients)
        self.projector: Optional[Projector] = None
        self.model: Optional[torch.nn.Module] = None
        self.built_at: Optional[int] = None
        self.refresh_steps: list[int] = []   # steps at which a basis was built in this process
        self.last_collect: Optional[CollectInfo] = None
        self._reset_metrics()

    # -- subspace ---------------------------------------------------------------------------

    def build(self, model: torch.nn.Module, step: int) -> Subspace:
        """Collect reference gradients on ``model`` now and build a subspace (projection paused)."""
        if self.reference_datasets is None:
            raise RuntimeError("cannot refresh the OGPSA subspace without reference_datasets")
        t0 = time.perf_counter()
        grads, info = collect_reference_gradients(
            model, self.reference_datasets, num_samples=self.num_samples, batch_size=self.batch_size,
            loss_fn=self.loss_fn, tokenizer=self.tokenizer, projector=self.projector, progress=self.progress,
            grad_mode=self.grad_mode)
        if not any(grads):
            raise ValueError("no trainable parameter received a reference gradient; check the reference data")
        sub = Subspace.from_gradients(grads, self.config)
        seconds = time.perf_counter() - t0
        self.last_collect = info
        self.built_at = step
        self.refresh_steps.append(step)
        self._refresh_seconds += seconds
        self._refreshes += 1
        logger.info("ogpsa: subspace built at step %d in %.2fs (%s); %s", step, seconds, info, sub.memory_report())
        return sub

    def setup(self, model: torch.nn.Module, optimizer: Any, step: int = 0,
              resume_dir: Optional[str] = None,
              attach_fn: Optional[Callable[[Subspace], Projector]] = None) -> Projector:
        """Before the first optimizer step: restore (resume), take the initial subspace, or build one.

        Attaches a projector to the innermost torch optimizer (its step pre-hook projects
        only if the trainer has not already projected this step), or to none; or, with
        ``attach_fn``, whatever ``attach_fn(subspace)`` returns (e.g. a DeepSpeed
        :class:`~ogpsa.distributed.ZeroProjector`)."""
        self.model = model
        sub = None
        if resume_dir is not None:
            sub = self.load(resume_dir)
            if sub is None:
                logger.warning("ogpsa: checkpoint %s holds no %s; building a new subspace", resume_dir, SUBSPACE_FILE)
        if sub is None and self.initial_subspace is not None and step == 0:
            sub = self.initial_subspace
            self.built_at = 0
        if sub is None:
            sub = self.build(model, step)
        sub.check_model(model)
        if self.projector is not None:
            self.projector.remove()
        if attach_fn is not None:
            self.projector = attach_fn(sub)
        else:
            self.projector = attach(model, unwrap_optimizer(optimizer), sub, self.config)
        return self.projector

    def refresh_due(self, step: int) -> bool:
        return bool(self.refresh_every) and step % self.refresh_every == 0 and step != self.built_at

    def maybe_refresh(self, step: int) -> bool:
        """Rebuild the subspace if ``step`` is a refresh step (a multiple of ``refresh_every``)."""
        if self.projector is None or not self.refresh_due(step):
            return False
        self.projector.set_subspace(self.build(self.model, step))
        return True

    @property
    def subspace(self) -> Optional[Subspace]:
        return self.projector.subspace if self.projector is not None else None

    # -- statistics -------------------------------------------------------------------------

    def _reset_metrics(self) -> None:
        self._n = 0
        self._removed: Any = 0.0  # device tensors between logs: no host sync on the training step
        self._cosine: Any = 0.0
        self._refresh_seconds = 0.0
        self._refreshes = 0

    def record(self, stats: Optional[ProjectionStats]) -> None:
        """Accumulate one projection's statistics until the next :meth:`pop_metrics`."""
        if stats is None or self.projector is None:
            return
        names = stats.names or []
        key = tuple(names)
        if getattr(self, "_mask_key", None) != (key, id(self.projector.subspace)):
            ranks = self.projector.subspace.ranks()
            self._mask = torch.tensor([ranks.get(n, 0) > 0 for n in names], dtype=torch.bool,
                                      device=stats.sq_before.device)
            self._mask_key = (key, id(self.projector.subspace))
        before = stats.sq_before.float()
        removed = stats.removed_sq.float()
        total = before.sum()
        self._removed = self._removed + torch.where(total > 0, removed.sum() / total.clamp_min(1e-30),
                                                    torch.zeros_like(total))
        mask = self._mask
        if mask.numel() == before.numel():
            cos = (removed / before.clamp_min(1e-30)).clamp(0, 1).sqrt()
            count = mask.sum()
            self._cosine = self._cosine + torch.where(count > 0, (cos * mask).sum() / count.clamp_min(1),
                                                      torch.zeros_like(total))
        self._n += 1

    def pop_metrics(self) -> dict[str, float]:
        """Mean ``ogpsa/removed_fraction`` and ``ogpsa/cosine`` over the steps since the last
        call, plus the refresh time and count; resets the accumulators."""
        out: dict[str, float] = {}
        if self._n:
            out["ogpsa/removed_fraction"] = float(self._removed) / self._n
            out["ogpsa/cosine"] = float(self._cosine) / self._n
        if self._refreshes or self._n:
            out["ogpsa/refresh_seconds"] = self._refresh_seconds
            out["ogpsa/refreshes"] = float(self._refreshes)
        self._reset_metrics()
        return out

    # -- persistence ------------------------------------------------------------------------

    def save(self, directory: str) -> None:
        """Write ``ogpsa_subspace.safetensors`` and ``ogpsa_state.json`` into ``directory``."""
        if self.subspace is None:
            return
        os.makedirs(directory, exist_ok=True)
        self.subspace.save(os.path.join(directory, SUBSPACE_FILE))
        state = {"built_at": self.built_at, "refresh_every": self.refresh_every,
                 "refresh_steps": self.refresh_steps, "config": self.config.to_dict()}
        with open(os.path.join(directory, STATE_FILE), "w") as f:
            json.dump(state, f, indent=2)

    def load(self, directory: str) -> Optional[Subspace]:
        """The subspace saved in ``directory`` (None if there is none); restores ``built_at``."""
        path = os.path.join(directory, SUBSPACE_FILE)
        if not os.path.isfile(path):
            return None
        sub = Subspace.load(path)
        state_path = os.path.join(directory, STATE_FILE)
        if os.path.isfile(state_path):
            with open(state_path) as f:
                self.built_at = json.load(f).get("built_at")
        return sub


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
