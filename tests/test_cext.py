"""The compiled extension ogpsa._C: CPU (and, with a GPU, CUDA) ops against float64."""

from __future__ import annotations

import os
import shutil
import zlib

import numpy as np
import pytest
import torch
from oracle import BIG_SIZE, float64_project, make_case, random_basis, rel_err, tolerance

import ogpsa
from ogpsa.backends import cext

pytestmark = pytest.mark.skipif(cext._C is None, reason=f"ogpsa._C not built: {cext._IMPORT_ERROR}")

GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BASIS_DTYPES = (torch.float32, torch.bfloat16)
MODES = ("orthogonal", "conflict", "plane")
HAS_CUDA = torch.cuda.is_available() and bool(cext.build_info().get("cuda"))
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
# odd sizes, one tensor spanning several kernel chunks (CPU 32768, CUDA 65536 elements)
NUMELS = (1, 7, 33, 4097, 70001)


def _clone(ts):
    return [t.clone() for t in ts]


def _to(ts, device):
    return [t.to(device) for t in ts]


# ----------------------------------------------------------------------------------------
# project_ through the cpu backend: the shared correctness matrix
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("grad_dtype", GRAD_DTYPES, ids=str)
@pytest.mark.parametrize("basis_dtype", BASIS_DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scope", ("tensor", "global"))
@pytest.mark.parametrize("max_norm", (None, 0.5))
def test_project_matrix(grad_dtype, basis_dtype, mode, scope, max_norm):
    # a stable seed (hash() of strings changes with every process)
    seed = zlib.crc32(repr((str(grad_dtype), str(basis_dtype), mode, scope, max_norm)).encode()) % 10_000
    grads, bases = make_case(seed, NUMELS, 5, grad_dtype, basis_dtype, scope=scope)
    expected, total = float64_project(grads, bases, mode, scope, max_norm, aligned_scale=0.3)
    stats = ogpsa.project_(grads, bases, mode=mode, scope=scope, max_norm=max_norm, aligned_scale=0.3,
                           backend="cpu")
    assert stats.backends == ("cpu",)
    assert rel_err(grads, expected) <= tolerance(grad_dtype, basis_dtype)
    if grad_dtype == torch.float32 and basis_dtype == torch.float32:
        assert float(stats.total_norm) == pytest.approx(total, rel=1e-4)


@pytest.mark.parametrize("k", range(1, 17))
@pytest.mark.parametrize("max_norm", (None, 2.0), ids=("fused", "two_pass"))
def test_every_rank(k, max_norm):
    numels = [3 + 37 * i for i in range(12)] + [33333]
    grads, bases = make_case(100 + k, numels, k)
    expected, _ = float64_project(grads, bases, "orthogonal", "tensor", max_norm)
    ogpsa.project_(grads, bases, max_norm=max_norm, backend="cpu")
    assert rel_err(grads, expected) <= 1e-5


def test_many_small_tensors_mixed_ranks():
    gen = torch.Generator().manual_seed(7)
    grads, bases = [], []
    for i in range(240):
        n = 5 + (i * 131) % 997
        k = min(i % 17, n)  # includes k = 0: norm and scale only
        grads.append(torch.randn(n, generator=gen))
        bases.append(random_basis(n, k, gen))
    for max_norm in (None, 1.0):
        g = _clone(grads)
        expected, _ = float64_project(g, bases, "conflict", "tensor", max_norm, aligned_scale=0.5)
        ogpsa.project_(g, bases, mode="conflict", max_norm=max_norm, aligned_scale=0.5, backend="cpu")
        assert rel_err(g, expected) <= 1e-5


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("grad_dtype", GRAD_DTYPES, ids=str)
def test_fused_large_tensor_path(mode, grad_dtype):
    # > 2**18 elements: the fused op falls back to chunked dots + a second parallel pass
    grads, bases = make_case(11, (300_007, 65_536, 9), 3, grad_dtype)
    expected, _ = float64_project(grads, bases, mode, "tensor", None, aligned_scale=0.25)
    ogpsa.project_(grads, bases, mode=mode, aligned_scale=0.25, backend="cpu")
    assert rel_err(grads, expected) <= tolerance(grad_dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grad_dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("max_norm", (None, 2.0), ids=("fused", "two_pass"))
def test_big_odd_size(device, grad_dtype, max_norm):
    grads, bases = make_case(7, [BIG_SIZE, 3], 4, grad_dtype)
    expected, _ = float64_project(grads, bases, max_norm=max_norm)
    grads, bases = [g.to(device) for g in grads], [u.to(device) for u in bases]
    ogpsa.project_(grads, bases, max_norm=max_norm, backend="cuda" if device == "cuda" else "cpu")
    assert rel_err(grads, expected) <= tolerance(grad_dtype)


def test_project_without_clip_uses_fused_single_pass(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("update_ must not run on the fused path")

    monkeypatch.setattr(cext.CpuBackend, "update_", boom)
    grads, bases = make_case(3, NUMELS, 4)
    before = _clone(grads)
    expected, _ = float64_project(grads, bases, "orthogonal")
    stats = ogpsa.project_(grads, bases, backend="cpu")
    assert rel_err(grads, expected) <= 1e-5
    # statistics come from the pass-1 table of the original gradients
    sq = torch.stack([g.double().pow(2).sum() for g in before]).float()
    torch.testing.assert_close(stats.sq_before.float(), sq, rtol=1e-5, atol=0)  # stats are float64
    with pytest.raises(AssertionError, match="fused path"):
        ogpsa.project_(grads, bases, backend="cpu", max_norm=1.0)  # clipping needs the 2-pass path


def test_fused_matches_two_pass_and_torch_backend():
    grads, bases = make_case(5, NUMELS, 6)
    a, b, c = _clone(grads), _clone(grads), _clone(grads)
    sa = ogpsa.project_(a, bases, mode="conflict", aligned_scale=0.5, backend="cpu")
    # max_norm huge: clip_coef == 1 exactly, but forces the two-pass path
    ogpsa.project_(b, bases, mode="conflict", aligned_scale=0.5, backend="cpu", max_norm=1e30)
    st = ogpsa.project_(c, bases, mode="conflict", aligned_scale=0.5, backend="torch")
    for x, y, z in zip(a, b, c):
        torch.testing.assert_close(x, y, rtol=2e-6, atol=2e-6)
        torch.testing.assert_close(x, z, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(sa.removed_sq, st.removed_sq, rtol=1e-4, atol=1e-6)


def test_deterministic_across_runs_and_thread_counts():
    grads, bases = make_case(9, (100_003, 40_000, 77), 4)
    outs = []
    threads = torch.get_num_threads()
    try:
        for n_threads in (1, threads, 1):
            torch.set_num_threads(n_threads)
            g = _clone(grads)
            table = torch.ops.ogpsa.dots(g, bases, 4)
            ogpsa.project_(g, bases, max_norm=3.0, backend="cpu")
            outs.append((table, g))
    finally:
        torch.set_num_threads(threads)
    for table, g in outs[1:]:
        assert torch.equal(table, outs[0][0])
        assert all(torch.equal(x, y) for x, y in zip(g, outs[0][1]))


# ----------------------------------------------------------------------------------------
# the raw ops against float64
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grad_dtype", GRAD_DTYPES, ids=str)
@pytest.mark.parametrize("basis_dtype", BASIS_DTYPES, ids=str)
def test_dots_op(device, grad_dtype, basis_dtype):
    grads, bases = make_case(21, NUMELS, 3, grad_dtype, basis_dtype, device=device)
    k_max = 5  # wider than every k_i: the padding must be exact zeros
    out = torch.ops.ogpsa.dots(grads, bases, k_max)
    assert out.shape == (len(grads), k_max + 1) and out.dtype == torch.float32 and out.device.type == device
    for i, (g, u) in enumerate(zip(grads, bases)):
        g64, u64 = g.double().cpu().reshape(-1), u.double().cpu()
        k = u.shape[0]
        ref = torch.cat([u64 @ g64, torch.zeros(k_max - k, dtype=torch.float64), (g64 @ g64).reshape(1)])
        got = out[i].double().cpu()
        assert torch.equal(got[k:k_max], torch.zeros(k_max - k, dtype=torch.float64))
        scale = float(g64.norm()) * max(1.0, float(u64.norm(dim=1).max()) if k else 1.0)
        assert float((got - ref).abs().max()) <= 1e-5 * max(scale, float(ref[-1]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grad_dtype", GRAD_DTYPES, ids=str)
@pytest.mark.parametrize("basis_dtype", BASIS_DTYPES, ids=str)
def test_update_op(device, grad_dtype, basis_dtype):
    grads, bases = make_case(22, NUMELS, 4, grad_dtype, basis_dtype, device=device)
    gen = torch.Generator().manual_seed(0)
    weights = torch.randn(len(grads), 4, generator=gen)
    scale = torch.rand(len(grads), generator=gen) + 0.5
    kappa = 0.75
    expected = []
    for i, (g, u) in enumerate(zip(grads, bases)):
        k = u.shape[0]
        e = kappa * g.double().cpu().reshape(-1) - u.double().cpu().T @ weights[i, :k].double()
        expected.append((float(scale[i]) * e).numpy())
    torch.ops.ogpsa.update_(grads, bases, weights.to(device), kappa, scale.to(device))
    assert rel_err(grads, expected) <= tolerance(grad_dtype, basis_dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ref_dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("m", (1, 3, 7))
def test_gram_and_combine_ops(device, ref_dtype, m):
    gen = torch.Generator().manual_seed(m)
    refs = [torch.randn(m, n, generator=gen).to(ref_dtype).to(device) for n in (1, 19, 4097, 70001)]
    gram = torch.ops.ogpsa.gram(refs)
    assert gram.shape == (len(refs), m, m) and gram.dtype == torch.float64
    for i, r in enumerate(refs):
        r64 = r.double().cpu()
        ref = r64 @ r64.T
        assert float((gram[i].cpu() - ref).abs().max()) <= 1e-5 * float(ref.diagonal().max())
    ks = [min(m, 2), m, 0, 1]
    coef = torch.randn(len(refs), m, m, generator=gen)
    for out_dtype in (torch.float32, torch.bfloat16):
        outs = torch.ops.ogpsa.combine(refs, coef.to(device), ks, out_dtype)
        for i, (r, k, u) in enumerate(zip(refs, ks, outs)):
            assert u.shape == (k, r.shape[1]) and u.dtype == out_dtype and u.is_contiguous()
            if k:
                ref = coef[i, :k].double() @ r.double().cpu()
                err = float((u.double().cpu() - ref).norm() / ref.norm())
                assert err <= (1e-5 if out_dtype == torch.float32 else 1e-2)


def test_gram_and_combine_through_ops_dispatch():
    gen = torch.Generator().manual_seed(1)
    refs = [torch.randn(2, n, generator=gen) for n in (5, 301)]
    torch.testing.assert_close(ogpsa.ops.gram(refs, backend="cpu"), ogpsa.ops.gram(refs, backend="torch"), rtol=1e-5, atol=0)
    coefs = [torch.randn(2, 2, generator=gen), torch.randn(1, 2, generator=gen)]
    for a, b in zip(ogpsa.ops.combine(refs, coefs, backend="cpu"), ogpsa.ops.combine(refs, coefs, backend="torch")):
        torch.testing.assert_close(a, b)


def test_fused_op_directly():
    grads, bases = make_case(31, NUMELS, 3)
    m_inv = torch.zeros(len(grads), 3, 3)
    for i, u in enumerate(bases):
        k = u.shape[0]
        m_inv[i, :k, :k] = torch.linalg.inv(u.double() @ u.double().T).float()
    before = _clone(grads)
    expected, _ = float64_project(grads, bases, "plane")
    table = torch.ops.ogpsa.fused_project_(grads, bases, m_inv, "plane", 1.0)
    assert rel_err(grads, expected) <= 1e-5
    torch.testing.assert_close(table, torch.ops.ogpsa.dots(before, bases, 3))
    with pytest.raises(RuntimeError, match="mode must be"):
        torch.ops.ogpsa.fused_project_(grads, bases, m_inv, "sideways", 1.0)


# ----------------------------------------------------------------------------------------
# errors, opcheck, torch.compile
# ----------------------------------------------------------------------------------------


def test_bad_input_raises_before_modifying():
    g = [torch.randn(10), torch.randn(12)]
    u = [random_basis(10, 2, torch.Generator().manual_seed(0)), torch.randn(2, 11)]
    before = _clone(g)
    with pytest.raises(RuntimeError, match=r"bases\[1\] has shape"):
        torch.ops.ogpsa.update_(g, u, torch.zeros(2, 2), 1.0, torch.ones(2))
    assert all(torch.equal(a, b) for a, b in zip(g, before))
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.ogpsa.dots([torch.randn(4, dtype=torch.float64)], [torch.randn(1, 4)], 1)
    with pytest.raises(RuntimeError, match="k_max"):
        torch.ops.ogpsa.dots([torch.randn(4)], [torch.randn(2, 4)], 1)
    with pytest.raises(RuntimeError, match="weights must be"):
        torch.ops.ogpsa.update_([torch.randn(4)], [torch.randn(1, 4)], torch.zeros(2, 1), 1.0, torch.ones(1))
    with pytest.raises(RuntimeError, match="ks has"):
        torch.ops.ogpsa.combine([torch.randn(2, 4)], torch.zeros(1, 2, 2), [1, 1], torch.float32)


def _opcheck_args(device):
    grads, bases = make_case(41, (7, 33, 129), 3, device=device)
    weights = torch.randn(3, 3, device=device)
    scale = torch.full((3,), 0.5, device=device)
    refs = [torch.randn(3, n, device=device) for n in (5, 40)]
    coef = torch.randn(2, 2, 3, device=device)
    m_inv = torch.eye(3).expand(3, 3, 3).contiguous().to(device)
    return {
        "dots": (grads, bases, 3),
        "update_": (grads, bases, weights, 0.5, scale),
        "gram": (refs,),
        "combine": (refs, coef, [2, 1], torch.float32),
        "fused_project_": (grads, bases, m_inv, "conflict", 0.5),
        **_adamw_opcheck_args(device),
    }


def _adamw_opcheck_args(device):
    """Arguments of the projected AdamW ops: 3 tensors (one without a basis), k = 2, step 3."""
    gen = torch.Generator().manual_seed(61)
    sizes = (7, 33, 129)
    params = [torch.randn(n, generator=gen).to(device) for n in sizes]
    grads = [torch.randn(n, generator=gen).to(device) for n in sizes]
    ms = [0.1 * torch.randn(n, generator=gen).to(device) for n in sizes]
    vs = [torch.rand(n, generator=gen).to(device) + 0.01 for n in sizes]
    bases = [torch.linalg.qr(torch.randn(n, 2, generator=gen))[0].T.contiguous().to(device) for n in sizes[:2]]
    bases.append(torch.empty(0, sizes[2], device=device))
    m_invs = [torch.eye(2, device=device), torch.eye(2, device=device), torch.empty(0, 0, device=device)]
    steps = [3, 3, 3]
    weights = torch.randn(3, 2, generator=gen).to(device)
    return {
        "projected_adamw_": (params, grads, ms, vs, [], bases, m_invs, steps, 1e-3, 0.9, 0.999, 1e-8, 0.01,
                             False, False),
        "projected_adamw_pass1_": (params, grads, ms, vs, [], bases, steps, 2, 0.9, 0.999, 1e-8, 0.01, False, True),
        "projected_adamw_pass2_": (params, ms, vs, [], bases, weights, steps, 1e-3, 0.9, 0.999, 1e-8, 0.01, 1.0,
                                   True),
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ("dots", "update_", "gram", "combine", "fused_project_", "projected_adamw_",
                                "projected_adamw_pass1_", "projected_adamw_pass2_"))
def test_opcheck(device, op):
    if device == "cuda" and op == "fused_project_":
        pytest.skip("fused_project_ is CPU-only (CUDA uses the two-pass kernels)")
    args = _opcheck_args(device)[op]
    torch.library.opcheck(getattr(torch.ops.ogpsa, op).default, args)


def test_torch_compile_traces_through_ops():
    grads, bases = make_case(51, (9, 65), 2)

    def step(gs, us):
        table = torch.ops.ogpsa.dots(gs, us, 2)
        w = table[:, :2].contiguous()
        torch.ops.ogpsa.update_(gs, us, w, 1.0, torch.ones(len(gs)))
        return table

    expected, _ = float64_project(grads, bases)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    compiled(grads, bases)
    assert rel_err(grads, expected) <= 1e-5


# ----------------------------------------------------------------------------------------
# build information
# ----------------------------------------------------------------------------------------


def test_info_reports_build(capsys):
    from ogpsa import cli

    data = cli.info()
    ext = data["extension"]
    assert ext["built"] is True and ext["openmp"] is True
    assert {"dots", "update_", "gram", "combine", "fused_project_", "projected_adamw_"} <= set(ext["ops"])
    assert "adamw_backends" in data and data["adamw_backends"]["torch"] is True
    has_cuda_kernel = torch._C._dispatch_has_kernel_for_dispatch_key("ogpsa::dots", "CUDA")
    assert ext["cuda_kernels"] is has_cuda_kernel
    if ext["cuda_kernels"]:
        assert ext["cuda_archs"] and all("." in a for a in ext["cuda_archs"])
    assert data["backends"]["cpu"]["available"] is True
    assert data["backends"]["cuda"]["available"] is HAS_CUDA
    assert cli.main(["info"]) == 0
    assert "extension:" in capsys.readouterr().out


def _nvcc_here() -> bool:
    homes = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"]
    return any(h and os.path.exists(os.path.join(h, "bin", "nvcc")) for h in homes) or bool(shutil.which("nvcc"))


def _cuda_build_expected() -> bool:
    # setup.py builds CUDA kernels for OGPSA_BUILD_CUDA=1 (CI: .ci/run) or, unset, a visible device
    forced = os.environ.get("OGPSA_BUILD_CUDA", "").strip()
    return forced == "1" or (forced == "" and torch.cuda.device_count() > 0)


@pytest.mark.skipif(not _cuda_build_expected() or not torch.version.cuda or not _nvcc_here(),
                    reason="CUDA kernels are not expected in this build (no nvcc, torch without CUDA, no device "
                           "visible and OGPSA_BUILD_CUDA not 1, or disabled)")
def test_cuda_kernels_compiled_in_when_nvcc_present():
    # CI builds with OGPSA_BUILD_CUDA=1 and nvcc; a silent fallback to CPU-only would show up here
    info = cext.info()
    assert info["cuda_kernels"] is True, "ogpsa._C was built without CUDA kernels although nvcc is available"
    assert info["cuda_archs"]


def test_arch_decoding():
    assert cext._decode_archs("80_90") == ["8.0", "9.0"]
    assert cext._decode_archs("90a_100PTX") == ["9.0a", "10.0+PTX"]
    assert cext._decode_archs("") == []


def test_auto_picks_cpu_for_cpu_tensors():
    grads, bases = make_case(61, (8,), 1)
    assert ogpsa.project_(grads, bases).backends[0] in ("cpu", "triton")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and CUDA kernels")
@pytest.mark.parametrize("grad_dtype", GRAD_DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("max_norm", (None, 0.5))
def test_cuda_project_matrix(grad_dtype, mode, max_norm):
    grads, bases = make_case(71, NUMELS + (300_001,), 6, grad_dtype, device="cuda")
    expected, _ = float64_project(grads, bases, mode, "tensor", max_norm, aligned_scale=0.3)
    stats = ogpsa.project_(grads, bases, mode=mode, max_norm=max_norm, aligned_scale=0.3, backend="cuda")
    assert stats.backends == ("cuda",)
    assert rel_err(grads, expected) <= tolerance(grad_dtype)
    again, bases2 = make_case(71, NUMELS + (300_001,), 6, grad_dtype, device="cuda")
    ogpsa.project_(again, bases2, mode=mode, max_norm=max_norm, aligned_scale=0.3, backend="cuda")
    assert all(torch.equal(a, b) for a, b in zip(grads, again))  # deterministic


def _shifted(t):
    """The same values one element past a 16-byte boundary (the CUDA kernels' scalar path)."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    return out


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and CUDA kernels")
@pytest.mark.parametrize("grad_dtype", (torch.float32, torch.bfloat16), ids=str)
def test_cuda_vector_and_scalar_paths_give_the_same_bits(grad_dtype):
    """Aligned tensors take 16-byte loads, shifted ones scalar loads of the same elements by the
    same threads in the same order: the results are bitwise equal."""
    grads, bases = make_case(72, (64, 8192, 70_000, 5000), 4, grad_dtype, device="cuda")
    shifted = [_shifted(g) for g in grads]
    a = torch.ops.ogpsa.dots(grads, bases, 4)
    b = torch.ops.ogpsa.dots(shifted, bases, 4)
    assert torch.equal(a, b)
    w, s = torch.randn(len(grads), 4, device="cuda"), torch.rand(len(grads), device="cuda")
    torch.ops.ogpsa.update_(grads, bases, w, 0.5, s)
    torch.ops.ogpsa.update_(shifted, bases, w, 0.5, s)
    assert all(torch.equal(x, y) for x, y in zip(grads, shifted))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and CUDA kernels")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("gi_dtype", (torch.float32, torch.float64), ids=str)
def test_cuda_fused_project_single_and_two_pass(mode, gi_dtype):
    """Tensors up to single_pass_max_numel in one pass, larger ones in two; the returned rows
    are the pass-1 statistics of the gradients before the update."""
    limit = cext.CudaBackend.single_pass_max_numel
    grads, bases = make_case(73, (1, 33, limit, limit + 1, 70_001), 4, device="cuda")
    k_max = 4
    inv = torch.zeros(len(grads), k_max, k_max, dtype=torch.float64, device="cuda")
    for i, u in enumerate(bases):
        k = u.shape[0]
        inv[i, :k, :k] = torch.linalg.inv(u.double() @ u.double().T)
    before = torch.ops.ogpsa.dots(grads, bases, k_max)
    expected, _ = float64_project(grads, bases, mode, aligned_scale=0.3)
    rows = cext.CudaBackend().fused_project_(grads, bases, inv.to(gi_dtype), mode, 0.3)
    torch.testing.assert_close(rows, before, rtol=2e-6, atol=1e-6)
    assert rel_err(grads, expected) <= 1e-5


def test_oracle_sanity():
    # the oracle itself distinguishes a projected from an unprojected gradient
    grads, bases = make_case(81, (50,), 2)
    expected, _ = float64_project(grads, bases)
    assert rel_err(grads, expected) > 1e-2
    assert np.isfinite(expected[0]).all()


# ----------------------------------------------------------------------------------------
# CPU instruction sets: every ISA the CPU has gives the baseline's bits (OGPSA_CPU_ISA forces one)
# ----------------------------------------------------------------------------------------

_ISA_ORDER = ("baseline", "avx2", "avx512")


def _isas() -> list:
    best = cext.build_info().get("cpu_isa_best", "baseline")
    return list(_ISA_ORDER[: _ISA_ORDER.index(best) + 1])


def _run_ops(isa: str, monkeypatch, grad_dtype, basis_dtype):
    """dots, update_, fused_project_ and projected_adamw_ under one ISA, on odd sizes and ranks 0-16."""
    monkeypatch.setenv("OGPSA_CPU_ISA", isa)
    assert cext.build_info()["cpu_isa"] == isa
    gen = torch.Generator().manual_seed(2024)
    numels = (1, 7, 33, 531, 4097, 70001)
    ks = (1, 3, 16, 7, 4, 2)
    grads = [torch.randn(n, generator=gen).to(grad_dtype) for n in numels]
    bases = [random_basis(n, min(k, n), gen, basis_dtype) for n, k in zip(numels, ks)]
    k_max = max(u.shape[0] for u in bases)
    out = [torch.ops.ogpsa.dots(grads, bases, k_max)]
    w = torch.randn(len(grads), k_max, generator=gen) * 0.1
    g1 = _clone(grads)
    torch.ops.ogpsa.update_(g1, bases, w, 0.7, torch.rand(len(grads), generator=gen) + 0.5)
    out += g1
    g2 = _clone(grads)
    m_inv = torch.eye(k_max).repeat(len(grads), 1, 1)
    out += [torch.ops.ogpsa.fused_project_(g2, bases, m_inv, "conflict", 0.3)] + g2
    # projected AdamW (amsgrad, projected decay, two steps; k = 0 on one tensor)
    params = [torch.randn(n, generator=gen).to(grad_dtype) for n in numels]
    ms, vs, vmax = ([torch.zeros(n) for n in numels] for _ in range(3))
    bases_a = list(bases[:-1]) + [bases[-1][:0]]
    m_invs = [torch.eye(u.shape[0]) for u in bases_a]
    for step in (1, 2):
        st = torch.ops.ogpsa.projected_adamw_(params, grads, ms, vs, vmax, bases_a, m_invs, [step] * len(params), 1e-2,
                                             0.9, 0.999, 1e-8, 0.1, False, True)
        out.append(st)
    return out + params + ms + vs + vmax


@pytest.mark.parametrize("grad_dtype,basis_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                    (torch.float16, torch.float32)], ids=("fp32", "bf16", "fp16"))
def test_every_cpu_isa_gives_the_baseline_bits(monkeypatch, grad_dtype, basis_dtype):
    isas = _isas()
    ref = _run_ops("baseline", monkeypatch, grad_dtype, basis_dtype)
    for isa in isas[1:]:
        got = _run_ops(isa, monkeypatch, grad_dtype, basis_dtype)
        for i, (a, b) in enumerate(zip(ref, got)):
            assert torch.equal(a, b), f"{isa}: output {i} differs from the baseline ISA"


@pytest.mark.parametrize("isa", ("baseline", "avx2", "avx512"))
@pytest.mark.parametrize("k", (1, 5, 16))
def test_each_cpu_isa_against_float64(monkeypatch, isa, k):
    if isa not in _isas():
        pytest.skip(f"this CPU has at most {_isas()[-1]}")
    monkeypatch.setenv("OGPSA_CPU_ISA", isa)
    numels = [3 + 37 * i for i in range(6)] + [33333, 70001]
    for max_norm in (None, 2.0):  # fused single pass, then dots + update_
        grads, bases = make_case(300 + k, numels, k)
        expected, _ = float64_project(grads, bases, "orthogonal", "tensor", max_norm)
        ogpsa.project_(grads, bases, max_norm=max_norm, backend="cpu")
        assert rel_err(grads, expected) <= 1e-5


def test_bad_cpu_isa_raises_before_modifying(monkeypatch):
    grads, bases = make_case(5, (100, 3000), 2)
    before = _clone(grads)
    monkeypatch.setenv("OGPSA_CPU_ISA", "avx9000")
    with pytest.raises(RuntimeError, match="OGPSA_CPU_ISA=avx9000 is not one of"):
        torch.ops.ogpsa.update_(grads, bases, torch.ones(2, 2), 1.0, torch.ones(2))
    assert all(torch.equal(a, b) for a, b in zip(grads, before))
    assert cext.build_info()["cpu_isa"].startswith("invalid: ")
    if _isas()[-1] != "avx512":
        monkeypatch.setenv("OGPSA_CPU_ISA", "avx512")
        with pytest.raises(RuntimeError, match="has at most"):
            torch.ops.ogpsa.dots(grads, bases, 2)
