"""The ``torch`` backend: per-tensor PyTorch ops, runs anywhere; also the fallback.

Memory. Every pass walks each tensor in slices of :data:`CHUNK` elements, so the float32
temporaries (an upcast bf16 gradient slice, an upcast bf16 basis slice, the new values) are
bounded by a few chunks whatever the model size: the extra peak stays far below the
gradient bytes (a whole-tensor version needed 2x the gradient bytes for fp32 and 6x for
bf16). float32 gradients with a float32 basis are updated in place with ``addmv_`` and no
temporary at all. Slices are contiguous views of the flat tensors (no copies).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .base import Backend

#: elements of one tensor processed at a time (4 MiB as float32): large enough that the
#: per-slice launch cost is noise on CPU and GPU, small enough to bound the temporaries
CHUNK = 1 << 20


def _slices(n: int, k: int):
    """(start, stop) of the slices of an N-element tensor with a k-row basis: about CHUNK
    elements of gradient plus basis per slice."""
    step = max(1, CHUNK // (k + 1))
    return ((s, min(n, s + step)) for s in range(0, n, step))


class TorchBackend(Backend):
    name = "torch"

    def availability(self) -> tuple[bool, str]:
        return True, "pure PyTorch, any device and dtype"

    def supports(self, device, grad_dtype, basis_dtype, forced) -> bool:
        return True

    def dots(self, grads: Sequence[Tensor], bases: Sequence[Tensor], k_max: int) -> Tensor:
        # per-slice partial sums are accumulated in float64 in a fixed order: deterministic,
        # and as accurate as one float32 reduction over the whole tensor
        out = torch.zeros(len(grads), k_max + 1, dtype=torch.float64, device=grads[0].device)
        for i, (g, u) in enumerate(zip(grads, bases)):
            flat = g.reshape(-1)
            k = u.shape[0]
            row = out[i]
            for s, e in _slices(flat.numel(), k):
                g32 = flat[s:e].float()  # a view when g is float32
                if k:
                    row[:k] += (u[:, s:e].float() @ g32).double()
                row[k_max] += g32.dot(g32).double()
        return out.float()

    def update_(self, grads, bases, weights: Tensor, kappa: float, scale: Tensor) -> None:
        for i, (g, u) in enumerate(zip(grads, bases)):
            k = u.shape[0]
            flat = g.view(-1)
            w = weights[i, :k]
            if flat.dtype == torch.float32 and u.dtype == torch.float32:
                # in place, no temporary: g <- kappa g - U^T w, then the scale (kappa by a
                # multiply, not addmv's beta: beta=0 would drop a NaN that kappa * g keeps)
                if kappa != 1.0:
                    flat.mul_(kappa)
                if k:
                    flat.addmv_(u.T, w, alpha=-1.0)
                flat.mul_(scale[i])
                continue
            for s, e in _slices(flat.numel(), k):
                new = flat[s:e].float()  # a copy: g is bf16/fp16 here, or U is bf16 (then g fp32)
                if new.data_ptr() == flat[s:e].data_ptr():
                    new = new.clone()  # fp32 gradient with a bf16 basis: keep g untouched until the copy
                if kappa != 1.0:
                    new.mul_(kappa)
                if k:
                    new.addmv_(u[:, s:e].float().T, w, alpha=-1.0)
                new.mul_(scale[i])
                flat[s:e].copy_(new)

    def gram(self, refs: Sequence[Tensor]) -> Tensor:
        out = []
        for r in refs:
            m = r.shape[0]
            acc = torch.zeros(m, m, dtype=torch.float64, device=r.device)
            for s, e in _slices(r.shape[1], m):
                part = r[:, s:e].double()
                acc += part @ part.T
            out.append(acc)
        return torch.stack(out)

    def combine(self, refs, coefficients: Tensor, ks, out_dtype) -> list[Tensor]:
        out = []
        for i, (r, k) in enumerate(zip(refs, ks)):
            a = coefficients[i, :k].float()
            u = torch.empty(k, r.shape[1], dtype=out_dtype, device=r.device)
            for s, e in _slices(r.shape[1], r.shape[0]):
                u[:, s:e] = a @ r[:, s:e].float()
            out.append(u)
        return out
