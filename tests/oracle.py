"""Shared test inputs and the float64 NumPy oracle that every backend is checked against.

Every backend test builds its inputs with :func:`make_case` (seeded random, never zeros,
odd sizes) and compares with :func:`float64_project`, an independent NumPy float64
implementation of the projection written from the math, not from ogpsa's code.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

CLIP_EPS = 1e-6

#: relative-error tolerance of the output by gradient dtype (‖out − ref‖ / ‖ref‖)
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}

#: odd tensor sizes used across backend tests (BIG_SIZE = 2**20 + 3 in one test per backend)
SIZES = (1, 7, 33, 4097)
BIG_SIZE = 2**20 + 3
MODES = ("orthogonal", "conflict", "plane", "threshold")
SCOPES = ("tensor", "global")


def random_basis(n: int, k: int, gen: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    """[k, n] with orthonormal rows (float64 QR), then cast to ``dtype``."""
    if k == 0:
        return torch.empty(0, n, dtype=dtype)
    a = torch.randn(n, k, generator=gen, dtype=torch.float64)
    q, _ = torch.linalg.qr(a)
    return q.T.contiguous().to(dtype)


def make_case(
    seed: int,
    numels: Sequence[int],
    k: int,
    grad_dtype=torch.float32,
    basis_dtype=torch.float32,
    scope: str = "tensor",
    device: str = "cpu",
    shapes: Optional[Sequence[tuple]] = None,
):
    """Random gradients and bases. With ``scope="global"`` the bases are slices of one
    orthonormal whole-model basis; otherwise each tensor gets its own, with k_i = min(k, n_i)
    (and a mix of smaller ranks when there are several tensors)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = list(shapes) if shapes is not None else [(n,) for n in numels]
    numels = [int(torch.Size(s).numel()) for s in shapes]
    grads = [torch.randn(*s, generator=gen).to(grad_dtype).to(device) for s in shapes]
    if scope == "global":
        kk = min(k, sum(numels))
        full = random_basis(sum(numels), kk, gen, torch.float64)
        bases, off = [], 0
        for n in numels:
            bases.append(full[:, off:off + n].contiguous().to(basis_dtype).to(device))
            off += n
    else:
        bases = []
        for i, n in enumerate(numels):
            ki = min(k if i % 3 != 2 else max(0, k - 1), n)
            bases.append(random_basis(n, ki, gen, basis_dtype).to(device))
    return grads, bases


def float64_project(grads, bases, mode="orthogonal", scope="tensor", max_norm=None, aligned_scale=1.0):
    """Expected projected gradients (float64 NumPy arrays, flat) and total norm.

    Projects onto the orthogonal complement of the row space of each basis *as stored*
    (exactly: uses (U U^T)^{-1}), applies the mode rule (every mode in :data:`MODES`;
    ``threshold`` scales a whole gradient by ``aligned_scale``, with ``scope="global"`` every
    tensor's), then clip_grad_norm_'s rule."""
    gs = [g.detach().double().cpu().numpy().reshape(-1) for g in grads]
    us = [u.detach().double().cpu().numpy().reshape(u.shape[0], g.numel()) for u, g in zip(bases, grads)]

    def weights(c, m):
        w = np.linalg.solve(m, c) if c.size else c
        if mode == "orthogonal":
            return w, 1.0
        if mode == "conflict":
            return np.where(w < 0, w, (1 - aligned_scale) * w), 1.0
        if mode == "threshold":
            # the original's rule: one direction and g aligned with it (u.g > 0): scale the whole g;
            # otherwise (conflict, or two or more directions) project orthogonally
            if c.size == 1 and c[0] > 0:
                return np.zeros_like(w), aligned_scale
            return w, 1.0
        if mode == "plane":
            return -w, 0.0
        raise ValueError(f"unknown mode {mode!r}")

    outs = []
    if scope == "global":
        k = max(u.shape[0] for u in us)
        c = sum((u @ g if u.shape[0] else np.zeros(k)) for u, g in zip(us, gs))
        m = sum((u @ u.T if u.shape[0] else np.zeros((k, k))) for u in us)
        w, kappa = weights(c, m)
        for u, g in zip(us, gs):
            outs.append(kappa * g - (u.T @ w if u.shape[0] else 0))
    else:
        for u, g in zip(us, gs):
            if u.shape[0]:
                w, kappa = weights(u @ g, u @ u.T)
                outs.append(kappa * g - u.T @ w)
            else:  # no directions: no projection in any mode (project_'s contract; plane too), only clipping
                outs.append(g.copy())
    total = float(np.sqrt(sum(float(o @ o) for o in outs)))
    if max_norm is not None:
        coef = min(1.0, max_norm / (total + CLIP_EPS))
        outs = [o * coef for o in outs]
    return outs, total


def rel_err(outs: Sequence[torch.Tensor], expected: Sequence[np.ndarray]) -> float:
    """‖out − ref‖ / ‖ref‖ over all tensors together."""
    num = sum(float(((o.detach().double().cpu().numpy().reshape(-1) - e) ** 2).sum()) for o, e in zip(outs, expected))
    den = sum(float((e ** 2).sum()) for e in expected)
    return float(np.sqrt(num / max(den, 1e-300)))


def tolerance(grad_dtype, basis_dtype=torch.float32) -> float:
    tol = TOL[grad_dtype]
    return max(tol, 1e-2) if basis_dtype == torch.bfloat16 and grad_dtype != torch.float32 else tol


def deepspeed_importable() -> bool:
    """DeepSpeed is optional (not in requirements-dev.txt); its tests skip without it. Any
    import failure counts: DeepSpeed can raise more than ImportError on import."""
    try:
        import deepspeed  # noqa: F401
    except Exception:
        return False
    return True
