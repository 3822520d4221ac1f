"""FSDP2 (``fully_shard``): project each rank's DTensor gradient shards with its basis
shards and one all_reduce per projection."""

from __future__ import annotations

from typing import Optional, Union

import torch

from ..config import OGPSAConfig
from ..plan import check_coverage
from ..projector import Projector
from ..subspace import Subspace, SubspaceMismatchError
from .layout import _first_device, _local, fsdp_layout, is_dtensor
from .pieces import PieceProjection
from .sharded import ShardedSubspace

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
        check_coverage(list(self.model.named_parameters()), subspace.names,
                       allow_partial=bool(self.config.allow_partial), what="gradient space under FSDP2")
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
        self._runners: dict[bool, PieceProjection] = {}
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
            self._runners[include] = PieceProjection(names, bases, grams, self.config, group)
        self._plans.clear()
        self._record.clear()

    @property
    def num_plan_builds(self) -> int:
        return sum(r.num_plan_builds for r in self._runners.values()) if hasattr(self, "_runners") else 0

    @num_plan_builds.setter
    def num_plan_builds(self, value: int) -> None:
        pass  # counted by the runners

    def _check_params(self) -> None:
        """Parameters are bound at attach / set_subspace. A replaced DTensor parameter leaves
        its old object without a gradient, which :meth:`_pieces` reports (never skipped)."""

    def _clip_params(self) -> list:
        return [p for _n, p in self._named]

    def _current_grads(self) -> list:
        return self._pieces(self._runners[True])

    def _pieces(self, runner: PieceProjection) -> list:
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
        return pieces

    def _project(self, max_norm: Optional[float], error_if_nonfinite: bool):
        """Project (and, with ``max_norm``, clip) the local gradient shards (collective: every
        rank of the FSDP group must call it). Local shards already projected by this projector
        and not written since are not projected again (the same on every rank)."""
        runner = self._runners[max_norm is not None]
        pieces = self._pieces(runner)
        if not pieces:
            return None, False, None
        if self._record.covers(pieces):
            return self.last_stats, True, None
        if max_norm is not None:
            with_basis = [g for n, g in zip(runner.names, pieces) if n in self.subspace]
            if with_basis and self._record.covers(with_basis):  # projected earlier: clip only
                return self.last_stats, True, self._plain_clip(max_norm, error_if_nonfinite)
        first = pieces[0]
        stats = runner.run(pieces, first.dtype, first.device, max_norm, error_if_nonfinite)
        self._record.mark(pieces)
        self.last_stats = stats
        self.num_projections += 1
        return stats, False, None


def attach_fsdp(model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer],
                subspace: Union[Subspace, ShardedSubspace], config: Optional[OGPSAConfig] = None) -> ShardedProjector:
    """Attach OGPSA to an FSDP2 (``fully_shard``) model: like :func:`ogpsa.attach`, but the
    basis is kept sliced like each parameter and each projection costs one all_reduce of a
    ``[tensors, k+1]`` float32 table. ``subspace``: a full :class:`~ogpsa.Subspace` (every
    rank slices its part) or a :class:`ShardedSubspace`."""
    return ShardedProjector(model, optimizer, subspace, config)

