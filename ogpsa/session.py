"""One object for hand-written training loops: :class:`OGPSA`.

::

    import ogpsa

    og = ogpsa.OGPSA(model, optimizer, reference=[general_a, general_b], tokenizer=tok,
                     config=ogpsa.OGPSAConfig(refresh_every=30))   # builds the subspace now
    for batch in loader:
        model(**batch).loss.backward()
        optimizer.step()          # projected first; every refresh_every steps the basis is rebuilt
        optimizer.zero_grad()
    og.save_pretrained("out")     # basis + schedule; resume with OGPSA.from_pretrained("out", ...)

It is the same subspace life cycle the trainer integrations run
(:class:`ogpsa.integrations.common.OGPSAEngine`: build, refresh, attach, save/load), driven by
the optimizer's own step hooks instead of trainer callbacks: the projection runs in the
optimizer's step pre-hook (:func:`ogpsa.attach`; or call :meth:`OGPSA.clip_grad_norm_` before
``optimizer.step()`` to project and clip in one go), and after every ``optimizer.step()`` the
step count advances and, when it is a multiple of ``refresh_every``, the subspace is rebuilt
from the model as it is then (reference collection restores the loop's ``.grad`` tensors).
"""

from __future__ import annotations

import io
import json
import os
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch

from .config import OGPSAConfig
from .integrations.common import SFT_REFRESH_EVERY, STATE_FILE, SUBSPACE_FILE, OGPSAEngine, unwrap_optimizer
from .subspace import Subspace

_STATE_VERSION = 1


