"""Pure-PyTorch reference of every OGPSA op: the readable specification and the oracle.

Everything here works on plain Python lists of tensors, one entry per parameter tensor,
and is written for clarity, one tensor at a time. The fast backends (Triton, the C++/CUDA
extension) must agree with these functions; tests compare both against float64.

Notation (one parameter tensor i, flattened to N_i elements):

* ``refs[i]``: ``[m, N_i]``, the m reference gradients restricted to tensor i.
* ``bases[i]``: ``[k_i, N_i]``, the basis U_i of the capability subspace. Its rows are
  orthonormal up to storage rounding (a bf16 basis is not exactly orthonormal; every
  formula therefore uses M_i = U_i U_i^T, which is the identity for an exact basis).
* ``c_i = U_i g_i``: k_i coefficients, always accumulated in float32 or wider.

Projection of a gradient onto the orthogonal complement of the row space of U is
``g - U^T M^{-1} U g``. Each mode picks weights w (and a factor kappa on g):

* orthogonal: ``w = M^{-1} c``, kappa = 1  -> g' = g - U^T w  (the paper's rule)
* conflict:   ``w = M^{-1} c``; for each direction, w_j < 0 (descending g would raise the
  reference loss) is removed entirely, w_j > 0 is scaled by ``aligned_scale``: the
  removed part is w_j for w_j < 0 and (1 - aligned_scale) * w_j otherwise.
* plane:      ``w = -M^{-1} c``, kappa = 0  -> g' = U^T M^{-1} c (the subspace part); a tensor
  without basis rows is not projected in any mode (per-tensor scope: kappa = 1, as with no basis)
* threshold:  the original implementation's ``threshold`` rule, per subspace. With one
  direction (k = 1): if c > 0 (g aligned with the reference gradient, whose sign the
  original tests through its cosine) the WHOLE gradient is scaled: w = 0,
  kappa = ``aligned_scale`` (the original's ``base_scale``); otherwise (conflict, or c = 0)
  it is projected orthogonally: w = M^{-1} c, kappa = 1. With k >= 2 directions it is the
  orthogonal rule, as in the original SFT trainer (its DPO trainer leaves such a gradient
  unprojected: a branch without an else). With aligned_scale = 1 it equals ``conflict``
  for k = 1; with aligned_scale != 1 no ``conflict`` setting reproduces it.

Clipping folded in: ``||kappa g - U^T w||^2 = kappa^2 ||g||^2 - 2 kappa w.c + w^T M w``,
so the post-projection norm comes from the same pass that computes c, and the second
pass applies the clip factor, exactly like ``torch.nn.utils.clip_grad_norm_`` applied
after projection (``coef = min(1, max_norm / (total_norm + 1e-6))``).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from .modes import check_mode
from .modes import mode_weights as _rule

CLIP_EPS = 1e-6  # the epsilon torch.nn.utils.clip_grad_norm_ adds to the norm


# ----------------------------------------------------------------------------------------
# Basis construction: Gram matrix -> coefficients A -> U = A R
# ----------------------------------------------------------------------------------------


def gram_matrices(refs: Sequence[Tensor]) -> list[Tensor]:
    """Per-tensor Gram matrices R_i R_i^T in float64 (one pass over every R_i)."""
    out = []
    for r in refs:
        r64 = r.reshape(r.shape[0], -1).to(torch.float64)
        out.append(r64 @ r64.T)
    return out


def valid_directions(gram: Tensor) -> Tensor:
    """Reference gradients that can give a direction: finite and non-zero."""
    # r_j holds a NaN/Inf exactly when ||r_j||^2 does; its row and column of the Gram matrix
    # are then non-finite too and get zeroed, so only the diagonal needs checking
    diag = torch.diagonal(gram)
    return torch.isfinite(diag) & (diag > 0)


def basis_coefficients(
    gram: Tensor,
    *,
    method: str = "gram_schmidt",
    rank: Optional[int] = None,
    energy: Optional[float] = None,
    normalize: bool = True,
    rank_tol: float = 1e-6,
) -> Tensor:
    """Coefficients A [k, m] (float64) such that U = A R has orthonormal rows.

    Zero and non-finite reference gradients get no direction (their column of A is 0);
    near-dependent ones are dropped by ``rank_tol``. Directions are oriented so that each
    has a non-negative inner product with the reference gradients (for Gram-Schmidt,
    u_j with r_j; for eigen, u_j with their sum), which is what ``conflict`` mode relies on.
    """
    g = gram.to(torch.float64).clone()
    m = g.shape[0]
    valid = valid_directions(g)
    g[~valid, :] = 0.0
    g[:, ~valid] = 0.0
    scale = torch.zeros(m, dtype=torch.float64)
    if normalize:
        scale[valid] = torch.diagonal(g)[valid].rsqrt()
    else:
        scale[valid] = 1.0
    gs = scale[:, None] * g * scale[None, :]  # Gram of the (normalised) references

    rows: list[Tensor] = []
    if method == "gram_schmidt":
        for j in range(m):
            if not valid[j]:
                continue
            a = torch.zeros(m, dtype=torch.float64)
            a[j] = 1.0
            for _ in range(2):  # twice is enough (Kahan's "twice is enough" re-orthogonalisation)
                for prev in rows:
                    a = a - (prev @ gs @ a) * prev
            residual = float(a @ gs @ a)
            if not residual > rank_tol * float(gs[j, j]):
                continue
            rows.append(a / math.sqrt(residual))
            if rank is not None and len(rows) == rank:
                break
    elif method == "eigen":
        evals, evecs = torch.linalg.eigh(gs)
        order = torch.argsort(evals, descending=True)
        evals, evecs = evals[order], evecs[:, order]
        if evals.numel() and evals[0] > 0:
            keep = evals > rank_tol * evals[0]
            if energy is not None:
                total = evals.clamp_min(0).sum()
                cumulative = torch.cumsum(evals.clamp_min(0), 0)
                needed = int(torch.searchsorted(cumulative, energy * total * (1 - 1e-12)).item()) + 1
                keep &= torch.arange(m) < needed
            for j in range(m):
                if keep[j]:
                    a = evecs[:, j] / evals[j].sqrt()
                    if float((gs @ a).sum()) < 0:
                        a = -a
                    rows.append(a)
            if rank is not None:
                rows = rows[:rank]
    else:
        raise ValueError(f"method={method!r} is not one of ('gram_schmidt', 'eigen')")
    if not rows:
        return torch.zeros(0, m, dtype=torch.float64)
    return torch.stack(rows) * scale[None, :]


def combine_rows(refs: Sequence[Tensor], coefficients: Sequence[Tensor], dtype=torch.float32) -> list[Tensor]:
    """U_i = A_i R_i for every tensor (one more pass over R). Rows of R whose coefficient
    column is all zero are not read, so a non-finite reference gradient cannot leak in."""
    out = []
    for r, a in zip(refs, coefficients):
        r2 = r.reshape(r.shape[0], -1)
        used = (a != 0).any(dim=0)
        u = a[:, used].to(torch.float64) @ r2[used].to(torch.float64)
        out.append(u.to(dtype).contiguous())
    return out


def build_bases(
    refs: Sequence[Tensor],
    *,
    scope: str = "tensor",
    method: str = "gram_schmidt",
    rank: Optional[int] = None,
    energy: Optional[float] = None,
    normalize: bool = True,
    rank_tol: float = 1e-6,
    dtype=torch.float32,
) -> list[Tensor]:
    """Orthonormal bases from reference gradients ``refs[i]: [m, N_i]``.

    ``scope="tensor"``: one basis per tensor. ``scope="global"``: one whole-model basis
    (Gram matrix summed over tensors, same coefficients A for every tensor), returned
    sliced per tensor, so the concatenation of the rows is orthonormal.
    """
    kw = dict(method=method, rank=rank, energy=energy, normalize=normalize, rank_tol=rank_tol)
    grams = gram_matrices(refs)
    if scope == "tensor":
        coefficients = [basis_coefficients(g, **kw) for g in grams]
    elif scope == "global":
        # a reference gradient non-finite in any tensor makes its row of the sum non-finite,
        # so it gives no global direction
        a = basis_coefficients(torch.stack(grams).sum(0), **kw)
        coefficients = [a] * len(refs)
    else:
        raise ValueError(f"scope={scope!r} is not one of ('tensor', 'global')")
    return combine_rows(refs, coefficients, dtype=dtype)


# ----------------------------------------------------------------------------------------
# Projection
# ----------------------------------------------------------------------------------------


def mode_weights(c: Tensor, m_inv: Tensor, mode: str, aligned_scale: float) -> tuple[Tensor, float]:
    """Weights w and factor kappa such that the projected gradient is kappa g - U^T w, for ONE
    tensor (or one global subspace): ``w = M^{-1} c`` and the rule of :mod:`ogpsa.modes` (the one
    definition every backend and both spaces use). A tensor without rows (k = 0) keeps kappa 1."""
    check_mode(mode)
    w = m_inv @ c
    v, kappa = _rule(w[None], c[None], mode, aligned_scale, torch.tensor([c.numel()]))
    return v[0], float(kappa[0])


def project_(
    grads: Sequence[Tensor],
    bases: Sequence[Tensor],
    *,
    mode: str = "orthogonal",
    scope: str = "tensor",
    max_norm: Optional[float] = None,
    aligned_scale: float = 1.0,
) -> dict:
    """Project every gradient in place (and clip the result to ``max_norm``).

    Returns a dict of float32 tensors: ``sq_before``/``sq_after`` [T] (squared norms before
    projection and after projection, before clipping), ``removed_sq`` [T] (||g - g'||^2),
    ``total_norm`` (post-projection, pre-clip, as clip_grad_norm_ returns) and ``clip_coef``.
    """
    flat = [g.view(-1) for g in grads]
    us = [u.reshape(u.shape[0], g.numel()).float() for u, g in zip(bases, flat)]
    cs = [u @ g.float() for u, g in zip(us, flat)]
    ms = [u @ u.T for u in us]
    sq_before = torch.stack([g.float().dot(g.float()) for g in flat]) if flat else torch.zeros(0)

    if scope == "tensor":
        weights = [mode_weights(c, torch.linalg.inv(m.double()).float(), mode, aligned_scale) for c, m in zip(cs, ms)]
    elif scope == "global":
        # one subspace for the whole model: sum the coefficients of the tensors that have a
        # slice of it. A tensor without one has no rows (nothing to subtract) but is part of
        # the whole gradient, so it takes kappa too (plane zeroes it, threshold scales it)
        k = max(u.shape[0] for u in us)
        c = sum(c for c in cs if c.numel() == k)
        m = sum(m for m in ms if m.shape[0] == k)
        w, kappa = mode_weights(c, torch.linalg.inv(m.double()).float(), mode, aligned_scale)
        weights = [(w, kappa) if u.shape[0] == k else (torch.zeros(0), kappa) for u in us]
    else:
        raise ValueError(f"scope={scope!r} is not one of ('tensor', 'global')")

    sq_after, removed_sq = [], []
    for sq, c, m, (w, kappa) in zip(sq_before, cs, ms, weights):
        wmw = w @ m @ w
        sq_after.append((kappa * kappa * sq - 2 * kappa * (w @ c) + wmw).clamp_min(0))
        removed_sq.append(((1 - kappa) ** 2 * sq + 2 * (1 - kappa) * (w @ c) + wmw).clamp_min(0))
    sq_after_t = torch.stack(sq_after) if sq_after else torch.zeros(0)
    total_norm = sq_after_t.sum().sqrt()
    clip_coef = torch.ones(())
    if max_norm is not None:
        clip_coef = (max_norm / (total_norm + CLIP_EPS)).clamp(max=1.0)

    for g, u, (w, kappa) in zip(flat, us, weights):
        new = (kappa * g.float() - u.T @ w) * clip_coef
        g.copy_(new.to(g.dtype))
    return {
        "sq_before": sq_before,
        "sq_after": sq_after_t,
        "removed_sq": torch.stack(removed_sq) if removed_sq else torch.zeros(0),
        "total_norm": total_norm,
        "clip_coef": clip_coef,
    }


# ----------------------------------------------------------------------------------------
# Update-space projection: the projected AdamW step (issue 13)
# ----------------------------------------------------------------------------------------


def adam_direction(grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, max_exp_avg_sq: Optional[Tensor],
                   step: int, *, beta1: float, beta2: float, eps: float, maximize: bool = False) -> Tensor:
    """Update the moments in place from the RAW gradient (as torch.optim.AdamW does) and return
    the float32 Adam direction d = m_hat / (sqrt(v_hat) + eps), flattened.

    The arithmetic follows torch's single-tensor AdamW (lerp for m, addcmul for v, the bias
    corrections as step size and sqrt(bc2) divisor) so that with an empty basis the step is
    torch's AdamW step."""
    g = -grad if maximize else grad
    exp_avg.lerp_(g.to(exp_avg.dtype), 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g.to(exp_avg_sq.dtype), g.to(exp_avg_sq.dtype), value=1 - beta2)
    bias_correction1 = 1 - beta1 ** step
    bias_correction2_sqrt = math.sqrt(1 - beta2 ** step)
    v = exp_avg_sq
    if max_exp_avg_sq is not None:
        torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
        v = max_exp_avg_sq
    denom = (v.float().sqrt() / bias_correction2_sqrt).add_(eps)
    return (exp_avg.float() / bias_correction1 / denom).reshape(-1)


