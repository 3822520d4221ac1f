"""OGPSA trainers for TRL: :class:`OGPSASFTTrainer` and :class:`OGPSADPOTrainer`.

Drop-in subclasses of TRL's ``SFTTrainer`` / ``DPOTrainer`` that take an
:class:`~ogpsa.OGPSAConfig` and reference datasets::

    from ogpsa.integrations.trl import OGPSASFTTrainer

    trainer = OGPSASFTTrainer(model=model, args=SFTConfig(...), train_dataset=safety_data,
                              processing_class=tokenizer,
                              reference_datasets=[general_a, general_b])   # OGPSA
    trainer.train()

What they add (all in :class:`OGPSATrainerMixin`, usable with any ``transformers.Trainer``
subclass), through the same :class:`ogpsa.OGPSA` object hand-written loops use (``trainer.ogpsa``):

* Before the first optimizer step, the capability subspace is built from the reference
  gradients of the model being trained (after TRL wrapped it with PEFT: only trainable
  parameters get bases), and rebuilt every ``refresh_every`` optimizer steps (defaults from
  the original work: 30 for SFT, 5 for DPO). The collection follows the config's
  ``reference_averaging`` / ``reference_batch_size`` (batch size default: the train batch
  size) and shows a progress bar unless ``disable_tqdm`` is set.
* The projection runs inside the Trainer's gradient-clipping method, on the fully
  accumulated gradient, fused with the clipping: project -> clip -> optimizer step. With
  ``max_grad_norm=0`` it still projects (without clipping). With
  ``OGPSAConfig(space="update")`` and the Trainer's torch AdamW, the clipping method clips
  the raw gradient and the AdamW direction is projected inside ``optimizer.step``.
* ``ogpsa/removed_fraction`` (fraction of the gradient's squared norm removed),
  ``ogpsa/cosine`` (mean over projected tensors of ||removed part|| / ||gradient||: in
  ``orthogonal`` mode, the cosine between the raw gradient, i.e. the update without OGPSA,
  and the subspace), ``ogpsa/refreshes`` (since the last log), ``ogpsa/refresh_seconds``
  (cumulative since train begin) and ``ogpsa/refresh_share`` (refresh time / training time so
  far) are logged with the trainer's usual logs (so TensorBoard / W&B show them).
* ``save_model`` (and so every checkpoint) writes ``ogpsa_subspace.safetensors`` and
  ``ogpsa_state.json``; ``train(resume_from_checkpoint=...)`` restores the basis
  bit-identically and keeps the refresh schedule.
* SFT -> DPO: pass ``subspace=<SFT output dir or file>`` to the DPO trainer to start from
  the SFT stage's basis; it keeps refreshing every ``refresh_every`` steps.

Multi-GPU (docs/distributed.md):

* DDP (``accelerate launch`` / ``torchrun``): nothing changes; the Trainer's clipping step
  runs on the averaged gradient, so every rank projects the same gradient.
* DeepSpeed ZeRO-1/2: the engine reduces, clips and steps inside ``accelerator.backward``.
  The mixin attaches :func:`ogpsa.distributed.attach_deepspeed` to the engine, whose
  wrapped ZeRO optimizer step projects each rank's reduced gradient partition before
  DeepSpeed clips it (``gradient_clipping``, set from ``max_grad_norm``) and steps; the
  Trainer's own clipping method is left alone. Reference gradients are collected on the
  engine's module with ``torch.autograd.grad`` (DeepSpeed's post-accumulate gradient hooks
  would reduce ``backward`` gradients into the training partition). ZeRO-3: a clear error.
* FSDP: not supported by the trainers (a clear error); use a hand-written FSDP2 loop with
  :mod:`ogpsa.distributed`, or DDP / DeepSpeed ZeRO-2.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Callable, Optional, Sequence, Union

import torch

from ..config import OGPSAConfig
from ..ops import UnsupportedSetupError
from ..session import OGPSA
from ..subspace import Subspace
from .common import (
    DPO_REFRESH_EVERY,
    SFT_REFRESH_EVERY,
    tokenizer_of,
    trainer_reference_batch_size,
)

try:
    from transformers import TrainerCallback
    from transformers.trainer_utils import get_last_checkpoint
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("ogpsa.integrations.trl needs transformers and trl: pip install 'ogpsa[trl]'") from exc


class _EngineCallback(TrainerCallback):
    """Internal: gives the mixin the Trainer's train-begin/end, step-begin and optimizer-step events."""

    def __init__(self, trainer: OGPSATrainerMixin):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._ogpsa_setup()

    def on_step_begin(self, args, state, control, **kwargs):
        self.trainer._ogpsa_engine.maybe_refresh(state.global_step)

    def on_optimizer_step(self, args, state, control, **kwargs):
        # update space (space="update") projects inside optimizer.step: its statistics exist only now
        self.trainer._ogpsa_engine.record_latest()

    def on_train_end(self, args, state, control, **kwargs):
        self.trainer._ogpsa_engine.stop_clock()


