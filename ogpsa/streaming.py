"""Streaming basis (``OGPSAConfig.stream_window``): the last W chunk gradients as basis rows.

Every refresh adds a few new chunk gradients (a slice of s new reference examples) and drops the
oldest beyond the window. The basis is re-orthonormalised incrementally: per tensor the W x W
Gram matrix of the window rows is kept, and an update computes only the dot products of the
new rows with the window (s x W instead of W x W / 2), drops the rows and columns of the evicted
rows, factorises the tiny float64 matrix on the host and forms U = A R (one pass over the
window). The result equals :meth:`ogpsa.Subspace.from_gradients` on the same rows, in the same
order (oldest first), to float32 rounding (tests/test_rich.py).

The window lives in memory only: a run resumed from a checkpoint (or started from a given
subspace) seeds its window with the saved basis rows (:func:`ogpsa.pool.seed_window`), which span
the same space, and fresh chunk gradients push them out as usual.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor

from . import ops
from .config import OGPSAConfig
from .subspace import _DTYPES, Subspace, coefficients_from_grams


class StreamingBasis:
    """A window of at most ``window`` reference rows per tensor and its Gram matrices.

    Args:
        config: projection settings (``rank``, ``method``, ``normalize_reference``,
            ``basis_dtype``...); ``window`` defaults to ``config.stream_window``.
    """

    def __init__(self, config: OGPSAConfig, window: Optional[int] = None, *, backend: Optional[str] = None):
        window = config.stream_window if window is None else window
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise ValueError(f"window={window!r} must be an integer >= 1 (OGPSAConfig.stream_window)")
        self.config = config
        self.window = window
        self.backend = backend
        self.names: list[str] = []
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.devices: dict[str, torch.device] = {}
        self.rows: dict[str, list[Tensor]] = {}  # name -> window rows, oldest first ([N] float32)
        self.grams: dict[str, Tensor] = {}  # name -> [w, w] float64 on the CPU
        self.count = 0  # rows in the window
        self.dots = 0  # row dot products computed so far (the incremental cost)

    def add(self, grads: Sequence[Mapping[str, Optional[Tensor]]]) -> None:
        """Append new reference gradients (``{name: tensor}`` dicts, one row each), evicting the
        oldest rows beyond the window. Non-finite rows are kept as zero rows (no direction)."""
        if isinstance(grads, Mapping) or not len(grads):
            raise ValueError("grads must be a non-empty list of {param_name: tensor} dicts")
        for d in grads:
            for n, t in d.items():
                if t is None:
                    continue
                if n not in self.shapes:
                    if self.count:  # a tensor new to the window: zero rows before
                        numel = int(t.numel())
                        dev = self._device(t)
                        self.rows[n] = [torch.zeros(numel, device=dev) for _ in range(self.count)]
                        self.grams[n] = torch.zeros(self.count, self.count, dtype=torch.float64)
                    else:
                        self.rows[n], self.grams[n] = [], torch.zeros(0, 0, dtype=torch.float64)
                    self.names.append(n)
                    self.shapes[n] = tuple(t.shape)
                    self.devices[n] = self._device(t)
                elif tuple(t.shape) != self.shapes[n]:
                    raise ValueError(f"reference gradients disagree on the shape of {n!r}: {self.shapes[n]} vs "
                                     f"{tuple(t.shape)}")
        new = len(grads)
        keep = max(0, min(self.count, self.window - new))
        drop = self.count - keep
        for n in self.names:
            numel = int(torch.Size(self.shapes[n]).numel())
            fresh = []
            for d in grads:
                t = d.get(n)
                row = (t.detach().reshape(-1).to(self.devices[n], torch.float32, copy=True) if t is not None
                       else torch.zeros(numel, device=self.devices[n]))
                if not bool(torch.isfinite(row).all()):
                    row.zero_()
                fresh.append(row)
            fresh = fresh[-self.window:]
            old = self.rows[n][drop:]
            g_old = self.grams[n][drop:, drop:]
            new_rows = torch.stack(fresh).double() if fresh else None
            cross = (new_rows @ torch.stack(old).double().t()).cpu() if old else torch.zeros(len(fresh), 0,
                                                                                              dtype=torch.float64)
            inner = (new_rows @ new_rows.t()).cpu()
            self.dots += len(fresh) * len(old) + len(fresh) * (len(fresh) + 1) // 2
            w = len(old) + len(fresh)
            g = torch.zeros(w, w, dtype=torch.float64)
            g[:len(old), :len(old)] = g_old
            g[len(old):, :len(old)] = cross
            g[:len(old), len(old):] = cross.t()
            g[len(old):, len(old):] = inner
            self.grams[n] = g
            self.rows[n] = old + fresh
        self.count = min(self.window, keep + min(new, self.window))

    @staticmethod
    def _device(t: Tensor) -> torch.device:
        return t.device

    def subspace(self) -> Subspace:
        """The orthonormal basis of the current window (per tensor; ``config.scope`` as in
        :meth:`Subspace.from_gradients`)."""
        if not self.count:
            raise RuntimeError("the streaming window is empty: add() reference gradients first")
        refs = [torch.stack(self.rows[n]).contiguous() for n in self.names]
        grams = torch.stack([self.grams[n] for n in self.names])
        coefficients = coefficients_from_grams(grams, refs, self.config)
        bases = ops.combine(refs, coefficients, out_dtype=_DTYPES[self.config.basis_dtype], backend=self.backend)
        shapes = [self.shapes[n] for n in self.names]
        return Subspace(self.names, shapes, bases, self.config, num_references=self.count)

    def window_rows(self) -> list[dict[str, Tensor]]:
        """The window as ``{name: tensor}`` dicts, oldest first (for a full rebuild to compare)."""
        return [{n: self.rows[n][i].view(self.shapes[n]) for n in self.names} for i in range(self.count)]


__all__ = ["StreamingBasis"]
