"""One object for OGPSA's subspace life cycle: :class:`OGPSA`.

Hand-written loops::

    import ogpsa

    og = ogpsa.OGPSA(model, optimizer, reference=[general_a, general_b], tokenizer=tok,
                     config=ogpsa.OGPSAConfig(refresh_every=30))   # builds the subspace now
    for batch in loader:
        model(**batch).loss.backward()
        optimizer.step()          # projected first; every refresh_every steps the basis is rebuilt
        optimizer.zero_grad()
    og.save_pretrained("out")     # basis + schedule; resume with OGPSA.from_pretrained("out", ...)

The projection runs in the optimizer's step pre-hook (:func:`ogpsa.attach`; or call
:meth:`OGPSA.clip_grad_norm_` before ``optimizer.step()`` to project and clip in one go), and
after every ``optimizer.step()`` the step count advances and, when it is a multiple of
``refresh_every``, the subspace is rebuilt from the model as it is then (reference collection
restores the loop's ``.grad`` tensors).

The trainer integrations use this same object: :class:`ogpsa.integrations.trl.OGPSATrainerMixin`
(and the TRL trainers built on it) and :class:`ogpsa.integrations.transformers.OGPSACallback`
create it with :meth:`OGPSA.deferred` (before the Trainer has its final, PEFT-wrapped model
and its optimizer), attach it at train begin with :meth:`OGPSA.setup`, and drive its schedule
with the Trainer's step counter (:meth:`OGPSA.maybe_refresh`); checkpoints hold the files
:meth:`OGPSA.save_pretrained` writes, so a trainer checkpoint loads with
:meth:`OGPSA.from_pretrained` and the other way round.

Refresh cost: :meth:`OGPSA.timing` reports the number of refreshes, their seconds and their
share of the time since training began; the trainers log it as ``ogpsa/refresh_seconds`` and
``ogpsa/refresh_share``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch

from . import atomic
from .attaching import attach
from .collect import CollectInfo, collect_reference_gradients
from .config import OGPSAConfig
from .integrations.common import (
    SFT_REFRESH_EVERY,
    STATE_FILE,
    SUBSPACE_FILE,
    ProjectionMetrics,
    load_subspace,
    unwrap_optimizer,
)
from .memory import log_basis_memory
from .state_file import STATE_VERSION as _STATE_VERSION
from .state_file import (
    StateFileError,
    check_pair,
    check_schedule,
    read_state,
    subspace_bytes,
    subspace_checksum,
    subspace_from_bytes,
    warn_not_restored,
)
from .subspace import Subspace

logger = logging.getLogger("ogpsa")

_WARMED_UP = False  # whether this process ran OGPSA._warm_up (lazy initialisation is process-wide)

class OGPSA:
    """Build, refresh, apply, time, save and restore OGPSA for one model + optimizer.

    Args:
        model: the model being trained (its trainable parameters get bases).
        optimizer: a ``torch.optim.Optimizer`` (or a wrapper with ``.optimizer``); its steps
            are projected and counted.
        reference: a list of general-capability datasets, one reference gradient each
            (formats: :mod:`ogpsa.collect`). Needed unless ``subspace`` is given and
            ``refresh_every`` is 0.
        config: projection settings (default ``OGPSAConfig()``); ``config.max_norm`` clips
            in the optimizer's pre-hook, fused with the projection. Its
            ``reference_averaging`` and ``reference_batch_size`` drive the collection.
        tokenizer: for text reference examples.
        subspace: start from this subspace (object, file or directory) instead of building.
        refresh_every: rebuild every this many optimizer steps (0: never). Default:
            ``config.refresh_every``, or 30 when that is None.
        loss_fn, num_samples: passed to the reference collection
            (:func:`~ogpsa.collect.collect_reference_gradients`).
        batch_size: collection batch size (default: ``config.reference_batch_size``).
        progress: progress bar while collecting (on by default).
    """

    def __init__(self, model: torch.nn.Module, optimizer: Any, reference: Optional[Sequence[Any]] = None,
                 config: Optional[OGPSAConfig] = None, *, tokenizer: Any = None,
                 subspace: Union[Subspace, str, os.PathLike, None] = None, refresh_every: Optional[int] = None,
                 loss_fn: Optional[Callable] = None, batch_size: Optional[int] = None,
                 num_samples: Optional[int] = None, progress: bool = True, _step: int = 0):
        inner = unwrap_optimizer(optimizer)
        if inner is None:
            raise TypeError(f"optimizer must be a torch.optim.Optimizer (or wrap one in .optimizer), "
                            f"got {type(optimizer).__name__}")
        self._configure(reference, config, refresh_every=refresh_every, default_refresh_every=SFT_REFRESH_EVERY,
                        subspace=subspace, tokenizer=tokenizer, loss_fn=loss_fn, batch_size=batch_size,
                        num_samples=num_samples, progress=progress)
        self.start_clock()
        self.setup(model, inner, step=_step)
        self._post_hook = inner.register_step_post_hook(self._after_step)

    @classmethod
    def deferred(cls, reference: Optional[Sequence[Any]] = None, config: Optional[OGPSAConfig] = None, *,
                 refresh_every: Optional[int] = None, default_refresh_every: int = SFT_REFRESH_EVERY,
                 subspace: Union[Subspace, str, os.PathLike, None] = None, tokenizer: Any = None,
                 loss_fn: Optional[Callable] = None, batch_size: Optional[int] = None,
                 num_samples: Optional[int] = None, progress: Optional[bool] = True) -> OGPSA:
        """An OGPSA for a host that clips and counts steps itself (a Trainer): arguments are
        validated now; nothing is built or attached until :meth:`setup`, and the schedule
        advances through :meth:`maybe_refresh` (no optimizer hook counts steps).
        ``config.max_norm`` must be None (the host's clipping is fused with the projection).
        ``refresh_every`` None: ``config.refresh_every``, else ``default_refresh_every``."""
        if isinstance(config, OGPSAConfig) and config.max_norm is not None:
            raise ValueError(f"ogpsa_config.max_norm={config.max_norm!r}: in a trainer, clipping is set by "
                             "TrainingArguments.max_grad_norm (it is fused with the projection); leave max_norm=None")
        og = cls.__new__(cls)
        og._configure(reference, config, refresh_every=refresh_every, default_refresh_every=default_refresh_every,
                      subspace=subspace, tokenizer=tokenizer, loss_fn=loss_fn, batch_size=batch_size,
                      num_samples=num_samples, progress=progress)
        return og

    def _configure(self, reference: Optional[Sequence[Any]], config: Optional[OGPSAConfig], *,
                   refresh_every: Optional[int], default_refresh_every: int,
                   subspace: Union[Subspace, str, os.PathLike, None], tokenizer: Any, loss_fn: Optional[Callable],
                   batch_size: Optional[int], num_samples: Optional[int], progress: Optional[bool]) -> None:
        if config is not None and not isinstance(config, OGPSAConfig):
            raise TypeError(f"config must be an ogpsa.OGPSAConfig, got {type(config).__name__}")
        config = config or OGPSAConfig()
        if refresh_every is None:
            refresh_every = config.refresh_every if config.refresh_every is not None else default_refresh_every
        if not isinstance(refresh_every, int) or isinstance(refresh_every, bool) or refresh_every < 0:
            raise ValueError(f"refresh_every={refresh_every!r} must be an integer >= 0")
        if reference is not None:
            if isinstance(reference, (str, dict)) or not isinstance(reference, (list, tuple)):
                raise TypeError("reference_datasets must be a list of datasets (wrap a single one in a list), "
                                f"got {type(reference).__name__}")
            if not reference:
                raise ValueError("reference_datasets is empty")
        if reference is None and (subspace is None or refresh_every):
            raise ValueError("OGPSA needs reference datasets (reference= / reference_datasets=) to build and refresh "
                             "the capability subspace (or pass subspace= with refresh_every=0)")
        if batch_size is not None and (not isinstance(batch_size, int) or isinstance(batch_size, bool)
                                       or batch_size < 1):
            raise ValueError(f"reference batch_size={batch_size!r} must be an integer >= 1")
        self.config = config.replace(refresh_every=refresh_every)
        self.reference_datasets = list(reference) if reference is not None else None
        self.refresh_every = refresh_every
        self.initial_subspace = load_subspace(subspace) if subspace is not None else None
        self.tokenizer = tokenizer
        self.loss_fn = loss_fn
        self.batch_size = batch_size
        self.num_samples = num_samples
        self.progress = progress
        self.grad_mode = "backward"  # "autograd" under DeepSpeed ZeRO-1/2 (see collect_reference_gradients)
        self.model: Optional[torch.nn.Module] = None
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.projector: Any = None
        self._subspace: Optional[Subspace] = None  # the basis in use (kept after the projector is removed)
        self.step = 0
        self.built_at: Optional[int] = None
        self.refresh_steps: list[int] = []
        self.last_collect: Optional[CollectInfo] = None
        self._post_hook: Any = None
        self._metrics = ProjectionMetrics()
        self._seen = 0
        self._interval_refreshes = 0
        self._refreshes = 0
        self._refresh_seconds = 0.0
        self._warmup_seconds = 0.0
        self._clock_start: Optional[float] = None
        self._clock_stop: Optional[float] = None

    # -- life cycle ----------------------------------------------------------------------------

    def setup(self, model: torch.nn.Module, optimizer: Any, step: int = 0, resume_dir: Optional[str] = None,
              attach_fn: Optional[Callable[[Subspace], Any]] = None) -> Any:
        """Before the first optimizer step: restore (``resume_dir``), take the initial subspace
        (at step 0), or build one; then attach a projector to the innermost torch optimizer
        (or to none), or whatever ``attach_fn(subspace)`` returns (e.g. a DeepSpeed
        :class:`~ogpsa.distributed.ZeroProjector`). Returns the projector."""
        self.model = model
        self.optimizer = unwrap_optimizer(optimizer) if optimizer is not None else None
        self.step = step
        logger.info(self.config.describe())  # which preset runs (one line at start)
        if self._clock_start is None:
            self.start_clock()
        if self.projector is not None:
            self.projector.remove()
            self.projector = None
        sub = None
        if resume_dir is not None:
            sub = self._load_checkpoint(resume_dir)
            if sub is None:
                warn_not_restored(step, f"checkpoint {os.fspath(resume_dir)!r} holds no {SUBSPACE_FILE}")
        elif step > 0:
            warn_not_restored(step, "no checkpoint directory with ogpsa state was found")
        if sub is None and self.initial_subspace is not None and step == 0:
            sub = self.initial_subspace
            self.built_at = 0
        if sub is None:
            with self._timed_refresh():
                sub = self.build(step)
                self.projector = self._attach(sub, attach_fn)
        else:
            self.projector = self._attach(sub, attach_fn)
        self._seen = self.projector.num_projections
        return self.projector

    def _attach(self, sub: Subspace, attach_fn: Optional[Callable[[Subspace], Any]]) -> Any:
        sub.check_model(self.model)
        self._subspace = sub
        log_basis_memory(self.model, sub, sharding="zero" if attach_fn is not None else None)  # attach_fn: DeepSpeed
        if attach_fn is not None:
            return attach_fn(sub)
        return attach(self.model, self.optimizer, sub, self.config)

    def build(self, step: Optional[int] = None) -> Subspace:
        """Collect reference gradients on the model now and build a subspace (projection
        paused; the model's ``.grad`` tensors untouched). Records ``step`` as its build step."""
        if self.reference_datasets is None:
            raise RuntimeError("cannot refresh the OGPSA subspace without reference_datasets")
        if self.model is None:
            raise RuntimeError("OGPSA.build needs a model: call setup(model, optimizer) first")
        step = self.step if step is None else step
        t0 = time.perf_counter()
        if self.config.chunks:  # rich subspaces: K chunk directions from a fresh slice of the pool
            from .pool import build_chunked

            sub, cinfo = build_chunked(self, step)
            self.last_collect = cinfo
            self.built_at = step
            self.refresh_steps.append(step)
            logger.info("ogpsa: subspace built at step %d in %.2fs (%s); %s", step, time.perf_counter() - t0,
                        cinfo, sub.memory_report())
            return sub
        num_samples = self.config.num_reference_samples if self.num_samples is None else self.num_samples
        grads, info = collect_reference_gradients(
            self.model, self.reference_datasets, num_samples=num_samples, batch_size=self.batch_size,
            loss_fn=self.loss_fn, tokenizer=self.tokenizer, projector=self.projector,
            progress=bool(self.progress), grad_mode=self.grad_mode, config=self.config)
        if not any(grads):
            raise ValueError("no trainable parameter received a reference gradient; check the reference data")
        sub = Subspace.from_gradients(grads, self.config)
        self.last_collect = info
        self.built_at = step
        self.refresh_steps.append(step)
        logger.info("ogpsa: subspace built at step %d in %.2fs (%s); %s", step, time.perf_counter() - t0, info,
                    sub.memory_report())
        return sub

    def refresh_due(self, step: int) -> bool:
        """Whether ``step`` is a refresh step (a multiple of ``refresh_every``, not yet built at)."""
        return bool(self.refresh_every) and step % self.refresh_every == 0 and step != self.built_at

    def maybe_refresh(self, step: Optional[int] = None) -> bool:
        """Rebuild the subspace if the step count (``step``, when given: a host's counter such as
        the Trainer's ``global_step``) is a refresh step. Returns whether it rebuilt."""
        if step is not None:
            self.step = step
        if self.projector is None or not self.refresh_due(self.step):
            return False
        with self._timed_refresh():
            sub = self.build(self.step)
            self.projector.set_subspace(sub)
            self._subspace = sub
        return True

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.step += 1
        self.record_latest()
        self.maybe_refresh()

    @property
    def subspace(self) -> Optional[Subspace]:
        """The basis in use (None before :meth:`setup`; kept after :meth:`remove`)."""
        current = getattr(self.projector, "subspace", None)
        return current if current is not None else self._subspace

    def _require_setup(self, what: str) -> None:
        if self.projector is None:
            raise RuntimeError(
                f"OGPSA.{what} before setup: this OGPSA has no projector yet (OGPSA.deferred(...) builds and "
                "attaches nothing until og.setup(model, optimizer), which the trainers and OGPSACallback call at "
                "train begin); call og.setup(model, optimizer) first, or create it with ogpsa.OGPSA(model, "
                "optimizer, ...)")

    def clip_grad_norm_(self, max_norm: float, **kwargs: Any) -> torch.Tensor:
        """Project and clip now (the optimizer's pre-hook then does not project again)."""
        self._require_setup("clip_grad_norm_")
        return self.projector.clip_grad_norm_(max_norm, **kwargs)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Steps inside this block are not projected (they are still counted)."""
        self._require_setup("paused")
        with self.projector.paused():
            yield

    def remove(self) -> None:
        """Unhook the optimizer: later steps are neither projected nor counted."""
        if self.projector is not None:
            self.projector.remove()
        if self._post_hook is not None:
            self._post_hook.remove()
            self._post_hook = None

    # -- metrics and timing ----------------------------------------------------------------------

    @contextmanager
    def _timed_refresh(self) -> Iterator[None]:
        self._warmup_seconds += self._warm_up()  # once per process, before the first timed build
        t0 = time.perf_counter()
        yield
        self._refresh_seconds += time.perf_counter() - t0
        self._refreshes += 1
        self._interval_refreshes += 1

    def _warm_up(self) -> float:
        """Once per process, before its first subspace build: a reference pass over one example
        per set and a basis from it (random state saved and restored, ``.grad`` untouched,
        result discarded). Lazy initialisation (backend selection and self-test, kernels,
        allocator, autograd) then lands here instead of in the first refresh, which otherwise
        reads 10x or more its steady cost. Returns its seconds (0.0 when already done)."""
        global _WARMED_UP
        if _WARMED_UP or self.reference_datasets is None or self.model is None:
            return 0.0
        _WARMED_UP = True
        t0 = time.perf_counter()
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=devices):
            grads, _ = collect_reference_gradients(
                self.model, self.reference_datasets, num_samples=1, batch_size=1, loss_fn=self.loss_fn,
                tokenizer=self.tokenizer, projector=self.projector, progress=False, grad_mode=self.grad_mode,
                config=self.config)
            if any(grads):
                Subspace.from_gradients(grads, self.config)
        return time.perf_counter() - t0

    def start_clock(self) -> None:
        """Start timing training now (refresh count and seconds restart at zero). The
        constructor starts it; trainers start it at train begin."""
        self._clock_start = time.perf_counter()
        self._clock_stop = None
        self._refreshes = 0
        self._refresh_seconds = 0.0
        self._warmup_seconds = 0.0

    def stop_clock(self) -> None:
        """Freeze the training time (trainers call it at train end)."""
        if self._clock_start is not None:
            self._clock_stop = time.perf_counter()

    def timing(self) -> dict[str, float]:
        """``refreshes`` (subspaces built since the clock started), ``refresh_seconds`` (their
        time: collection, basis, attach), ``train_seconds`` (since the clock started, until it
        stopped, less the warm-up), ``refresh_share`` (= refresh_seconds / train_seconds) and
        ``warmup_seconds`` (the one-off, per-process warm-up before the first build, counted in
        neither: see :meth:`_warm_up`)."""
        if self._clock_start is None:
            return {"refreshes": 0, "refresh_seconds": 0.0, "train_seconds": 0.0, "refresh_share": 0.0,
                    "warmup_seconds": 0.0}
        end = self._clock_stop if self._clock_stop is not None else time.perf_counter()
        total = max(end - self._clock_start - self._warmup_seconds, 0.0)
        share = min(self._refresh_seconds / total, 1.0) if total > 0 else 0.0
        return {"refreshes": self._refreshes, "refresh_seconds": self._refresh_seconds, "train_seconds": total,
                "refresh_share": share, "warmup_seconds": self._warmup_seconds}

    def timing_summary(self) -> str:
        """One line: refreshes, their seconds, and their share of training time (the one-off
        warm-up, when this object ran it, separately)."""
        t = self.timing()
        line = (f"ogpsa: {t['refreshes']} subspace refresh(es) took {t['refresh_seconds']:.2f}s of "
                f"{t['train_seconds']:.2f}s training ({100 * t['refresh_share']:.1f}%)")
        if t["warmup_seconds"] > 0:
            line += f"; one-off warm-up before the first build {t['warmup_seconds']:.2f}s, not counted"
        return line

    def record_latest(self) -> None:
        """Add the projector's latest projection to the metrics, once (a no-op when it has not
        projected since the last call)."""
        proj = self.projector
        if proj is None or proj.num_projections == self._seen:
            return
        self._seen = proj.num_projections
        self._metrics.record(proj.last_stats, proj.subspace)

    def pop_metrics(self) -> dict[str, float]:
        """Metrics for a log line: since the last call, mean ``ogpsa/removed_fraction`` and
        ``ogpsa/cosine`` and the number of ``ogpsa/refreshes``; cumulative since the clock
        started, ``ogpsa/refresh_seconds`` and ``ogpsa/refresh_share`` (refresh time / train time)."""
        out = self._metrics.pop()
        if self.projector is not None:
            t = self.timing()
            out["ogpsa/refreshes"] = float(self._interval_refreshes)
            out["ogpsa/refresh_seconds"] = t["refresh_seconds"]
            out["ogpsa/refresh_share"] = t["refresh_share"]
        self._interval_refreshes = 0
        return out

    # -- state -------------------------------------------------------------------------------

    def _schedule(self) -> dict:
        return {"version": _STATE_VERSION, "step": self.step, "built_at": self.built_at,
                "refresh_every": self.refresh_every, "refresh_steps": list(self.refresh_steps),
                "config": self.config.to_dict()}

    def _restore_schedule(self, schedule: dict) -> None:
        """Take step count, build step and refresh history from a schedule that
        :func:`check_schedule` accepted."""
        self.step = schedule["step"]
        self.built_at = schedule["built_at"]
        self.refresh_steps = list(schedule["refresh_steps"])

    def state_dict(self) -> dict:
        """Basis (the bytes of its safetensors file, as a uint8 tensor, so ``torch.load(weights_only=True)``
        reads it) and schedule (step count, step the basis was built at, refresh history)."""
        if self.subspace is None:
            self._require_setup("state_dict")
        buf = io.BytesIO()
        buf.write(subspace_bytes(self.subspace))
        return {"subspace": torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8),
                "schedule": json.dumps(self._schedule())}

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict`: the same basis bit for bit, and the schedule."""
        self._require_setup("load_state_dict")
        if not isinstance(state, dict) or "subspace" not in state or "schedule" not in state:
            raise ValueError("state must be a dict from OGPSA.state_dict() with keys 'subspace' and 'schedule'")
        try:
            schedule = json.loads(state["schedule"])
        except (TypeError, ValueError) as exc:
            raise StateFileError(f"state['schedule']: not valid JSON ({exc})") from exc
        check_schedule(schedule, "state['schedule']")
        sub = subspace_from_bytes(bytes(state["subspace"].numpy().tobytes()))
        sub.check_model(self.model)
        self.projector.set_subspace(sub)
        self._subspace = sub
        self._restore_schedule(schedule)

    def save_pretrained(self, directory: Union[str, os.PathLike]) -> None:
        """Write ``ogpsa_subspace.safetensors`` and ``ogpsa_state.json`` (what trainer checkpoints hold)."""
        if self.subspace is None:
            raise RuntimeError("OGPSA has no subspace yet (call setup first)")
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        # Each file is replaced atomically (ogpsa.atomic): a save killed half-way over an existing
        # checkpoint leaves every file whole; the schedule names its basis by checksum, so a new basis
        # next to the old schedule (killed between the two) is an error on load, not a silent mix.
        path = os.path.join(directory, SUBSPACE_FILE)
        self.subspace.save(path)
        atomic.write_json(os.path.join(directory, STATE_FILE),
                          dict(self._schedule(), subspace_sha256=subspace_checksum(path)))

    def _load_checkpoint(self, directory: str) -> Optional[Subspace]:
        """The subspace saved in ``directory`` (None if there is none); restores the schedule."""
        path = os.path.join(directory, SUBSPACE_FILE)
        if not os.path.isfile(path):
            return None
        state_path = os.path.join(directory, STATE_FILE)
        schedule = read_state(state_path) if os.path.isfile(state_path) else None
        if schedule is not None:
            check_pair(state_path, schedule, path)
        sub = Subspace.load(path)
        if schedule is not None:
            step = self.step
            if schedule["step"] != step:
                warnings.warn(f"ogpsa: {state_path} was saved at step {schedule['step']}, but training resumes at "
                              f"step {step}; the basis built at step {schedule['built_at']} is restored and the "
                              "refresh schedule continues from the resumed step", UserWarning, stacklevel=3)
            self._restore_schedule(schedule)
            self.step = step  # the host's step counter (the Trainer's global_step) is the authority
        return sub

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
            schedule = read_state(state_path)
            check_pair(state_path, schedule, path)
        if config is None and "config" in schedule:
            config = OGPSAConfig.from_dict(schedule["config"])
        if "refresh_every" in schedule and "refresh_every" not in kwargs and (config is None
                                                                              or config.refresh_every is None):
            kwargs["refresh_every"] = schedule["refresh_every"]
        og = cls(model, optimizer, reference, config, subspace=Subspace.load(path), **kwargs)
        if schedule:
            og._restore_schedule(schedule)
        return og

    def __repr__(self) -> str:
        return (f"OGPSA(step={self.step}, refresh_every={self.refresh_every}, built_at={self.built_at}, "
                f"subspace={self.subspace.memory_report() if self.subspace is not None else None})")


__all__ = ["OGPSA", "StateFileError", "read_state", "check_schedule"]
