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
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from typing import Any, Mapping, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import Tensor

from . import ops
from .config import OGPSAConfig
from .ops import ProjectionStats, UnsupportedSetupError
from .projector import Projector
from .subspace import _DTYPES, NamedBases, Subspace, SubspaceMismatchError, coefficients_from_grams

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


# ----------------------------------------------------------------------------------------
# ShardedSubspace
# ----------------------------------------------------------------------------------------


class ShardedSubspace(NamedBases):
    """A :class:`~ogpsa.Subspace` whose bases are sliced like the parameters on this rank.

    ``bases[i]``: ``[k_i, slices[i].numel]`` (this rank's columns of the full basis);
    ``grams[i]``: the full ``U_i U_i^T`` (identical on every rank). Build with
    :meth:`from_subspace` / :func:`shard_subspace`, :meth:`from_gradients` (sharded
    reference gradients, no full gradient ever materialised) or :meth:`load`.
    """

    def __init__(self, names: Sequence[str], slices: Sequence[LocalSlice], bases: Sequence[Tensor],
                 grams: Sequence[Tensor], config: OGPSAConfig, process_group=None, num_references: int = 0):
        self.names = list(names)
        self.slices = list(slices)
        self.bases = list(bases)
        self.grams = list(grams)
        self.config = config
        self.process_group = process_group
        self.num_references = int(num_references)
        for name, sl, u in zip(self.names, self.slices, self.bases):
            if u.dim() != 2 or u.shape[1] != sl.numel:
                raise ValueError(f"local basis for {name!r} has shape {tuple(u.shape)}, expected [k, {sl.numel}]")
        self._index = {n: i for i, n in enumerate(self.names)}

    @property
    def shapes(self) -> list[tuple]:
        return [sl.shape for sl in self.slices]

    def slice(self, name: str) -> LocalSlice:
        return self.slices[self._index[name]]

    def __repr__(self) -> str:
        return (f"<ShardedSubspace: {len(self)} tensors, {self.memory_bytes() / 2**20:.2f} MiB on this rank, "
                f"scope={self.config.scope}>")

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def from_subspace(cls, subspace: Subspace, slices: Mapping[str, LocalSlice], process_group=None,
                      device: Union[str, torch.device, None] = None) -> ShardedSubspace:
        """Slice a full (single-process) subspace; every rank calls this with its own slices."""
        problems = [f"{n!r}: in the subspace but not a (sharded) parameter of the model"
                    for n in subspace.names if n not in slices]
        problems += [f"{n!r}: basis for shape {s} but the parameter has shape {slices[n].shape}"
                     for n, s in zip(subspace.names, subspace.shapes) if n in slices and tuple(s) != slices[n].shape]
        if problems:
            raise SubspaceMismatchError("subspace does not match the model:\n  " + "\n  ".join(problems))
        bases, grams, sls = [], [], []
        for name in subspace.names:
            sl = slices[name]
            u = subspace.basis(name)
            bases.append(sl.take_rows(u).to(device if device is not None else u.device))
            grams.append(subspace.gram(name).float())
            sls.append(sl)
        return cls(subspace.names, sls, bases, grams, subspace.config, process_group, subspace.num_references)

    @classmethod
    def from_gradients(cls, grads: Sequence[Mapping[str, Optional[Tensor]]], slices: Mapping[str, LocalSlice],
                       config: Optional[OGPSAConfig] = None, *, process_group=None,
                       backend: Optional[str] = None) -> ShardedSubspace:
        """Build the sharded basis from sharded reference gradients (collective).

        ``grads``: m dicts ``{name: gradient}``; a value may be a DTensor (its local shard
        is used), this rank's local piece, or the full tensor (sliced here). Each rank
        computes the Gram matrices of its pieces; ONE all_reduce sums them (the Gram matrix
        of a split vector is the sum of its pieces'), the host factorises them exactly as
        :meth:`Subspace.from_gradients` does, then ``U = A R`` runs locally and a second
        all_reduce sums the local ``U U^T`` into the full k x k matrices.
        """
        config = config or OGPSAConfig()
        if isinstance(grads, Mapping) or not len(grads):
            raise ValueError("grads must be a non-empty list of {param_name: tensor} dicts, one per reference gradient")
        names = [n for n in slices if any(d.get(n) is not None for d in grads)]
        if not names:
            raise ValueError("the reference gradients hold none of the sharded parameters")
        m = len(grads)
        refs = []
        for n in names:
            sl = slices[n]
            rows = []
            for d in grads:
                t = d.get(n)
                if t is None:
                    rows.append(None)
                    continue
                t = t.detach()
                if is_dtensor(t):
                    t = _local(t)
                if tuple(t.shape) == sl.shape and sl.numel != sl.full_numel:
                    t = sl.take_rows(t.reshape(1, -1))[0]
                if t.numel() != sl.numel:
                    raise ValueError(f"reference gradient for {n!r} has shape {tuple(t.shape)}: neither the full "
                                     f"shape {sl.shape} nor this rank's shard {sl.local_shape}")
                rows.append(t.reshape(-1).float())
            dev = next((r.device for r in rows if r is not None), torch.device("cpu"))
            if config.basis_device:
                dev = torch.device(config.basis_device)
            refs.append(torch.stack([r.to(dev) if r is not None else torch.zeros(sl.numel, device=dev)
                                     for r in rows]).contiguous())
        # padded to one column so every backend gets non-empty rows; the zero column adds nothing
        nonempty = [i for i, r in enumerate(refs) if r.shape[1]]
        gram = torch.zeros(len(refs), m, m, dtype=torch.float64)
        if nonempty:
            gram[nonempty] = ops.gram([refs[i] for i in nonempty], backend=backend)
        _all_reduce(gram, process_group)
        coefficients = coefficients_from_grams(gram, refs, config)
        out_dtype = _DTYPES[config.basis_dtype]
        bases: list[Optional[Tensor]] = [None] * len(refs)
        if nonempty:
            built = ops.combine([refs[i] for i in nonempty], [coefficients[i] for i in nonempty],
                                out_dtype=out_dtype, backend=backend)
            for i, u in zip(nonempty, built):
                bases[i] = u
        k_all = max(1, max(int(a.shape[0]) for a in coefficients))
        local_m = torch.zeros(len(refs), k_all, k_all, dtype=torch.float64)
        for i, a in enumerate(coefficients):
            if bases[i] is None:
                bases[i] = torch.zeros(a.shape[0], 0, dtype=out_dtype, device=refs[i].device)
            u = bases[i].double()
            local_m[i, :a.shape[0], :a.shape[0]] = (u @ u.T).cpu()
        _all_reduce(local_m, process_group)
        grams = [local_m[i, :a.shape[0], :a.shape[0]].float() for i, a in enumerate(coefficients)]
        return cls(names, [slices[n] for n in names], bases, grams, config, process_group, m)

    # -- gather / persistence -------------------------------------------------------------

    def gather(self, dst: Optional[int] = 0) -> Optional[Subspace]:
        """The full :class:`Subspace` (collective). ``dst``: the group rank that receives it
        (others get None); ``dst=None``: every rank gets it."""
        group = self.process_group
        world = dist.get_world_size(group)
        me = dist.get_rank(group)
        desc = torch.tensor([[sl.start, sl.length] for sl in self.slices], dtype=torch.int64).reshape(-1, 2)
        descs = [torch.empty_like(desc) for _ in range(world)]
        _all_gather_via(descs, desc, group)
        receive = dst is None or me == dst
        full_bases = []
        for i, (sl, u) in enumerate(zip(self.slices, self.bases)):
            k = u.shape[0]
            lengths = [int(d[i, 1]) for d in descs]
            per_len = [replace(sl, start=int(d[i, 0]), length=int(d[i, 1])).numel for d in descs]
            pad = max(1, max(per_len))
            send = torch.zeros(k, pad, dtype=u.dtype, device=u.device)
            send[:, :u.shape[1]] = u
            send = _comm(send, group)
            if dst is None:
                recv = [torch.empty_like(send) for _ in range(world)]
                dist.all_gather(recv, send, group=group)
            else:
                recv = [torch.empty_like(send) for _ in range(world)] if me == dst else None
                dist.gather(send, recv, dst=dist.get_global_rank(group, dst) if group is not None else dst,
                            group=group)
            if not receive:
                continue
            full = torch.zeros(k, sl.full_numel, dtype=u.dtype, device=u.device)
            covered = 0
            for r in range(world):
                sr = replace(sl, start=int(descs[r][i, 0]), length=lengths[r])
                sr.put_rows(full, recv[r][:, :sr.numel].to(u.device))
                covered += sr.numel
            if covered != sl.full_numel:
                raise RuntimeError(f"the ranks' shards of {self.names[i]!r} hold {covered} of its {sl.full_numel} "
                                   f"elements (replicated or overlapping shards?)")
            full_bases.append(full)
        if not receive:
            return None
        return Subspace(self.names, self.shapes, full_bases, self.config,
                        [g.cpu() for g in self.grams], self.num_references)

    def save(self, path: str) -> None:
        """Gather to rank 0 of the group, which writes a normal single-process subspace file
        (:meth:`Subspace.save` format); collective, returns when the file is written."""
        full = self.gather(dst=0)
        if full is not None:
            full.save(path)
        dist.barrier(group=self.process_group)

    @classmethod
    def load(cls, path: str, model: torch.nn.Module, device: Union[str, torch.device, None] = None) -> ShardedSubspace:
        """Read a subspace file (written by :meth:`save` or by a single process) and keep
        this rank's slices of it for the FSDP2 ``model``."""
        sub = Subspace.load(path)
        slices, group = fsdp_layout(model, sub.names)
        return cls.from_subspace(sub, slices, group, device=device or _first_device(model))


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


