"""``attach_update_space``: what ``ogpsa.attach`` does for ``OGPSAConfig(space="update")``.

* a :class:`ProjectedAdamW`: it already projects its update; the projector only routes
  ``set_subspace`` / ``paused`` / statistics to it.
* a plain :class:`torch.optim.AdamW` (the HF/TRL Trainer's default): its own state and param
  groups are kept (``state_dict`` stays torch AdamW's). A step pre-hook runs the projected AdamW
  step on them (:meth:`ProjectedAdamW._projected_step` through a view sharing ``param_groups``
  and ``state``), then hides the gradients from AdamW's own step so that it changes nothing;
  the post-hook gives the gradients back. Hooks fire inside ``optimizer.step`` whatever wraps
  it (LR schedulers, accelerate, GradScaler's ``scaler.step``, which skips the step on inf).
* anything else: a clear error (project the gradient, or use ProjectedAdamW).

Multi-GPU: DDP needs nothing (the hooks run after DDP's averaging). FSDP2 (``fully_shard``,
DTensor parameters): the step runs on each rank's shards with one all_reduce of the pass-1 dots
per step (:mod:`ogpsa.optim.distributed`); ``subspace`` may be full or a
:class:`~ogpsa.distributed.ShardedSubspace`. DeepSpeed ZeRO-1/2: pass the ENGINE as ``model``
(:func:`ogpsa.distributed.attach_deepspeed` then hooks the torch AdamW inside its ZeRO optimizer,
:class:`~ogpsa.optim.distributed.ZeroUpdateProjector`); a ZeRO optimizer next to a plain model,
and FSDP1, raise :class:`~ogpsa.errors.UnsupportedSetupError`.

Clipping (``clip_grad_norm_``) clips the raw gradient, which then feeds the moments.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import torch

from ..config import OGPSAConfig
from ..stats import ProjectionStats
from ..subspace import Subspace
from .adamw import ProjectedAdamW
from .distributed import check_supported, is_deepspeed_object


def _shadow(optimizer: torch.optim.AdamW, model: torch.nn.Module, config: OGPSAConfig) -> ProjectedAdamW:
    """A ProjectedAdamW view of ``optimizer``: the same param_groups list and state dict."""
    view = ProjectedAdamW.__new__(ProjectedAdamW)
    view.param_groups = optimizer.param_groups
    view.state = optimizer.state
    view.defaults = optimizer.defaults
    # states exactly as torch AdamW creates them (param dtype), so its state_dict is unchanged
    view._init_projection(model, config, project_weight_decay=False, fp32_states=False, keep_updates=False)
    return view


class UpdateSpaceProjector:
    """Projector for ``space="update"``: same surface as :class:`ogpsa.Projector`
    (``set_subspace``, ``subspace``, ``paused``, ``remove``, ``project``, ``clip_grad_norm_``,
    ``last_stats``, ``num_projections``); the projection itself happens in the optimizer step."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, subspace: Subspace,
                 config: OGPSAConfig) -> None:
        self.model, self.optimizer, self.config = model, optimizer, config
        self._handles: list = []
        self._hidden: dict = {}
        if isinstance(optimizer, ProjectedAdamW):
            self.engine = optimizer
            if optimizer.ogpsa_config is None:
                optimizer.ogpsa_config = config
        else:
            self.engine = _shadow(optimizer, model, config)
            self._handles = [optimizer.register_step_pre_hook(self._pre_step),
                             optimizer.register_step_post_hook(self._post_step)]
        self.engine.set_subspace(subspace, model)

    # -- hooks on a plain AdamW -------------------------------------------------------------

    def _pre_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        if any(a is not None for a in args[1:]) or kwargs.get("closure") is not None:  # args[0]: the optimizer
            raise RuntimeError("ogpsa space='update' on torch.optim.AdamW does not support step(closure); "
                               "call the closure yourself before step(), or use ogpsa.optim.ProjectedAdamW")
        self.engine._projected_step()
        # AdamW skips parameters without a gradient: its own step becomes a no-op.
        self._hidden = {}
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._hidden[p] = p.grad
                    p.grad = None

    def _post_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        for p, g in self._hidden.items():
            p.grad = g
        self._hidden = {}

    # -- Projector surface ------------------------------------------------------------------

    @property
    def subspace(self) -> Optional[Subspace]:
        return self.engine.subspace

    @property
    def last_stats(self) -> Optional[ProjectionStats]:
        return self.engine.last_stats

    @property
    def num_projections(self) -> int:
        return self.engine.num_projections

    def set_subspace(self, subspace: Subspace) -> None:
        self.engine.set_subspace(subspace, self.model)

    def project(self, max_norm: Optional[float] = None) -> None:
        """Nothing to do on the gradient in update space (the step projects); clips the raw
        gradient when ``max_norm`` is given. Returns None (statistics come after the step)."""
        if max_norm is not None:
            self.clip_grad_norm_(max_norm)
        return None

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False,
                        **_: Any) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_`` over the optimizer's gradients (the RAW gradient:
        update-space projection acts later, on the Adam direction)."""
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not params:
            return torch.zeros(())
        return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type=norm_type,
                                              error_if_nonfinite=error_if_nonfinite)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        previous = self.engine.paused
        self.engine.paused = True
        try:
            yield
        finally:
            self.engine.paused = previous

    def is_paused(self) -> bool:
        return bool(self.engine.paused)

    def remove(self) -> None:
        """Stop projecting (a ProjectedAdamW keeps running as plain AdamW)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self.engine.set_subspace(None)


