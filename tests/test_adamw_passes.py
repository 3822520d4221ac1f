"""The projected AdamW step as two ops, ``projected_adamw_pass1_`` (moments, d, per-tensor rows
[c = U d, ||d||^2]) and ``projected_adamw_pass2_`` (p <- p shrink - lr (kappa d - U^T w) with the
caller's w): a reduction fits between them (sharded parameters: one all_reduce of the pass-1
rows), and the caller chooses the rule (w, kappa).

CPU ops always; their CUDA kernels in the CPU emulation (tests/adamw_emu.cpp) and, with a GPU
(marker ``gpu``), on the device.
"""

from __future__ import annotations

import platform

import pytest
import torch
from adamw_cases import (
    OPTION_IDS,
    OPTIONS,
    PARAM_DTYPES,
    Problem,
    build_emu,
    emu_call,
    oracle_pass2,
    rel,
    ulp,
)

import ogpsa  # noqa: F401  (loads ogpsa._C)
from ogpsa.backends import cext

HAS_OPS = cext._C is not None and hasattr(torch.ops.ogpsa, "projected_adamw_pass2_")
HAS_GPU = HAS_OPS and bool(cext.build_info().get("cuda")) and torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not HAS_OPS, reason="ogpsa._C without projected_adamw_pass1_/pass2_")
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device and ogpsa._C built with CUDA")

SIZES = (1, 7, 4097, 8193, 3 * 16384 + 5)
KS = (1, 16, 0, 5, 3)
K_MAX = 16


def assert_params_close(got: Problem, want: Problem, p0: list, tol: float = 1e-6) -> None:
    """fp32: the applied updates agree to ``tol``; 16-bit: within one ulp."""
    for i, (a, b) in enumerate(zip(got.params, want.params)):
        a, b = a.double().cpu().reshape(-1), b.double().cpu().reshape(-1)
        if got.params[i].dtype == torch.float32:
            assert rel(a - p0[i], b - p0[i]) <= tol, i
        else:
            assert bool(((a - b).abs() <= ulp(b, got.params[i].dtype)).all()), i


def assert_moments_equal(a: Problem, b: Problem) -> None:
    for name in ("ms", "vs", "vmax"):
        for i, (x, y) in enumerate(zip(getattr(a, name), getattr(b, name))):
            assert torch.equal(x.cpu(), y.cpu()), f"{name}[{i}]"


def two_passes(pb: Problem, opts, grads, *, kappa: float = 1.0) -> tuple:
    """pass1_, w = M^-1 c, pass2_ on pb; returns (rows, removed)."""
    _, maximize, project_wd, wd = opts
    rows = pb.pass1(grads, maximize, project_wd, wd, K_MAX)
    removed = pb.pass2(pb.weights(rows, K_MAX), kappa, project_wd, wd)
    return rows, removed


@pytest.mark.parametrize("opts", OPTIONS, ids=OPTION_IDS)
@pytest.mark.parametrize("pdt", PARAM_DTYPES, ids=str)
def test_passes_compose_to_fused_op(pdt, opts):
    amsgrad, maximize, project_wd, wd = opts
    fused = Problem(SIZES, KS, pdt, torch.bfloat16 if amsgrad else torch.float32, amsgrad=amsgrad, seed=3)
    split = fused.clone()
    p0 = [p.double().reshape(-1).clone() for p in fused.params]
    grads = fused.grads(0)
    stats = fused.call(grads, maximize, project_wd, wd)
    rows, removed = two_passes(split, opts, grads)
    assert rows.shape == (len(SIZES), K_MAX + 1) and rows.dtype == torch.float64
    assert torch.equal(rows[:, -1], stats[:, 0])  # same pass 1, same chunk order
    for i, u in enumerate(split.bases):
        assert not rows[i, u.shape[0]:K_MAX].any(), i  # columns beyond k_i are zero
    assert torch.allclose(removed, stats[:, 1], rtol=1e-5, atol=1e-12)
    assert_moments_equal(split, fused)
    assert_params_close(split, fused, p0)


