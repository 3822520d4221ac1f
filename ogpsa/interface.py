"""The one interface every projector implements, in both spaces and every setup: gradient
(:class:`ogpsa.Projector`), update (:class:`ogpsa.optim.UpdateSpaceProjector`), FSDP2
(:class:`ogpsa.distributed.ShardedProjector`) and DeepSpeed ZeRO (gradient and update space).

A ``typing.Protocol`` (structural, ``runtime_checkable``): code that drives a projector (the
trainer integrations, the session) relies on these members only, and the conformance tests
check every projector class against it. Also the one-projector-per-optimizer claim, shared by
every projector that hooks an optimizer.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, ContextManager, Optional, Protocol, runtime_checkable

from torch import Tensor

from .stats import ProjectionStats


@runtime_checkable
class ProjectorLike(Protocol):
    """What every projector offers."""

    config: Any
    last_stats: Optional[ProjectionStats]
    num_projections: int

    @property
    def is_paused(self) -> bool:
        """True while projection is paused (a property: ``if proj.is_paused:`` reads it)."""

    def pause(self) -> None:
        """Stop projecting until :meth:`resume` (calls nest)."""

    def resume(self) -> None:
        """Undo one :meth:`pause`."""

    def paused(self) -> ContextManager[None]:
        """``with proj.paused():`` no projection inside the block."""

    def set_subspace(self, subspace: Any) -> None:
        """Use a new (refreshed) subspace from the next step on; validated here."""

    def project(self, max_norm: Optional[float] = None) -> Optional[ProjectionStats]:
        """Gradient space: project now. Update space: the step projects (clips only)."""

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False) -> Tensor:
        """Clip as ``torch.nn.utils.clip_grad_norm_`` would at this point of the step."""

    def remove(self) -> None:
        """Detach: later steps are not projected."""

    def state_dict(self) -> dict:
        """Counters and pause depth (the subspace is saved on its own, ``Subspace.save``)."""

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`."""


class PauseMixin:
    """``is_paused`` / ``pause`` / ``resume`` / ``paused()`` and the state dict, on a pause depth
    counter ``_paused`` (an int)."""

    _paused: int = 0
    num_projections: int = 0

    @property
    def is_paused(self) -> bool:
        return self._paused > 0

    def pause(self) -> None:
        self._paused += 1

    def resume(self) -> None:
        if self._paused <= 0:
            raise RuntimeError("resume() without a matching pause()")
        self._paused -= 1

    @contextlib.contextmanager
    def paused(self):
        """No projection inside this block (e.g. while collecting reference gradients)."""
        self.pause()
        try:
            yield
        finally:
            self.resume()

    def state_dict(self) -> dict:
        return {"num_projections": int(self.num_projections), "paused": int(self._paused)}

    def load_state_dict(self, state: dict) -> None:
        unknown = sorted(set(state) - {"num_projections", "paused"})
        if unknown:
            raise ValueError(f"projector state has unknown keys {unknown}")
        self.num_projections = int(state.get("num_projections", 0))
        self._paused = int(state.get("paused", 0))


def claim_optimizer(optimizer: Any, projector: Any) -> None:
    """One projector per optimizer, across both spaces: a second would project (or step) twice.
    Raises RuntimeError naming the projector already attached."""
    own = getattr(optimizer, "subspace", None) if hasattr(optimizer, "set_subspace") else None
    if own is not None and getattr(getattr(projector, "config", None), "space", "gradient") != "update":
        raise RuntimeError(f"this {type(optimizer).__name__} already projects its update with its own subspace; a "
                           f"gradient projector on top would project twice (moments from the projected gradient). "
                           f"Use one space: set_subspace(None) on it, or drop the gradient projector")
    ref = optimizer.__dict__.get("_ogpsa_projector")
    other = ref() if ref is not None else None
    if other is not None and other is not projector and getattr(other, "attached", True):
        raise RuntimeError(f"this {type(optimizer).__name__} already has an OGPSA projector attached "
                           f"({type(other).__name__}, space={getattr(other.config, 'space', '?')!r}); call .remove() "
                           f"on it before attaching another (two would project every step twice)")
    optimizer.__dict__["_ogpsa_projector"] = weakref.ref(projector)


def release_optimizer(optimizer: Any, projector: Any) -> None:
    """Undo :func:`claim_optimizer` (only if ``projector`` holds the claim)."""
    if optimizer is None:
        return
    ref = optimizer.__dict__.get("_ogpsa_projector")
    if ref is not None and ref() is projector:
        del optimizer.__dict__["_ogpsa_projector"]
