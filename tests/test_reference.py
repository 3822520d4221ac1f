"""The reference implementation and the torch backend against the float64 NumPy oracle."""

import numpy as np
import pytest
import torch
from oracle import BIG_SIZE, MODES, SCOPES, float64_project, make_case, rel_err, tolerance

import ogpsa
from ogpsa import reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _run(impl, grads, bases, **kw):
    if impl == "reference":
        return reference.project_(grads, bases, **kw)
    return ogpsa.project_(grads, bases, backend="torch", **kw)


@pytest.mark.parametrize("impl", ["reference", "torch"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("grad_dtype", DTYPES)
@pytest.mark.parametrize("basis_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("max_norm", [None, 0.5])
def test_matrix_against_float64(impl, mode, scope, grad_dtype, basis_dtype, max_norm):
    seed = hash((impl, mode, scope, str(grad_dtype), str(basis_dtype), max_norm)) % 10_000
    grads, bases = make_case(seed, [1, 7, 33, 4097, 300], 5, grad_dtype, basis_dtype, scope)
    inputs = [g.clone() for g in grads]
    expected, total = float64_project(inputs, bases, mode, scope, max_norm, aligned_scale=0.5)
    _run(impl, grads, bases, mode=mode, scope=scope, max_norm=max_norm, aligned_scale=0.5)
    assert all(g.dtype == grad_dtype for g in grads)
    assert rel_err(grads, expected) <= tolerance(grad_dtype, basis_dtype)


@pytest.mark.parametrize("k", [1, 2, 3, 7, 8, 15, 16])
@pytest.mark.parametrize("impl", ["reference", "torch"])
def test_every_rank(k, impl):
    grads, bases = make_case(100 + k, [17, 4097, 64], k)
    expected, _ = float64_project(grads, bases)
    _run(impl, grads, bases)
    assert rel_err(grads, expected) <= 1e-5


@pytest.mark.parametrize("count", [1, 13, 50])
def test_many_mixed_shapes(count):
    gen = torch.Generator().manual_seed(count)
    shapes = [tuple(int(s) for s in torch.randint(1, 40, (int(torch.randint(1, 4, (1,), generator=gen)),), generator=gen))
              for _ in range(count)]
    grads, bases = make_case(count, [], 4, shapes=shapes)
    expected, total = float64_project(grads, bases, max_norm=1.0)
    stats = ogpsa.project_(grads, bases, max_norm=1.0, backend="torch")
    assert rel_err(grads, expected) <= 1e-5
    assert float(stats.total_norm) == pytest.approx(total, rel=1e-5)


@pytest.mark.parametrize("impl", ["reference", "torch"])
def test_big_odd_size(impl):
    grads, bases = make_case(7, [BIG_SIZE, 3], 4)
    expected, _ = float64_project(grads, bases, max_norm=2.0)
    _run(impl, grads, bases, max_norm=2.0)
    assert rel_err(grads, expected) <= 1e-5


def test_orthogonal_and_idempotent():
    grads, bases = make_case(3, [4097, 7, 1000], 8)
    before = [g.norm() for g in grads]
    ogpsa.project_(grads, bases)
    for g, u, n in zip(grads, bases, before):
        assert float((u @ g.view(-1)).abs().max()) <= 1e-5 * float(n)
    once = [g.clone() for g in grads]
    ogpsa.project_(grads, bases)
    assert rel_err(grads, [o.double().numpy() for o in once]) <= 1e-6


def test_conflict_math_k1():
    """k = 1: a conflicting component (c < 0) is removed, an aligned one scaled by aligned_scale."""
    u = torch.zeros(1, 4)
    u[0, 0] = 1.0
    g_conflict = torch.tensor([-2.0, 1.0, 1.0, 1.0])
    g_aligned = torch.tensor([3.0, 1.0, 1.0, 1.0])
    ogpsa.project_([g_conflict, g_aligned], [u, u.clone()], mode="conflict", aligned_scale=0.5)
    assert g_conflict.tolist() == [0.0, 1.0, 1.0, 1.0]
    assert g_aligned.tolist() == [1.5, 1.0, 1.0, 1.0]


def test_plane_keeps_only_subspace_part():
    grads, bases = make_case(5, [50], 3)
    g0 = grads[0].clone()
    ogpsa.project_(grads, bases, mode="plane")
    expected = bases[0].T @ (bases[0] @ g0)
    torch.testing.assert_close(grads[0], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scope", SCOPES)
def test_clipping_equals_clip_grad_norm_after_projection(scope):
    grads, bases = make_case(11, [33, 4097, 5], 3, scope=scope)
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    ogpsa.project_([p.grad for p in params], bases, scope=scope)
    torch_total = torch.nn.utils.clip_grad_norm_(params, 0.3)
    stats = ogpsa.project_(grads, bases, scope=scope, max_norm=0.3)
    assert float(stats.total_norm) == pytest.approx(float(torch_total), rel=1e-5)
    for g, p in zip(grads, params):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-7)
    assert stats.norm_after == pytest.approx(0.3, rel=1e-4)


def test_stats_removed_fraction():
    grads, bases = make_case(12, [4097, 100], 4)
    before = [g.clone() for g in grads]
    stats = ogpsa.project_(grads, bases)
    removed = sum(float((b - a).pow(2).sum()) for a, b in zip(grads, before))
    total = sum(float(b.pow(2).sum()) for b in before)
    assert stats.removed_fraction == pytest.approx(removed / total, rel=1e-4)
    assert stats.norm_before == pytest.approx(total ** 0.5, rel=1e-5)
    per = stats.removed_fraction_per_tensor()
    assert per.shape == (2,) and bool((per >= 0).all())


def test_tensor_without_basis_is_clipped_not_projected():
    grads, bases = make_case(13, [20, 30], 2)
    bases[1] = torch.empty(0, 30)
    g1 = grads[1].clone()
    expected, _ = float64_project(grads, bases, max_norm=0.1)
    ogpsa.project_(grads, bases, max_norm=0.1)
    assert rel_err(grads, expected) <= 1e-5
    assert torch.allclose(grads[1] / grads[1].norm(), g1 / g1.norm(), atol=1e-6)


# ---------------------------------------------------------------------------------------
# basis construction
# ---------------------------------------------------------------------------------------


def _span_projector(rows: np.ndarray) -> np.ndarray:
    q, _ = np.linalg.qr(rows.T)
    return q @ q.T


@pytest.mark.parametrize("method", ["gram_schmidt", "eigen"])
@pytest.mark.parametrize("scope", SCOPES)
def test_basis_spans_reference_gradients(method, scope):
    gen = torch.Generator().manual_seed(21)
    refs = [torch.randn(3, n, generator=gen) for n in (7, 4097, 40)]
    bases = reference.build_bases(refs, scope=scope, method=method)
    if scope == "tensor":
        for r, u in zip(refs, bases):
            assert u.shape == (3, r.shape[1])
            np.testing.assert_allclose((u @ u.T).numpy(), np.eye(3), atol=1e-5)
            np.testing.assert_allclose(_span_projector(u.double().numpy()), _span_projector(r.double().numpy()), atol=1e-6)
    else:
        u = torch.cat(bases, dim=1)
        r = torch.cat(refs, dim=1)
        np.testing.assert_allclose((u @ u.T).numpy(), np.eye(3), atol=1e-5)
        np.testing.assert_allclose(_span_projector(u.double().numpy()), _span_projector(r.double().numpy()), atol=1e-6)


def test_basis_drops_zero_nonfinite_and_dependent_rows():
    gen = torch.Generator().manual_seed(22)
    a, b = torch.randn(2, 50, generator=gen)
    bad = torch.randn(50, generator=gen)
    bad[3] = float("nan")
    rows = torch.stack([a, torch.zeros(50), 2 * a + 1e-9 * b, bad, b])
    (u,) = reference.build_bases([rows])
    assert u.shape[0] == 2
    assert bool(torch.isfinite(u).all())
    np.testing.assert_allclose(_span_projector(u.double().numpy()), _span_projector(torch.stack([a, b]).double().numpy()), atol=1e-6)


def test_gram_schmidt_orientation_and_rank():
    gen = torch.Generator().manual_seed(23)
    rows = torch.randn(4, 30, generator=gen)
    (u,) = reference.build_bases([rows], rank=2)
    assert u.shape[0] == 2
    torch.testing.assert_close(u[0], rows[0] / rows[0].norm(), rtol=1e-5, atol=1e-6)
    assert float(u[1] @ rows[1]) > 0


def test_energy_selection():
    gen = torch.Generator().manual_seed(24)
    big = torch.randn(30, generator=gen)
    rows = torch.stack([big, big + 0.01 * torch.randn(30, generator=gen), torch.randn(30, generator=gen)])
    (u,) = reference.build_bases([rows], method="eigen", energy=0.5, normalize=True)
    assert u.shape[0] == 1  # one principal direction holds > half the spectrum
    (u_all,) = reference.build_bases([rows], method="eigen", energy=1.0)
    assert u_all.shape[0] == 3
    # the kept direction is oriented along the reference gradients
    assert float(u[0] @ rows.sum(0)) > 0