@pytest.mark.parametrize("frac", (0.5, 0.3))
def test_sharded_passes_equal_unsharded(frac):
    """Each tensor split in two shards: pass 1 per shard, rows summed (the all_reduce), one w,
    pass 2 per shard == the fused op on the whole tensors."""
    opts = OPTIONS[1]
    amsgrad, maximize, project_wd, wd = opts
    whole = Problem(SIZES, KS, torch.float32, torch.float32, amsgrad=amsgrad, seed=4)
    sharded = whole.clone()
    p0 = [p.double().reshape(-1).clone() for p in whole.params]
    grads = whole.grads(0)
    stats = whole.call(grads, maximize, project_wd, wd)
    shards = sharded.shards(frac)
    cuts = [p.numel() for p in shards[0].params]
    shard_grads = ([g[:c] for g, c in zip(grads, cuts)], [g[c:] for g, c in zip(grads, cuts)])
    rows = sum(s.pass1(g, maximize, project_wd, wd, K_MAX) for s, g in zip(shards, shard_grads))
    w = sharded.weights(rows, K_MAX)
    removed = sum(s.pass2(w, 1.0, project_wd, wd) for s in shards)
    # float32 partial sums over other element ranges (the CPU kernel sums a chunk serially)
    assert torch.allclose(rows[:, -1], stats[:, 0], rtol=1e-4)
    assert torch.allclose(removed, stats[:, 1], rtol=1e-5, atol=1e-12)
    assert_moments_equal(sharded, whole)
    assert_params_close(sharded, whole, p0)


@pytest.mark.parametrize("kappa,rule", [(0.0, "plane"), (1.0, "random"), (0.5, "random")])
@pytest.mark.parametrize("pdt", (torch.float32, torch.bfloat16), ids=str)
def test_pass2_given_weights_and_kappa_float64(pdt, kappa, rule):
    """Pass 2 with w and kappa of the caller's choosing (plane rule: kappa 0, w = -M^-1 c) against
    float64 from the stored moments."""
    amsgrad, maximize, project_wd, wd = OPTIONS[3]
    pb = Problem(SIZES, KS, pdt, torch.float32, amsgrad=amsgrad, seed=5)
    rows = pb.pass1(pb.grads(0), maximize, project_wd, wd, K_MAX)
    if rule == "plane":
        w = -pb.weights(rows, K_MAX)
    else:
        w = torch.randn(len(SIZES), K_MAX, generator=torch.Generator().manual_seed(9))
    exp = oracle_pass2(pb, w, kappa, project_wd, wd)
    p0 = [p.double().reshape(-1).clone() for p in pb.params]
    removed = pb.pass2(w, kappa, project_wd, wd)
    for i, p in enumerate(pb.params):
        # element-wise: float32 evaluation (~1e-7 of |p| and of the update) plus, for 16-bit
        # parameters, the final rounding (the plane rule's update is small next to p)
        got, want = p.double().reshape(-1), exp["p"][i]
        slack = 1e-6 * (p0[i].abs() + (want - p0[i]).abs()) + (ulp(want, pdt) if pdt != torch.float32 else 0)
        assert bool(((got - want).abs() <= slack).all()), i
        assert float(removed[i]) == pytest.approx(exp["removed"][i], rel=1e-5, abs=1e-12), i


def test_pass_ops_reject_bad_input_before_writing():
    pb = Problem((9, 20000), (2, 3), torch.float32, torch.float32, amsgrad=True, seed=6)
    grads = pb.grads(0)
    before = [t.clone() for t in pb.params + pb.ms + pb.vs + pb.vmax]
    with pytest.raises(RuntimeError, match=r"bases\[1\] has k=3 > k_max=2"):
        pb.pass1(grads, False, False, 0.1, 2)
    with pytest.raises(RuntimeError, match=r"grads\[0\]"):
        pb.pass1([grads[0][:5], grads[1]], False, False, 0.1, 3)
    for bad in (torch.zeros(2, 2), torch.zeros(3, 3), torch.zeros(2, 3, dtype=torch.float64), torch.zeros(3, 2).T):
        with pytest.raises(RuntimeError, match="weights must be a contiguous float32"):
            pb.pass2(bad, 1.0, False, 0.1)
    after = pb.params + pb.ms + pb.vs + pb.vmax
    assert all(torch.equal(a, b) for a, b in zip(before, after))


# ----------------------------------------------------------------------------------------
# the CUDA kernels of the two ops: emulated on the CPU, and on a GPU
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("pdt,udt,kappa", [(torch.float32, torch.float32, 1.0), (torch.bfloat16, torch.bfloat16, 0.5),
                                           (torch.float16, torch.float32, 0.0)], ids=["fp32", "bf16", "fp16"])
def test_emulated_cuda_pass_ops_match_cpu(pdt, udt, kappa):
    lib = build_emu()
    amsgrad, maximize, project_wd, wd = OPTIONS[3]
    emu = Problem(SIZES, KS, pdt, udt, amsgrad=amsgrad, seed=7)
    cpu = emu.clone()
    p0 = [p.double().reshape(-1).clone() for p in emu.params]
    grads = emu.grads(0)
    rows = emu_call(lib, emu, grads, maximize, project_wd, wd, mode=1, k_max=K_MAX)
    rows_cpu = cpu.pass1(grads, maximize, project_wd, wd, K_MAX)
    assert torch.allclose(rows, rows_cpu, rtol=1e-5, atol=1e-6 * float(rows_cpu[:, -1].max()) ** 0.5)
    assert_moments_equal(emu, cpu)
    w = cpu.weights(rows_cpu, K_MAX)
    removed = emu_call(lib, emu, None, maximize, project_wd, wd, mode=2, weights=w, kappa=kappa)
    removed_cpu = cpu.pass2(w, kappa, project_wd, wd)
    assert torch.allclose(removed, removed_cpu, rtol=1e-5, atol=1e-12)
    assert_params_close(emu, cpu, p0)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("pdt", PARAM_DTYPES, ids=str)
