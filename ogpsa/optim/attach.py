"""``attach_update_space``: what ``ogpsa.attach`` does for ``OGPSAConfig(space="update")``.

* a :class:`ProjectedAdamW`: it already projects its update; the projector only routes
  ``set_subspace`` / ``paused`` / statistics to it.
* a plain :class:`torch.optim.AdamW` (the HF/TRL Trainer's default): its own state and param
  groups are used, READ LIVE at every step (``state_dict`` stays torch AdamW's; its
  ``load_state_dict`` before or after attach, LR schedulers and ``add_param_group`` act exactly
  as on torch AdamW). A step pre-hook runs the projected AdamW step on them
  (:meth:`ProjectedAdamW._projected_step` through a :class:`LiveAdamW` whose ``param_groups``,
  ``state`` and ``defaults`` are the optimizer's attributes, looked up at every access; no copy
  is held), then hides the gradients from AdamW's own step so that it changes nothing;
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

Clipping (``clip_grad_norm_``, or ``OGPSAConfig.max_norm``) clips the raw gradient by its global
norm, which then feeds the moments: exactly ``clip_grad_norm_`` followed by AdamW.
One projector per optimizer across both spaces: a second attach raises, naming the first.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..config import OGPSAConfig
from ..errors import BackendUnavailableError
from ..interface import PauseMixin, claim_optimizer, release_optimizer
from ..ops import requested_backend
from ..stats import ProjectionStats
from ..subspace import Subspace
from .adamw import ProjectedAdamW
from .distributed import check_supported
from .rule import UpdateRule, match_bases, registered_rules, rule_for, rule_step


class LiveAdamW(ProjectedAdamW):
    """The projected AdamW step on a user's :class:`torch.optim.AdamW`: ``param_groups``,
    ``state`` and ``defaults`` are properties that read the optimizer's attributes at every
    access (``load_state_dict`` replaces those objects; nothing stale is ever held). States are
    created exactly as torch AdamW creates them (parameter dtype), so its ``state_dict`` is
    unchanged."""

    def __init__(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module, config: OGPSAConfig) -> None:
        # no Optimizer.__init__: this object has no param_groups or state of its own
        self.__dict__["_target"] = optimizer
        self._init_projection(model, config, project_weight_decay=False, fp32_states=False, keep_updates=False)

    @property
    def param_groups(self) -> list:  # type: ignore[override]
        return self._target.param_groups

    @param_groups.setter
    def param_groups(self, value: list) -> None:
        self._target.param_groups = value

    @property
    def state(self):  # type: ignore[override]
        return self._target.state

    @state.setter
    def state(self, value) -> None:
        self._target.state = value

    @property
    def defaults(self) -> dict:  # type: ignore[override]
        return self._target.defaults


class _HidesGradients:
    """For projectors that run the projected step in the optimizer's step pre-hook: the
    gradients are then hidden, so that the optimizer's own step (torch optimizers skip
    parameters without a gradient) changes nothing, and the post-hook gives them back."""

    _hidden: dict

    def _hide_gradients(self, optimizer: torch.optim.Optimizer) -> None:
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


class UpdateSpaceProjector(PauseMixin, _HidesGradients):
    """Projector for ``space="update"`` (:class:`ogpsa.interface.ProjectorLike`, as
    :class:`ogpsa.Projector`); the projection itself happens in the optimizer step."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, subspace: Subspace,
                 config: OGPSAConfig) -> None:
        self.model, self.optimizer, self.config = model, optimizer, config
        self._handles: list = []
        self._hidden: dict = {}
        self._attached = False
        self._paused = 0
        if isinstance(optimizer, ProjectedAdamW):
            if (optimizer.subspace is not None and optimizer.subspace is not subspace
                    and optimizer.__dict__.get("_ogpsa_projector") is None):
                raise RuntimeError("this ProjectedAdamW already projects with its own subspace; call "
                                   "set_subspace(None) on it before attaching a projector")
            engine = optimizer
        else:
            engine = LiveAdamW(optimizer, model, config)
        claim_optimizer(optimizer, self)  # before any change: a second projector raises here
        try:
            if engine is optimizer and optimizer.ogpsa_config is None:
                optimizer.ogpsa_config = config
            engine.set_subspace(subspace, model)
        except BaseException:
            release_optimizer(optimizer, self)
            raise
        self.engine = engine
        self._attached = True
        if engine is not optimizer:
            self._handles = [optimizer.register_step_pre_hook(self._pre_step),
                             optimizer.register_step_post_hook(self._post_step)]

    @property
    def attached(self) -> bool:
        return self._attached

    def pause(self) -> None:
        super().pause()
        self.engine.paused = True

    def resume(self) -> None:
        super().resume()
        self.engine.paused = self._paused > 0

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.engine.num_projections = self.num_projections
        self.engine.paused = self._paused > 0

    # -- hooks on a plain AdamW -------------------------------------------------------------

    def _pre_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        if any(a is not None for a in args[1:]) or kwargs.get("closure") is not None:  # args[0]: the optimizer
            raise RuntimeError("ogpsa space='update' on torch.optim.AdamW does not support step(closure); "
                               "call the closure yourself before step(), or use ogpsa.optim.ProjectedAdamW")
        self.engine._projected_step()
        self._hide_gradients(optimizer)

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

    @num_projections.setter
    def num_projections(self, value: int) -> None:
        if "engine" in self.__dict__:
            self.engine.num_projections = int(value)

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
        update-space projection acts later, on the Adam direction), parameters outside the model
        included."""
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not params:
            return torch.zeros(())
        return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type=norm_type,
                                              error_if_nonfinite=error_if_nonfinite)

    def remove(self) -> None:
        """Stop projecting (a ProjectedAdamW keeps running as plain AdamW)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self.engine.set_subspace(None)
        self._attached = False
        release_optimizer(self.optimizer, self)


