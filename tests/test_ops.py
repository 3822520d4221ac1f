"""Dispatch, validation and the guarantee that bad input leaves every gradient unchanged."""

import pytest
import torch
from oracle import make_case

import ogpsa
from ogpsa import ops
from ogpsa.ops import BackendUnavailableError, ProjectionInputError


def _bad_cases():
    def base():
        return make_case(1, [7, 33, 12], 2)

    def shape_mismatch():
        g, u = base()
        u[1] = torch.randn(2, 34)
        return g, u, {}

    def dtype_grad():
        g, u = base()
        g[2] = g[2].to(torch.int32)
        return g, u, {}

    def dtype_basis():
        g, u = base()
        u[0] = u[0].double()
        return g, u, {}

    def noncontig():
        g, u = base()
        g[1] = torch.randn(33, 2)[:, 0]
        return g, u, {}

    def nan_basis():
        g, u = base()
        u[1][1, 3] = float("nan")
        return g, u, {}

    def k_too_big():
        g, u = base()
        g[0] = torch.randn(1)
        u[0] = torch.randn(2, 1)
        return g, u, {}

    def k_over_max():
        g, u = base()
        u[1] = torch.randn(17, 33)
        return g, u, {}

    def length():
        g, u = base()
        return g, u[:2], {}

    def unknown_mode():
        g, u = base()
        return g, u, {"mode": "sideways"}

    def bad_norm():
        g, u = base()
        return g, u, {"max_norm": -1.0}

    def device_meta():
        g, u = base()
        u[1] = torch.empty(2, 33, device="meta")
        return g, u, {}

    def not_tensor():
        g, u = base()
        u[1] = [[0.0] * 33] * 2
        return g, u, {}

    return {f.__name__: f for f in [shape_mismatch, dtype_grad, dtype_basis, noncontig, nan_basis, k_too_big,
                                    k_over_max, length, unknown_mode, bad_norm, device_meta, not_tensor]}


@pytest.mark.parametrize("case", sorted(_bad_cases()))
def test_bad_input_raises_and_leaves_grads_unchanged(case):
    grads, bases, kw = _bad_cases()[case]()
    before = [g.clone() if isinstance(g, torch.Tensor) else g for g in grads]
    with pytest.raises(ProjectionInputError):
        ogpsa.project_(grads, bases, **kw)
    for a, b in zip(grads, before):
        assert torch.equal(a, b)


def test_empty_list_is_an_error():
    with pytest.raises(ProjectionInputError, match="empty"):
        ogpsa.project_([], [])


def test_error_names_the_tensor():
    grads, bases = make_case(2, [5, 6], 1)
    bases[1] = torch.randn(1, 7)
    with pytest.raises(ProjectionInputError, match=r"tensor 1 \('layer.weight'\).*\[k, 6\]"):
        ogpsa.project_(grads, bases, names=["a", "layer.weight"])


def test_backends_report_and_forcing(monkeypatch):
    info = ogpsa.backends()
    assert set(info) == {"cuda", "triton", "cpu", "torch"}
    assert info["torch"][0] is True
    for _name, (_ok, why) in info.items():
        assert isinstance(why, str) and why
    grads, bases = make_case(3, [9], 2)
    monkeypatch.setenv("OGPSA_BACKEND", "torch")
    assert ogpsa.project_(grads, bases).backends == ("torch",)
    monkeypatch.setenv("OGPSA_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="nonsense"):
        ogpsa.project_(grads, bases)


def test_unavailable_backend_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("OGPSA_BACKEND", raising=False)
    unavailable = [n for n, (ok, _) in ogpsa.backends().items() if not ok]
    if not unavailable:
        pytest.skip("every backend is available here")
    grads, bases = make_case(4, [9], 2)
    before = grads[0].clone()
    with pytest.raises(BackendUnavailableError, match=unavailable[0]):
        ogpsa.project_(grads, bases, backend=unavailable[0])
    assert torch.equal(grads[0], before)


def test_auto_on_cpu_never_picks_cuda(monkeypatch):
    monkeypatch.delenv("OGPSA_BACKEND", raising=False)
    be = ops.select_backend(torch.device("cpu"), torch.float32, torch.float32)
    assert be.name in ("cpu", "torch")


def test_plan_serves_fresh_gradients_and_detects_changed_metadata():
    """The plan holds bases only: new gradient tensors (as after zero_grad(set_to_none=True))
    with the same shapes/dtypes reuse it; a changed numel or dtype is a named error."""
    from oracle import float64_project, rel_err

    grads, bases = make_case(5, [7, 9], 2)
    plan = ops.plan_projection(grads, bases, names=["a", "b"])
    ops.execute(plan, grads)
    fresh = [torch.randn_like(g) for g in grads]
    expected, _ = float64_project(fresh, bases)
    ops.execute(plan, fresh)
    assert rel_err(fresh, expected) < 1e-5
    with pytest.raises(ProjectionInputError, match=r"tensor 1 \('b'\).*changed"):
        ops.execute(plan, [grads[0], torch.randn(10)])
    with pytest.raises(ProjectionInputError, match="float64|changed"):
        ops.execute(plan, [grads[0].double(), grads[1]])
    before = [g.clone() for g in grads]
    with pytest.raises(ProjectionInputError, match="not contiguous"):
        ops.execute(plan, [grads[0], torch.randn(9, 2)[:, 0]])
    assert torch.equal(grads[0], before[0])


def test_mixed_dtypes_are_grouped():
    g32, u32 = make_case(6, [40, 41], 3)
    g16, u16 = make_case(7, [42], 3, grad_dtype=torch.bfloat16, basis_dtype=torch.bfloat16)
    from oracle import float64_project, rel_err

    grads, bases = g32 + g16, u32 + u16
    expected, _ = float64_project(grads, bases, max_norm=1.0)
    ogpsa.project_(grads, bases, max_norm=1.0)
    assert rel_err(grads[:2], expected[:2]) < 1e-5
    assert rel_err(grads[2:], expected[2:]) < 1e-2
