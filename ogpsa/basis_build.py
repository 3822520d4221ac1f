"""The basis build near one pass over the reference gradients (the fast path behind
:meth:`ogpsa.Subspace.from_gradients` and :meth:`~ogpsa.Subspace.from_reference_rows`).

The build reads the stacked reference rows ``R_i`` ([m, N_i], float32) exactly twice: the
Gram pass ``R_i R_i^T`` and the combine pass ``U_i = A_i R_i``; then the new bases once, for
their ``M_i = U_i U_i^T``. Everything else works on the [T, m, m] Gram table:

* Finiteness. A reference row holds a NaN or an Inf exactly when its squared norm does, so a
  non-finite Gram diagonal entry marks it (no full-size ``isfinite`` pass).
* Row scales. The compiled backends multiply in float32, where squares of values below about
  2^-75 underflow and above 2^64 overflow. A row is in range when its largest magnitude lies
  in [2^-SAFE_EXP, 2^SAFE_EXP], and the diagonal bounds that magnitude: max^2 <= ||r||^2 <=
  N max^2. So rows whose diagonal lies in [N 2^-2S, 2^2S] are certainly safe and need nothing;
  only the others (zero, non-finite, tiny or huge diagonal) get an inf-norm over THEIR rows,
  a power-of-two rescale and a Gram recomputation of their tensor (no full-size inf-norm).
* Coefficients. Gram-Schmidt on the Gram matrices runs batched over all tensors (float64,
  the same operations in the same order as :func:`ogpsa.reference.basis_coefficients`);
  ``method="eigen"`` uses the per-tensor reference (its selection rules are per spectrum).
* Only non-finite rows are zeroed before the combine pass (a finite row with a zero
  coefficient contributes exactly zero), so an all-zero LoRA adapter is never rewritten.
* M = U U^T of the stored bases comes from the backend's Gram op (float32 products,
  float64 across chunks), whose diagonal also proves every basis element finite.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from . import ops, reference
from .config import OGPSAConfig
from .plan import gram64

#: rows whose largest |value| lies outside [2^-SAFE_EXP, 2^SAFE_EXP] need a rescale (ops.SAFE_EXP)
SAFE_EXP = ops.SAFE_EXP


def _safe_rows(diag: Tensor, numel: Tensor) -> Tensor:
    """[T, m] bool: rows whose float32 Gram entries are certainly accurate (see module doc)."""
    lo = numel.to(torch.float64)[:, None] * 2.0 ** (-2 * SAFE_EXP)
    return (diag >= lo) & (diag <= 2.0 ** (2 * SAFE_EXP))


def _rescue(r: Tensor, rows: Tensor, be) -> Optional[Tensor]:
    """Recompute ``r``'s Gram matrix with the suspect ``rows`` scaled into range by powers of
    two (restored afterwards, exactly), or None when none of them needs it (they are zero
    or non-finite, which the unscaled Gram already says)."""
    top = torch.linalg.vector_norm(r[rows.to(r.device)], ord=float("inf"), dim=1).to("cpu", torch.float64)
    finite = torch.isfinite(top) & (top > 0)
    _, exp = torch.frexp(torch.where(finite, top, torch.ones_like(top)))
    unsafe = finite & (exp.abs() > SAFE_EXP)
    if not bool(unsafe.any()):
        return None
    scale = torch.ones(r.shape[0], dtype=torch.float64)
    scale[rows[unsafe]] = torch.ldexp(torch.ones_like(top[unsafe]), -exp[unsafe])
    factor = scale.to(r.device, r.dtype)[:, None]
    r.mul_(factor)
    try:
        g = be.gram([r]).to("cpu", torch.float64)[0]
    finally:
        r.div_(factor)  # powers of two: exact
    return g / (scale[:, None] * scale[None, :])


def reference_grams(refs: Sequence[Tensor], *, backend: Optional[str] = None) -> Tensor:
    """Gram matrices ``R_i R_i^T`` ([T, m, m], float64, CPU) from one backend pass, with the
    rare out-of-range rows rescued (module doc). Same result as :func:`ogpsa.ops.gram`
    without its full-size inf-norm pass."""
    if not refs:
        raise ops.ProjectionInputError("refs is an empty list")
    m = refs[0].shape[0]
    for i, r in enumerate(refs):
        if r.dim() != 2 or r.shape[0] != m or not r.is_contiguous():
            raise ops.ProjectionInputError(f"refs[{i}] must be a contiguous [m={m}, N] tensor, got {tuple(r.shape)}")
    out = torch.empty(len(refs), m, m, dtype=torch.float64)
    for be, idx in ops._group_refs(refs, backend):
        part = be.gram([refs[i] for i in idx]).to("cpu", torch.float64)
        if be.name != "torch":  # the torch backend multiplies in float64: any float32 value is in range
            diag = torch.diagonal(part, dim1=1, dim2=2)
            ok = _safe_rows(diag, torch.tensor([refs[i].shape[1] for i in idx]))
            for j in (~ok).any(dim=1).nonzero().flatten().tolist():
                fixed = _rescue(refs[idx[j]], (~ok[j]).nonzero().flatten(), be)
                if fixed is not None:
                    part[j] = fixed
        out[idx] = part
    return out


def gram_schmidt_batched(grams: Tensor, *, rank: Optional[int], normalize: bool, rank_tol: float) -> list[Tensor]:
    """:func:`ogpsa.reference.basis_coefficients` with ``method="gram_schmidt"`` for every
    Gram matrix of ``grams`` ([T, m, m]) at once: the same float64 operations in the same
    order, batched over T (a slot not yet filled is zero and subtracts exactly nothing)."""
    g = grams.to(torch.float64).clone()
    t, m = g.shape[0], g.shape[1]
    diag = torch.diagonal(g, dim1=1, dim2=2)
    valid = torch.isfinite(diag) & (diag > 0)
    g = torch.where(valid[:, :, None] & valid[:, None, :], g, torch.zeros((), dtype=g.dtype))
    scale = torch.zeros(t, m, dtype=torch.float64)
    if normalize:
        scale[valid] = torch.diagonal(g, dim1=1, dim2=2)[valid].rsqrt()
    else:
        scale[valid] = 1.0
    gs = scale[:, :, None] * g * scale[:, None, :]
    rows = torch.zeros(t, m, m, dtype=torch.float64)  # rows[:, s]: the s-th accepted direction
    count = torch.zeros(t, dtype=torch.int64)
    eye = torch.eye(m, dtype=torch.float64)
    limit = m if rank is None else int(rank)
    for j in range(m):
        live = valid[:, j] & (count < limit)
        if not bool(live.any()):
            continue
        a = eye[j].expand(t, m).clone()
        for _ in range(2):  # "twice is enough", as in the reference
            for s in range(j):
                prev = rows[:, s]
                coef = torch.bmm(torch.bmm(prev[:, None, :], gs), a[:, :, None])[:, 0, 0]
                a = a - coef[:, None] * prev
        residual = torch.bmm(torch.bmm(a[:, None, :], gs), a[:, :, None])[:, 0, 0]
        accept = live & (residual > rank_tol * gs[:, j, j])
        if bool(accept.any()):
            idx = accept.nonzero().flatten()
            rows[idx, count[idx]] = a[idx] / residual[idx].sqrt()[:, None]
            count[idx] += 1
    return [rows[i, :int(count[i])] * scale[i][None, :] for i in range(t)]


def coefficients(grams: Tensor, config: OGPSAConfig) -> list[Tensor]:
    """Per-tensor coefficients ``A_i`` ([k_i, m], float64) from the Gram table ([T, m, m];
    summed over tensors for ``scope="global"``), as :func:`reference.basis_coefficients`."""
    kw = dict(method=config.method, rank=config.rank, energy=config.energy,
              normalize=config.normalize_reference, rank_tol=config.rank_tol)
    if config.scope == "global":
        return [reference.basis_coefficients(grams.sum(0), **kw)] * grams.shape[0]
    if config.method == "gram_schmidt" and grams.shape[0]:
        return gram_schmidt_batched(grams, rank=config.rank, normalize=config.normalize_reference,
                                    rank_tol=config.rank_tol)
    return [reference.basis_coefficients(g, **kw) for g in grams]


def zero_nonfinite_rows(grams: Tensor, refs: Sequence[Tensor], config: OGPSAConfig) -> None:
    """Zero, in place, the reference rows whose Gram diagonal is non-finite (under
    ``scope="global"``: non-finite in any tensor), so the combine pass never computes
    0 * NaN. Finite rows are left alone: a zero coefficient makes them contribute nothing."""
    bad = ~torch.isfinite(torch.diagonal(grams, dim1=1, dim2=2))  # [T, m]
    if config.scope == "global":
        bad = bad.any(dim=0, keepdim=True).expand_as(bad)
    for i in bad.any(dim=1).nonzero().flatten().tolist():
        refs[i][bad[i].to(refs[i].device)] = 0.0


def basis_grams(names: Sequence[str], bases: Sequence[Tensor], *, backend: Optional[str] = None) -> list[Tensor]:
    """``M_i = U_i U_i^T`` (float32, [k_i, k_i], on the basis' device) of the bases as stored,
    from the backend's Gram op (one read of the bases, grouped by rank). Raises ValueError
    naming the tensor when a basis holds a NaN or Inf (its diagonal says so); a basis too
    large or too small for float32 products is recomputed in float64 blocks instead."""
    out: list[Optional[Tensor]] = [None] * len(bases)
    by_rank: dict[int, list[int]] = {}
    for i, u in enumerate(bases):
        k = int(u.shape[0])
        if k == 0 or u.shape[1] == 0 or not u.is_contiguous():
            out[i] = gram64(u).float() if k else torch.zeros(0, 0, device=u.device)
            continue
        by_rank.setdefault(k, []).append(i)
    for idx in by_rank.values():
        group = [bases[i] for i in idx]
        for be, sub in ops._group_refs(group, backend):
            part = be.gram([group[j] for j in sub]).to("cpu", torch.float64)
            diag = torch.diagonal(part, dim1=1, dim2=2)
            ok = _safe_rows(diag, torch.tensor([group[j].shape[1] for j in sub])).all(dim=1)
            for pos, (j, good) in enumerate(zip(sub, ok.tolist())):
                i = idx[j]
                m = part[pos] if good else _checked_gram64(names[i], bases[i])
                out[i] = m.float().to(bases[i].device)
    return out  # type: ignore[return-value]


def combined_grams(names: Sequence[str], grams: Tensor, coefficients: Sequence[Tensor], bases: Sequence[Tensor],
                   *, backend: Optional[str] = None) -> list[Tensor]:
    """``M_i = U_i U_i^T`` of float32 bases ``U_i = A_i R_i`` without reading them:
    ``A32_i G_i A32_i^T`` in float64 (A32: the float32 coefficients the combine pass used; G_i:
    the reference Gram table with non-finite rows and columns zeroed, as their coefficient
    columns are). It differs from the Gram of the stored U by the float32 rounding of U's
    elements, whose effect on M is below the float32 rounding of M itself (M is stored in
    float32). A tensor whose A32 is not finite (float32 overflow) takes :func:`basis_grams`,
    which raises naming it when its basis holds a NaN or Inf."""
    g = grams.to(torch.float64)
    finite = torch.isfinite(torch.diagonal(g, dim1=1, dim2=2))
    g = torch.where(finite[:, :, None] & finite[:, None, :], g, torch.zeros((), dtype=g.dtype))
    ks = [int(a.shape[0]) for a in coefficients]
    t, m = g.shape[0], g.shape[1]
    a32 = torch.zeros(t, max(ks, default=0), m, dtype=torch.float64)  # batched: one bmm pair, not T matmuls
    for i, (a, k) in enumerate(zip(coefficients, ks)):
        if k:
            a32[i, :k] = a.to(torch.float32)
    mats = torch.bmm(torch.bmm(a32, g), a32.transpose(1, 2)) if t else a32
    ok = torch.isfinite(mats).flatten(1).all(dim=1).tolist()
    mats32 = mats.float()
    out: list[Optional[Tensor]] = []
    redo = []
    for i, (u, k) in enumerate(zip(bases, ks)):
        if ok[i]:
            out.append(mats32[i, :k, :k].to(u.device) if u.device.type != "cpu" else mats32[i, :k, :k].clone())
        else:
            out.append(None)
            redo.append(i)
    if redo:
        fixed = basis_grams([names[i] for i in redo], [bases[i] for i in redo], backend=backend)
        for i, m in zip(redo, fixed):
            out[i] = m
    return out  # type: ignore[return-value]


def _checked_gram64(name: str, u: Tensor) -> Tensor:
    if not bool(torch.isfinite(u).all()):
        raise ValueError(f"basis for {name!r} contains NaN or Inf")
    return gram64(u)