class OGPSA:
    """Build, refresh, apply, save and restore OGPSA for one model + optimizer.

    Args:
        model: the model being trained (its trainable parameters get bases).
        optimizer: a ``torch.optim.Optimizer`` (or a wrapper with ``.optimizer``); its steps
            are projected and counted.
        reference: a list of general-capability datasets, one reference gradient each
            (formats: :mod:`ogpsa.collect`). Needed unless ``subspace`` is given and
            ``refresh_every`` is 0.
        config: projection settings (default ``OGPSAConfig()``); ``config.max_norm`` clips
            in the optimizer's pre-hook, fused with the projection.
        tokenizer: for text reference examples.
        subspace: start from this subspace (object, file or directory) instead of building.
        refresh_every: rebuild every this many optimizer steps (0: never). Default:
            ``config.refresh_every``, or 30 when that is None.
        loss_fn, batch_size, num_samples: passed to the reference collection.
        progress: progress bar while collecting (on by default).
    """

    def __init__(self, model: torch.nn.Module, optimizer: Any, reference: Optional[Sequence[Any]] = None,
                 config: Optional[OGPSAConfig] = None, *, tokenizer: Any = None,
                 subspace: Union[Subspace, str, os.PathLike, None] = None, refresh_every: Optional[int] = None,
                 loss_fn: Optional[Callable] = None, batch_size: Optional[int] = None,
                 num_samples: Optional[int] = None, progress: bool = True, _step: int = 0):
        if config is not None and not isinstance(config, OGPSAConfig):
            raise TypeError(f"config must be an ogpsa.OGPSAConfig, got {type(config).__name__}")
        config = config or OGPSAConfig()
        if refresh_every is None:
            refresh_every = config.refresh_every if config.refresh_every is not None else SFT_REFRESH_EVERY
        inner = unwrap_optimizer(optimizer)
        if inner is None:
            raise TypeError(f"optimizer must be a torch.optim.Optimizer (or wrap one in .optimizer), "
                            f"got {type(optimizer).__name__}")
        config = config.replace(refresh_every=refresh_every)
        if batch_size is None:
            batch_size = getattr(config, "reference_batch_size", 8)
        # The engine validates with max_norm=None (trainers clip themselves); a loop clips in the pre-hook.
        self.engine = OGPSAEngine(config.replace(max_norm=None), reference, refresh_every=refresh_every,
                                  subspace=subspace, tokenizer=tokenizer, loss_fn=loss_fn, batch_size=batch_size,
                                  num_samples=num_samples, progress=progress)
        self.engine.config = config
        self.model = model
        self.optimizer = inner
        self.step = _step
        self.engine.setup(model, inner, step=_step)
        self._post_hook = inner.register_step_post_hook(self._after_step)

    # -- schedule ----------------------------------------------------------------------------

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.step += 1
        self.engine.maybe_refresh(self.step)

    @property
    def refresh_every(self) -> int:
        return self.engine.refresh_every

    @property
    def built_at(self) -> Optional[int]:
        """The optimizer step the current basis was built at."""
        return self.engine.built_at

    @property
    def refresh_steps(self) -> list[int]:
        """Steps at which a basis was built (in this process, plus restored history)."""
        return self.engine.refresh_steps

    @property
    def projector(self):
        return self.engine.projector

    @property
    def subspace(self) -> Subspace:
        return self.engine.subspace

    def clip_grad_norm_(self, max_norm: float, **kwargs: Any) -> torch.Tensor:
        """Project and clip now (the optimizer's pre-hook then does not project again)."""
        return self.engine.projector.clip_grad_norm_(max_norm, **kwargs)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Steps inside this block are not projected (they are still counted)."""
        with self.engine.projector.paused():
            yield

    def remove(self) -> None:
        """Unhook the optimizer: later steps are neither projected nor counted."""
        self.engine.projector.remove()
        self._post_hook.remove()

    # -- state -------------------------------------------------------------------------------

    def _schedule(self) -> dict:
        return {"version": _STATE_VERSION, "step": self.step, "built_at": self.built_at,
                "refresh_every": self.refresh_every, "refresh_steps": list(self.refresh_steps),
                "config": self.engine.config.to_dict()}

    def state_dict(self) -> dict:
        """Basis (the bytes of its safetensors file, as a uint8 tensor, so ``torch.load(weights_only=True)``
        reads it) and schedule (step count, step the basis was built at, refresh history)."""
        buf = io.BytesIO()
        _save_subspace_to(self.subspace, buf)
        return {"subspace": torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8),
                "schedule": json.dumps(self._schedule())}

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict`: the same basis bit for bit, and the schedule."""
        if not isinstance(state, dict) or "subspace" not in state or "schedule" not in state:
            raise ValueError("state must be a dict from OGPSA.state_dict() with keys 'subspace' and 'schedule'")
        schedule = json.loads(state["schedule"])
        sub = _load_subspace_from(bytes(state["subspace"].numpy().tobytes()))
        sub.check_model(self.model)
        self.engine.projector.set_subspace(sub)
        self._restore_schedule(schedule)

    def _restore_schedule(self, schedule: dict) -> None:
        self.step = int(schedule["step"])
        self.engine.built_at = schedule.get("built_at")
        self.engine.refresh_steps = list(schedule.get("refresh_steps", []))

    def save_pretrained(self, directory: Union[str, os.PathLike]) -> None:
        """Write ``ogpsa_subspace.safetensors`` and ``ogpsa_state.json`` (the trainers' checkpoint files)."""
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        self.subspace.save(os.path.join(directory, SUBSPACE_FILE))
        with open(os.path.join(directory, STATE_FILE), "w") as f:
            json.dump(self._schedule(), f, indent=2)

    @classmethod
    def from_pretrained(cls, directory: Union[str, os.PathLike], model: torch.nn.Module, optimizer: Any,
                        reference: Optional[Sequence[Any]] = None, config: Optional[OGPSAConfig] = None,
                        **kwargs: Any) -> OGPSA:
        """Resume from :meth:`save_pretrained` (or a trainer checkpoint): the saved basis, step count and
        schedule; ``config`` defaults to the saved one. Pass ``reference`` to keep refreshing."""
        directory = os.fspath(directory)
        path = os.path.join(directory, SUBSPACE_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no {SUBSPACE_FILE} in {directory!r} (write one with OGPSA.save_pretrained)")
        schedule: dict = {}
        state_path = os.path.join(directory, STATE_FILE)
        if os.path.isfile(state_path):
            with open(state_path) as f:
                schedule = json.load(f)
        if config is None and "config" in schedule:
            config = OGPSAConfig.from_dict(schedule["config"])
        if "refresh_every" in schedule and "refresh_every" not in kwargs and (config is None
                                                                              or config.refresh_every is None):
            kwargs["refresh_every"] = schedule["refresh_every"]
        og = cls(model, optimizer, reference, config, subspace=Subspace.load(path), **kwargs)
        if schedule:
            schedule.setdefault("step", schedule.get("built_at") or 0)
            og._restore_schedule(schedule)
        return og

    def __repr__(self) -> str:
        return (f"OGPSA(step={self.step}, refresh_every={self.refresh_every}, built_at={self.built_at}, "
                f"subspace={self.subspace.memory_report() if self.subspace is not None else None})")


def _save_subspace_to(sub: Subspace, buf: io.BytesIO) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, SUBSPACE_FILE)
        sub.save(path)
        with open(path, "rb") as f:
            buf.write(f.read())


def _load_subspace_from(data: bytes) -> Subspace:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, SUBSPACE_FILE)
        with open(path, "wb") as f:
            f.write(data)
        return Subspace.load(path)


__all__ = ["OGPSA"]
