"""Update-space projection on sharded parameters: FSDP2 (``fully_shard``) DTensors and DeepSpeed
ZeRO-1/2 flat fp32 partitions.

The projected AdamW step is elementwise except for its pass-1 dots (``c_i = U_i d_i`` and
``||d_i||^2``), which are sums over elements. So each rank runs the step on its own pieces of
p, grad, m and v with its slice of every basis, the partial dots of ALL tensors are stacked and
summed with ONE ``all_reduce`` per step (both scopes), and pass 2 applies the weights computed
from the summed dots, identical on every rank. The update equals the single-process update up
to rounding.

* FSDP2: basis slices are cut once per subspace, keyed by parameter (never by gradient
  address), with the same slicing as the gradient-space projector
  (:func:`ogpsa.distributed.fsdp_layout`, :meth:`LocalSlice.take_rows`); a
  :class:`~ogpsa.distributed.ShardedSubspace` is used as is. ``M = U U^T`` is the FULL basis'
  Gram (exact for the global scope too).
* DeepSpeed ZeRO-1/2 (:class:`ZeroUpdateProjector`, made by
  :func:`ogpsa.distributed.attach_deepspeed` with ``space="update"``): DeepSpeed steps its
  inner torch AdamW on one flat fp32 partition per param group. A step pre-hook on that AdamW
  runs the projected step on per-parameter views into the flat partition, its gradient and
  its flat ``exp_avg``/``exp_avg_sq`` (the basis columns of each piece cut once per subspace),
  sums the pass-1 table over the data-parallel group with one all_reduce per param group, and
  hides the gradient from AdamW's own step. The AdamW state keeps its flat layout, so
  DeepSpeed checkpoints are unchanged.
* DDP needs nothing from here: the step runs on the replicated, averaged gradient.
* Refused with :class:`~ogpsa.errors.UnsupportedSetupError`, naming what to do: FSDP1
  (``FullyShardedDataParallel`` flat parameters), a ProjectedAdamW or ZeRO optimizer used
  without the engine, ZeRO-3, DeepSpeed's FusedAdam / DeepSpeedCPUAdam and other optimizers,
  DTensor placements other than ``Shard(d)`` on one mesh dimension, sharded parameters without a
  sharded gradient.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ..config import OGPSAConfig
from ..distributed.layout import LocalSlice, _all_reduce, _local, fsdp_layout, is_dtensor
from ..distributed.sharded import ShardedSubspace
from ..distributed.zero_layout import _zero_partition_slices, check_zero_subspace
from ..errors import UnsupportedSetupError
from ..interface import PauseMixin, claim_optimizer, release_optimizer
from ..plan import check_coverage, gram_pinv
from ..stats import ProjectionStats
from ..subspace import Subspace, SubspaceMismatchError
from .functional import StepHyper, StepResult, projected_step

DEEPSPEED_MESSAGE = (
    "update-space projection (space='update') under DeepSpeed ZeRO-1/2 attaches to the ENGINE: hand a "
    "torch.optim.AdamW to deepspeed.initialize and call ogpsa.distributed.attach_deepspeed(engine, subspace, "
    "OGPSAConfig(space='update')) (or ogpsa.attach(engine, None, subspace, config)); it projects the step of the "
    "AdamW inside the ZeRO optimizer, which runs on flat fp32 partitions that cut parameters at arbitrary offsets. "
    "A ProjectedAdamW or a ZeRO optimizer on its own never sees the parameters the subspace is matched to. Or use "
    "space='gradient' with DeepSpeed (attach_deepspeed), or FSDP2 (fully_shard) / DDP with ogpsa.optim.ProjectedAdamW")


def is_deepspeed_object(obj: Any) -> bool:
    """Whether ``obj`` is a DeepSpeed engine or ZeRO optimizer (by its class' module; DeepSpeed
    itself is never imported)."""
    return type(obj).__module__.split(".")[0] == "deepspeed"


def check_supported(model: Optional[torch.nn.Module], optimizer: Any = None) -> None:
    """Raise :class:`UnsupportedSetupError` for setups update-space projection cannot handle:
    DeepSpeed engines / ZeRO optimizers and FSDP1-wrapped models."""
    if is_deepspeed_object(model) or is_deepspeed_object(optimizer):
        raise UnsupportedSetupError(DEEPSPEED_MESSAGE)
    if model is None:
        return
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # torch without distributed
        return
    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise UnsupportedSetupError(
            "update-space projection does not support FSDP1 (FullyShardedDataParallel): its flat parameters do not "
            "match the subspace's parameter names. Shard the model with FSDP2 (torch.distributed.fsdp.fully_shard), "
            "or use DDP")


def has_dtensor(params) -> bool:
    """Whether any of ``params`` is a DTensor (FSDP2)."""
    return any(is_dtensor(p) for p in params)


def shard_bases(model: torch.nn.Module, subspace, mine: set, *, allow_partial: bool = False) -> tuple[dict, Any]:
    """``({param: (name, U_local, M^{-1}, M)}, process_group)`` for the parameters of ``mine``
    that the subspace holds, each basis sliced like its DTensor parameter on this rank.

    ``subspace``: a full :class:`~ogpsa.Subspace` (every rank cuts its slice) or a
    :class:`~ogpsa.distributed.ShardedSubspace` already sliced for this layout. Errors name the
    parameter: a plain-tensor parameter next to DTensor ones, an unsupported placement, a
    basis of the wrong shape, a sharded subspace cut for another layout."""
    if not isinstance(subspace, ShardedSubspace):
        subspace.check_model(model)
    ours = [(n, p) for n, p in model.named_parameters() if p in mine]
    in_model = {p for _, p in ours}
    check_coverage(ours, subspace.names, [p for p in mine if p not in in_model], allow_partial=allow_partial,
                   what="update space under FSDP2")
    named = [(n, p) for n, p in ours if n in subspace]
    slices, group = fsdp_layout(model, [n for n, _ in named]) if named else ({}, None)
    sharded = isinstance(subspace, ShardedSubspace)
    bases = {}
    for name, p in named:
        sl, u = slices[name], subspace.basis(name)
        if u.dim() != 2:
            raise ValueError(f"ProjectedAdamW: basis of {name!r} has shape {tuple(u.shape)}, expected [k, N]")
        if sharded:
            if subspace.slice(name) != sl:
                raise SubspaceMismatchError(f"{name!r}: the sharded subspace was sliced for {subspace.slice(name)} "
                                            f"but the parameter's shard on this rank is {sl}")
        elif u.shape[1] != sl.full_numel:
            raise ValueError(f"ProjectedAdamW: basis of {name!r} has shape {tuple(u.shape)}, expected "
                             f"[k, {sl.full_numel}] for parameter shape {sl.shape}")
        else:
            u = sl.take_rows(u)
        if u.shape[0] == 0:
            continue
        device = _local(p).device
        m = subspace.gram(name).to(device=device, dtype=torch.float64)
        bases[p] = (name, u.to(device), gram_pinv(m, f"parameter {name!r}").float(), m)
    return bases, group


def _local_state(state: dict) -> dict:
    """The state with every DTensor replaced by its local shard (same storage; ``step`` is
    the same scalar tensor, incremented in place)."""
    return {k: _local(v) if is_dtensor(v) else v for k, v in state.items()}


def local_items(items: list) -> tuple[list, list, list]:
    """Items on this rank's shards: ``(alias, local state, hyper, basis)`` where ``alias``
    shares the parameter shard's storage and carries the local gradient shard as ``.grad``
    (plain-tensor items pass through). Returns (local items, the parameters in the same
    order, the aliases created)."""
    out, params, aliases = [], [], []
    for p, state, h, basis in items:
        if is_dtensor(p):
            g = p.grad
            if not is_dtensor(g):
                raise UnsupportedSetupError(f"a DTensor parameter of shape {tuple(p.shape)} has a "
                                            f"{type(g).__name__} gradient; expected a DTensor sharded like the "
                                            f"parameter (FSDP2 fully_shard)")
            alias = _local(p).detach()
            alias.grad = _local(g)
            if alias.grad.shape != alias.shape:
                raise RuntimeError(f"gradient shard of shape {tuple(alias.grad.shape)} does not match the parameter "
                                   f"shard of shape {tuple(alias.shape)} (placements {p.placements} vs "
                                   f"{g.placements})")
            out.append((alias, _local_state(state), h, basis))
            aliases.append(alias)
        else:
            out.append((p, state, h, basis))
        params.append(p)
    return out, params, aliases


def reducer(process_group) -> Callable[[Tensor], None]:
    """The in-place sum over ``process_group`` handed to :func:`projected_step` as ``reduce_dots``."""
    return lambda t: _all_reduce(t, process_group)


def sharded_step(items: list, process_group, **kwargs: Any) -> StepResult:
    """:func:`projected_step` on this rank's shards, the pass-1 dots summed over
    ``process_group`` with one all_reduce (only when some item has a basis: the same on every
    rank). ``kwargs``: as :func:`projected_step`. ``updates`` (with ``keep_updates``) are keyed
    by the original parameters and hold this rank's flattened shard of the direction."""
    local, params, aliases = local_items(items)
    reduce_dots = reducer(process_group) if any(it[3] is not None for it in items) else None
    try:
        result = projected_step(local, reduce_dots=reduce_dots, **kwargs)
    finally:
        for alias in aliases:  # no reference to a gradient outlives the step
            alias.grad = None
    if result.updates:
        by_alias = {id(a): p for (a, *_), p in zip(local, params)}
        result.updates = {by_alias[id(a)]: d for a, d in result.updates.items()}
    return result


