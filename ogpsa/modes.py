"""The projection mode rule, once, batched over tensors; both spaces and every backend use it.

Pass 1 gives each tensor its dots ``c_i = U_i x_i`` (x: the gradient in gradient space, the
optimizer's direction in update space). With ``w_i = M_i^+ c_i`` (``M_i = U_i U_i^T``, its
pseudo-inverse on the span of the rows, :func:`ogpsa.plan.gram_pinv`), the projected tensor is

    x_i' = kappa_i x_i - U_i^T v_i

and the mode decides ``(v_i, kappa_i)``:

* ``orthogonal``: ``v = w, kappa = 1`` (remove the whole component in the subspace);
* ``conflict``: ``v = w`` where ``w < 0``, ``(1 - aligned_scale) w`` elsewhere, ``kappa = 1``
  (remove only the components that conflict with the reference; scale the aligned ones);
* ``plane``: ``v = -w, kappa = 0`` (keep only the component in the subspace);
* ``threshold`` (the original work's rule): a tensor with ONE basis row whose dot is positive
  is scaled as a whole (``v = 0, kappa = aligned_scale``); every other tensor is projected
  orthogonally.

A tensor without basis rows (``k = 0``) keeps ``kappa = 1`` and ``v = 0`` in every mode (it
is only counted, e.g. for clipping). All of it runs on ``[T, K]`` float64 tensors on the
device: no host synchronisation, no Python loop over tensors.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .config import MODES

__all__ = ["MODES", "check_mode", "mode_weights", "ranks_of"]


def check_mode(mode: str) -> None:
    """ValueError naming the bad ``mode`` (subclasses of ValueError are raised by callers)."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {MODES}")


def mode_weights(w: Tensor, c: Tensor, mode: str, aligned_scale: float,
                 ks: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """The mode rule on ``w = M^+ c`` and the dots ``c`` (both ``[..., K]``, zero padded).

    ``ks``: the rank of each tensor's basis (``[...]``, int); None: every tensor has rows in
    all K columns that are non-zero. Returns ``(v, kappa)``: ``v`` ``[..., K]`` (w's dtype)
    and ``kappa`` ``[...]`` such that the projected tensor is ``kappa x - U^T v``.
    """
    check_mode(mode)
    batch = w.shape[:-1]
    one = torch.ones(batch, dtype=w.dtype, device=w.device)
    has_rows = one.bool() if ks is None else ks.to(w.device) > 0
    if mode == "orthogonal":
        return w, one
    if mode == "conflict":
        return torch.where(w < 0, w, (1.0 - aligned_scale) * w), one
    if mode == "plane":
        return -w, torch.where(has_rows, 0.0, one)
    # threshold: exactly one basis row and a positive dot
    k1 = (ks.to(w.device) == 1) if ks is not None else torch.full(batch, w.shape[-1] == 1, device=w.device)
    aligned = k1 & (c[..., 0] > 0) if w.shape[-1] else torch.zeros(batch, dtype=torch.bool, device=w.device)
    return torch.where(aligned.unsqueeze(-1), torch.zeros_like(w), w), torch.where(aligned, float(aligned_scale), one)


def ranks_of(gram: Tensor) -> Tensor:
    """The rank k of each zero-padded ``[T, K, K]`` Gram (or pseudo-inverse) matrix, counted by its
    positive diagonal entries (a basis row is never all zero, else it was rejected)."""
    return (torch.diagonal(gram, dim1=-2, dim2=-1) > 0).sum(-1)