def test_cuda_pass_ops_match_cpu(pdt):
    amsgrad, maximize, project_wd, wd = OPTIONS[3]
    cpu = Problem(SIZES + (2**20 + 3,), KS + (8,), pdt, torch.bfloat16, amsgrad=amsgrad, seed=8)
    dev = cpu.clone("cuda")
    p0 = [p.double().reshape(-1).clone() for p in cpu.params]
    grads = cpu.grads(0)
    rows_cpu = cpu.pass1(grads, maximize, project_wd, wd, K_MAX)
    rows = dev.pass1(grads, maximize, project_wd, wd, K_MAX)
    assert rows.device.type == "cuda" and rows.dtype == torch.float64
    assert torch.allclose(rows.cpu(), rows_cpu, rtol=1e-5, atol=1e-6 * float(rows_cpu[:, -1].max()) ** 0.5)
    if platform.machine() == "x86_64":  # both IEEE, rounded step by step in the same order
        assert_moments_equal(dev, cpu)
    w = cpu.weights(rows_cpu, K_MAX)
    removed_cpu = cpu.pass2(w, 0.5, project_wd, wd)
    removed = dev.pass2(w.cuda(), 0.5, project_wd, wd)
    assert torch.allclose(removed.cpu(), removed_cpu, rtol=1e-5, atol=1e-12)
    assert_params_close(dev, cpu, p0)


@pytest.mark.gpu
@needs_gpu
def test_cuda_sharded_passes_equal_fused():
    amsgrad, maximize, project_wd, wd = OPTIONS[1]
    whole = Problem(SIZES + (2**20 + 3,), KS + (16,), torch.float32, torch.float32, amsgrad=amsgrad, seed=9,
                    device="cuda")
    sharded = whole.clone()
    p0 = [p.double().reshape(-1).clone().cpu() for p in whole.params]
    grads = whole.grads(0)
    stats = whole.call(grads, maximize, project_wd, wd).cpu()
    shards = sharded.shards(0.5)
    cuts = [p.numel() for p in shards[0].params]
    shard_grads = ([g[:c] for g, c in zip(grads, cuts)], [g[c:] for g, c in zip(grads, cuts)])
    rows = sum(s.pass1(g, maximize, project_wd, wd, K_MAX) for s, g in zip(shards, shard_grads))
    removed = sum(s.pass2(sharded.weights(rows, K_MAX).cuda(), 1.0, project_wd, wd) for s in shards)
    assert torch.allclose(rows[:, -1].cpu(), stats[:, 0], rtol=1e-5)
    assert torch.allclose(removed.cpu(), stats[:, 1], rtol=1e-5, atol=1e-12)
    assert_moments_equal(sharded, whole)
    assert_params_close(sharded, whole, p0)


@pytest.mark.gpu
@needs_gpu
def test_cuda_pass_ops_reject_bad_input_before_writing():
    pb = Problem((9, 20000), (2, 3), torch.float32, torch.float32, amsgrad=True, seed=10, device="cuda")
    grads = pb.grads(0)
    before = [t.clone() for t in pb.params + pb.ms + pb.vs + pb.vmax]
    with pytest.raises(RuntimeError, match=r"bases\[1\] has k=3 > k_max=2"):
        pb.pass1(grads, False, False, 0.1, 2)
    for bad in (torch.zeros(2, 2), torch.zeros(3, 3), torch.zeros(2, 3, dtype=torch.float64)):
        with pytest.raises(RuntimeError, match="weights must be a contiguous float32"):
            pb.pass2(bad.cuda(), 1.0, False, 0.1)
    with pytest.raises(RuntimeError, match="weights must be a contiguous float32"):
        torch.ops.ogpsa.projected_adamw_pass2_(pb.params, pb.ms, pb.vs, pb.vmax, pb.bases, torch.zeros(2, 3),
                                               pb.steps, 0.1, 0.9, 0.999, 1e-8, 0.1, 1.0, False)
    after = pb.params + pb.ms + pb.vs + pb.vmax
    assert all(torch.equal(a, b) for a, b in zip(before, after))
