"""OGPSA for plain ``transformers.Trainer`` users: :class:`OGPSACallback`.

::

    from ogpsa.integrations.transformers import OGPSACallback

    trainer = Trainer(model=model, args=args, train_dataset=data,
                      callbacks=[OGPSACallback(reference_datasets=[general_a, general_b], tokenizer=tok)])
    trainer.train()

Limitation: a callback never gets the Trainer and runs after the Trainer has clipped the
gradients, so the callback projects in the optimizer's step pre-hook: clip -> project ->
step. The update is still exactly orthogonal to the subspace (with SGD), but the clipping
threshold applies to the gradient *before* projection, so steps can be shorter than
``max_grad_norm`` allows. For the exact order project -> clip -> step use
:class:`ogpsa.integrations.trl.OGPSATrainerMixin` (or the TRL trainers built on it), which
projects inside the Trainer's clipping method.

With ``OGPSAConfig(space="update")`` the order question does not arise: the Trainer clips
the raw gradient and the callback projects the AdamW direction inside ``optimizer.step``
(:func:`ogpsa.attach`; the Trainer's torch AdamW keeps its own state and ``state_dict``).

Otherwise the callback does what the trainers do, through the same :class:`ogpsa.OGPSA`
object (``callback.ogpsa``): builds the subspace before the first optimizer step (progress
bar unless ``disable_tqdm``), refreshes it every ``refresh_every`` optimizer steps, adds
``ogpsa/*`` metrics (including ``ogpsa/refresh_seconds`` and ``ogpsa/refresh_share``) to the
training logs, writes ``ogpsa_subspace.safetensors`` + ``ogpsa_state.json`` into every
checkpoint and, when training resumes from a checkpoint, restores it bit-identically.

Resume: ``Trainer.train(resume_from_checkpoint=...)`` passes the checkpoint path to no
callback, so the callback reads it from the Trainer's training loop (the
``resume_from_checkpoint`` argument of ``Trainer._inner_training_loop``, on the call stack of
``on_train_begin``): the basis and the refresh schedule come from the checkpoint being
resumed, wherever it lives (another run's ``output_dir`` included). An explicit
``OGPSACallback(resume_from_checkpoint=...)`` wins. When the Trainer resumes
(``global_step > 0``) and no ogpsa state is found, :meth:`ogpsa.OGPSA.setup` warns
(``UserWarning``) and builds a new basis at that step.
"""

from __future__ import annotations

import gc
import inspect
import os
from typing import Any, Callable, Optional, Sequence, Union

from ..config import OGPSAConfig
from ..ops import UnsupportedSetupError
from ..session import OGPSA
from ..subspace import Subspace
from .common import SFT_REFRESH_EVERY, tokenizer_of, trainer_reference_batch_size, unwrap_optimizer

try:
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("ogpsa.integrations.transformers needs transformers: pip install 'ogpsa[trl]'") from exc


def trainer_resume_checkpoint() -> Optional[str]:
    """The checkpoint directory the running ``transformers.Trainer`` resumes from, or None.

    The Trainer resolves ``train(resume_from_checkpoint=...)`` (``True``: the last checkpoint
    of ``output_dir``) and hands the path to ``_inner_training_loop``, which calls the
    callbacks' ``on_train_begin``; no callback argument carries it. Read it from that frame
    (only a frame whose ``self`` is a Trainer counts)."""
    from transformers import Trainer

    frame = inspect.currentframe()
    try:
        f = frame.f_back if frame is not None else None
        while f is not None:
            if f.f_code.co_name == "_inner_training_loop" and isinstance(f.f_locals.get("self"), Trainer):
                value = f.f_locals.get("resume_from_checkpoint")
                return os.fspath(value) if isinstance(value, (str, os.PathLike)) else None
            f = f.f_back
    finally:
        del frame  # break the frame reference cycle
    return None