class RuleUpdateProjector(PauseMixin, _HidesGradients):
    """Update space for an optimizer with a rule in :mod:`ogpsa.optim.rules` (e.g.
    ``torch.optim.SGD``), on the torch backend: a step pre-hook runs :func:`rule_step` on the
    optimizer's LIVE ``param_groups`` and ``state`` (keys as the torch optimizer's) and hides the
    gradients from its own step; the post-hook gives them back. Same surface as every projector
    (:class:`ogpsa.interface.ProjectorLike`)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, subspace: Subspace,
                 config: OGPSAConfig, rule: UpdateRule) -> None:
        name = requested_backend(config.backend)
        if name not in ("auto", "torch"):
            raise BackendUnavailableError(f"space='update' with {type(optimizer).__name__} (rule {rule.name!r}) runs "
                                          f"on the torch backend only; backend {name!r} was requested (config.backend "
                                          f"or OGPSA_BACKEND)")
        for group in optimizer.param_groups:
            rule.check_group(group)
        self.model, self.optimizer, self.config, self.rule = model, optimizer, config, rule
        self.last_stats: Optional[ProjectionStats] = None
        self._paused = 0
        self._hidden: dict = {}
        self._handles: list = []
        self._count = 0
        self.subspace: Optional[Subspace] = None
        claim_optimizer(optimizer, self)
        try:
            self.set_subspace(subspace)
        except BaseException:
            release_optimizer(optimizer, self)
            raise
        self._handles = [optimizer.register_step_pre_hook(self._pre_step),
                         optimizer.register_step_post_hook(self._post_step)]

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    @property
    def num_projections(self) -> int:
        return self._count

    @num_projections.setter
    def num_projections(self, value: int) -> None:
        self._count = int(value)

    def _params(self) -> list:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def set_subspace(self, subspace: Subspace) -> None:
        """Match ``subspace`` to the optimizer's parameters (validated; on error nothing changes)."""
        params = self._params()
        bases = match_bases(self.model, subspace, params, allow_partial=bool(self.config.allow_partial))
        self.subspace, self._bases, self._signature = subspace, bases, tuple(map(id, params))

    def _pre_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        if any(a is not None for a in args[1:]) or kwargs.get("closure") is not None:
            raise RuntimeError(f"ogpsa space='update' on {type(optimizer).__name__} does not support step(closure); "
                               f"call the closure yourself before step()")
        if not self.is_paused:
            if tuple(map(id, self._params())) != self._signature:  # add_param_group, load onto other params
                self.set_subspace(self.subspace)
            if self.config.max_norm is not None:
                self.clip_grad_norm_(float(self.config.max_norm))
        cfg = self.config
        stats = rule_step(self.rule, optimizer.param_groups, optimizer.state, self._bases, mode=cfg.mode,
                          scope=cfg.scope, aligned_scale=float(cfg.aligned_scale), paused=self.is_paused)
        if stats is not None:
            self.last_stats = stats
            self._count += 1
        self._hide_gradients(optimizer)

    def project(self, max_norm: Optional[float] = None) -> None:
        """Nothing to do on the gradient (the step projects); clips the raw gradient with ``max_norm``."""
        if max_norm is not None:
            self.clip_grad_norm_(max_norm)
        return None

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False,
                        **_: Any) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_`` over every gradient the optimizer steps (the raw gradient)."""
        params = [p for p in self._params() if p.grad is not None]
        if not params:
            return torch.zeros(())
        return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type=norm_type,
                                              error_if_nonfinite=error_if_nonfinite)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        release_optimizer(self.optimizer, self)


def attach_update_space(model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer], subspace: Subspace,
                        config: Optional[OGPSAConfig] = None) -> Any:
    """Update-space OGPSA on ``optimizer`` (a :class:`ProjectedAdamW` or a plain
    :class:`torch.optim.AdamW`: an :class:`UpdateSpaceProjector`, single process, DDP, FSDP2; an
    optimizer with a rule in :mod:`ogpsa.optim.rules`, e.g. ``torch.optim.SGD``: a
    :class:`RuleUpdateProjector`, torch backend);
    see the module docs. A DeepSpeed engine goes through :func:`ogpsa.attach` (the attach
    table, :mod:`ogpsa.attaching`) and raises here. Other optimizers raise ValueError."""
    config = config if config is not None else getattr(subspace, "config", None) or OGPSAConfig(space="update")
    if optimizer is None:
        raise ValueError("ogpsa.attach(space='update') projects the optimizer's update and needs the optimizer: "
                         "pass the torch.optim.AdamW (or an ogpsa.optim.ProjectedAdamW)")
    check_supported(model, optimizer)
    rule = rule_for(optimizer)  # the rule registry (ogpsa/optim/rules/): AdamW, SGD, ...
    if rule is None:
        known = ["ogpsa.optim.ProjectedAdamW"] + [
            f"{c.__module__}.{c.__name__}" for r in registered_rules() for c in r.optimizer_types]
        raise ValueError(f"ogpsa space='update' has no rule for {type(optimizer).__name__} (rules: {', '.join(known)}): "
                         f"use space='gradient' for it, or add a rule in ogpsa/optim/rules/")
    for group in optimizer.param_groups:
        rule.check_group(group)
    if not getattr(rule, "fused", False):
        return RuleUpdateProjector(model, optimizer, subspace, config, rule)
    return UpdateSpaceProjector(model, optimizer, subspace, config)
