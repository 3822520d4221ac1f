"""The ``triton`` backend against the float64 oracle.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1 before anything imports Triton); with a GPU the same tests run compiled
on CUDA tensors and the CPU ones skip.
"""

import os

import torch

if not torch.cuda.is_available():  # also when this file runs alone; conftest normally did it already
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

triton = pytest.importorskip("triton")

from ogpsa.kernels import common as kcommon  # noqa: E402
from ogpsa.kernels import projection as kproj  # noqa: E402
from ogpsa.kernels import tables as ktables  # noqa: E402
from oracle import BIG_SIZE, MODES, SCOPES, float64_project, make_case, rel_err, tolerance  # noqa: E402

import ogpsa  # noqa: E402
from ogpsa import ops  # noqa: E402
from ogpsa.backends import triton_backend as tb  # noqa: E402

pytestmark = pytest.mark.usefixtures("paper_preset")  # these tests mean the paper recipe (preset="paper")

INTERP = kcommon.INTERPRETED
GPU = torch.cuda.is_available() and not INTERP
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not INTERP, reason="Triton was not imported with TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not GPU, reason="needs a CUDA GPU (compiled Triton)")]),
]
GRAD_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BASIS_DTYPES = [torch.float32, torch.bfloat16]


def _on(device, grads, bases):
    return [g.to(device) for g in grads], [u.to(device) for u in bases]


def _mixed_shapes(count, seed, max_dim=24):
    gen = torch.Generator().manual_seed(seed)
    return [tuple(int(s) for s in torch.randint(1, max_dim, (int(torch.randint(1, 4, (1,), generator=gen)),),
                                                 generator=gen)) for _ in range(count)]


# ---------------------------------------------------------------------------------------
# registration, availability, dispatch
# ---------------------------------------------------------------------------------------


def test_registered_and_tells_the_truth():
    ok, why = ogpsa.backends()["triton"]
    assert ok
    assert f"triton {triton.__version__}" in why
    assert ("interpreter" in why) == INTERP
    assert ops.get_backend("triton").name == "triton"


def test_supports_rules():
    be = tb.TritonBackend()
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert be.supports(cpu, torch.float32, torch.float32, True) == INTERP
    assert not be.supports(cpu, torch.float32, torch.float32, False)  # never chosen automatically for the CPU
    assert be.supports(cuda, torch.bfloat16, torch.bfloat16, False) == GPU
    assert not be.supports(cpu, torch.float64, torch.float32, True)
    assert not be.supports(cpu, torch.float32, torch.float16, True)


def test_auto_never_picks_triton_for_cpu_tensors():
    be = ops.select_backend(torch.device("cpu"), torch.float32, torch.float32, "auto")
    assert be.name != "triton"


@pytest.mark.skipif(not INTERP, reason="interpreter mode only")
def test_env_variable_forces_triton(monkeypatch):
    monkeypatch.setenv("OGPSA_BACKEND", "triton")
    grads, bases = make_case(1, [33, 7], 2)
    expected, _ = float64_project(grads, bases)
    stats = ogpsa.project_(grads, bases)
    assert stats.backends == ("triton",)
    assert rel_err(grads, expected) <= 1e-5


# ---------------------------------------------------------------------------------------
# projection against float64: every mode, scope, dtype, clipping
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("grad_dtype", GRAD_DTYPES)
@pytest.mark.parametrize("basis_dtype", BASIS_DTYPES)
@pytest.mark.parametrize("max_norm", [None, 0.5])
def test_matrix_against_float64(device, mode, scope, grad_dtype, basis_dtype, max_norm):
    seed = (MODES.index(mode) * 97 + SCOPES.index(scope) * 31 + GRAD_DTYPES.index(grad_dtype) * 7
            + BASIS_DTYPES.index(basis_dtype) * 3 + (max_norm is None))
    grads, bases = _on(device, *make_case(seed, [1, 7, 33, 4097, 300], 5, grad_dtype, basis_dtype, scope))
    expected, total = float64_project(grads, bases, mode, scope, max_norm, aligned_scale=0.5)
    stats = ogpsa.project_(grads, bases, mode=mode, scope=scope, max_norm=max_norm, aligned_scale=0.5,
                           backend="triton")
    assert stats.backends == ("triton",)
    assert all(g.dtype == grad_dtype and g.device.type == device for g in grads)
    tol = tolerance(grad_dtype, basis_dtype)
    assert rel_err(grads, expected) <= tol
    assert float(stats.total_norm) == pytest.approx(total, rel=max(tol, 1e-5))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [1, 2, 5, 16])