def shard_subspace(subspace: Subspace, model: torch.nn.Module,
                   device: Union[str, torch.device, None] = None) -> ShardedSubspace:
    """This rank's slices of a full subspace, sharded like the FSDP2 ``model``'s parameters."""
    slices, group = fsdp_layout(model, subspace.names)
    return ShardedSubspace.from_subspace(subspace, slices, group, device=device or _first_device(model))


# ----------------------------------------------------------------------------------------
# Projection over local pieces
# ----------------------------------------------------------------------------------------


class _PieceProjection:
    """Projects a fixed, rank-consistent list of local pieces with one all_reduce.

    Every rank must pass the same tensors in the same order (the all_reduce adds the
    partial tables row by row), so a rank that holds none (or too little) of a parameter
    projects a zero-padded scratch buffer of at least k elements in its place: its
    partials are zero and its update is copied back over the real (short) piece.
    """

    def __init__(self, names: Sequence[str], bases: Sequence[Tensor], grams: Sequence[Tensor],
                 config: OGPSAConfig, process_group):
        self.names = list(names)
        self.bases = list(bases)
        self.grams = list(grams)
        self.config = config
        self.process_group = process_group
        self._scratch: dict[int, tuple[Tensor, Tensor]] = {}
        self._plans: dict[tuple, ops.ProjectionPlan] = {}

    def _padded(self, i: int, piece: Optional[Tensor], dtype: torch.dtype, device) -> tuple[Tensor, Tensor]:
        u = self.bases[i]
        width = max(1, u.shape[0])
        key = i
        entry = self._scratch.get(key)
        if entry is None or entry[0].dtype != dtype or entry[0].device != device:
            ub = torch.zeros(u.shape[0], width, dtype=u.dtype, device=device)
            ub[:, :u.shape[1]] = u.to(device)
            entry = (torch.zeros(width, dtype=dtype, device=device), ub)
            self._scratch[key] = entry
        buf = entry[0]
        buf.zero_()
        if piece is not None and piece.numel():
            buf[:piece.numel()] = piece.reshape(-1)
        return entry

    def run(self, pieces: Sequence[Optional[Tensor]], fallback_dtype: torch.dtype, fallback_device,
            max_norm: Optional[float]) -> ProjectionStats:
        grads, bases, copy_back = [], [], []
        for i, (piece, u) in enumerate(zip(pieces, self.bases)):
            if piece is not None and piece.numel() >= max(1, u.shape[0]):
                if not piece.is_contiguous():
                    raise ValueError(f"the local gradient piece of {self.names[i]!r} is not contiguous")
                grads.append(piece.view(-1))
                bases.append(u if u.device == piece.device else u.to(piece.device))
            else:
                dtype = piece.dtype if piece is not None else fallback_dtype
                device = piece.device if piece is not None else fallback_device
                buf, ub = self._padded(i, piece, dtype, device)
                grads.append(buf)
                bases.append(ub)
                if piece is not None and piece.numel():
                    copy_back.append((piece, buf))
        plan = ops.cached_plan(self._plans, grads, bases, clipping=max_norm is not None, scope=self.config.scope,
                               backend=self.config.backend, names=self.names, grams=self.grams)
        stats = ops.execute(plan, grads, mode=self.config.mode, scope=self.config.scope, max_norm=max_norm,
                            aligned_scale=self.config.aligned_scale, process_group=self.process_group)
        for piece, buf in copy_back:
            piece.view(-1).copy_(buf[:piece.numel()])
        return stats


