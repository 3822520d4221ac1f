"""What a projection reports (:class:`ProjectionStats`) and the float64 helpers of the tiny
step's rare exact paths (CPU only, where reading a tensor is no device sync)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor


@dataclass
class ProjectionStats:
    """What one projection did. Tensors stay on the device (float64); the float properties sync.

    ``sq_before``/``sq_after``: per-tensor squared norms before projection and after it
    (before clipping); ``removed_sq``: ||g - g'||^2 per tensor; ``total_norm``: the
    post-projection, pre-clip global norm (what clip_grad_norm_ returns);
    ``clip_coef``: the factor applied (1 without clipping); ``single_pass``: how many
    tensors the backends projected in one pass over their gradient.
    """

    sq_before: Tensor
    sq_after: Tensor
    removed_sq: Tensor
    total_norm: Tensor
    clip_coef: Tensor
    names: Optional[list[str]] = None
    backends: tuple = ()
    single_pass: int = 0

    @property
    def norm_before(self) -> float:
        return float(self.sq_before.sum().sqrt())

    @property
    def norm_after(self) -> float:
        """Norm after projection and clipping."""
        return float(self.total_norm * self.clip_coef)

    @property
    def removed_fraction(self) -> float:
        """Fraction of the gradient's squared norm removed by the projection (whole model)."""
        total = float(self.sq_before.sum())
        return float(self.removed_sq.sum()) / total if total > 0 else 0.0

    def removed_fraction_per_tensor(self) -> Tensor:
        return torch.where(self.sq_before > 0, self.removed_sq / self.sq_before.clamp_min(1e-300),
                           torch.zeros_like(self.sq_before))

    def as_dict(self) -> dict:
        return {
            "norm_before": self.norm_before,
            "norm_after": self.norm_after,
            "total_norm": float(self.total_norm),
            "removed_fraction": self.removed_fraction,
            "clip_coef": float(self.clip_coef),
            "num_tensors": int(self.sq_before.numel()),
            "backends": list(self.backends),
            "single_pass": self.single_pass,
        }



def sq_norms64(grads: Sequence[Tensor]) -> Tensor:
    """Squared norms accumulated in float64 (no float32 overflow); the rare exact path only."""
    return torch.stack([torch.linalg.vector_norm(g, dtype=torch.float64) for g in grads]).square()


def rescue_overflow(tables: list, grouped: list, fused: list) -> None:
    """CPU only (reading a CPU tensor is no device sync): a finite gradient whose float32
    ``||g||^2`` overflowed (|g| > ~1.8e19) gets its squared norm again in float64."""
    for t, gs, f in zip(tables, grouped, fused):
        sq = t[:, -1]
        bad = ~torch.isfinite(sq)
        if f or not bool(bad.any()):
            continue
        idx = bad.nonzero().flatten().tolist()
        t[idx, -1] = sq_norms64([gs[i] for i in idx])


def recover_fused_sq(sq: Tensor, gs: Sequence[Tensor], kappa: float, wc: Tensor, wmw: Tensor) -> Tensor:
    """A single-pass kernel already overwrote g when its float32 ``||g||^2`` overflowed: measure
    ``||g'||^2`` in float64 and invert ``||g'||^2 = k^2 ||g||^2 - 2k w.c + w^T M w`` (CPU only)."""
    bad = ~torch.isfinite(sq)
    if not bool(bad.any()):
        return sq
    idx = bad.nonzero().flatten().tolist()
    sq = sq.clone()
    sq[idx] = (sq_norms64([gs[i] for i in idx]) + 2 * kappa * wc[idx] - wmw[idx]) / (kappa * kappa)
    return sq
