"""Norm algebra in float64 on every available backend (issue 12, item 4) and one NaN/Inf
policy for all of them (item 5)."""

from __future__ import annotations

import pytest
import torch
from oracle import random_basis

import ogpsa
from ogpsa import ops

BACKENDS = [name for name in ("torch", "cpu", "triton") if ogpsa.backends()[name][0]]


def _exact_projection(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """float64 projection of the stored (rounded) g onto the complement of the stored u."""
    g64, u64 = g.double().reshape(-1), u.double()
    return g64 - u64.T @ torch.linalg.solve(u64 @ u64.T, u64 @ g64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_is_exact_when_almost_all_of_g_lies_in_the_subspace(backend):
    """g = 1e3 u + 1e-3 e, max_norm 1e-4: ||g||^2 - ||c||^2 from float32 sums would leave
    nothing but rounding (the old code returned 0.35 for 1e-3)."""
    gen = torch.Generator().manual_seed(11)
    q = random_basis(257, 3, gen, torch.float64)
    u = q[:2].float().contiguous()
    g = (1e3 * q[0] + 1e-3 * q[2]).float()
    expected = float(_exact_projection(g, u).norm())
    assert expected == pytest.approx(1e-3, rel=1e-2)  # the float32 g still holds its 1e-3 part
    stats = ops.project_([g], [u], max_norm=1e-4, backend=backend)
    total = float(stats.total_norm)
    assert total == pytest.approx(expected, rel=2e-2)
    # clipping then brings exactly the gradient that is stored to max_norm
    assert float(g.double().norm()) == pytest.approx(1e-4 * total / (total + 1e-6), rel=1e-5)
    assert float(stats.sq_after[0]) == pytest.approx(total ** 2, rel=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("max_norm", [None, 1.0])
def test_huge_gradient_whose_float32_square_overflows(backend, max_norm):
    """|g| ~ 1e21: every element's square overflows float32; results stay finite and exact."""
    gen = torch.Generator().manual_seed(12)
    u = random_basis(1001, 2, gen).contiguous()
    g = (1e21 / 1001 ** 0.5 * torch.randn(1001, generator=gen)).float()
    proj = _exact_projection(g, u)
    norm_before = float(g.double().norm())
    stats = ops.project_([g], [u], max_norm=max_norm, backend=backend)
    assert float(stats.total_norm) == pytest.approx(float(proj.norm()), rel=1e-6)
    assert float(stats.sq_before[0]) == pytest.approx(norm_before ** 2, rel=1e-6)
    assert bool(torch.isfinite(g).all())
    target = proj / proj.norm() if max_norm is not None else proj
    assert float((g.double() - target).norm() / target.norm()) < 1e-5


def test_coefficient_path_ignores_tf32_and_reduced_matmul_precision():
    gen = torch.Generator().manual_seed(13)
    grads = [torch.randn(301, generator=gen), torch.randn(7, 9, generator=gen)]
    bases = [random_basis(301, 3, gen).contiguous(), random_basis(63, 2, gen).contiguous()]
    a = [g.clone() for g in grads]
    sa = ops.project_(a, bases, max_norm=0.5, mode="conflict", aligned_scale=0.3, backend="torch")
    old_prec, old_tf32 = torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32
    try:
        torch.set_float32_matmul_precision("medium")
        torch.backends.cuda.matmul.allow_tf32 = True  # what HF's tf32=True sets
        b = [g.clone() for g in grads]
        sb = ops.project_(b, bases, max_norm=0.5, mode="conflict", aligned_scale=0.3, backend="torch")
    finally:
        torch.set_float32_matmul_precision(old_prec)
        torch.backends.cuda.matmul.allow_tf32 = old_tf32
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert torch.equal(sa.total_norm, sb.total_norm) and sa.total_norm.dtype == torch.float64


def _nan_case():
    gen = torch.Generator().manual_seed(14)
    grads = [torch.randn(65, generator=gen), torch.randn(40, generator=gen), torch.randn(33, generator=gen)]
    bases = [random_basis(65, 2, gen).contiguous(), random_basis(40, 2, gen).contiguous(),
             torch.empty(0, 33)]
    grads[0][5] = float("nan")
    grads[2][3] = float("inf")
    return grads, bases


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_nan_inf_policy_on_every_backend(backend):
    """Without clipping: a tensor with a basis and a NaN becomes all non-finite, a finite tensor
    is projected normally, a tensor without basis keeps its values. With clipping: the NaN
    clip factor reaches every gradient, as in torch.nn.utils.clip_grad_norm_."""
    grads, bases = _nan_case()
    before = [g.clone() for g in grads]
    ops.project_(grads, bases, backend=backend)
    assert not bool(torch.isfinite(grads[0]).any())
    assert float((grads[1].double() - _exact_projection(before[1], bases[1])).norm()) < 1e-5 * float(before[1].norm())
    assert torch.equal(grads[2], before[2])
    grads, bases = _nan_case()
    ops.project_(grads, bases, backend=backend, max_norm=1.0)
    assert all(bool(torch.isnan(g).all()) for g in grads[:2])
    with pytest.raises(RuntimeError, match="non-finite"):
        grads, bases = _nan_case()
        kept = [g.clone() for g in grads]
        ops.project_(grads, bases, backend=backend, max_norm=1.0, error_if_nonfinite=True)
    assert all(torch.equal(g, k) or (torch.isnan(g) == torch.isnan(k)).all() and
               torch.equal(g.nan_to_num(), k.nan_to_num()) for g, k in zip(grads, kept))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [1e-25, 1e20])
def test_gram_keeps_rank_for_tiny_and_huge_reference_gradients(backend, scale):
    gen = torch.Generator().manual_seed(15)
    refs = (scale * torch.randn(2, 1003, generator=gen)).contiguous()
    kept = refs.clone()
    g = ops.gram([refs], backend=backend)[0]
    assert torch.equal(refs, kept)  # rescaling for the backend pass is undone exactly
    exact = kept.double() @ kept.double().T
    assert float((g - exact).norm() / exact.norm()) < 1e-5
    sub = ogpsa.Subspace.from_reference_rows(["w"], [(1003,)], [refs], backend=backend)
    assert sub.ranks() == {"w": 2}