class OGPSATrainerMixin:
    """Adds OGPSA to any ``transformers.Trainer`` subclass: put it first in the bases::

        class MyTrainer(OGPSATrainerMixin, Trainer):
            pass

        MyTrainer(model=..., args=..., train_dataset=..., reference_datasets=[...], ogpsa_config=...)

    Keyword arguments: see :class:`OGPSASFTTrainer`. ``refresh_every`` defaults to
    :attr:`ogpsa_default_refresh_every` (30) when neither it nor the config sets it. The run's
    :class:`ogpsa.OGPSA` object (the same one hand-written loops use) is :attr:`ogpsa`.
    """

    ogpsa_default_refresh_every = SFT_REFRESH_EVERY

    def __init__(self, *args: Any, ogpsa_config: Optional[OGPSAConfig] = None,
                 reference_datasets: Optional[Sequence[Any]] = None, refresh_every: Optional[int] = None,
                 subspace: Union[Subspace, str, os.PathLike, None] = None,
                 reference_loss_fn: Optional[Callable] = None, reference_batch_size: Optional[int] = None,
                 reference_num_samples: Optional[int] = None, reference_progress: Optional[bool] = None,
                 **kwargs: Any):
        targs = kwargs.get("args", args[1] if len(args) > 1 else None)
        if hasattr(targs, "to_ogpsa_config"):
            # OGPSASFTConfig / OGPSADPOConfig (ogpsa.integrations.trl_config): settings from the trainer's
            # own config, YAML or command line; explicit keyword arguments win.
            if ogpsa_config is None:
                ogpsa_config = targs.to_ogpsa_config()
            if subspace is None:
                subspace = targs.ogpsa_subspace
            if reference_datasets is None:
                reference_datasets = targs.ogpsa_reference_datasets()
            if reference_batch_size is None:
                reference_batch_size = targs.ogpsa_reference_batch_size
        self._ogpsa_prepare(ogpsa_config, reference_datasets, refresh_every, subspace, reference_loss_fn,
                            reference_batch_size, reference_num_samples, reference_progress)
        super().__init__(*args, **kwargs)
        self._ogpsa_finish()

    def _ogpsa_prepare(self, ogpsa_config: Optional[OGPSAConfig], reference_datasets: Optional[Sequence[Any]],
                       refresh_every: Optional[int], subspace: Union[Subspace, str, os.PathLike, None],
                       reference_loss_fn: Optional[Callable], reference_batch_size: Optional[int],
                       reference_num_samples: Optional[int], reference_progress: Optional[bool]) -> None:
        """Validate the OGPSA arguments (before the Trainer's slow dataset preparation)."""
        if ogpsa_config is not None and not isinstance(ogpsa_config, OGPSAConfig):
            raise TypeError(f"ogpsa_config must be an ogpsa.OGPSAConfig, got {type(ogpsa_config).__name__}")
        # refresh_every unset here and in the config: the stage's default (30 SFT, 5 DPO), never the config's
        self._ogpsa_engine = OGPSA.deferred(
            reference_datasets, ogpsa_config, refresh_every=refresh_every,
            default_refresh_every=self.ogpsa_default_refresh_every, subspace=subspace, loss_fn=reference_loss_fn,
            batch_size=reference_batch_size, num_samples=reference_num_samples, progress=reference_progress)
        self._ogpsa_batch_size = reference_batch_size
        self._ogpsa_resume_dir: Optional[str] = None
        self._ogpsa_clipped = False
        self._ogpsa_deepspeed = False

    def _ogpsa_finish(self) -> None:
        """After the Trainer's __init__: check the setup and register the step events."""
        if getattr(self, "is_deepspeed_enabled", False):
            stage = getattr(self.accelerator.state.deepspeed_plugin, "zero_stage", None)
            if stage == 3:
                raise UnsupportedSetupError(
                    "OGPSA trainers support DeepSpeed ZeRO stage 1 and 2, not stage 3 (ZeRO-3 partitions the "
                    "parameters, so the reference gradients and the basis would have to be sharded): set "
                    "zero_optimization.stage to 2 in the DeepSpeed config, or use DDP")
            self._ogpsa_deepspeed = True
            self._ogpsa_engine.grad_mode = "autograd"
        if getattr(self, "is_fsdp_enabled", False):
            raise UnsupportedSetupError(
                "OGPSA trainers do not support FSDP: the Trainer's FSDP path is not wired to OGPSA's sharded "
                "projector. Use DDP or DeepSpeed ZeRO-2 with these trainers, or a hand-written FSDP2 loop with "
                "ogpsa.distributed (docs/distributed.md)")
        if not hasattr(type(self), "_clip_grad_norm") or not hasattr(type(self), "_get_grad_norm"):
            warnings.warn("this transformers version has no overridable Trainer._clip_grad_norm: OGPSA projects in "
                          "the optimizer's step pre-hook, i.e. after gradient clipping", stacklevel=3)
        og = self._ogpsa_engine
        og.tokenizer = tokenizer_of(getattr(self, "processing_class", None))
        og.batch_size = trainer_reference_batch_size(self._ogpsa_batch_size, og.config,
                                                     self.args.per_device_train_batch_size)
        if og.progress is None:  # the Trainer's own switch for progress bars
            og.progress = not getattr(self.args, "disable_tqdm", False)
        self.add_callback(_EngineCallback(self))

    # -- public -----------------------------------------------------------------------------

    @property
    def ogpsa(self) -> OGPSA:
        """The run's :class:`ogpsa.OGPSA`: ``.subspace``, ``.projector``, ``.refresh_steps``,
        ``.last_collect``, ``.timing()``."""
        return self._ogpsa_engine

    @property
    def ogpsa_projector(self):
        return self._ogpsa_engine.projector

    # -- Trainer hooks ----------------------------------------------------------------------

    def train(self, resume_from_checkpoint: Union[str, bool, None] = None, *args: Any, **kwargs: Any):
        if isinstance(resume_from_checkpoint, bool) and resume_from_checkpoint:
            last = get_last_checkpoint(self.args.output_dir)
            # Resolve here so we know which directory's basis to restore; the Trainer does the same.
            resume_from_checkpoint = last if last is not None else resume_from_checkpoint
        self._ogpsa_resume_dir = resume_from_checkpoint if isinstance(resume_from_checkpoint, str) else None
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _ogpsa_setup(self) -> None:
        # After TRL's PEFT wrapping and accelerate's prepare: self.model holds the final parameters.
        og = self._ogpsa_engine
        og.start_clock()
        if self._ogpsa_deepspeed:
            from ..attaching import attach  # the attach table (DeepSpeed rows)

            ds_engine = self.model_wrapped
            if not hasattr(ds_engine, "zero_optimization_stage"):
                raise RuntimeError(f"DeepSpeed is enabled but the prepared model is a {type(ds_engine).__name__}, "
                                   "not a DeepSpeed engine")
            config = og.config
            og.setup(ds_engine.module, None, step=self.state.global_step, resume_dir=self._ogpsa_resume_dir,
                     attach_fn=lambda sub: attach(ds_engine, None, sub, config))
            return
        og.setup(self.model, self.optimizer, step=self.state.global_step, resume_dir=self._ogpsa_resume_dir)

    def _clip_grad_norm(self, model):
        proj = self._ogpsa_engine.projector
        if proj is None or self._ogpsa_deepspeed:
            # DeepSpeed: the step already ran (projected, then clipped by the engine); this only reads its norm.
            return super()._clip_grad_norm(model)
        self.accelerator.unscale_gradients()  # AMP fp16: project and clip the true gradients
        norm = proj.clip_grad_norm_(self.args.max_grad_norm)
        self._ogpsa_engine.record_latest()
        self._ogpsa_clipped = True
        return norm

    def _get_grad_norm(self, model, grad_norm=None):
        og = self._ogpsa_engine
        proj = og.projector
        if self._ogpsa_deepspeed:
            og.record_latest()  # DeepSpeed projected inside its step (during accelerator.backward)
            return super()._get_grad_norm(model, grad_norm=grad_norm)
        if proj is not None and not self._ogpsa_clipped:
            # max_grad_norm <= 0: the Trainer skipped clipping; project anyway, before the step.
            self.accelerator.unscale_gradients()
            proj.project(max_norm=None)
            og.record_latest()
            if grad_norm is None:
                # The base method would unscale again (an error under fp16 AMP): report the norm here.
                params = [p for p in model.parameters() if p.grad is not None]
                grad_norm = torch.nn.utils.clip_grad_norm_(params, float("inf")) if params else torch.zeros(())
        self._ogpsa_clipped = False
        return super()._get_grad_norm(model, grad_norm=grad_norm)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs:  # training logs only; evaluation logs keep their own keys
            logs.update(self._ogpsa_engine.pop_metrics())
        return super().log(logs, *args, **kwargs)

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call=_internal_call)
        og = self._ogpsa_engine
        if self.args.should_save and og.subspace is not None:
            og.step = self.state.global_step
            og.save_pretrained(output_dir or self.args.output_dir)


