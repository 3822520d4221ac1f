"""Multi-GPU OGPSA: DDP, FSDP2 (sharded DTensor gradients) and DeepSpeed ZeRO-1/2.

The projection is linear in the gradient and its pass 1 is a sum over elements, so a
gradient split across ranks is projected exactly like the whole one: every rank computes
the partial coefficients ``[U_i g_i | ||g_i||^2]`` of its own pieces for all tensors,
ONE ``all_reduce`` sums the stacked ``[tensors, k+1]`` table, the tiny step (mode rule,
global scope, clip factor) then runs on identical inputs on every rank, and pass 2
updates each rank's pieces locally with its own slice of the basis.

* **DDP** needs nothing from this module: ``ogpsa.attach`` hooks ``optimizer.step``,
  which runs after DDP has averaged the gradients, so the averaged gradient is projected.
* **FSDP2** (``torch.distributed.fsdp.fully_shard``): gradients are DTensors sharded on
  dim 0 (or any ``Shard(d)``), shards may be uneven or empty. :func:`attach_fsdp` (also
  picked automatically by ``ogpsa.attach`` when the model has DTensor parameters) keeps
  each basis sharded exactly like its parameter (:class:`ShardedSubspace`).
* **DeepSpeed ZeRO-1/2**: the engine reduces gradients into per-rank flat partitions
  that cut parameters at arbitrary element offsets; :func:`attach_deepspeed` slices each
  basis along the same element ranges and projects the reduced partition right before
  the ZeRO optimizer's step (so DeepSpeed's own clipping sees the projected gradient).

Sharded bases save to and load from the same single-process file format
(:meth:`ShardedSubspace.save` gathers to rank 0; :meth:`ShardedSubspace.load` slices).

Modules: :mod:`.layout` (LocalSlice, DTensor placements), :mod:`.sharded`
(ShardedSubspace), :mod:`.pieces` (projection of local pieces with one all_reduce),
:mod:`.fsdp` (ShardedProjector), :mod:`.deepspeed` (ZeroProjector). Which projector
``ogpsa.attach`` returns is decided in one place, :func:`ogpsa.attaching.attach`.
"""

from .deepspeed import ZeroProjector, attach_deepspeed
from .fsdp import ShardedProjector, attach_fsdp
from .layout import LocalSlice, fsdp_layout, is_dtensor
from .sharded import ShardedSubspace, reference_gradients, shard_subspace

__all__ = [
    "LocalSlice",
    "ShardedSubspace",
    "ShardedProjector",
    "ZeroProjector",
    "attach_fsdp",
    "attach_deepspeed",
    "shard_subspace",
    "fsdp_layout",
    "is_dtensor",
    "reference_gradients",
]
