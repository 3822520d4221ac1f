"""First-contact self-test (ogpsa.selftest): a wrong backend is caught, warned about once and
skipped by automatic routing; a named one raises; OGPSA_SELFTEST=0 turns it off."""

import warnings

import pytest
import torch

from ogpsa import ops, selftest
from ogpsa.backends.cext import CpuBackend
from ogpsa.backends.torch_backend import TorchBackend
from ogpsa.cli import main
from ogpsa.errors import BackendUnavailableError

cpu_available = ops.backends()["cpu"][0]


def _problem(seed=3):
    gen = torch.Generator().manual_seed(seed)
    grads, bases = [], []
    for n, k in ((41, 2), (3001, 3), (517, 1)):
        q, _ = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))
        bases.append(q.T.contiguous().float())
        grads.append(torch.randn(n, generator=gen))
    return grads, bases


def _float64_projection(grads, bases):
    out = []
    for g, u in zip(grads, bases):
        g64, u64 = g.double(), u.double()
        out.append(g64 - u64.T @ torch.linalg.solve(u64 @ u64.T, u64 @ g64))
    return out


class CorruptUpdate(TorchBackend):
    """A backend posing as a compiled one whose pass 2 is wrong by 1 % (a plausible kernel bug)."""

    def __init__(self, name):
        self.name = name
        self.calls = 0

    def update_(self, grads, bases, weights, kappa, scale):
        self.calls += 1
        super().update_(grads, bases, weights * 1.01, kappa, scale)


@pytest.fixture
def clean(monkeypatch):
    monkeypatch.delenv("OGPSA_BACKEND", raising=False)
    monkeypatch.delenv(selftest.ENV, raising=False)
    selftest.reset()
    yield monkeypatch
    selftest.reset()


def test_correct_backends_pass_on_the_cpu(clean):
    backends = {"torch": TorchBackend()}
    if cpu_available:
        backends["cpu"] = CpuBackend()
    rows = selftest.run_all(backends)
    # 3 grad x 2 basis dtypes, gradient space and update space (the fused projected AdamW op)
    assert len(rows) == (12 if cpu_available else 0)
    assert {r.space for r in rows} == ({"gradient", "update"} if cpu_available else set())
    assert all(r.ok and r.worst < 1.0 for r in rows), selftest.format_table(rows)


def test_update_space_catches_an_unprojected_adamw_step(monkeypatch):
    if not cpu_available:
        pytest.skip("ogpsa._C not built")
    real = torch.ops.ogpsa.projected_adamw_

    def unprojected(params, grads, ms, vs, vmax, bases, minvs, *rest):
        empty = [torch.empty(0, b.shape[1]) for b in bases]
        return real(params, grads, ms, vs, vmax, empty, [torch.empty(0, 0) for _ in minvs], *rest)

    monkeypatch.setattr(torch.ops.ogpsa, "projected_adamw_", unprojected)
    r = selftest.check(CpuBackend(), torch.device("cpu"), torch.float32, torch.float32, "update")
    assert not r.ok and "projected_adamw_ parameter" in r.detail


def test_check_catches_a_wrong_backend():
    r = selftest.check(CorruptUpdate("cuda"), torch.device("cpu"), torch.float32, torch.float32)
    assert not r.ok and r.worst > 1.0 and "update_" in r.detail


def test_check_turns_an_exception_into_a_failure():
    class Crashing(TorchBackend):
        name = "cuda"

        def dots(self, grads, bases, k_max):
            raise RuntimeError("no kernel image is available for execution on the device")

    r = selftest.check(Crashing(), torch.device("cpu"), torch.float32, torch.bfloat16)
    assert not r.ok and "no kernel image" in r.detail


def test_auto_falls_back_to_the_next_backend_and_warns_once(clean):
    fake = CorruptUpdate("cuda")
    fake.supports = lambda device, g, u, forced: True  # claims the CPU tensors, as CUDA would claim its own
    clean.setitem(ops._instances, "cuda", fake)
    grads, bases = _problem()
    want = _float64_projection(grads, bases)
    with pytest.warns(RuntimeWarning, match=r"backend 'cuda' failed its first-contact self-test.*update_"):
        stats = ops.project_(grads, bases)
    assert "cuda" not in stats.backends
    assert stats.backends == (("cpu",) if cpu_available else ("torch",))
    for g, w in zip(grads, want):  # the fallback's result is right
        assert float((g.double() - w).norm() / w.norm()) <= 1e-5
    calls = fake.calls
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning for the same key
        grads2, bases2 = _problem(4)
        stats2 = ops.project_(grads2, bases2)
    assert "cuda" not in stats2.backends and fake.calls == calls  # not re-tested either
    key = ("cuda", "cpu", torch.float32, torch.float32, "gradient")
    assert not selftest.results()[key].ok