# ----------------------------------------------------------------------------------------
# DeepSpeed ZeRO-1/2: the projected step on the inner AdamW's flat fp32 partitions
# ----------------------------------------------------------------------------------------


def zero_inner_adamw(zero_opt: Any, stage: int) -> torch.optim.AdamW:
    """The torch AdamW that DeepSpeed's ZeRO-1/2 optimizer steps on its flat fp32 partitions;
    :class:`UnsupportedSetupError` naming what to use for every other setup."""
    kind = type(zero_opt).__name__
    needed = ("single_partition_of_fp32_groups", "params_in_partition", "bit16_groups", "optimizer")
    if not all(hasattr(zero_opt, a) for a in needed):
        hint = (" (DeepSpeed uses BF16_Optimizer for ZeRO-1 with bf16 parameters and fp32 gradient accumulation: "
                "use ZeRO stage 2, or data_types.grad_accum_dtype 'bf16')" if kind == "BF16_Optimizer" else "")
        raise UnsupportedSetupError(f"space='update' under DeepSpeed ZeRO-{stage} needs DeepSpeed's ZeRO-1/2 optimizer "
                                    f"(flat fp32 partitions single_partition_of_fp32_groups around a torch "
                                    f"optimizer); {kind} is not one{hint}. Or use space='gradient'")
    if getattr(zero_opt, "zenflow", False):
        raise UnsupportedSetupError("space='update' does not support DeepSpeed ZenFlow (its CPU optimizer step "
                                    "bypasses the torch AdamW); disable zenflow or use space='gradient'")
    inner = zero_opt.optimizer
    name = type(inner).__name__
    if name == "DeepSpeedCPUAdam":
        raise UnsupportedSetupError(
            "space='update' under ZeRO-Offload needs a torch.optim.AdamW, but DeepSpeed built DeepSpeedCPUAdam: set "
            "\"zero_force_ds_cpu_optimizer\": false in the DeepSpeed config and pass torch.optim.AdamW(...) to "
            "deepspeed.initialize (or add \"torch_adam\": true to the config's optimizer params), or use "
            "space='gradient'")
    if name in ("FusedAdam", "FusedLamb", "FusedLion", "OnebitAdam", "ZeroOneAdam", "OnebitLamb"):
        raise UnsupportedSetupError(
            f"space='update' under DeepSpeed needs a torch.optim.AdamW, but DeepSpeed built {name}: add \"torch_adam\": "
            f"true (and \"adam_w_mode\": true) to the optimizer params in the DeepSpeed config, or pass "
            f"torch.optim.AdamW(model.parameters(), ...) to deepspeed.initialize; or use space='gradient'")
    if not isinstance(inner, torch.optim.AdamW):
        raise UnsupportedSetupError(
            f"space='update' projects AdamW's direction; DeepSpeed's ZeRO optimizer wraps a {name}. Pass "
            f"torch.optim.AdamW(...) to deepspeed.initialize (or \"torch_adam\": true in the config's AdamW params), "
            f"or use space='gradient' with {name}")
    for group in inner.param_groups:
        for key in ("fused", "capturable", "differentiable"):
            if group.get(key):
                raise UnsupportedSetupError(f"space='update': the AdamW inside DeepSpeed has {key}=True, which the "
                                            f"projected step does not support; create it with {key}=False")
    return inner