class OGPSACallback(TrainerCallback):
    """Adds OGPSA to any ``transformers.Trainer`` (see the module docs for the clipping caveat).

    Args:
        config: projection settings (default ``OGPSAConfig()``; ``max_norm`` must be None).
            ``space="update"`` projects the Trainer's torch AdamW direction in its step.
        reference_datasets: general-capability datasets, one reference gradient each (formats:
            :mod:`ogpsa.collect`).
        refresh_every: rebuild every this many optimizer steps (default: ``config.refresh_every``
            if set there, else 30; 0: never).
        subspace: start from this subspace (object, file or directory) instead of building one.
        tokenizer: for text reference examples (default: the Trainer's ``processing_class``).
        loss_fn, num_samples: passed to :func:`~ogpsa.collect.collect_reference_gradients`.
        batch_size: collection batch size (default: ``config.reference_batch_size`` when set
            (not None), else the Trainer's ``per_device_train_batch_size``).
        progress: progress bar while collecting (default: on unless ``args.disable_tqdm``).
        resume_from_checkpoint: directory to restore the basis from; default: when the run
            resumes (``global_step > 0`` at train begin), the checkpoint the Trainer resumes
            from (see the module docs), else ``output_dir/checkpoint-<step>``.

    The run's :class:`ogpsa.OGPSA` object (the one hand-written loops use) is :attr:`ogpsa`.
    """

    def __init__(self, config: Optional[OGPSAConfig] = None, reference_datasets: Optional[Sequence[Any]] = None, *,
                 refresh_every: Optional[int] = None, subspace: Union[Subspace, str, os.PathLike, None] = None,
                 tokenizer: Any = None, loss_fn: Optional[Callable] = None, batch_size: Optional[int] = None,
                 num_samples: Optional[int] = None, progress: Optional[bool] = None,
                 resume_from_checkpoint: Optional[str] = None):
        # refresh_every unset here and in the config (None): the SFT default
        self.ogpsa = OGPSA.deferred(reference_datasets, config, refresh_every=refresh_every,
                                    default_refresh_every=SFT_REFRESH_EVERY, subspace=subspace, tokenizer=tokenizer,
                                    loss_fn=loss_fn, batch_size=batch_size, num_samples=num_samples,
                                    progress=progress)
        self._batch_size = batch_size
        self.resume_from_checkpoint = resume_from_checkpoint

    @property
    def projector(self):
        return self.ogpsa.projector

    @property
    def subspace(self) -> Optional[Subspace]:
        return self.ogpsa.subspace

    def on_train_begin(self, args, state, control, model=None, optimizer=None, processing_class=None, **kwargs):
        if getattr(getattr(args, "deepspeed_plugin", None), "deepspeed_config", None) or getattr(args, "deepspeed", None):
            raise UnsupportedSetupError("OGPSACallback does not support DeepSpeed yet (its engine clips and steps)")
        if model is None:
            raise RuntimeError("OGPSACallback.on_train_begin got no model from the Trainer")
        if unwrap_optimizer(optimizer) is None:
            raise RuntimeError("OGPSACallback needs a torch.optim.Optimizer to hook its step "
                               f"(got {type(optimizer).__name__}); use OGPSATrainerMixin instead")
        og = self.ogpsa
        if og.tokenizer is None:
            og.tokenizer = tokenizer_of(processing_class)
        og.batch_size = trainer_reference_batch_size(self._batch_size, og.config, args.per_device_train_batch_size)
        if og.progress is None:
            og.progress = not getattr(args, "disable_tqdm", False)
        resume = self.resume_from_checkpoint
        if resume is None and state.global_step > 0:
            resume = trainer_resume_checkpoint()
        if resume is None and state.global_step > 0:
            candidate = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            resume = candidate if os.path.isdir(candidate) else None
        og.start_clock()
        og.setup(model, optimizer, step=state.global_step, resume_dir=resume)
        self._run_before_reporters()

    def _run_before_reporters(self) -> None:
        """Move this callback to the front of the Trainer's callback list.

        The Trainer puts user callbacks after its reporting callbacks (TensorBoard, W&B,
        trackio...), and every ``on_log`` gets the same ``logs`` dict: only a callback that
        runs first can add ``ogpsa/*`` metrics that the reporters then write. A callback is
        never given its handler, so find the list that holds it. Moving an element that was
        already called to the front is safe during the handler's own iteration: the items
        after it keep their indices.
        """
        for holder in gc.get_referrers(self):
            if not isinstance(holder, list) or not any(c is self for c in holder):
                continue
            for owner in gc.get_referrers(holder):
                cbs = owner.get("callbacks") if isinstance(owner, dict) else getattr(owner, "callbacks", None)
                if cbs is holder and type(owner).__name__ in ("CallbackHandler", "dict"):
                    idx = next(i for i, c in enumerate(holder) if c is self)
                    if idx:
                        holder.insert(0, holder.pop(idx))
                    return

    def on_step_begin(self, args, state, control, **kwargs):
        self.ogpsa.maybe_refresh(state.global_step)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.ogpsa.record_latest()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs:
            return
        metrics = self.ogpsa.pop_metrics()
        logs.update(metrics)  # this callback runs first (see _run_before_reporters): reporters see these
        # The Trainer appended its copy of `logs` to the history before calling us.
        if state.log_history and state.log_history[-1].get("loss") == logs.get("loss"):
            state.log_history[-1].update(metrics)

    def on_save(self, args, state, control, **kwargs):
        if args.should_save and self.ogpsa.subspace is not None:
            self.ogpsa.step = state.global_step
            self.ogpsa.save_pretrained(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))

    def save(self, directory: str) -> None:
        """Write the current basis and schedule (``ogpsa_subspace.safetensors``, ``ogpsa_state.json``)."""
        self.ogpsa.save_pretrained(directory)

    def on_train_end(self, args, state, control, **kwargs):
        self.ogpsa.stop_clock()
        if self.ogpsa.projector is not None:
            # Leave the optimizer unhooked so later manual steps are not silently projected.
            self.ogpsa.projector.remove()
