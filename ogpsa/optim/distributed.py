"""Update-space projection on sharded parameters: FSDP2 (``fully_shard``) DTensors.

The projected AdamW step is elementwise except for its pass-1 dots (``c_i = U_i d_i`` and
``||d_i||^2``), which are sums over elements. So under FSDP2 each rank runs the step on its
own shards of p, grad, m and v with its slice of every basis, the partial dots of ALL tensors
are stacked and summed with ONE ``all_reduce`` per step (both scopes), and pass 2 applies the
weights computed from the summed dots, identical on every rank. The update equals the
single-process update up to rounding.

* Basis slices are cut once per subspace, keyed by parameter (never by gradient address),
  with the same slicing as the gradient-space projector (:func:`ogpsa.distributed.fsdp_layout`,
  :meth:`LocalSlice.take_rows`); a :class:`~ogpsa.distributed.ShardedSubspace` is used as is.
  ``M = U U^T`` is the FULL basis' Gram (exact for the global scope too).
* DDP needs nothing from here: the step runs on the replicated, averaged gradient.
* Refused with :class:`~ogpsa.errors.UnsupportedSetupError`, naming what to do: FSDP1
  (``FullyShardedDataParallel`` flat parameters), DeepSpeed engines and ZeRO optimizers (they
  keep the optimizer state in flat fp32 partitions the step never sees by name), DTensor
  placements other than ``Shard(d)`` on one mesh dimension, sharded parameters without a
  sharded gradient.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor

from ..distributed.layout import _all_reduce, _local, fsdp_layout, is_dtensor
from ..distributed.sharded import ShardedSubspace
from ..errors import UnsupportedSetupError
from ..subspace import SubspaceMismatchError
from .functional import StepResult, projected_step

DEEPSPEED_MESSAGE = (
    "update-space projection (space='update', ProjectedAdamW) does not support DeepSpeed ZeRO: the ZeRO optimizer "
    "runs AdamW on flat fp32 partitions that cut parameters at arbitrary offsets, so the step never sees the "
    "parameters the subspace is matched to. Use space='gradient' with DeepSpeed (ogpsa.distributed.attach_deepspeed), "
    "or train with FSDP2 (fully_shard) or DDP and ogpsa.optim.ProjectedAdamW")


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


def shard_bases(model: torch.nn.Module, subspace, mine: set) -> tuple[dict, Any]:
    """``({param: (name, U_local, M^{-1}, M)}, process_group)`` for the parameters of ``mine``
    that the subspace holds, each basis sliced like its DTensor parameter on this rank.

    ``subspace``: a full :class:`~ogpsa.Subspace` (every rank cuts its slice) or a
    :class:`~ogpsa.distributed.ShardedSubspace` already sliced for this layout. Errors name the
    parameter: a plain-tensor parameter next to DTensor ones, an unsupported placement, a
    basis of the wrong shape, a sharded subspace cut for another layout."""
    named = [(n, p) for n, p in model.named_parameters() if p in mine and n in subspace]
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
        bases[p] = (name, u.to(device), torch.linalg.inv(m).float(), m)
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