def _scalar_dtype() -> torch.dtype:
    try:
        from torch.optim.optimizer import _get_scalar_dtype
    except ImportError:  # older torch
        return torch.float32
    return _get_scalar_dtype()


class ZeroUpdateProjector(PauseMixin):
    """Update-space OGPSA on a DeepSpeed ZeRO-1/2 engine; create with
    :func:`ogpsa.distributed.attach_deepspeed` and ``OGPSAConfig(space="update")``.

    A step pre-hook on the ZeRO optimizer's inner torch AdamW (DeepSpeed steps it once per param
    group, on ``single_partition_of_fp32_groups[g]``, whose ``.grad`` is the reduced, unscaled and
    clipped flat gradient partition) runs :func:`projected_step` on per-parameter views of that
    partition, its gradient and its flat ``exp_avg``/``exp_avg_sq``, with the basis columns of
    each piece (cut once per subspace) and the full Gram M. Every rank lists every parameter of
    the group that has a basis, in model order, with an empty piece where it holds none, so the
    pass-1 table is summed row by row with ONE all_reduce per param group (pieces of a parameter
    split across ranks add up to the whole tensor's dots). Elements of no projected parameter
    (other parameters, padding) get plain AdamW in the same call. Then the gradient is hidden from
    AdamW's own step (a no-op) and given back after it. The state dict stays torch AdamW's
    (``step``, flat ``exp_avg``, ``exp_avg_sq``). Clipping is DeepSpeed's (``gradient_clipping``),
    on the raw gradient that feeds the moments. ``scope="global"`` needs one param group.
    A ProjectedAdamW handed to ``deepspeed.initialize`` works too (its ``project_weight_decay`` is
    used; its own subspace is cleared).
    """

    def __init__(self, engine: Any, subspace: Subspace, config: Optional[OGPSAConfig] = None) -> None:
        config = config if config is not None else subspace.config
        stage = int(engine.zero_optimization_stage())
        self.engine = engine
        self.zero_optimizer = engine.optimizer
        self.optimizer = zero_inner_adamw(self.zero_optimizer, stage)
        self.model: torch.nn.Module = engine.module
        if config.max_norm is not None:
            raise UnsupportedSetupError(f"OGPSAConfig.max_norm={config.max_norm!r} under DeepSpeed: clipping is "
                                        f"DeepSpeed's (set gradient_clipping in the DeepSpeed config; it clips the raw "
                                        f"gradient before the projected AdamW step); leave max_norm=None")
        self.config = config
        self.project_weight_decay = bool(getattr(self.optimizer, "project_weight_decay", False))
        if hasattr(self.optimizer, "set_subspace"):  # a ProjectedAdamW: its own step must stay plain AdamW
            self.optimizer.set_subspace(None)
        self.subspace: Optional[Subspace] = None
        self.last_stats: Optional[ProjectionStats] = None
        self.num_projections = 0
        self._paused = 0
        self._plans: dict[int, tuple] = {}
        self._group_of: dict[int, int] = {}
        self._hidden: dict = {}
        self._step_stats: list = []
        self._last_group = -1
        self._handles: list = []
        self.set_subspace(subspace)
        claim_optimizer(self.optimizer, self)
        self._handles = [self.optimizer.register_step_pre_hook(self._pre_step),
                         self.optimizer.register_step_post_hook(self._post_step)]

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    # -- basis side: once per subspace -------------------------------------------------------

    def set_subspace(self, subspace: Subspace) -> None:
        """Use a new full subspace (each rank cuts its pieces' columns here) from the next step on."""
        check_zero_subspace(subspace, self.config, self.model)
        check_coverage(list(self.model.named_parameters()), subspace.names,
                       allow_partial=bool(self.config.allow_partial), what="update space under DeepSpeed")
        zero = self.zero_optimizer
        named = list(self.model.named_parameters())
        layout = _zero_partition_slices(zero, {id(p): n for n, p in named})
        plans, group_of = {}, {}
        for gi, flat in enumerate(zero.single_partition_of_fp32_groups):
            group_of[id(flat)] = gi
            members = {id(p) for p in zero.bit16_groups[gi]}
            starts = self._hp_starts(gi, layout)
            device, size = flat.device, flat.numel()
            pieces = []
            for name, p in named:
                if id(p) not in members or name not in subspace:
                    continue
                u = subspace.basis(name)
                if u.shape[0] == 0:
                    continue
                sl = layout[name][2] if name in layout else LocalSlice(tuple(p.shape), "flat", 0, 0, 0)
                start = starts.get(name, 0)
                if start < 0 or start + sl.length > size:
                    raise RuntimeError(f"DeepSpeed's piece of {name!r} ({sl.length} elements at {start}) lies outside "
                                       f"its flat fp32 partition of {size} elements")
                m = subspace.gram(name).to(device=device, dtype=torch.float64)
                pieces.append((name, start, sl.length,
                               (name, sl.take_rows(u).to(device), gram_pinv(m, f"parameter {name!r}").float(), m)))
            plans[gi] = (pieces, self._gaps(pieces, size), self._process_group(gi))
        if self.config.scope == "global" and sum(1 for pl in plans.values() if pl[0]) > 1:
            raise UnsupportedSetupError("scope='global' under DeepSpeed needs every projected parameter in ONE "
                                        "optimizer param group (ZeRO steps the groups one at a time); use one "
                                        "group or scope='tensor'")
        self.subspace, self._plans, self._group_of = subspace, plans, group_of

    def _hp_starts(self, gi: int, layout: dict) -> dict[str, int]:
        """Where each parameter's piece starts in group ``gi``'s flat fp32 partition."""
        out, pos = {}, 0
        for name, (g, j, sl) in sorted(((n, v) for n, v in layout.items() if v[0] == gi), key=lambda kv: kv[1][1]):
            p = self.zero_optimizer.params_in_partition[g][j]
            mapping = getattr(p, "_hp_mapping", None)
            if mapping is not None:
                out[name] = int(mapping.hp_fragment_address.start)
            else:  # older DeepSpeed: the pieces lie back to back from the partition's start
                out[name] = pos
            pos += sl.length
        return out

    @staticmethod
    def _gaps(pieces: list, size: int) -> list[tuple[int, int]]:
        """The element ranges of the flat partition outside every projected piece (plain AdamW)."""
        spans = sorted((s, s + n) for _, s, n, _ in pieces if n > 0)
        gaps, pos = [], 0
        for a, b in spans:
            if a < pos:
                raise RuntimeError("two parameters' pieces overlap in DeepSpeed's flat fp32 partition")
            if a > pos:
                gaps.append((pos, a - pos))
            pos = b
        if pos < size:
            gaps.append((pos, size - pos))
        return gaps

    def _process_group(self, gi: int):
        groups = getattr(self.zero_optimizer, "real_dp_process_group", None) or []
        group = groups[gi] if gi < len(groups) else None
        # None is DeepSpeed's (and torch's) spelling of the default group
        return group if group is not None else dist.group.WORLD

    # -- the step: hooks on the inner AdamW ---------------------------------------------------

    def _pre_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        if self._paused:
            return  # plain AdamW (e.g. while reference gradients are collected)
        cfg = self.config
        for group in optimizer.param_groups:
            for flat in group["params"]:
                if flat.grad is None:
                    continue
                gi = self._group_of.get(id(flat))
                if gi is None:
                    raise RuntimeError("the AdamW inside DeepSpeed steps a tensor that is not one of the ZeRO "
                                       "optimizer's flat fp32 partitions; attach OGPSA again after re-initialising")
                result = self._step_group(flat, group, gi, cfg)
                if gi <= self._last_group:  # DeepSpeed steps groups 0, 1, ...: a new engine step began
                    self._step_stats = []
                self._last_group = gi
                if result.stats is not None:
                    if not self._step_stats:
                        self.num_projections += 1
                    self._step_stats.append(result.stats)
                    self.last_stats = _merge_stats(self._step_stats)
                self._hidden[flat] = flat.grad
                flat.grad = None  # AdamW's own step skips it: this step is done

    def _post_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        for flat, g in self._hidden.items():
            flat.grad = g
        self._hidden = {}

    @torch.no_grad()
    def _step_group(self, flat: Tensor, group: dict, gi: int, cfg: OGPSAConfig) -> StepResult:
        beta1, beta2 = group["betas"]
        hyper = StepHyper(lr=float(group["lr"]), beta1=float(beta1), beta2=float(beta2), eps=float(group["eps"]),
                          weight_decay=float(group["weight_decay"]), maximize=bool(group.get("maximize", False)),
                          amsgrad=bool(group["amsgrad"]))
        state = self.optimizer.state[flat]
        if len(state) == 0:  # exactly as torch AdamW creates it, so checkpoints keep its layout
            state["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
            state["exp_avg"] = torch.zeros_like(flat, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(flat, memory_format=torch.preserve_format)
        if hyper.amsgrad and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(flat, memory_format=torch.preserve_format)
        keys = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if hyper.amsgrad else ())
        pieces, gaps, process_group = self._plans[gi]
        data, grad = flat.detach().view(-1), flat.grad.view(-1)
        items, aliases = [], []
        for start, n, basis in [(s, n, b) for _, s, n, b in pieces] + [(s, n, None) for s, n in gaps]:
            alias = data.narrow(0, start, n)
            alias.grad = grad.narrow(0, start, n)
            # each piece its own copy of the step count (the step increments it per item)
            st = {"step": state["step"].clone(), **{k: state[k].view(-1).narrow(0, start, n) for k in keys}}
            items.append((alias, st, hyper, basis))
            aliases.append(alias)
        reduce_dots = reducer(process_group) if pieces else None  # same pieces on every rank
        try:
            result = projected_step(items, mode=cfg.mode, scope=cfg.scope, aligned_scale=float(cfg.aligned_scale),
                                    project_weight_decay=self.project_weight_decay, backend=cfg.backend,
                                    reduce_dots=reduce_dots)
        finally:
            for alias in aliases:  # no reference to the gradient outlives the step
                alias.grad = None
        state["step"] += 1
        return result

    # -- Projector surface -------------------------------------------------------------------

    def project(self, max_norm: Optional[float] = None) -> None:
        """Nothing to do on the gradient: the AdamW step inside DeepSpeed projects its update."""
        if max_norm is not None:
            raise ValueError("under DeepSpeed, clipping is DeepSpeed's: set gradient_clipping in its config")
        return None

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False,
                        **_: Any) -> Tensor:
        raise RuntimeError("under DeepSpeed the engine clips (gradient_clipping in its config) before the projected "
                           "AdamW step")

    def remove(self) -> None:
        """Remove the hooks: DeepSpeed's AdamW steps unprojected from now on."""
        for h in self._handles:
            h.remove()
        self._handles = []
        release_optimizer(self.optimizer, self)


def _merge_stats(parts: list) -> ProjectionStats:
    """One engine step's statistics from its param groups' (one part per group)."""
    if len(parts) == 1:
        return parts[0]
    sq_after = torch.cat([s.sq_after for s in parts])
    return ProjectionStats(sq_before=torch.cat([s.sq_before for s in parts]), sq_after=sq_after,
                           removed_sq=torch.cat([s.removed_sq for s in parts]), total_norm=sq_after.sum().sqrt(),
                           clip_coef=parts[0].clip_coef, names=[n for s in parts for n in (s.names or [])],
                           backends=tuple(sorted({b for s in parts for b in s.backends})),
                           single_pass=sum(s.single_pass for s in parts))
