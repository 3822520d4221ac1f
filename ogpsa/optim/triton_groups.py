"""The Triton backend's host side of the projected optimizer step: tensors grouped by device,
parameter dtype, basis dtype and amsgrad (:func:`triton_groups`), one launch per pass for each
group (:class:`TritonGroup`), the basis side (chunk tables, padded M^+ / Gram stacks) cached by
parameters and basis versions in :data:`ogpsa.optim.backends._CACHE`.

Split from :mod:`ogpsa.optim.backends` (which routes tensors to kernels and holds the shared
caches and the tiny-step algebra); this module only builds and launches the Triton groups.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .backends import _CACHE, _triton, gram_of, padded_stack, removed_sq, tensor_weights

_NOWHERE: dict = {}


def _nowhere(device: torch.device) -> int:
    """A zeroed, 16-byte aligned word per device: the (never dereferenced) basis address of a
    tensor without basis rows."""
    if device not in _NOWHERE:
        _NOWHERE[device] = torch.zeros(4, dtype=torch.float32, device=device)
    return _NOWHERE[device].data_ptr()


class _Subset:
    """The cached, basis side of some tensors of a :class:`TritonGroup`: chunk table (pointers
    of parameters, moments, bases; shapes), padded M^-1 / Gram stacks, ranks."""

    def __init__(self, grp: TritonGroup, idx: list, chunk: int, rows: int) -> None:
        from ogpsa.kernels import common, tables

        kern = grp.kern
        items = [grp.items[i] for i in idx]
        self.idx = idx
        dev = grp.device
        ps = [p for p, _, _, _ in items]
        us = [b[1] if b is not None else None for _, _, _, b in items]
        lists = [[p.data_ptr() for p in ps], [s["exp_avg"].data_ptr() for _, s, _, _ in items],
                 [s["exp_avg_sq"].data_ptr() for _, s, _, _ in items],
                 [s["max_exp_avg_sq" if grp.amsgrad else "exp_avg_sq"].data_ptr() for _, s, _, _ in items],
                 [u.data_ptr() if u is not None and u.shape[0] else _nowhere(dev) for u in us]]
        ks = [0 if u is None else int(u.shape[0]) for u in us]
        vec = kern.u_vec(grp.u_dtype)
        self.stable_aligned = all(a % 16 == 0 for lst in lists for a in lst) and all(p.numel() % vec == 0 for p in ps)
        self.table = tables.build_table(lists, [p.numel() for p in ps], ks, chunk, dev, seg_tb=common.SEG_TB,
                                        rows=rows, aligned=self.stable_aligned)
        k = grp.k_max
        minvs = [b[2] if b is not None else None for _, _, _, b in items]
        self.minv32 = padded_stack(minvs, k, dev, torch.float32)
        self.minv64 = padded_stack(minvs, k, dev, torch.float64)
        self.gram = padded_stack([gram_of(b) if b is not None else None for _, _, _, b in items], k, dev)
        self.ks = torch.tensor(ks, dtype=torch.int64).to(dev)


class TritonGroup:
    """Items (``(p, state, hyper, basis)``) that share device, parameter dtype, basis dtype and
    amsgrad: one launch per pass for all of them. ``positions``: their indices in the step's
    item list. Nothing is written until :meth:`begin`."""

    def __init__(self, positions: list, items: list, project_weight_decay: bool) -> None:
        self.kern = _triton()[0]
        self.positions, self.items = positions, items
        p0 = items[0][0]
        self.device, self.p_dtype, self.amsgrad = p0.device, p0.dtype, bool(items[0][2].amsgrad)
        self.u_dtype = next((b[1].dtype for _, _, _, b in items if b is not None), torch.float32)
        self.k_max = max([b[1].shape[0] for _, _, _, b in items if b is not None] + [1])
        self.project_wd = bool(project_weight_decay)
        self.decay_in_d = self.project_wd and any(h.weight_decay != 0 for _, _, h, _ in items)
        self._hyper: Optional[Tensor] = None
        self.single_pass: list = []  # group indices stepped in one pass by the last tensor_step

    def subset(self, idx: list, chunk: int, rows: int) -> _Subset:
        its = [self.items[i] for i in idx]
        stable = [t for p, s, _, b in its for t in (p, s["exp_avg"], s["exp_avg_sq"], s.get("max_exp_avg_sq"))
                  + ((None, None, None) if b is None else (b[1], b[2], b[3] if len(b) > 3 else None))]
        values = tuple(None if b is None else (b[1]._version, b[2]._version, b[3]._version if len(b) > 3 else None)
                       for _, _, _, b in its)  # bases, M^-1, M: stacks hold their values
        extra = ("adamw", chunk, rows, self.p_dtype, self.u_dtype, self.amsgrad, self.k_max) + values
        return _CACHE.get(stable, extra, lambda: _Subset(self, idx, chunk, rows))

    def begin(self) -> None:
        """Count the step (``state["step"] += 1``) and build this step's per-tensor hyperparameters."""
        rows = []
        for _, state, h, _ in self.items:
            state["step"] += 1
            t = float(state["step"].item())
            wd = h.weight_decay
            rows.append([1.0 - h.beta1, h.beta2, 1.0 - h.beta2, h.eps, 1.0 - h.beta1 ** t,
                         (1.0 - h.beta2 ** t) ** 0.5, h.lr, wd if self.project_wd else 0.0,
                         1.0 if self.project_wd else 1.0 - h.lr * wd, -1.0 if h.maximize else 1.0])
        self._hyper = torch.tensor(rows, dtype=torch.float64).float()

    def _arrays(self, sub: _Subset) -> tuple:
        grads = [self.items[i][0].grad for i in sub.idx]
        g_ptrs, hyper = self.kern.step_buffer([g.data_ptr() for g in grads], self._hyper[sub.idx], self.device)
        aligned = sub.stable_aligned and all(g.data_ptr() % 16 == 0 for g in grads)
        return g_ptrs, hyper, aligned

    def _device(self):
        import contextlib

        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    def dots(self) -> tuple:
        """Pass 1 over every tensor (two-pass chunks): ``[T, k_max + 1]`` float64 ``[c, ||d||^2]``."""
        kern = self.kern
        sub = self.subset(list(range(len(self.items))), kern.CHUNK, kern.ROWS)
        g_ptrs, hyper, aligned = self._arrays(sub)
        w = self.k_max + 1
        partials = torch.empty(sub.table.num_chunks, w, dtype=torch.float32, device=self.device)
        out = torch.empty(len(self.items), w, dtype=torch.float64, device=self.device)
        with self._device():
            kern.dots(sub.table, g_ptrs, hyper, self.p_dtype, self.u_dtype, self.amsgrad, self.decay_in_d, aligned,
                      self.k_max, partials, out)
        self._pending = (sub, hyper, aligned)
        return out, sub

    def apply_(self, w: Tensor, kappa: Tensor) -> None:
        """Pass 2 after :meth:`dots`: ``w`` ``[T, k]`` and ``kappa`` ``[T]`` (any float dtype)."""
        sub, hyper, aligned = self._pending
        wk = torch.zeros(len(self.items), self.k_max + 1, dtype=torch.float32, device=self.device)
        wk[:, :w.shape[1]] = w.to(self.device, torch.float32)
        wk[:, -1] = kappa.to(self.device, torch.float32)
        with self._device():
            self.kern.apply_(sub.table, hyper, self.p_dtype, self.u_dtype, self.decay_in_d, aligned, wk)

    def tensor_step(self, mode: str, aligned_scale: float) -> list:
        """The whole per-tensor-scope step: tensors of at most ``SINGLE_PASS_MAX_NUMEL`` elements
        in one pass (one launch), the others in two passes with the float64 tiny step between.
        Returns ``[(group indices, ||d||^2 [n], removed [n])]`` (float64, on the device)."""
        kern = self.kern
        limit = int(kern.SINGLE_PASS_MAX_NUMEL)
        small = [i for i, it in enumerate(self.items) if it[0].numel() <= limit]
        large = [i for i, it in enumerate(self.items) if it[0].numel() > limit]
        k, out = self.k_max, []
        self.single_pass = small
        if small:
            sub = self.subset(small, max(1, limit), kern.SMALL_ROWS)
            g_ptrs, hyper, aligned = self._arrays(sub)
            rows = torch.empty(len(small), k + 1, dtype=torch.float32, device=self.device)
            with self._device():
                kern.fused_small_(sub.table, g_ptrs, hyper, self.p_dtype, self.u_dtype, self.amsgrad,
                                  self.decay_in_d, aligned, sub.minv32, mode, aligned_scale, rows)
            rows = rows.double()
            w, kappa = tensor_weights(rows[:, :k], sub.minv64, sub.ks, mode, aligned_scale)  # as the kernel did
            out.append((small, rows[:, k], removed_sq(rows[:, k], rows[:, :k], w, kappa, sub.gram)))
        if large:
            sub = self.subset(large, kern.CHUNK, kern.ROWS)
            g_ptrs, hyper, aligned = self._arrays(sub)
            partials = torch.empty(sub.table.num_chunks, k + 1, dtype=torch.float32, device=self.device)
            rows = torch.empty(len(large), k + 1, dtype=torch.float64, device=self.device)
            with self._device():
                kern.dots(sub.table, g_ptrs, hyper, self.p_dtype, self.u_dtype, self.amsgrad, self.decay_in_d,
                          aligned, k, partials, rows)
                w, kappa = tensor_weights(rows[:, :k], sub.minv64, sub.ks, mode, aligned_scale)
                wk = torch.cat([w, kappa[:, None]], 1).float().contiguous()
                kern.apply_(sub.table, hyper, self.p_dtype, self.u_dtype, self.decay_in_d, aligned, wk)
            out.append((large, rows[:, k], removed_sq(rows[:, k], rows[:, :k], w, kappa, sub.gram)))
        return out


def triton_groups(indexed: list, project_weight_decay: bool) -> list:
    """Group ``[(position, item)]`` for the Triton kernels (items without a basis join a group
    of their device, dtype and amsgrad). Builds nothing and writes nothing."""
    keyed: dict = {}
    loose = []
    for pos, item in indexed:
        p, _, h, basis = item
        if basis is None:
            loose.append((pos, item))
            continue
        keyed.setdefault((p.device, p.dtype, basis[1].dtype, bool(h.amsgrad)), []).append((pos, item))
    for pos, item in loose:
        p, _, h, _ = item
        home = next((key for key in keyed if key[0] == p.device and key[1] == p.dtype and key[3] == bool(h.amsgrad)),
                    (p.device, p.dtype, torch.float32, bool(h.amsgrad)))
        keyed.setdefault(home, []).append((pos, item))
    return [TritonGroup([pos for pos, _ in members], [it for _, it in members], project_weight_decay)
            for members in keyed.values()]
