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
* M = U U^T of the stored bases: ``A G A^T`` on the host where the float32 rounding estimate
  (:func:`rounding_estimates`) proves it accurate, else (nearly dependent kept rows) from the
  stored bases, re-orthonormalised once more when visibly off (:func:`repair_ill_conditioned`);
  :func:`basis_grams` is the backend's Gram op (float32 products,
  float64 across chunks), whose diagonal also proves every basis element finite.
"""

from __future__ import annotations

import math
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


#: float32 unit roundoff
_U32 = 2.0 ** -24
#: largest estimated error of the entries of M = A G A^T accepted as M of the stored bases
CHEAP_TOL = 2.0 ** -20
#: largest estimated departure of the stored U U^T from M (~ I) kept without re-orthonormalising
REORTHO_TOL = 2.0 ** -12


def rounding_estimates(grams: Tensor, coefficients: Sequence[Tensor]) -> Tensor:
    """[T] float64: estimated float32 error of the entries of ``M_i = A_i G_i A_i^T`` as the
    Gram matrix of the stored ``U_i = fl(A32_i R_i)``, about ``u32 * amp_i^2`` with
    ``amp_i = max_a sum_l |A32_al| ||r_l||``.

    Why: each stored element of U errs by up to about ``u32 * sum_l |A_al| |R_lj|`` (float32
    combine) and each Gram entry by about ``u32 ||r_l|| ||r_m||`` (float32 products), so row a
    of U errs by ``u32 amp_a`` and ``A dG A^T`` by ``u32 amp_a amp_b``. For orthonormal rows
    amp = 1; with nearly dependent kept rows amp^2 grows like the condition number of the
    kept part of G (cancellation in A). Measured errors track this estimate within a factor
    ~2 (tests/test_basis_build.py). A tensor whose A or G is not finite gets 0 here: its
    M is handled (and a non-finite basis rejected) by :func:`combined_grams`."""
    g = grams.to(torch.float64)
    diag = torch.diagonal(g, dim1=1, dim2=2)
    norms = torch.where(torch.isfinite(diag) & (diag > 0), diag, torch.zeros((), dtype=g.dtype)).sqrt()
    out = torch.zeros(g.shape[0], dtype=torch.float64)
    for i, a in enumerate(coefficients):
        if a.shape[0]:
            amp = float((a.to(torch.float32).to(torch.float64).abs() @ norms[i]).max())
            if math.isfinite(amp):
                out[i] = _U32 * amp * amp
    return out


def repair_ill_conditioned(names: Sequence[str], bases: list[Tensor], grams: list[Tensor], estimates: Tensor,
                           config: OGPSAConfig, *, backend: Optional[str] = None) -> None:
    """Make ``grams[i]`` the Gram matrix of the stored ``bases[i]`` where the cheap
    ``A G A^T`` is not provably accurate (``estimates[i] > CHEAP_TOL``), in place.

    * ``CHEAP_TOL < est <= REORTHO_TOL`` (or ``scope="global"``, whose per-tensor pieces are not
      orthonormal by design): M from the backend Gram op over the stored basis (one read of
      it; the basis is kept bit for bit).
    * ``est > REORTHO_TOL``, per-tensor scope: the stored rows are visibly non-orthonormal;
      they are orthonormalised once more ("twice is enough"): G2 = U U^T (one read, float64
      across chunks), Gram-Schmidt on G2 in float64, U' = A2 U (one more read), and M' of U'
      from ``A2 G2 A2^T`` when that is now provably accurate (A2 ~ I), else from U' itself.
    Well-conditioned tensors are untouched (bit-identical bases and M)."""
    mid, high = [], []
    for i, est in enumerate(estimates.tolist()):
        if est <= CHEAP_TOL or not bases[i].shape[0]:
            continue
        (high if est > REORTHO_TOL and config.scope != "global" else mid).append(i)
    by_rank: dict[int, list[int]] = {}
    for i in high:
        by_rank.setdefault(int(bases[i].shape[0]), []).append(i)
    for idx in by_rank.values():
        group = [bases[i] for i in idx]
        g2 = reference_grams(group, backend=backend)
        a2 = gram_schmidt_batched(g2, rank=None, normalize=True, rank_tol=config.rank_tol)
        new = ops.combine(group, a2, out_dtype=torch.float32, backend=backend)
        new_m = combined_grams([names[i] for i in idx], g2, a2, new, backend=backend)
        again = rounding_estimates(g2, a2)
        for j, i in enumerate(idx):
            bases[i] = new[j]
            if float(again[j]) <= CHEAP_TOL:
                grams[i] = new_m[j]
            else:
                mid.append(i)
    if mid:
        fixed = basis_grams([names[i] for i in mid], [bases[i] for i in mid], backend=backend)
        for i, m in zip(mid, fixed):
            grams[i] = m