# ----------------------------------------------------------------------------------------
# FSDP2
# ----------------------------------------------------------------------------------------


class ShardedProjector(Projector):
    """:class:`~ogpsa.Projector` for FSDP2 models: projects each rank's gradient shards
    with its basis shards and one all_reduce per projection. Create with :func:`attach_fsdp`
    (or ``ogpsa.attach``, which picks this class for DTensor models).

    With ``max_norm`` (or :meth:`clip_grad_norm_`) every trainable parameter counts towards
    the global norm, exactly as ``torch.nn.utils.clip_grad_norm_`` on the DTensors would.
    """

    def set_subspace(self, subspace: Union[Subspace, ShardedSubspace]) -> None:
        """Use a new subspace (full: sliced here; or already sharded) from the next projection on."""
        if subspace.config.scope != self.config.scope:
            raise ValueError(f"subspace was built with scope={subspace.config.scope!r} but the projector "
                             f"uses scope={self.config.scope!r}")
        trainable = [n for n, p in self.model.named_parameters() if p.requires_grad]
        slices, group = fsdp_layout(self.model, trainable)
        if isinstance(subspace, Subspace):
            subspace = ShardedSubspace.from_subspace(subspace, slices, group)
        else:
            for n in subspace.names:
                if n not in slices or slices[n] != subspace.slice(n):
                    raise SubspaceMismatchError(f"{n!r}: the sharded subspace was sliced for a different layout "
                                                f"({subspace.slice(n) if n in subspace else None}) than the model's "
                                                f"({slices.get(n)})")
        udt = torch.bfloat16 if self.config.basis_dtype == "bfloat16" else torch.float32
        self.subspace = subspace
        self.process_group = group
        self._named = [(n, p) for n, p in self.model.named_parameters() if n in slices]
        self._slices = slices
        self._runners: dict[bool, _PieceProjection] = {}
        device = _first_device(self.model)
        for include in (False, True):
            names, bases, grams = [], [], []
            for n, _p in self._named:
                if n in subspace:
                    u = subspace.basis(n)
                    if self.config.basis_device:
                        u = u.to(self.config.basis_device)
                    names.append(n)
                    bases.append(u)
                    grams.append(subspace.gram(n))
                elif include:
                    names.append(n)
                    bases.append(torch.empty(0, slices[n].numel, dtype=udt, device=device))
                    grams.append(None)
            self._runners[include] = _PieceProjection(names, bases, grams, self.config, group)
        self._plans.clear()

    def project(self, max_norm: Optional[float] = None) -> Optional[ProjectionStats]:
        """Project (and, with ``max_norm``, clip) the local gradient shards now (collective:
        every rank of the FSDP group must call it)."""
        if self._paused:
            return None
        max_norm = self.config.max_norm if max_norm is None else max_norm
        runner = self._runners[max_norm is not None]
        params = dict(self._named)
        pieces = []
        for n in runner.names:
            g = params[n].grad
            if g is None:
                raise RuntimeError(f"parameter {n!r} has no gradient on this rank; under FSDP2 every rank must "
                                   f"project the same parameters (did it take part in the backward?)")
            if not is_dtensor(g):
                raise ValueError(f"parameter {n!r} has a plain-tensor gradient; expected a sharded DTensor (FSDP2)")
            local = _local(g)
            if tuple(local.shape) != self._slices[n].local_shape:
                raise RuntimeError(f"gradient shard of {n!r} has shape {tuple(local.shape)}, expected "
                                   f"{self._slices[n].local_shape}")
            pieces.append(local)
        if not pieces:
            return None
        first = pieces[0]
        stats = runner.run(pieces, first.dtype, first.device, max_norm)
        self.last_stats = stats
        self.num_projections += 1
        self._projected_this_step = True
        return stats