def test_a_wrong_cpu_kernel_falls_back_to_torch(clean):
    """The real cpu backend with its pass 2 corrupted (monkeypatched op), checked with
    OGPSA_SELFTEST=all: routed to torch."""
    if not cpu_available:
        pytest.skip("ogpsa._C not built")
    clean.setenv(selftest.ENV, "all")
    be = ops._load("cpu")
    good = be.update_

    def corrupt(grads, bases, weights, kappa, scale):
        good(grads, bases, weights, kappa, scale)
        for g in grads:
            g.mul_(1.5)

    clean.setattr(be, "update_", corrupt)
    clean.setattr(be, "fused_project_", lambda *a: (_ for _ in ()).throw(RuntimeError("corrupt")), raising=False)
    grads, bases = _problem()
    with pytest.warns(RuntimeWarning, match="'cpu' failed"):
        stats = ops.project_(grads, bases, max_norm=1e9)
    assert stats.backends == ("torch",)


def test_a_named_backend_that_fails_raises(clean):
    fake = CorruptUpdate("cuda")
    fake.supports = lambda device, g, u, forced: True
    fake.availability = lambda: (True, "fake")
    clean.setitem(ops._instances, "cuda", fake)
    clean.setitem(ops._REGISTRY, "cuda", "ogpsa.backends.cext:CudaBackend")
    grads, bases = _problem()
    before = [g.clone() for g in grads]
    with pytest.raises(BackendUnavailableError, match="'cuda' failed its first-contact self-test"):
        ops.project_(grads, bases, backend="cuda")
    assert all(torch.equal(a, b) for a, b in zip(grads, before))  # nothing modified


def test_switch_off(clean):
    fake = CorruptUpdate("cuda")
    fake.supports = lambda device, g, u, forced: True
    clean.setitem(ops._instances, "cuda", fake)
    clean.setenv(selftest.ENV, "0")
    grads, bases = _problem()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stats = ops.project_(grads, bases)
    assert stats.backends == ("cuda",)  # trusted without a check: the switch is the user's call
    assert selftest.results() == {}


def test_cpu_check_runs_once_per_key(clean):
    if not cpu_available:
        pytest.skip("ogpsa._C not built")
    clean.setenv(selftest.ENV, "all")
    count = {"n": 0}
    real = selftest.check

    def counting(*a, **kw):
        count["n"] += 1
        return real(*a, **kw)

    clean.setattr(selftest, "check", counting)
    for seed in range(3):
        grads, bases = _problem(seed)
        ops.project_(grads, bases)
    assert count["n"] == 1
    grads, bases = _problem()
    ops.project_([g.bfloat16() for g in grads], bases)  # a new key: one more check
    assert count["n"] == 2


def test_cpu_is_not_checked_by_default(clean):
    if not cpu_available:
        pytest.skip("ogpsa._C not built")
    grads, bases = _problem()
    stats = ops.project_(grads, bases)
    assert stats.backends == ("cpu",) and selftest.results() == {}
    assert selftest.checked_backends() == ("cuda", "triton")


def test_info_selftest_prints_a_table(clean, capsys):
    rc = main(["info", "--selftest"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert out.splitlines()[0].split()[:6] == ["backend", "device", "grad", "basis", "space", "result"]
    if cpu_available:
        assert sum(1 for line in out.splitlines() if line.startswith("cpu ") and " ok " in line) == 12


def test_check_ignores_the_callers_autocast_and_grad_mode(clean):
    if not cpu_available:
        pytest.skip("ogpsa._C not built")
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.enable_grad():
        r = selftest.check(CpuBackend(), torch.device("cpu"), torch.float32, torch.float32)
    assert r.ok and r.worst < 0.1, r.detail