def _load_trl():
    try:
        import trl
    except ImportError as exc:  # pragma: no cover
        raise ImportError("ogpsa.integrations.trl needs trl: pip install 'ogpsa[trl]'") from exc
    return trl


_trl = _load_trl()


class OGPSASFTTrainer(OGPSATrainerMixin, _trl.SFTTrainer):
    """TRL ``SFTTrainer`` with OGPSA. Takes every ``SFTTrainer`` argument, plus:

    Args:
        ogpsa_config: projection settings (mode, scope, rank, basis dtype, backend...);
            default ``OGPSAConfig()``. Its ``max_norm`` must be None: clipping is
            ``args.max_grad_norm``.
        reference_datasets: a list of general-capability datasets, one reference gradient
            each (the original work: two sets, 200 examples each). Formats: see
            :mod:`ogpsa.collect` (text, prompt/completion, messages, preference pairs, ids).
        refresh_every: rebuild the subspace every this many optimizer steps (0: never).
            Default: ``ogpsa_config.refresh_every`` if set there, else the stage default (30 SFT, 5 DPO).
        subspace: start from this subspace (object, file, or directory with
            ``ogpsa_subspace.safetensors``) instead of building one at step 0.
        reference_loss_fn: ``fn(model, examples) -> mean loss``; default next-token loss.
        reference_batch_size: batch size of the collection (default: ``ogpsa_config.reference_batch_size``
            when set (not None), else the train batch size); with
            ``ogpsa_config.reference_averaging="batch"`` also the averaging unit.
        reference_num_samples: examples per reference set (default ``ogpsa_config.num_reference_samples``).
        reference_progress: progress bar while collecting (default: on unless ``args.disable_tqdm``).
    """

    ogpsa_default_refresh_every = SFT_REFRESH_EVERY
    _tag_names = [*getattr(_trl.SFTTrainer, "_tag_names", ["trl", "sft"]), "ogpsa"]  # model-card tags


class OGPSADPOTrainer(OGPSATrainerMixin, _trl.DPOTrainer):
    """TRL ``DPOTrainer`` with OGPSA. Same extra arguments as :class:`OGPSASFTTrainer`;
    ``refresh_every`` defaults to 5 (the original work's DPO setting) unless set here or in
    ``ogpsa_config.refresh_every``.

    The original DPO reference set is one set of preference pairs whose reference loss is
    the plain LM loss on the chosen and rejected sequences together: pass preference
    examples (``prompt``/``chosen``/``rejected``) in ``reference_datasets`` for that.
    On CPU (and whenever the policy is not a PEFT model and ``ref_model`` cannot be
    reloaded from a hub id) pass ``ref_model=`` explicitly.
    """

    ogpsa_default_refresh_every = DPO_REFRESH_EVERY
    _tag_names = [*getattr(_trl.DPOTrainer, "_tag_names", ["trl", "dpo"]), "ogpsa"]  # model-card tags


__all__ = ["OGPSATrainerMixin", "OGPSASFTTrainer", "OGPSADPOTrainer"]