def attach_fsdp(model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer],
                subspace: Union[Subspace, ShardedSubspace], config: Optional[OGPSAConfig] = None) -> ShardedProjector:
    """Attach OGPSA to an FSDP2 (``fully_shard``) model: like :func:`ogpsa.attach`, but the
    basis is kept sliced like each parameter and each projection costs one all_reduce of a
    ``[tensors, k+1]`` float32 table. ``subspace``: a full :class:`~ogpsa.Subspace` (every
    rank slices its part) or a :class:`ShardedSubspace`."""
    return ShardedProjector(model, optimizer, subspace, config)


def reference_gradients(model: torch.nn.Module, closure, names: Optional[Sequence[str]] = None) -> dict[str, Tensor]:
    """One reference gradient from ``closure()`` (which runs forward and ``backward``),
    as ``{name: local float32 shard}`` under FSDP2 (plain tensors otherwise). The model's
    existing gradients are restored afterwards. Uses backward, because
    ``torch.autograd.grad`` returns None for FSDP2 parameters; every rank must call it.
    Pause the projector around it (``with proj.paused():``) if one is attached.
    """
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad and (names is None or n in names)]
    saved = {n: p.grad for n, p in params}
    for _, p in params:
        p.grad = None
    try:
        closure()
        out = {n: _local(p.grad).detach().float().clone() for n, p in params if p.grad is not None}
    finally:
        for n, p in params:
            p.grad = saved[n]
    return out


