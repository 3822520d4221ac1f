"""The original OGPSA implementation's projection scheme, re-implemented for benchmarking.

The authors' public code (a LLaMA-Factory fork, ``OrthogonalProjectionTrainer``)
registers one ``Tensor.register_hook`` per trainable parameter. Every backward of every
micro-batch runs each hook, which:

* copies that parameter's stored reference gradient(s) from the CPU to the gradient's
  device, cast to the gradient's dtype (``base.to(device=grad.device, dtype=grad.dtype)``);
* one reference gradient (DPO, k=1): ``grad -= (grad.g1 / (g1.g1 + eps)) * g1``;
* two (SFT, k=2): Gram-Schmidt on the fly (u1 = g1/(|g1|+eps), u2 = normalised part of
  g2 orthogonal to u1, with a host-side ``norm < 1e-6`` test), then builds the in-plane
  component ``(grad.u1) u1 + (grad.u2) u2`` and copies ``grad - plane`` into ``grad``;
* also queries the process-group rank and trainer state for its (disabled) logging.

Gradient accumulation of 8 runs all of this 8 times per optimizer step; clipping follows
in the trainer. This module keeps exactly that per-hook work (the logging itself is off
in the original too), so the benchmark times what the original pays. It is benchmark
code only: the package never projects per micro-batch.

The original handles one or two reference gradients; k > 2 is refused rather than
invented.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

EPS = 1e-8  # the original's self.eps


class AuthorsHookScheme:
    """Per-parameter hooks with CPU-resident reference gradients.

    Args:
        names: parameter names (keys of the CPU dictionaries, as in the original).
        grads: tensors shaped like the parameters (only their shapes are used here).
        bases: ``[k, N_i]`` rows per tensor, k in {1, 2}; copied to CPU tensors shaped like
            the parameter (the original stores normalised reference gradients on the CPU).
        device: where gradients live (hooks copy the CPU rows there on every call).
    """

    def __init__(self, names: Sequence[str], grads: Sequence[Tensor], bases: Sequence[Tensor],
                 device: Optional[torch.device] = None, method: str = "orthogonal_projection"):
        if len(names) != len(grads) or len(grads) != len(bases):
            raise ValueError(f"names, grads and bases must have equal lengths, got {len(names)}, {len(grads)}, "
                             f"{len(bases)}")
        ks = {int(u.shape[0]) for u in bases}
        if not ks <= {0, 1, 2}:
            raise ValueError(f"the original scheme handles one or two reference gradients per tensor, got k={sorted(ks)}")
        if method not in ("orthogonal_projection", "plane_projection"):
            raise ValueError(f"method={method!r}: only orthogonal_projection and plane_projection are re-implemented")
        self.method = method
        self.names = list(names)
        self.base_grads_1: dict[str, Tensor] = {}
        self.base_grads_2: dict[str, Tensor] = {}
        for name, g, u in zip(names, grads, bases):
            # on the CPU already: keep the storage (a view), as the original's dict of CPU tensors
            rows = u if u.device.type == "cpu" else u.cpu()
            if rows.shape[0] >= 1:
                self.base_grads_1[name] = rows[0].view(g.shape)
            if rows.shape[0] == 2:
                self.base_grads_2[name] = rows[1].view(g.shape)
        self.device = device
        self.hooks = [self.make_hook(n) for n in self.names]
        self.global_step = 0
        self.logging_steps = 10

    def make_hook(self, name: str) -> Callable[[Tensor], Tensor]:
        def hook(grad: Tensor) -> Tensor:
            if grad is None:
                return grad
            has_base_1 = name in self.base_grads_1
            has_base_2 = name in self.base_grads_2
            if not has_base_1:
                return grad
            try:  # the original decides per hook whether to log
                import torch.distributed as dist

                is_rank0 = dist.is_initialized() and dist.get_rank() == 0
            except Exception:
                is_rank0 = True
            _should_log = is_rank0 and (self.global_step % self.logging_steps == 0)

            if has_base_2:
                g_base_1 = self.base_grads_1[name].to(device=grad.device, dtype=grad.dtype)
                g_base_2 = self.base_grads_2[name].to(device=grad.device, dtype=grad.dtype)
                norm_1 = torch.norm(g_base_1) + EPS
                u1 = g_base_1 / norm_1
                dot_12 = torch.sum(g_base_2 * u1)
                g_base_2_perp = g_base_2 - dot_12 * u1
                norm_2_perp = torch.norm(g_base_2_perp) + EPS
                if norm_2_perp < 1e-6:  # a host sync on every hook, as in the original
                    u2 = torch.zeros_like(u1)
                else:
                    u2 = g_base_2_perp / norm_2_perp
                proj_u1 = torch.sum(grad * u1) * u1
                proj_u2 = torch.sum(grad * u2) * u2
                grad_plane = proj_u1 + proj_u2
                grad_perp = grad - grad_plane
                grad.copy_(grad_perp if self.method == "orthogonal_projection" else grad_plane)
            else:
                g_base = self.base_grads_1[name].to(device=grad.device, dtype=grad.dtype)
                if self.method == "orthogonal_projection":
                    dot_product = torch.sum(grad * g_base)
                    norm_base_sq = torch.sum(g_base * g_base) + EPS
                    grad.sub_((dot_product / norm_base_sq) * g_base)
                else:
                    grad.copy_((torch.sum(grad * g_base) / (torch.sum(g_base * g_base) + EPS)) * g_base)
            return grad

        return hook

    def register(self, params: Sequence[torch.nn.Parameter]) -> list:
        """Register the hooks on real parameters (``param.register_hook``), as the original does."""
        if len(params) != len(self.hooks):
            raise ValueError(f"{len(params)} parameters for {len(self.hooks)} hooks")
        return [p.register_hook(h) for p, h in zip(params, self.hooks)]

    def microbatch(self, grads: Sequence[Tensor]) -> None:
        """What autograd does for one micro-batch: hand each parameter's fresh gradient to its hook."""
        for h, g in zip(self.hooks, grads):
            h(g)

    def step(self, grads: Sequence[Tensor], micro_batches: int = 8) -> None:
        """One optimizer step's projection work: every hook at every micro-batch. (Timing
        calls the hooks on the same buffers each micro-batch; the accumulation autograd
        does between them is not projection work and is paid by every scheme alike.)"""
        for _ in range(micro_batches):
            self.microbatch(grads)
        self.global_step += 1