def projected_adamw_step_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    max_exp_avg_sqs: Sequence[Optional[Tensor]],
    steps: Sequence[int],
    bases: Sequence[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool = False,
    project_weight_decay: bool = False,
    mode: str = "orthogonal",
    scope: str = "tensor",
    aligned_scale: float = 1.0,
) -> dict:
    """One projected AdamW step, in place on params and moments (the specification).

    Per tensor i (``steps[i]`` is the step count AFTER this step's increment):

    1. m, v from the raw gradient; d_i = m_hat / (sqrt(v_hat) + eps)            (float32)
    2. with ``project_weight_decay``: d_i <- d_i + weight_decay * p_i (decay projected too)
    3. c_i = U_i d_i; weights w from ``mode`` (per tensor, or ``scope="global"``: one
       whole-model subspace, c = sum_i U_i d_i); d_i <- kappa d_i - U_i^T w
    4. without ``project_weight_decay``: p_i <- p_i (1 - lr * weight_decay) (decoupled, along
       p_i itself: NOT orthogonal to U_i); then p_i <- p_i - lr * d_i

    Guarantees: with ``weight_decay == 0`` or ``project_weight_decay=True`` the whole applied
    update is orthogonal to U_i (up to rounding of p). Without it, the projected Adam part is
    orthogonal and the decay part shrinks p along itself (as torch's AdamW does).

    Returns float32 tensors ``sq_before`` / ``removed_sq`` [T] (||d||^2 before projection and
    ||removed part||^2) and the projected directions ``updates`` (the list of d_i, flattened).
    """
    ds = []
    for p, g, m, v, vmax, t in zip(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps):
        d = adam_direction(g, m, v, vmax, int(t), beta1=beta1, beta2=beta2, eps=eps, maximize=maximize)
        if project_weight_decay and weight_decay != 0:
            d = d + weight_decay * p.detach().float().reshape(-1)
        ds.append(d)
    us = [u.reshape(u.shape[0], d.numel()).float() for u, d in zip(bases, ds)]
    cs = [u @ d for u, d in zip(us, ds)]
    ms = [u @ u.T for u in us]
    if scope == "tensor":
        weights = [mode_weights(c, torch.linalg.inv(m.double()).float(), mode, aligned_scale) for c, m in zip(cs, ms)]
    elif scope == "global":
        k = max((u.shape[0] for u in us), default=0)
        c = sum((c for c in cs if c.numel() == k), torch.zeros(k))
        m = sum((m for m in ms if m.shape[0] == k), torch.zeros(k, k))
        w, kappa = mode_weights(c, torch.linalg.inv(m.double()).float(), mode, aligned_scale)
        weights = [(w, kappa) if u.shape[0] == k else (torch.zeros(0), kappa) for u in us]
    else:
        raise ValueError(f"scope={scope!r} is not one of ('tensor', 'global')")
    out, sq_before, removed_sq = [], [], []
    for p, d, u, (w, kappa) in zip(params, ds, us, weights):
        new = kappa * d - u.T @ w
        sq_before.append(d.dot(d))
        removed_sq.append((d - new).dot(d - new))
        if not project_weight_decay and weight_decay != 0:
            p.mul_(1 - lr * weight_decay)
        p.copy_((p.float().reshape(-1) - lr * new).reshape(p.shape).to(p.dtype))
        out.append(new)
    return {
        "sq_before": torch.stack(sq_before) if sq_before else torch.zeros(0),
        "removed_sq": torch.stack(removed_sq) if removed_sq else torch.zeros(0),
        "updates": out,
    }
