"""First-contact self-test in update space: the routing of the projected AdamW step
(ogpsa.optim.backends.route) checks a compiled kernel once per key, exactly as gradient space
does (tests/test_selftest.py): under ``auto`` a wrong kernel warns once and the step falls
back to torch (and is right); a kernel named by the user raises BackendUnavailableError
before anything is modified. Checked on the CPU with OGPSA_SELFTEST=all (the cpu op is then
first-contact checked) and the compiled op monkeypatched to corrupt its result."""

import warnings

import pytest
import torch

import ogpsa
from ogpsa import selftest
from ogpsa.errors import BackendUnavailableError
from ogpsa.optim import ProjectedAdamW
from ogpsa.optim.backends import cpu_kernel_available

pytestmark = pytest.mark.skipif(not cpu_kernel_available(), reason="compiled extension without projected_adamw_")

LR = 1e-2


def _problem(seed=11):
    """Odd-sized parameters, a subspace for all but one of them, seeded gradients (never zeros)."""
    gen = torch.Generator().manual_seed(seed)
    model = torch.nn.Module()
    for i, shape in enumerate(((13, 29), (3001,), (5, 7, 3))):
        model.register_parameter(f"t{i}", torch.nn.Parameter(torch.randn(shape, generator=gen)))
    refs = [{n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters() if n != "t2"}
            for _ in range(3)]
    sub = ogpsa.Subspace.from_gradients(refs, ogpsa.OGPSAConfig(allow_partial=True))
    grads = {n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()}
    return model, sub, grads


def _one_step(model, sub, grads, **kw):
    opt = ProjectedAdamW(model, sub, lr=LR, weight_decay=0.0, **kw)
    for n, p in model.named_parameters():
        p.grad = grads[n].clone()
    opt.step()
    return opt


def _float64_first_step(p0, g, u):
    """AdamW's first step from zero moments (bias-corrected: d = g / (|g| + eps)), projected
    off span(U) with the pseudo-inverse, all in float64."""
    g64 = g.double().reshape(-1)
    d = g64 / (g64.abs() + 1e-8)
    if u is not None:
        u64 = u.double()
        d = d - u64.T @ (torch.linalg.pinv(u64 @ u64.T) @ (u64 @ d))
    return p0.double() - LR * d.reshape(p0.shape)


@pytest.fixture
def corrupt_cpu_op(monkeypatch):
    """OGPSA_SELFTEST=all and a compiled projected AdamW op that steps 5 % too far (a plausible
    kernel bug: right direction, wrong length)."""
    monkeypatch.delenv("OGPSA_BACKEND", raising=False)
    monkeypatch.setenv(selftest.ENV, "all")
    selftest.reset()
    real = torch.ops.ogpsa.projected_adamw_
    calls = {"n": 0}

    def corrupt(params, *rest):
        calls["n"] += 1
        before = [p.clone() for p in params]
        out = real(params, *rest)
        for p, b in zip(params, before):
            p.add_(p - b, alpha=0.05)
        return out

    monkeypatch.setattr(torch.ops.ogpsa, "projected_adamw_", corrupt)
    yield calls
    selftest.reset()


def test_auto_warns_once_and_falls_back_to_torch(corrupt_cpu_op, monkeypatch):
    model, sub, grads = _problem()
    p0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.warns(RuntimeWarning, match=r"backend 'cpu' failed its first-contact self-test.*update space"):
        opt = _one_step(model, sub, grads)
    assert opt.last_stats.backends == ("torch",)
    checks = corrupt_cpu_op["n"]
    assert checks == 1  # the check itself; the step never called the corrupt op
    key = ("cpu", "cpu", torch.float32, torch.float32, "update")
    assert not selftest.results()[key].ok
    # the fallback's step is right: against float64, and identical to the torch path
    for n, p in model.named_parameters():
        want = _float64_first_step(p0[n], grads[n], sub.basis(n) if n in sub else None)
        got = p.detach().double()
        assert float((got - want).norm() / want.norm()) <= 1e-5, n
    ref_model = torch.nn.Module()
    for n, p in p0.items():
        ref_model.register_parameter(n, torch.nn.Parameter(p.clone()))
    monkeypatch.setenv("OGPSA_BACKEND", "torch")
    _one_step(ref_model, sub, grads)
    monkeypatch.delenv("OGPSA_BACKEND")
    for (n, a), b in zip(model.named_parameters(), ref_model.parameters()):
        assert torch.equal(a, b), n
    # same key again: no second warning, no second check
    model2, sub2, grads2 = _problem(12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt2 = _one_step(model2, sub2, grads2)
    assert opt2.last_stats.backends == ("torch",) and corrupt_cpu_op["n"] == checks


def test_named_backend_that_fails_raises_before_writing(corrupt_cpu_op):
    model, sub, grads = _problem()
    p0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = ProjectedAdamW(model, sub, lr=LR, weight_decay=0.0, config=ogpsa.OGPSAConfig(backend="cpu",
                                                                                       allow_partial=True))
    for n, p in model.named_parameters():
        p.grad = grads[n].clone()
    with pytest.raises(BackendUnavailableError, match=r"'cpu' failed its first-contact self-test"):
        opt.step()
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), p0[n]), n
        assert torch.equal(p.grad, grads[n]), n
        assert all(int(v.sum() != 0) == 0 for v in opt.state[p].values() if torch.is_tensor(v)), n


def test_a_correct_cpu_op_passes_and_runs(monkeypatch):
    monkeypatch.delenv("OGPSA_BACKEND", raising=False)
    monkeypatch.setenv(selftest.ENV, "all")
    selftest.reset()
    try:
        model, sub, grads = _problem()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            opt = _one_step(model, sub, grads)
        assert opt.last_stats.backends == ("cpu",)
        assert selftest.results()[("cpu", "cpu", torch.float32, torch.float32, "update")].ok
    finally:
        selftest.reset()


def test_cpu_op_not_checked_by_default(corrupt_cpu_op, monkeypatch):
    monkeypatch.delenv(selftest.ENV)
    model, sub, grads = _problem()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = _one_step(model, sub, grads)
    assert opt.last_stats.backends == ("cpu",) and selftest.results() == {}
