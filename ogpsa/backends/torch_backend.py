"""The ``torch`` backend: per-tensor PyTorch ops, runs anywhere; also the fallback."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .base import Backend


class TorchBackend(Backend):
    name = "torch"

    def availability(self) -> tuple[bool, str]:
        return True, "pure PyTorch, any device and dtype"

    def supports(self, device, grad_dtype, basis_dtype, forced) -> bool:
        return True

    def dots(self, grads: Sequence[Tensor], bases: Sequence[Tensor], k_max: int) -> Tensor:
        out = torch.zeros(len(grads), k_max + 1, dtype=torch.float32, device=grads[0].device)
        for i, (g, u) in enumerate(zip(grads, bases)):
            g32 = g.reshape(-1).float()
            k = u.shape[0]
            if k:
                out[i, :k] = u.float() @ g32
            out[i, k_max] = g32.dot(g32)
        return out

    def update_(self, grads, bases, weights: Tensor, kappa: float, scale: Tensor) -> None:
        for i, (g, u) in enumerate(zip(grads, bases)):
            k = u.shape[0]
            flat = g.view(-1)
            new = flat.float() * kappa if kappa != 1.0 else flat.float()
            if k:
                new = new - u.float().T @ weights[i, :k]
            flat.copy_(new * scale[i])

    def gram(self, refs: Sequence[Tensor]) -> Tensor:
        return torch.stack([r.double() @ r.double().T for r in refs])

    def combine(self, refs, coefficients: Tensor, ks, out_dtype) -> list[Tensor]:
        return [(coefficients[i, :k].float() @ r.float()).to(out_dtype).contiguous() for i, (r, k) in enumerate(zip(refs, ks))]