def test_ranks(device, k):
    grads, bases = _on(device, *make_case(100 + k, [17, 4097, 64], k))
    expected, _ = float64_project(grads, bases)
    ogpsa.project_(grads, bases, backend="triton")
    assert rel_err(grads, expected) <= 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", range(1, 17))
def test_every_rank(device, k):
    grads, bases = _on(device, *make_case(200 + k, [17, 4097, 64, 1], k, scope="tensor"))
    expected, total = float64_project(grads, bases, "conflict", max_norm=1.0)
    stats = ogpsa.project_(grads, bases, mode="conflict", max_norm=1.0, backend="triton")
    assert rel_err(grads, expected) <= 1e-5
    assert float(stats.total_norm) == pytest.approx(total, rel=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("count,k", [(1, 3), (13, 4), (300, 4), (300, 1)])
def test_many_mixed_shapes(device, count, k):
    """Up to 300 tensors of mixed 1-3 d shapes; k=1 makes every third tensor basis-free."""
    grads, bases = _on(device, *make_case(count + k, [], k, shapes=_mixed_shapes(count, count + k)))
    if k == 1:
        assert any(u.shape[0] == 0 for u in bases)
    expected, total = float64_project(grads, bases, max_norm=1.0)
    stats = ogpsa.project_(grads, bases, max_norm=1.0, backend="triton")
    assert rel_err(grads, expected) <= 1e-5
    assert float(stats.total_norm) == pytest.approx(total, rel=1e-5)
    assert [tuple(g.shape) for g in grads] == _mixed_shapes(count, count + k)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_big_odd_size(device, grad_dtype):
    grads, bases = _on(device, *make_case(7, [BIG_SIZE, 3], 4, grad_dtype))
    expected, _ = float64_project(grads, bases, max_norm=2.0)
    ogpsa.project_(grads, bases, max_norm=2.0, backend="triton")
    assert rel_err(grads, expected) <= tolerance(grad_dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scope", SCOPES)
def test_plan_once_execute_every_mode_and_clip(device, scope):
    """The backend composes with ops.execute: one plan, reused for every mode and clipping,
    on fresh gradient values written into the same buffers (tables built once)."""
    grads, bases = _on(device, *make_case(41, [7, 4097, 33, 1], 3, scope=scope))
    be = ops.get_backend("triton")
    plan = ops.plan_projection(grads, bases, scope=scope, backend="triton")
    builds = None
    for i, (mode, max_norm) in enumerate([(m, c) for m in MODES for c in (None, 0.3)]):
        fresh, _ = make_case(500 + i, [7, 4097, 33, 1], 3, scope=scope)
        for g, f in zip(grads, fresh):
            g.copy_(f)
        expected, total = float64_project(grads, bases, mode, scope, max_norm, aligned_scale=0.25)
        stats = ops.execute(plan, grads, mode=mode, scope=scope, max_norm=max_norm, aligned_scale=0.25)
        assert rel_err(grads, expected) <= 1e-5, (mode, max_norm)
        assert float(stats.total_norm) == pytest.approx(total, rel=1e-5)
        if builds is None:
            builds = be.tables.builds
    assert be.tables.builds == builds


@pytest.mark.parametrize("device", DEVICES)
def test_all_tensors_without_basis(device):
    """k_i = 0 everywhere (k_max still 1): only the squared norms and the clip scale."""
    grads, _ = make_case(3, [5, 4097, 1], 1)
    grads = [g.to(device) for g in grads]
    bases = [torch.empty(0, g.numel(), device=device) for g in grads]
    expected, total = float64_project(grads, bases, max_norm=0.7)
    stats = ogpsa.project_(grads, bases, max_norm=0.7, backend="triton")
    assert rel_err(grads, expected) <= 1e-5
    assert float(stats.total_norm) == pytest.approx(total, rel=1e-5)


def test_bad_input_raises_before_any_gradient_changes():
    grads, bases = make_case(4, [33, 7], 2)
    before = [g.clone() for g in grads]
    bad = [bases[0], torch.randn(2, 8)]
    with pytest.raises(ops.ProjectionInputError, match=r"tensor 1.*basis shape \(2, 8\)"):
        ogpsa.project_(grads, bad, backend="triton")
    assert all(torch.equal(a, b) for a, b in zip(grads, before))


# ---------------------------------------------------------------------------------------
# the backend contract, directly
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grad_dtype,basis_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                    (torch.float16, torch.float32)])
def test_dots_contract(device, grad_dtype, basis_dtype, monkeypatch):
    monkeypatch.setattr(tb, "_new", _poisoned_new)  # every output element must be written
    grads, bases = _on(device, *make_case(8, [1, 7, 33, 4097, 300, 2], 5, grad_dtype, basis_dtype))
    k_max = 7  # wider than any k_i: the padding columns must be exact zeros
    out = tb.TritonBackend().dots(grads, bases, k_max)
    assert out.shape == (len(grads), k_max + 1) and out.dtype == torch.float32 and out.device == grads[0].device
    out = out.double().cpu().numpy()
    for i, (g, u) in enumerate(zip(grads, bases)):
        g64, u64 = g.double().cpu().numpy().reshape(-1), u.double().cpu().numpy()
        k = u.shape[0]
        np.testing.assert_allclose(out[i, :k], u64 @ g64, rtol=1e-5, atol=1e-5 * np.linalg.norm(g64))
        assert (out[i, k:k_max] == 0).all()
        assert out[i, k_max] == pytest.approx(float(g64 @ g64), rel=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grad_dtype", GRAD_DTYPES)
@pytest.mark.parametrize("kappa", [1.0, 0.0])
def test_update_contract(device, grad_dtype, kappa):
    grads, bases = _on(device, *make_case(9, [1, 7, 33, 4097, 300], 4, grad_dtype, torch.float32))
    gen = torch.Generator().manual_seed(10)
    weights = torch.randn(len(grads), 6, generator=gen).to(device)  # k_max 6 > every k_i
    scale = (0.5 + torch.rand(len(grads), generator=gen)).to(device)
    expected = []
    for i, (g, u) in enumerate(zip(grads, bases)):
        g64, u64 = g.double().cpu().numpy().reshape(-1), u.double().cpu().numpy()
        w64 = weights[i, :u.shape[0]].double().cpu().numpy()
        expected.append(float(scale[i]) * (kappa * g64 - u64.T @ w64))
    tb.TritonBackend().update_(grads, bases, weights, kappa, scale)
    assert all(g.dtype == grad_dtype for g in grads)
    assert rel_err(grads, expected) <= tolerance(grad_dtype)
    if grad_dtype != torch.float32:
        # computed in float32 and rounded once: at most one ulp from the exact value rounded
        # (arithmetic in the gradient dtype, or rounding twice, would stray further)
        widen = 2.0**16 if grad_dtype == torch.bfloat16 else 2.0**13
        for g, e in zip(grads, expected):
            once = torch.from_numpy(e).to(grad_dtype).double().numpy()
            ulp = np.spacing(np.abs(once).astype(np.float32)).astype(np.float64) * widen
            assert (np.abs(g.double().cpu().numpy().reshape(-1) - once) <= ulp + 1e-30).all()


@pytest.mark.parametrize("device", DEVICES)
def test_bitwise_deterministic(device):
    grads, bases = _on(device, *make_case(12, [4097, 33, 70000, 5], 6))
    be = tb.TritonBackend()
    first = be.dots(grads, bases, 6)
    assert torch.equal(first, be.dots(grads, bases, 6))
    runs = []
    for _ in range(2):
        gs = [g.clone() for g in grads]
        ogpsa.project_(gs, bases, mode="conflict", max_norm=0.5, backend="triton")
        runs.append(gs)
    assert all(torch.equal(a, b) for a, b in zip(*runs))


# ---------------------------------------------------------------------------------------
# pointer tables, launches, host synchronisation
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_table_cache_reuse_and_invalidation(device):
    """The cached table is the basis side only: new gradient buffers (as after
    zero_grad(set_to_none=True)) reuse it; new bases, shapes or dtypes rebuild it."""
    be = tb.TritonBackend()
    grads, bases = _on(device, *make_case(13, [33, 4097, 7], 3))

    def check(gs, us, k_max=3):
        out = be.dots(gs, us, k_max)
        for i, (g, u) in enumerate(zip(gs, us)):
            ref = u.double() @ g.reshape(-1).double()
            torch.testing.assert_close(out[i, :u.shape[0]].double(), ref, rtol=1e-5, atol=1e-5)
            assert float(out[i, k_max]) == pytest.approx(float(g.double().pow(2).sum()), rel=1e-6)

    check(grads, bases)
    check(grads, bases)
    be.update_(grads, bases, torch.zeros(3, 3, device=device), 1.0, torch.ones(3, device=device))
    assert be.tables.builds == 1 and be.tables.hits == 2
    # new gradient buffers every step: the basis table is reused, the result follows the new buffers
    for step in range(3):
        moved = [g.clone() * (2 + step) for g in grads]
        check(moved, bases)
    assert be.tables.builds == 1
    # a new basis for the same gradients: rebuilt
    other = [u.to(device) for u in make_case(14, [33, 4097, 7], 3)[1]]
    check(moved, other)
    assert be.tables.builds == 2
    # other shapes (views of the same storage): rebuilt (numels and chunking differ)
    check([moved[0][:32], moved[1], moved[2]], [other[0][:, :32].contiguous(), other[1], other[2]])
    assert be.tables.builds == 3
    # the old lists again: served from the cache
    check(grads, bases)
    assert be.tables.builds == 3
    # another gradient dtype with the same bases: rebuilt (the key names the gradient dtype)
    check([g.to(torch.bfloat16) for g in grads], bases)
    assert be.tables.builds == 4


def test_gradient_pointers_are_not_kept():
    """No gradient tensor outlives the call: only addresses go into the per-call table."""
    import gc
    import weakref

    be = tb.TritonBackend()
    grads, bases = make_case(18, [33, 4097], 2)
    refs = [weakref.ref(g) for g in grads]
    be.dots(grads, bases, 2)
    be.update_(grads, bases, torch.zeros(2, 2), 1.0, torch.ones(2))
    del grads
    gc.collect()
    assert all(r() is None for r in refs)


def test_table_cache_is_bounded():
    cache = ktables.TableCache(capacity=3)
    for i in range(5):
        cache.put(("k", i), object())
    assert len(cache) == 3 and cache.get(("k", 0)) is None and cache.get(("k", 4)) is not None


def _poisoned_new(shape, dtype, device):
    """An allocator for the Triton backend that fills floating buffers with NaN: every output
    element must then be written by a kernel."""
    out = torch.empty(shape, dtype=dtype, device=device)
    return out.fill_(float("nan")) if out.is_floating_point() else out


class _Proxy:
    """Stands in for a kernel object and counts ``kernel[grid]`` launches."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, 0
        self.__name__ = "proxy"

    def __getitem__(self, grid):
        self.calls += 1
        return self.kernel[grid]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode,scope,max_norm", [("orthogonal", "tensor", None), ("conflict", "global", 0.5)])
def test_launches_constant_in_number_of_tensors(device, mode, scope, max_norm, monkeypatch):
    names = ["_dots_kernel", "_update_kernel", "_fused_small_kernel"]
    proxies = {n: _Proxy(getattr(kproj, n)) for n in names}
    for n, p in proxies.items():
        monkeypatch.setattr(kproj, n, p)
    seg = _Proxy(kcommon._segment_sum_kernel)
    monkeypatch.setattr(kcommon, "_segment_sum_kernel", seg)
    counts = []
    for count in (1, 17, 150):
        grads, bases = _on(device, *make_case(count, [], 2, scope=scope, shapes=_mixed_shapes(count, count, 12)))
        ogpsa.project_(grads, bases, mode=mode, scope=scope, max_norm=max_norm, backend="triton")  # warm up
        calls = [p.calls for p in proxies.values()] + [seg.calls]
        ogpsa.project_(grads, bases, mode=mode, scope=scope, max_norm=max_norm, backend="triton")
        counts.append(sum(p.calls for p in proxies.values()) + seg.calls - sum(calls))
    # per-tensor scope without clipping: the single-pass kernel (all these tensors are small);
    # otherwise dots + its fixed-order reduction + update, whatever the tensor count
    expected = 1 if (scope == "tensor" and max_norm is None) else 3
    assert counts == [expected] * 3


def test_no_host_sync_on_the_hot_path(monkeypatch):
    """With cached tables, dots/update_ do no device-to-host reads: launching is all they do."""
    be = tb.TritonBackend()
    grads, bases = make_case(15, [33, 4097], 2)
    be.dots(grads, bases, 2)  # builds the table (allowed to touch the host once)
    launched = []
    monkeypatch.setattr(kproj, "launch", lambda k, grid, *a, **kw: launched.append(grid))
    monkeypatch.setattr(kcommon, "launch", lambda k, grid, *a, **kw: launched.append(grid))

    def forbidden(*args, **kwargs):
        raise AssertionError("host synchronisation on the hot path")

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    w, s = torch.zeros(2, 2), torch.ones(2)
    be.dots(grads, bases, 2)
    be.update_(grads, bases, w, 1.0, s)
    monkeypatch.undo()
    assert len(launched) == 3 and be.tables.builds == 1


@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
@pytest.mark.gpu
def test_no_host_sync_on_cuda():
    be = ops.get_backend("triton")
    grads, bases = _on("cuda", *make_case(16, [33, 4097, 70000], 4))
    w, s = torch.zeros(3, 4, device="cuda"), torch.ones(3, device="cuda")
    be.dots(grads, bases, 4)
    be.update_(grads, bases, w, 1.0, s)  # first calls: basis table + compiles
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        be.dots(grads, bases, 4)
        be.update_(grads, bases, w, 1.0, s)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(not INTERP, reason="interpreter mode only")
def test_gpu_shaped_chunking_in_the_interpreter(monkeypatch):
    """The GPU layout (one chunk per program, several BLOCK steps per chunk, long chunks for
    big tensors, many partial rows per tensor) checked under the interpreter."""
    monkeypatch.setattr(kproj, "CHUNK", 256)
    monkeypatch.setattr(kproj, "ROWS", 1)
    monkeypatch.setattr(kcommon, "INTERPRET_BLOCK", 64)
    monkeypatch.setattr(ktables, "MAX_CHUNKS_PER_TENSOR", 5)
    monkeypatch.setattr(ktables, "CHUNK_ALIGN", 128)
    grads, bases = make_case(17, [1, 300, 4097, 257], 3)
    table = tb.TritonBackend()._basis_table(grads, bases)
    assert table.rows == 1 and table.num_programs == table.num_chunks
    assert table.chunk_len.tolist() == [256, 256, 896, 256]  # 4097 elements: 5 chunks of 7 * 128
    monkeypatch.setattr(ops, "_instances", {})  # a fresh backend (and table cache) for this layout
    expected, total = float64_project(grads, bases, "conflict", max_norm=0.8)
    stats = ogpsa.project_(grads, bases, mode="conflict", max_norm=0.8, backend="triton")
    assert rel_err(grads, expected) <= 1e-5
    assert float(stats.total_norm) == pytest.approx(total, rel=1e-5)


# ---------------------------------------------------------------------------------------
# basis building: Gram matrices and U = A R
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ref_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 16, 20])
def test_gram_against_float64(device, ref_dtype, m, monkeypatch):
    monkeypatch.setattr(tb, "_new", _poisoned_new)
    gen = torch.Generator().manual_seed(m)
    sizes = [1, 7, 33, 4097] if m <= 3 else [5, 1500]  # wide m costs the interpreter m steps per block
    refs = [torch.randn(m, n, generator=gen).to(ref_dtype).to(device) for n in sizes]
    out = tb.TritonBackend().gram(refs)
    assert out.shape == (len(refs), m, m)
    for got, r in zip(out, refs):
        r64 = r.double().cpu().numpy()
        want = r64 @ r64.T
        assert np.linalg.norm(got.double().cpu().numpy() - want) <= 1e-6 * np.linalg.norm(want)
        assert torch.equal(got, got.T)
    via_ops = ops.gram(refs, backend="triton")
    assert via_ops.dtype == torch.float64 and torch.allclose(via_ops, out.double().cpu())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ref_dtype,out_dtype", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                                 (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("m", [2, 5])
def test_combine_against_float64(device, ref_dtype, out_dtype, m, monkeypatch):
    monkeypatch.setattr(tb, "_new", _poisoned_new)
    gen = torch.Generator().manual_seed(30 + m)
    sizes = [1, 7, 33, 4097, 300]
    ks = [1, m, 0, min(3, m), m]
    refs = [torch.randn(m, n, generator=gen).to(ref_dtype).to(device) for n in sizes]
    coefficients = torch.zeros(len(refs), max(ks), m)
    for i, k in enumerate(ks):
        coefficients[i, :k] = torch.randn(k, m, generator=gen)
    outs = tb.TritonBackend().combine(refs, coefficients.to(device), ks, out_dtype)
    tol = 1e-5 if out_dtype == torch.float32 else 1e-2
    for out, r, k, a in zip(outs, refs, ks, coefficients):
        assert out.shape == (k, r.shape[1]) and out.dtype == out_dtype and out.is_contiguous()
        if k:
            want = a[:k].double().numpy() @ r.double().cpu().numpy()
            assert np.linalg.norm(out.double().cpu().numpy() - want) <= tol * np.linalg.norm(want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scope", SCOPES)
def test_subspace_built_with_triton_matches_torch(device, scope):
    gen = torch.Generator().manual_seed(50)
    shapes = [(7,), (33, 3), (4097,)]
    refs = [torch.randn(3, int(torch.Size(s).numel()), generator=gen).to(device) for s in shapes]
    cfg = ogpsa.OGPSAConfig(scope=scope)
    built = {}
    for backend in ("triton", "torch"):
        built[backend] = ogpsa.Subspace.from_reference_rows(["a", "b", "c"], shapes, [r.clone() for r in refs], cfg,
                                                            backend=backend)
    for u_t, u_r in zip(built["triton"].bases, built["torch"].bases):
        assert u_t.shape == u_r.shape
        torch.testing.assert_close(u_t.cpu(), u_r.cpu(), rtol=1e-4, atol=1e-5)

# the sm_90 compile checks (no spills, 128-bit loads) are in tests/test_kernels_compiled.py
