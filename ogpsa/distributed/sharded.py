"""ShardedSubspace: the bases sliced like each parameter on this rank (FSDP2), built from
a full subspace, from sharded reference gradients, or loaded from a subspace file."""

from __future__ import annotations

from dataclasses import replace
from typing import Mapping, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import Tensor

from .. import basis_build, ops
from ..config import OGPSAConfig
from ..subspace import _DTYPES, NamedBases, Subspace, SubspaceMismatchError, coefficients_from_grams
from .layout import LocalSlice, _all_gather_via, _all_reduce, _comm, _first_device, _local, fsdp_layout, is_dtensor

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
        computes the Gram matrices of its pieces (:func:`ogpsa.basis_build.reference_grams`,
        the Gram pass of :meth:`Subspace.from_gradients`); ONE all_reduce sums them (the Gram matrix
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
            # the build's Gram pass (as Subspace.from_gradients): one backend pass, only rows
            # out of float32 range get an inf-norm (no full-size inf-norm pass over every shard)
            gram[nonempty] = basis_build.reference_grams([refs[i] for i in nonempty], backend=backend)
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



def shard_subspace(subspace: Subspace, model: torch.nn.Module,
                   device: Union[str, torch.device, None] = None) -> ShardedSubspace:
    """This rank's slices of a full subspace, sharded like the FSDP2 ``model``'s parameters."""
    slices, group = fsdp_layout(model, subspace.names)
    return ShardedSubspace.from_subspace(subspace, slices, group, device=device or _first_device(model))



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

