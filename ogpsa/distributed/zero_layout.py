"""Where DeepSpeed ZeRO-1/2 puts each parameter's elements (this rank's flat partitions), and
which subspaces a ZeRO projector takes: shared by the gradient-space (:mod:`.deepspeed`) and the
update-space (:mod:`ogpsa.optim.distributed`) ZeRO projectors, so neither imports the other."""

from __future__ import annotations

from typing import Mapping

import torch

from ..config import OGPSAConfig
from .layout import LocalSlice
from .sharded import ShardedSubspace


def _zero_partition_slices(zero_opt, params_by_id: Mapping[int, str]) -> dict[str, tuple[int, int, LocalSlice]]:
    """``{name: (group index, index in params_in_partition, LocalSlice)}`` for the parameters
    that have elements in this rank's ZeRO partition."""
    out = {}
    for gi, group in enumerate(zero_opt.params_in_partition):
        for j, p in enumerate(group):
            name = params_by_id.get(id(p))
            if name is None:
                continue
            mapping = getattr(p, "_hp_mapping", None)
            if mapping is not None:
                start, length = int(mapping.lp_fragment_address.start), int(mapping.lp_fragment_address.numel)
            else:  # older DeepSpeed: only the first parameter of a partition starts inside itself
                start = int(zero_opt.first_offset[gi]) if j == 0 else 0
                length = min(p.numel() - start, int(zero_opt.partition_size[gi]))
            out[name] = (gi, j, LocalSlice(tuple(int(s) for s in p.shape), "flat", 0, start, length))
    return out


def check_zero_subspace(subspace, config: OGPSAConfig, model: torch.nn.Module) -> None:
    """A subspace a ZeRO projector can take: a full one (each rank slices its own partition),
    built with the projector's scope, matching the model's parameter names and shapes."""
    if isinstance(subspace, ShardedSubspace):
        raise TypeError("attach_deepspeed takes a full Subspace (ZeRO partitions cut parameters at element "
                        "offsets; each rank slices its own part)")
    if subspace.config.scope != config.scope:
        raise ValueError(f"subspace was built with scope={subspace.config.scope!r} but the projector "
                         f"uses scope={config.scope!r}")
    subspace.check_model(model)