# ----------------------------------------------------------------------------------------
# DeepSpeed ZeRO-1/2
# ----------------------------------------------------------------------------------------


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


def _zero_pieces(zero_opt, layout: Mapping[str, tuple[int, int, LocalSlice]], params: Mapping[str, Tensor]):
    """This rank's reduced gradient piece of every parameter in ``layout`` (views into
    DeepSpeed's buffers, so in-place projection changes what the optimizer consumes)."""
    flats: dict[int, Optional[Tensor]] = {}
    lists: dict[int, list] = {}
    out = {}
    for name, (gi, j, sl) in layout.items():
        if gi not in flats:
            flat = None
            if getattr(zero_opt, "cpu_offload", False):
                flat = zero_opt.single_partition_of_fp32_groups[gi].grad
            else:
                group = zero_opt.averaged_gradients[gi] if gi in zero_opt.averaged_gradients else None
                if group is None:
                    raise RuntimeError("DeepSpeed has no reduced gradients for parameter group "
                                       f"{gi}; OGPSA projects at the gradient-accumulation boundary step only")
                flat = getattr(group, "flat_partition", None)
                lists[gi] = [t for t in group if not getattr(t, "_zero_padding", False)]
            flats[gi] = flat.view(-1) if flat is not None else None
        p = params[name]
        flat = flats[gi]
        if flat is not None:
            hp = p._hp_mapping.hp_fragment_address
            piece = flat.narrow(0, int(hp.start), int(hp.numel))
        else:
            piece = lists[gi][j]
        if piece.numel() != sl.numel:
            raise RuntimeError(f"DeepSpeed's gradient piece of {name!r} has {piece.numel()} elements but its "
                               f"partition mapping says {sl.numel}")
        out[name] = piece.view(-1)
    return out


