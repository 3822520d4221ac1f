"""``ProjectedAdamW``: AdamW whose final update is projected off the capability subspace.

Update-space projection (DESIGN.md, "Update space"): Adam divides every element by its own
sqrt(v), so projecting the *gradient* leaves the applied update with a component in the
subspace. Here the moments come from the raw gradient and the Adam direction itself is
projected, per tensor (or over one whole-model subspace):

    d = m_hat / (sqrt(v_hat) + eps);  w = M^+ U d;  d <- d - U^T w;  p <- p - lr d

(M^+: the rank-revealing float64 pseudo-inverse of M = U U^T, :func:`ogpsa.plan.gram_pinv`; the
mode rule of :mod:`ogpsa.modes` for the other modes). float64 parameters are stepped in float64.
``param_groups`` and ``state`` are read at every step (nothing is cached from them except the
bases, matched again when the parameter list changes: ``add_param_group``); the subspace must
cover every trainable parameter stepped unless ``OGPSAConfig.allow_partial``
(:class:`~ogpsa.SubspaceMismatchError`); ``OGPSAConfig.max_norm`` clips the raw gradient by its
global norm before the moments (``clip_grad_norm_`` then AdamW).

It is a subclass of :class:`torch.optim.AdamW`: same hyperparameters, param groups,
``state_dict`` keys (``step``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``), LR schedulers
and GradScaler (``scaler.step(opt)`` unscales, skips on inf/NaN, else calls :meth:`step`).
Gradient clipping (``clip_grad_norm_`` before ``step``) clips the raw gradient, which feeds
the moments; gradient accumulation needs nothing special (the step sees the summed gradient).
The math of one step is :func:`ogpsa.reference.projected_adamw_step_`.

Multi-GPU: under DDP the step sees the averaged, replicated gradient (nothing special). Under
FSDP2 (``fully_shard``: DTensor parameters) each rank steps its own shards with its slice of
every basis and the pass-1 dots are summed with one all_reduce per step
(:mod:`ogpsa.optim.distributed`). DeepSpeed ZeRO-1/2 runs its own optimizer on flat fp32
partitions: attach through the engine (``ogpsa.distributed.attach_deepspeed(engine, subspace,
OGPSAConfig(space="update"))``), which projects the step of the AdamW inside it with the same
one all_reduce. FSDP1, ZeRO-3 and a ProjectedAdamW stepped by ZeRO without that attach raise
:class:`~ogpsa.errors.UnsupportedSetupError` naming what to use instead.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch import Tensor

from ..config import OGPSAConfig
from ..distributed.layout import is_dtensor
from ..errors import UnsupportedSetupError
from ..stats import ProjectionStats
from ..subspace import Subspace
from .distributed import DEEPSPEED_MESSAGE, check_supported, has_dtensor, shard_bases, sharded_step
from .functional import StepHyper, projected_step
from .rule import match_bases

_LOW_PRECISION = (torch.bfloat16, torch.float16)


class ProjectedAdamW(torch.optim.AdamW):
    """Drop-in :class:`torch.optim.AdamW` with update-space OGPSA projection.

    Args:
        params: parameters or param groups, as for AdamW; or an ``nn.Module`` (its trainable
            parameters, and the module is used as ``model``).
        subspace: the capability subspace (bases by parameter name); None runs plain AdamW
            until :meth:`set_subspace`.
        lr, betas, eps, weight_decay, amsgrad, maximize: as :class:`torch.optim.AdamW`
            (``foreach`` is accepted and ignored; ``fused``, ``capturable`` and
            ``differentiable`` are refused with a clear error).
        model: the module whose ``named_parameters()`` names match the subspace (required
            with a subspace unless ``params`` is the module).
        config: mode (orthogonal/conflict/plane/threshold), scope (tensor/global) and
            aligned_scale of the projection; default: the subspace's config.
        project_weight_decay: False (default): decoupled decay ``p <- p (1 - lr wd)`` as in
            AdamW, applied outside the projection, so the applied update is orthogonal to the
            subspace only up to that shrink of p along itself. True: the decay is added to the
            direction before projecting (``d + wd p`` projected together), so the WHOLE applied
            update is orthogonal to the subspace; the decay then no longer shrinks the part
            of p inside the subspace.
        fp32_states: keep exp_avg/exp_avg_sq in float32 for bf16/fp16 parameters (default
            True; also restored in float32 by :meth:`load_state_dict`). False: states in the
            parameter's dtype, exactly as torch's AdamW.
        keep_updates: remember the last applied float32 direction per parameter in
            ``last_updates`` (for tests and analysis; costs one fp32 copy of the model; under
            FSDP2 each rank keeps its flattened local shard of it).
    """

    def __init__(self, params: Union[Iterable[Any], torch.nn.Module], subspace: Optional[Subspace] = None,
                 lr: Union[float, Tensor] = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 foreach: Optional[bool] = None, fused: Optional[bool] = None, capturable: bool = False,
                 differentiable: bool = False, model: Optional[torch.nn.Module] = None,
                 config: Optional[OGPSAConfig] = None, project_weight_decay: bool = False,
                 fp32_states: bool = True, keep_updates: bool = False) -> None:
        if fused:
            raise ValueError("ProjectedAdamW: fused=True is not supported (the projected step is its own fused "
                             "kernel); leave fused=None")
        if capturable or differentiable:
            raise ValueError("ProjectedAdamW: capturable=True / differentiable=True are not supported")
        if isinstance(params, torch.nn.Module):
            model = params if model is None else model
            params = [p for p in params.parameters() if p.requires_grad]
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         maximize=maximize, foreach=None)
        self._init_projection(model, config, project_weight_decay, fp32_states, keep_updates)
        if subspace is not None:
            self.set_subspace(subspace)

    # -- projection state (also set up by :func:`ogpsa.optim.attach_update_space` on a converted AdamW) --

    def _init_projection(self, model: Optional[torch.nn.Module], config: Optional[OGPSAConfig],
                         project_weight_decay: bool, fp32_states: bool, keep_updates: bool) -> None:
        self.model = model
        self.ogpsa_config = config
        self.project_weight_decay = bool(project_weight_decay)
        self.fp32_states = bool(fp32_states)
        self.keep_updates = bool(keep_updates)
        self.subspace: Optional[Subspace] = None
        self._bases: dict[Tensor, tuple] = {}
        self._process_group = None  # FSDP2: the group the pass-1 dots are summed over
        self._signature: tuple = ()  # the optimizer's parameters the bases were matched against, in order
        self.paused = False
        self.last_updates: dict[Tensor, Tensor] = {}
        self.last_stats: Optional[ProjectionStats] = None
        self.num_projections = 0

    def set_subspace(self, subspace: Optional[Subspace], model: Optional[torch.nn.Module] = None) -> None:
        """Use ``subspace`` from the next step on (None: plain AdamW). Every basis is checked
        against its parameter here; on error nothing changes.

        FSDP2 (DTensor parameters): ``subspace`` is a full :class:`~ogpsa.Subspace` (each rank
        keeps its slice of every basis, cut here once) or a
        :class:`~ogpsa.distributed.ShardedSubspace` sliced for this model."""
        model = model if model is not None else self.model
        if subspace is None:
            self.subspace, self._bases, self._process_group = None, {}, None
            self._signature = ()
            return
        if model is None:
            raise ValueError("ProjectedAdamW: a subspace is matched to parameters by name; pass model= "
                             "(or the module itself as params)")
        check_supported(model)
        params = [p for g in self.param_groups for p in g["params"]]
        mine = set(params)
        if mine and not any(p in mine for p in model.parameters()):
            raise UnsupportedSetupError("ProjectedAdamW: none of the optimizer's parameters is a parameter of the "
                                        "model the subspace is matched to (are they wrapped or flattened?). "
                                        + DEEPSPEED_MESSAGE)
        cfg = self._config(subspace)
        if has_dtensor(mine):
            bases, group = shard_bases(model, subspace, mine, allow_partial=bool(cfg.allow_partial))
        else:
            bases, group = match_bases(model, subspace, params, allow_partial=bool(cfg.allow_partial)), None
        self.model = model
        self.subspace, self._bases, self._process_group = subspace, bases, group
        self._signature = tuple(map(id, params))

    def _follow_param_groups(self) -> None:
        """The optimizer's parameters are read live; when they changed since the bases were matched
        (``add_param_group``, a ``load_state_dict`` onto other parameters) match them again: new
        parameters get their bases, or SubspaceMismatchError when they have none."""
        if self.subspace is None or self.paused:  # paused: plain AdamW, matched again on resume
            return
        params = [p for g in self.param_groups for p in g["params"]]
        if tuple(map(id, params)) == self._signature:
            return
        mine = set(params)
        if self._bases and not (mine & set(self._bases)) and not any(p in mine for p in self.model.parameters()):
            # every basis was matched to parameters this optimizer no longer steps: DeepSpeed ZeRO
            # swaps the param groups for flat fp32 partitions (never a silent plain-AdamW step)
            raise UnsupportedSetupError("ProjectedAdamW: the optimizer's parameters were replaced after the "
                                        "subspace was set (none of them has a basis). " + DEEPSPEED_MESSAGE)
        self.set_subspace(self.subspace, self.model)

    @property
    def last_removed_fraction(self) -> float:
        """Fraction of the last step's Adam direction (squared norm, projected tensors) that the
        projection removed; 0.0 before any projected step. Syncs with the device."""
        return self.last_stats.removed_fraction if self.last_stats is not None else 0.0

    def _config(self, subspace: Optional[Subspace] = None) -> OGPSAConfig:
        if self.ogpsa_config is not None:
            return self.ogpsa_config
        subspace = subspace if subspace is not None else self.subspace
        if subspace is not None and getattr(subspace, "config", None) is not None:
            return subspace.config
        return OGPSAConfig()

    # -- state ------------------------------------------------------------------------------

    def _state_for(self, p: Tensor, amsgrad: bool) -> dict:
        state = self.state[p]
        dtype = torch.float32 if (self.fp32_states and p.dtype in _LOW_PRECISION) else p.dtype
        if len(state) == 0:
            # same keys and types as torch.optim.AdamW (step: a float32 scalar tensor)
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        if amsgrad and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """As :meth:`torch.optim.Optimizer.load_state_dict` (accepts a torch AdamW state dict),
        but low-precision parameters get their moments back in float32 (``fp32_states``),
        not rounded to the parameter dtype."""
        super().load_state_dict(state_dict)
        if not getattr(self, "fp32_states", True):
            return
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        mine = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, mine):
            saved = state_dict["state"].get(pid)
            if saved is None or p.dtype not in _LOW_PRECISION:
                continue
            for key, value in saved.items():
                if key != "step" and isinstance(value, Tensor) and value.is_floating_point():
                    self.state[p][key] = value.to(device=p.device, dtype=torch.float32, copy=True)

    # -- the step ---------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """One projected AdamW step over every param group (projection skipped while paused)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._projected_step()
        return loss

    @torch.no_grad()
    def _projected_step(self) -> None:
        """The step's body, without hooks or closure (also run by the update-space projector on
        a plain torch AdamW, sharing its param_groups and state)."""
        cfg = self._config()
        self._follow_param_groups()
        clip_coef = None
        if cfg.max_norm is not None and not self.paused:
            clip_coef = self._clip_raw(float(cfg.max_norm))
        items, sharded = [], False
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            hyper = StepHyper(lr=float(group["lr"]), beta1=float(beta1), beta2=float(beta2), eps=float(group["eps"]),
                              weight_decay=float(group["weight_decay"]), maximize=bool(group.get("maximize", False)),
                              amsgrad=bool(group["amsgrad"]))
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("ProjectedAdamW does not support sparse gradients")
                state = self._state_for(p, hyper.amsgrad)
                basis = None if self.paused else self._bases.get(p)
                items.append((p, state, hyper, basis))
                sharded = sharded or is_dtensor(p)
        kwargs = dict(mode=cfg.mode, scope=cfg.scope, aligned_scale=float(cfg.aligned_scale),
                      project_weight_decay=self.project_weight_decay, keep_updates=self.keep_updates,
                      backend=cfg.backend)
        if sharded:
            result = sharded_step(items, self._process_group, **kwargs)
        else:
            result = projected_step(items, **kwargs)
        if self.keep_updates:
            self.last_updates = result.updates
        if result.stats is not None:
            if clip_coef is not None:
                result.stats.clip_coef = clip_coef.to(result.stats.clip_coef.device, torch.float64)
            self.last_stats = result.stats
            self.num_projections += 1

    def _clip_raw(self, max_norm: float) -> Tensor:
        """Clip the RAW gradients of every parameter this optimizer steps (model or not) to the
        global L2 norm ``max_norm`` before they feed the moments: exactly
        ``torch.nn.utils.clip_grad_norm_`` followed by AdamW. Returns the factor applied."""
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None and p.grad.numel()]
        if not params:
            return torch.ones((), dtype=torch.float64)
        if any(is_dtensor(p) for p in params):
            raise UnsupportedSetupError("OGPSAConfig.max_norm with FSDP2 in update space: clip with "
                                        "torch.nn.utils.clip_grad_norm_ (it handles DTensor gradients) before "
                                        "optimizer.step() and leave max_norm=None")
        total = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return (max_norm / (total.double() + 1e-6)).clamp(max=1.0)
