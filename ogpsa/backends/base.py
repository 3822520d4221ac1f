"""The contract every projection backend implements.

A backend does the two bandwidth-bound passes and the basis-building passes for one
group of tensors that share (device, gradient dtype, basis dtype). Everything between
the passes (mode rules, global sums, clip coefficient) is a tiny batched step on
``[T, K]`` tensors done once in :mod:`ogpsa.ops`, identical for every backend.

Inputs are validated by :mod:`ogpsa.ops` before a backend sees them, so backends may
assume (and must not re-check on the hot path):

* ``grads[i]``: contiguous, dtype float32/bfloat16/float16, N_i >= 1 elements, any shape
  (treated as flat), all on one device with one dtype.
* ``bases[i]``: contiguous ``[k_i, N_i]``, float32 or bfloat16 (one dtype per group),
  same device, finite, 0 <= k_i <= k_max. A tensor with k_i == 0 has no basis: it still
  gets its squared norm from :meth:`dots` and its scale from :meth:`update_`.
* ``k_max >= 1`` is the padded width of the coefficient tables (max k_i, at least 1).
* All arithmetic accumulates in float32 (or wider); reductions are deterministic
  (fixed-order partial sums, no float atomics in the default path).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

import torch
from torch import Tensor


class Backend(ABC):
    """Abstract base; a backend implements every method below."""

    name: str = "base"

    @abstractmethod
    def availability(self) -> tuple[bool, str]:
        """(available, human-readable reason); reason says why not, or what it runs on."""

    @abstractmethod
    def supports(self, device: torch.device, grad_dtype: torch.dtype, basis_dtype: torch.dtype, forced: bool) -> bool:
        """Whether this backend handles a group; ``forced`` is True when the user named it."""

    @abstractmethod
    def dots(self, grads: Sequence[Tensor], bases: Sequence[Tensor], k_max: int) -> Tensor:
        """Pass 1. Returns a new float32 tensor ``[T, k_max + 1]`` on the grads' device:
        row i holds ``U_i g_i`` in columns ``0..k_i-1``, zeros in ``k_i..k_max-1`` and
        ``||g_i||^2`` in column ``k_max``."""

    @abstractmethod
    def update_(
        self,
        grads: Sequence[Tensor],
        bases: Sequence[Tensor],
        weights: Tensor,
        kappa: float,
        scale: Tensor,
    ) -> None:
        """Pass 2, in place: ``g_i <- scale_i * (kappa * g_i - U_i^T w_i[:k_i])`` computed in
        float32 and rounded once to the gradient dtype. ``weights``: float32 ``[T, k_max]``;
        ``scale``: float32 ``[T]``; both on the grads' device (never read on the host)."""

    @abstractmethod
    def gram(self, refs: Sequence[Tensor]) -> Tensor:
        """Basis pass 1. ``refs[i]``: contiguous ``[m, N_i]`` (float32 or bfloat16, one m for
        all). Returns ``[T, m, m]`` (float32 or float64) Gram matrices ``R_i R_i^T``."""

    @abstractmethod
    def combine(self, refs: Sequence[Tensor], coefficients: Tensor, ks: Sequence[int], out_dtype: torch.dtype) -> list[Tensor]:
        """Basis pass 2. ``coefficients``: float32 ``[T, k_max, m]``; returns new contiguous
        ``U_i = coefficients[i, :k_i] @ refs[i]`` of shape ``[k_i, N_i]`` in ``out_dtype``
        (accumulated in float32). Rows of R with zero coefficients are finite (the caller
        zeroes invalid reference gradients), so they may be read."""
