"""Triton kernel paths under the interpreter: the aligned (128-bit) and unaligned variants, the
single-pass ``fused_project_`` against the two passes and float64, and fixed launch configs.

The interpreter runs the same kernel source as the GPU, so these check the control flow of
each constexpr variant (unmasked main loop + masked tail, hint placement, single pass); the
compiled code is checked in tests/test_kernels_compiled.py.
"""

import os

import torch

if not torch.cuda.is_available():  # also when this file runs alone
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

triton = pytest.importorskip("triton")

from ogpsa.kernels import common as kcommon  # noqa: E402
from ogpsa.kernels import projection as kproj  # noqa: E402
from oracle import float64_project, make_case, rel_err  # noqa: E402

import ogpsa  # noqa: E402
from ogpsa import ops  # noqa: E402
from ogpsa.backends import triton_backend as tb  # noqa: E402

pytestmark = pytest.mark.skipif(not kcommon.INTERPRETED, reason="interpreter-mode checks (CPU tensors)")


def _shifted(t: torch.Tensor) -> torch.Tensor:
    """The same values at an address one element past a 16-byte boundary."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    return out


@pytest.fixture
def gpu_layout(monkeypatch):
    """The GPU's layout scaled down: one chunk per program, several blocks per chunk."""
    monkeypatch.setattr(kproj, "CHUNK", 256)
    monkeypatch.setattr(kproj, "ROWS", 1)
    monkeypatch.setattr(kcommon, "INTERPRET_BLOCK", 64)
    monkeypatch.setattr(ops, "_instances", {})


@pytest.mark.parametrize("layout", ["interpreter", "gpu"])
@pytest.mark.parametrize("grad_dtype,basis_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                    (torch.float16, torch.float32)])
def test_aligned_and_unaligned_variants_agree(layout, grad_dtype, basis_dtype, request):
    if layout == "gpu":
        request.getfixturevalue("gpu_layout")
    # row lengths divisible by 8: aligned for 2- and 4-byte types; 4096 + 96 leaves a tail block
    grads, bases = make_case(40, [64, 4096 + 96, 600, 8], 3, grad_dtype=grad_dtype, basis_dtype=basis_dtype)
    be = tb.TritonBackend()
    assert be._step(grads, bases)[2], "these tensors should take the aligned variant"
    # a tensor without basis rows but an odd length rules the aligned variant out too (the length
    # hint also bounds the gradient's masked tail)
    assert not be._step(grads + [torch.ones(4097)], bases + [torch.zeros(0, 4097)])[2]
    ug, ub = [_shifted(g) for g in grads], [_shifted(u) for u in bases]
    assert not be._step(ug, bases)[2] and not be._step(grads, ub)[2]
    aligned = be.dots(grads, bases, 3)
    for g2, u2 in ((ug, bases), (grads, ub)):
        # the interpreter sums in the same order in both variants, so the bits agree
        assert torch.equal(be.dots(g2, u2, 3), aligned)
    expected, _ = float64_project(grads, bases, "conflict", max_norm=0.7)
    tol = 1e-5 if grad_dtype == torch.float32 and basis_dtype == torch.float32 else 1e-2
    for gs, us in ((grads, bases), (ug, ub)):
        ogpsa.project_(gs, us, mode="conflict", max_norm=0.7, backend="triton")
        assert rel_err(gs, expected) <= tol
    assert all(torch.equal(a, b) for a, b in zip(grads, ug))


@pytest.mark.parametrize("mode", ["orthogonal", "conflict", "plane"])
@pytest.mark.parametrize("gi_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_single_pass_matches_two_pass_and_float64(mode, gi_dtype, grad_dtype, monkeypatch):
    # a small threshold so that both paths run on small inputs
    monkeypatch.setattr(tb.TritonBackend, "single_pass_max_numel", 700)
    grads, bases = make_case(41, [5, 33, 700, 701, 3000, 1], 4, grad_dtype=grad_dtype)
    be = tb.TritonBackend()
    k_max = 4
    gram = torch.stack([torch.nn.functional.pad(u.double() @ u.double().T, (0, k_max - u.shape[0]) * 2)
                        for u in bases])
    inv = torch.zeros_like(gram)
    for i, u in enumerate(bases):
        k = u.shape[0]
        inv[i, :k, :k] = torch.linalg.inv(gram[i, :k, :k])
    before = be.dots(grads, bases, k_max)
    expected, _ = float64_project(grads, bases, mode, aligned_scale=0.5)
    rows = be.fused_project_(grads, bases, inv.to(gi_dtype), mode, 0.5)
    assert rows.shape == (len(grads), k_max + 1) and rows.dtype == torch.float32
    torch.testing.assert_close(rows, before, rtol=2e-6, atol=1e-6)  # statistics of the unprojected gradients
    assert rel_err(grads, expected) <= (1e-5 if grad_dtype == torch.float32 else 1e-2)


def test_single_pass_through_ops_reports_the_same_statistics():
    grads, bases = make_case(42, [7, 33, 4097, 9000], 3)
    two = [g.clone() for g in grads]
    fused = ogpsa.project_(grads, bases, mode="conflict", backend="triton")  # tensor scope, no clip: single pass
    passes = ogpsa.project_(two, bases, mode="conflict", max_norm=1e30, backend="triton")  # clip: two passes
    for name in ("sq_before", "sq_after", "removed_sq"):
        torch.testing.assert_close(getattr(fused, name), getattr(passes, name), rtol=1e-5, atol=1e-6)
    expected, _ = float64_project(two, bases, "conflict")
    assert rel_err(grads, expected) <= 1e-5 and rel_err(two, expected) <= 1e-5


def test_fused_project_rejects_bad_input_before_writing():
    grads, bases = make_case(43, [7, 33], 2)
    copies = [g.clone() for g in grads]
    be = tb.TritonBackend()
    with pytest.raises(ValueError, match="mode"):
        be.fused_project_(grads, bases, torch.zeros(2, 2, 2), "sideways", 1.0)
    with pytest.raises(ValueError, match="gram_inv"):
        be.fused_project_(grads, bases, torch.zeros(2, 2, 3), "orthogonal", 1.0)
    assert all(torch.equal(a, b) for a, b in zip(grads, copies))


def test_launch_config_is_a_fixed_function(monkeypatch):
    monkeypatch.setattr(kcommon, "INTERPRETED", False)
    got = {k: kcommon.launch_config(k) for k in (1, 2, 4, 8, 16)}
    assert got == {1: {"BLOCK": 2048, "num_warps": 8}, 2: {"BLOCK": 2048, "num_warps": 8},
                   4: {"BLOCK": 2048, "num_warps": 8}, 8: {"BLOCK": 1024, "num_warps": 8},
                   16: {"BLOCK": 512, "num_warps": 8}}
    # no autotuner objects anywhere: nothing picks a config by timing
    from ogpsa.kernels import basis as kbasis

    for mod in (kcommon, kproj, kbasis):
        assert not any(isinstance(v, triton.runtime.Autotuner) for v in vars(mod).values())


def test_statistics_count_the_single_pass_tensors(monkeypatch):
    monkeypatch.setattr(tb.TritonBackend, "single_pass_max_numel", 700)
    monkeypatch.setattr(ops, "_instances", {})
    grads, bases = make_case(44, [5, 700, 701, 3000], 2)
    stats = ogpsa.project_(grads, bases, mode="orthogonal", backend="triton")
    assert stats.single_pass == 2  # 5 and 700 elements; 701 and 3000 take the two passes
    assert ogpsa.project_(grads, bases, mode="orthogonal", max_norm=1.0, backend="triton").single_pass == 0
