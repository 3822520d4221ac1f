"""Projection of a fixed, rank-consistent list of local gradient pieces with one all_reduce.

The basis side (validated local bases with the FULL k x k Gram matrices, zero-padded
stand-ins for pieces too short to hold k elements, the plan) is built once per subspace
and gradient dtype/device; a step only binds this step's pieces (O(T) checks)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import ops
from ..config import OGPSAConfig
from ..ops import ProjectionStats
from ..plan import BasisEntry, basis_entry


class PieceProjection:
    """Projects local pieces of the gradients; every rank must pass the same tensors in the
    same order (the all_reduce adds the partial tables row by row). A rank that holds none
    (or fewer than k elements) of a parameter projects a zero-padded scratch buffer of at
    least k elements in its place: its partials are zero and its update is copied back over
    the real (short) piece. Scratch buffers are this object's own, never a gradient."""

    def __init__(self, names: Sequence[str], bases: Sequence[Tensor], grams: Sequence[Optional[Tensor]],
                 config: OGPSAConfig, process_group):
        self.names = list(names)
        self.bases = list(bases)
        self.grams = list(grams)
        self.config = config
        self.process_group = process_group
        self.num_plan_builds = 0
        # pieces holding at least max(1, k) elements are projected in place
        self.direct = [u.shape[1] >= max(1, u.shape[0]) for u in self.bases]
        self._entries: dict[torch.device, list[BasisEntry]] = {}
        self._plans: dict[tuple, ops.ProjectionPlan] = {}
        self._scratch: dict[tuple, list[Optional[Tensor]]] = {}
        self._entries_for(self.bases[0].device if self.bases else torch.device("cpu"))

    def _entries_for(self, device: torch.device) -> list[BasisEntry]:
        """Validated entries on ``device`` (bases moved there once, not every step)."""
        entries = self._entries.get(device)
        if entries is None:
            entries = []
            for name, u, m, direct in zip(self.names, self.bases, self.grams, self.direct):
                u = u.to(device)
                if not direct:
                    padded = torch.zeros(u.shape[0], max(1, u.shape[0]), dtype=u.dtype, device=device)
                    padded[:, :u.shape[1]] = u
                    u = padded
                entries.append(basis_entry(u, u.shape[1], device, f"parameter {name!r} (local piece)",
                                           scope=self.config.scope, gram=m))
            self._entries[device] = entries
        return entries

    def run(self, pieces: Sequence[Optional[Tensor]], fallback_dtype: torch.dtype, fallback_device,
            max_norm: Optional[float], error_if_nonfinite: bool = False) -> ProjectionStats:
        grads, copy_back = [], []
        key_dtypes = []
        for i, piece in enumerate(pieces):
            dtype = piece.dtype if piece is not None else fallback_dtype
            device = piece.device if piece is not None else torch.device(fallback_device)
            if self.direct[i] and piece is not None:
                if not piece.is_contiguous():
                    raise ValueError(f"the local gradient piece of {self.names[i]!r} is not contiguous")
                grads.append(piece.view(-1))
            else:
                buf = self._buffer(i, dtype, device)
                buf.zero_()
                if piece is not None and piece.numel():
                    buf[:piece.numel()] = piece.reshape(-1)
                    copy_back.append((piece, buf))
                grads.append(buf)
            key_dtypes.append(dtype)
        device = grads[0].device
        key = (device, tuple(key_dtypes), max_norm is not None)
        plan = self._plans.get(key)
        if plan is None:
            entries = self._entries_for(device)
            plan = ops.plan_from_entries(entries, [e.basis.shape[1] for e in entries], key_dtypes,
                                         [device] * len(entries), scope=self.config.scope,
                                         backend=self.config.backend, names=self.names)
            self._plans[key] = plan
            self.num_plan_builds += 1
        stats = ops.execute(plan, grads, mode=self.config.mode, max_norm=max_norm,
                            aligned_scale=self.config.aligned_scale, process_group=self.process_group,
                            error_if_nonfinite=error_if_nonfinite)
        for piece, buf in copy_back:
            piece.view(-1).copy_(buf[:piece.numel()])
        return stats

    def _buffer(self, i: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        bufs = self._scratch.setdefault((dtype, device), [None] * len(self.bases))
        if bufs[i] is None:
            bufs[i] = torch.zeros(max(1, self.bases[i].shape[0]), dtype=dtype, device=device)
        return bufs[i]