class ZeroProjector(Projector):
    """Projects DeepSpeed ZeRO-1/2 partitioned gradients right before the ZeRO optimizer's
    step (after reduction, before DeepSpeed's overflow check, clipping and update). Create
    with :func:`attach_deepspeed`. Clipping stays DeepSpeed's (``gradient_clipping`` in the
    DeepSpeed config), which then sees the projected gradient: project -> clip -> step."""

    def __init__(self, engine, subspace: Union[Subspace, ShardedSubspace], config: Optional[OGPSAConfig] = None):
        self.engine = engine
        self.zero_optimizer = engine.optimizer
        config = config or subspace.config
        if config.max_norm is not None:
            warnings.warn("OGPSAConfig.max_norm is ignored under DeepSpeed; set gradient_clipping in the DeepSpeed "
                          "config (DeepSpeed clips the projected gradient)", stacklevel=3)
            config = config.replace(max_norm=None)
        super().__init__(engine.module, None, subspace, config)
        opt = self.zero_optimizer
        self._orig_step = opt.step
        self._step_was_own = "step" in getattr(opt, "__dict__", {})
        projector = self

        def step(*args, **kwargs):
            projector.project()
            return projector._orig_step(*args, **kwargs)

        opt.step = step
        self._wrapped = True

    def set_subspace(self, subspace: Union[Subspace, ShardedSubspace]) -> None:
        """Use a new full subspace (sliced here to this rank's partition) from the next step on."""
        if isinstance(subspace, ShardedSubspace):
            raise TypeError("attach_deepspeed takes a full Subspace (ZeRO partitions cut parameters at element "
                            "offsets; each rank slices its own part)")
        if subspace.config.scope != self.config.scope:
            raise ValueError(f"subspace was built with scope={subspace.config.scope!r} but the projector "
                             f"uses scope={self.config.scope!r}")
        subspace.check_model(self.model)
        opt = self.zero_optimizer
        params = dict(self.model.named_parameters())
        by_id = {id(p): n for n, p in params.items()}
        self._layout = _zero_partition_slices(opt, by_id)
        self._params = params
        groups = list(getattr(opt, "real_dp_process_group", None) or [None])
        if any(g is not groups[0] for g in groups):
            raise UnsupportedSetupError("parameter groups use different data-parallel process groups")
        # None is DeepSpeed's (and torch's) spelling of the default group; the partial tables
        # must still be summed over it
        self.process_group = groups[0] if groups[0] is not None else dist.group.WORLD
        self.subspace = subspace
        names, bases, grams = [], [], []
        home = torch.device("cpu") if getattr(opt, "cpu_offload", False) else _first_device(self.model)
        for n, shape in zip(subspace.names, subspace.shapes):
            u = subspace.basis(n)
            sl = self._layout[n][2] if n in self._layout else LocalSlice(tuple(shape), "flat", 0, 0, 0)
            names.append(n)
            bases.append(sl.take_rows(u).to(home))
            grams.append(subspace.gram(n))
        self._runner = _PieceProjection(names, bases, grams, self.config, self.process_group)
        self._plans.clear()

    def project(self, max_norm: Optional[float] = None) -> Optional[ProjectionStats]:
        """Project this rank's reduced ZeRO partition (collective over the data-parallel group)."""
        if self._paused:
            return None
        if max_norm is not None:
            raise ValueError("under DeepSpeed, clipping is DeepSpeed's: set gradient_clipping in its config")
        pieces = _zero_pieces(self.zero_optimizer, self._layout, self._params)
        ordered = [pieces.get(n) for n in self._runner.names]
        any_piece = next((p for p in ordered if p is not None), None)
        if any_piece is not None:
            dtype, device = any_piece.dtype, any_piece.device
        else:
            first = self._runner.bases[0]
            dtype, device = torch.float32, first.device
        stats = self._runner.run(ordered, dtype, device, None)
        self.last_stats = stats
        self.num_projections += 1
        return stats

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False) -> Tensor:
        raise RuntimeError("under DeepSpeed the engine clips (gradient_clipping in its config) after OGPSA projects")

    def remove(self) -> None:
        """Restore the ZeRO optimizer's own step; later steps are not projected."""
        if self._wrapped:
            if self._step_was_own:
                self.zero_optimizer.step = self._orig_step
            else:
                del self.zero_optimizer.step  # the instance attribute; the class's step shows again
            self._wrapped = False
        super().remove()


def attach_deepspeed(engine, subspace: Subspace, config: Optional[OGPSAConfig] = None) -> Projector:
    """Attach OGPSA to a DeepSpeed engine (the object ``deepspeed.initialize`` returns, or a
    trainer's ``model_wrapped``).

    ZeRO stage 1/2: each rank slices the basis to its partition's element ranges and the
    reduced partition is projected right before the ZeRO optimizer's step (one all_reduce
    of a ``[tensors, k+1]`` table). Stage 0 with a plain torch optimizer: the usual
    optimizer pre-hook (gradients are already all-reduced). Stage 3 is not supported.
    """
    stage = int(engine.zero_optimization_stage())
    if stage in (1, 2):
        if not hasattr(engine.optimizer, "params_in_partition"):
            raise UnsupportedSetupError(f"DeepSpeed ZeRO stage {stage} optimizer {type(engine.optimizer).__name__} "
                                      f"does not expose its gradient partitions")
        return ZeroProjector(engine, subspace, config)
    if stage == 0:
        if isinstance(engine.optimizer, torch.optim.Optimizer):
            return Projector(engine.module, engine.optimizer, subspace, config)
        raise UnsupportedSetupError(f"DeepSpeed without ZeRO wraps the optimizer in {type(engine.optimizer).__name__}; "
                                  f"OGPSA supports ZeRO stage 1 or 2 (or stage 0 with a plain torch optimizer)")
    raise UnsupportedSetupError("DeepSpeed ZeRO stage 3 is not supported by OGPSA yet; use ZeRO-2 or FSDP2 "
                              "(ogpsa.distributed.attach_fsdp)")

