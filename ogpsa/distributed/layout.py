"""Which piece of each parameter this rank holds (DTensor shards, ZeRO partitions), and
the small collective helpers the sharded subspace and projectors share."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import UnsupportedSetupError
from ..subspace import SubspaceMismatchError


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (False where DTensor is absent)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without DTensor support
        return False
    return isinstance(t, DTensor)


def _local(t: Tensor) -> Tensor:
    """The local tensor of a DTensor, sharing its storage (so in-place edits land in the grad)."""
    if is_dtensor(t):
        with torch.no_grad():
            return t.to_local()
    return t


# ----------------------------------------------------------------------------------------
# Layout: which piece of each parameter this rank holds
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LocalSlice:
    """The part of a parameter (global ``shape``) that one rank holds.

    ``kind="dim"``: indices ``[start, start + length)`` along dimension ``dim`` (a DTensor
    ``Shard(dim)`` placement, e.g. FSDP2). ``kind="flat"``: elements ``[start, start +
    length)`` of the flattened parameter (a DeepSpeed ZeRO partition). ``length`` may be 0.
    """

    shape: tuple
    kind: str
    dim: int
    start: int
    length: int

    @property
    def local_shape(self) -> tuple:
        if self.kind == "flat":
            return (self.length,)
        s = list(self.shape)
        s[self.dim] = self.length
        return tuple(s)

    @property
    def numel(self) -> int:
        return int(math.prod(self.local_shape))

    @property
    def full_numel(self) -> int:
        return int(math.prod(self.shape))

    def take_rows(self, rows: Tensor) -> Tensor:
        """This rank's columns of ``rows`` ([k, N] over the full parameter): a new contiguous
        ``[k, numel]`` tensor."""
        k = rows.shape[0]
        if self.kind == "flat":
            return rows[:, self.start:self.start + self.length].contiguous()
        view = rows.reshape(k, *self.shape).narrow(self.dim + 1, self.start, self.length)
        return view.reshape(k, self.numel).contiguous()

    def put_rows(self, full: Tensor, piece: Tensor) -> None:
        """Write ``piece`` ([k, numel]) into this rank's columns of ``full`` ([k, N])."""
        k = full.shape[0]
        if self.kind == "flat":
            full[:, self.start:self.start + self.length] = piece
        else:
            full.view(k, *self.shape).narrow(self.dim + 1, self.start, self.length).copy_(
                piece.reshape(k, *self.local_shape))


def _placement_slice(name: str, p: Tensor) -> tuple[LocalSlice, Any]:
    """LocalSlice and process group of a DTensor parameter; a clear error for layouts whose
    partial sums would not add up to the full tensor's exactly once."""
    from torch.distributed.tensor import Replicate, Shard

    mesh, placements = p.device_mesh, tuple(p.placements)
    shard_dims = [i for i, pl in enumerate(placements) if isinstance(pl, Shard) and type(pl) is Shard]
    for pl in placements:
        if not isinstance(pl, (Shard, Replicate)) or (isinstance(pl, Shard) and type(pl) is not Shard):
            raise UnsupportedSetupError(f"parameter {name!r} has placement {pl} (placements {placements}); OGPSA's "
                                      f"sharded projection supports Shard(d) on one mesh dimension (FSDP2, HSDP)")
    if len(shard_dims) != 1:
        raise UnsupportedSetupError(
            f"parameter {name!r} has placements {placements}: OGPSA's sharded projection needs it sharded on exactly "
            f"one mesh dimension (apply fully_shard to every module that holds trainable parameters)")
    mesh_dim = shard_dims[0]
    dim = placements[mesh_dim].dim
    try:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        local_shape, offset = compute_local_shape_and_global_offset(p.shape, mesh, placements)
        start, length = int(offset[dim]), int(local_shape[dim])
    except ImportError:  # older torch: Shard(d) splits like torch.chunk
        size, world = int(p.shape[dim]), mesh.size(mesh_dim)
        coord = mesh.get_local_rank(mesh_dim)
        chunk = -(-size // world)
        start = min(size, coord * chunk)
        length = max(0, min(size, start + chunk) - start)
    sl = LocalSlice(tuple(int(s) for s in p.shape), "dim", int(dim), start, length)
    local = _local(p)
    if tuple(local.shape) != sl.local_shape:
        raise RuntimeError(f"parameter {name!r}: local shard has shape {tuple(local.shape)} but its placement "
                           f"{placements} implies {sl.local_shape}")
    return sl, mesh.get_group(mesh_dim)


def fsdp_layout(model: torch.nn.Module, names: Optional[Sequence[str]] = None) -> tuple[dict[str, LocalSlice], Any]:
    """``({name: LocalSlice}, process_group)`` for the model's DTensor parameters (all, or
    ``names``). Every sharded parameter must share one process group."""
    params = dict(model.named_parameters())
    wanted = list(names) if names is not None else [n for n, p in params.items() if p.requires_grad]
    slices, group = {}, None
    for name in wanted:
        if name not in params:
            raise SubspaceMismatchError(f"{name!r}: in the subspace but not a parameter of the model")
        p = params[name]
        if not is_dtensor(p):
            raise ValueError(f"parameter {name!r} is a plain tensor while the model has DTensor (FSDP2) parameters; "
                             f"apply fully_shard to every module that holds trainable parameters")
        sl, pg = _placement_slice(name, p)
        if group is None:
            group = pg
        elif pg is not group:
            raise UnsupportedSetupError(f"parameter {name!r} is sharded over a different process group than the "
                                      f"others; OGPSA needs one group for its single all_reduce")
        slices[name] = sl
    return slices, group



def _first_device(model: torch.nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return _local(p).device if p is not None else torch.device("cpu")


def _comm(t: Tensor, group) -> Tensor:
    """NCCL needs CUDA tensors; gloo takes CPU ones."""
    backend = dist.get_backend(group)
    if backend == "nccl" and t.device.type != "cuda":
        return t.cuda()
    if backend == "gloo" and t.device.type != "cpu":
        return t.cpu()
    return t


def _all_gather_via(out: list, t: Tensor, group) -> None:
    tt = _comm(t, group)
    tmp = [torch.empty_like(tt) for _ in out]
    dist.all_gather(tmp, tt, group=group)
    for o, x in zip(out, tmp):
        o.copy_(x)


def _all_reduce(t: Tensor, group) -> None:
    """Sum ``t`` across ``group`` in place (no-op without an initialised process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    tt = _comm(t, group)
    dist.all_reduce(tt, group=group)
    if tt is not t:
        t.copy_(tt)