def attach_update_space(model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer], subspace: Subspace,
                        config: Optional[OGPSAConfig] = None) -> Any:
    """Update-space OGPSA on ``optimizer`` (a :class:`ProjectedAdamW` or a plain
    :class:`torch.optim.AdamW`): an :class:`UpdateSpaceProjector`, or for a DeepSpeed engine as
    ``model`` a :class:`~ogpsa.optim.distributed.ZeroUpdateProjector`; see the module docs.
    Other optimizers raise ValueError."""
    config = config if config is not None else getattr(subspace, "config", None) or OGPSAConfig(space="update")
    if is_deepspeed_object(model) and hasattr(model, "zero_optimization_stage"):  # a DeepSpeed engine
        from ..distributed.deepspeed import attach_deepspeed

        zero = getattr(model, "optimizer", None)
        if optimizer is not None and optimizer is not zero and optimizer is not getattr(zero, "optimizer", None):
            raise ValueError("ogpsa.attach(engine, optimizer, ...) under DeepSpeed: pass the engine's own optimizer "
                             "(or None); the projection hooks the AdamW inside the engine's ZeRO optimizer")
        return attach_deepspeed(model, subspace, config if config.space == "update" else config.replace(space="update"))
    if optimizer is None:
        raise ValueError("ogpsa.attach(space='update') projects the optimizer's update and needs the optimizer: "
                         "pass the torch.optim.AdamW (or an ogpsa.optim.ProjectedAdamW)")
    check_supported(model, optimizer)
    if not isinstance(optimizer, (ProjectedAdamW, torch.optim.AdamW)):
        raise ValueError(f"ogpsa space='update' supports torch.optim.AdamW and ogpsa.optim.ProjectedAdamW, not "
                         f"{type(optimizer).__name__}: use space='gradient' for it, or train with "
                         f"ogpsa.optim.ProjectedAdamW")
    for group in optimizer.param_groups:
        for key in ("fused", "capturable", "differentiable"):
            if group.get(key):
                raise ValueError(f"ogpsa space='update': the AdamW has {key}=True, which the projected step "
                                 f"does not support; create it with {key}=False")
    return UpdateSpaceProjector(model, optimizer, subspace, config)
