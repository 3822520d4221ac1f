"""OGPSA under DDP, FSDP2 and DeepSpeed ZeRO-2 equals single-process projection.

The multi-process checks run once per session in tests/dist_worker.py (2 ranks, gloo on
127.0.0.1, torch.multiprocessing.spawn; about a minute on 2 shared cores), each rank
comparing with the single-process result it computes itself; the tests below assert on
what the ranks report. Fast single-process unit tests of the slicing and error paths follow.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
from dist_launch import launch_worker
from oracle import deepspeed_importable

import ogpsa
from ogpsa.distributed import LocalSlice, ShardedSubspace, attach_deepspeed
from ogpsa.ops import UnsupportedSetupError

pytestmark = pytest.mark.usefixtures("paper_preset")  # these tests mean the paper recipe (preset="paper")

TIMEOUT = 280

# Tolerances, from float32 error analysis against a float64 oracle (tests/dist_worker.py:
# float64_run, float64_bases). Every rank runs the distributed step in float32 and the same step
# in one process in float32; both are compared with the same step computed in float64 (float64
# model, NumPy float64 projection and clipping, exact SGD update). The two float32 runs round
# differently (batch split over ranks, gradient all-reduce, partial dots summed over shards,
# another BLAS blocking on another CPU), so comparing them with each other at a fixed 1e-6 fails
# on some x86 CPUs (AMD EPYC: update 1.08e-6). What must hold on any CPU: the distributed run is
# as accurate as a single-process float32 run, up to
#   * a factor 4 on the single run's error: both errors are norms over thousands of elements of
#     independent-looking rounding errors of the same size, so their ratio stays near 1;
#   * plus 8 eps32 for the roundings only the distributed run has (the all-reduce of the
#     gradients: an add and a halving; the all-reduce of the [T, k+1] partials; the clip factor),
#     each at most eps32 / 2 relative per element.
# A real fault (an unprojected step: relative error ~ sqrt(removed fraction) ~ 6e-2 here; a
# missed all-reduce; a wrong clip norm: O(1)) is orders of magnitude beyond this bound. The
# update errors of both float32 runs are dominated by rounding p - lr g to float32 (~6e-5 here,
# shared by both runs), which the relative rule absorbs without loosening the gradient checks.
EPS32 = torch.finfo(torch.float32).eps
RATIO, EXTRA = 4.0, 8 * EPS32
SINGLE_FP32_TOL = 1e-5  # the project's fp32 standard for the single-process run (measured ~2e-7)


def assert_as_accurate(out: dict, name: str) -> None:
    """``out[name_err]`` (distributed vs float64) within the bound above of
    ``out[name_single_err]`` (single-process float32 vs float64)."""
    err, single = out[f"{name}_err"], out[f"{name}_single_err"]
    assert err <= RATIO * single + EXTRA, (name, err, single, out)


def assert_gradients(out: dict) -> None:
    assert out["grad_single_err"] <= SINGLE_FP32_TOL, out
    assert_as_accurate(out, "grad")


def grad_level_bound(out: dict) -> float:
    """Relative error bound of the distributed gradient (before the projection as after it:
    the projection is a contraction), for scalars derived from it."""
    return RATIO * out["grad_single_err"] + EXTRA


def _launch(outdir: str, scenarios: str, env=None) -> dict:
    return launch_worker("dist_worker.py", outdir, scenarios.split(","), TIMEOUT, env=env)


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory):
    return _launch(str(tmp_path_factory.mktemp("dist")), "ddp,fsdp,zero_fake")


def _ranks(dist_results, name):
    ranks = dist_results[name]
    for r, out in enumerate(ranks):
        assert "error" not in out, f"rank {r} failed in {name}:\n{out['error']}"
    return ranks


def test_ddp_projects_the_averaged_gradient(dist_results):
    for out in _ranks(dist_results, "ddp"):
        assert out["type"] == "Projector"
        assert_gradients(out)
        assert_as_accurate(out, "update")
        # | |a| - |b| | <= |a - b|: the norm is as accurate as the gradient it is the norm of
        assert out["clipped"] and out["total_norm_err"] <= grad_level_bound(out), out
        assert out["changed"] > 0.1  # projection + clipping really changed the gradient


def test_fsdp2_tensor_scope_equals_single_process_with_one_collective(dist_results):
    for out in _ranks(dist_results, "fsdp"):
        t = out["tensor"]
        assert t["type"] == "ShardedProjector"  # ogpsa.attach picked it for the DTensor model
        assert_gradients(t)
        assert_as_accurate(t, "update")
        assert t["clipped"] and t["total_norm_err"] <= grad_level_bound(t), t  # the clip norm is the global one
        assert t["collectives"] == ["c10d::allreduce_"], t["collectives"]


def test_fsdp2_global_scope_conflict_mode(dist_results):
    for out in _ranks(dist_results, "fsdp"):
        g = out["global"]
        assert_gradients(g)
        assert_as_accurate(g, "update")
        # removed fraction f = |r|^2 / |g|^2 with r = g - Pg: |dr| <= |dg|, so
        # df / f <= 2 |dg| / |g| (1 / sqrt(f) + 1)
        bound = 2 * (1 + g["removed_fraction"] ** -0.5) * grad_level_bound(g)
        assert g["clipped"] and g["removed_err"] <= bound, (bound, g)
        assert g["collectives"] == ["c10d::allreduce_"], g["collectives"]


def test_fsdp2_sharded_reference_gradients_build_the_sharded_basis(dist_results):
    fractions = []
    for out in _ranks(dist_results, "fsdp"):
        b = out["sharded_build"]
        assert b["ranks_equal"]
        assert b["basis_single_err"] <= SINGLE_FP32_TOL, b
        assert_as_accurate(b, "basis")  # float64 bases from the float64 model's reference gradients
        assert b["gram_bound_ratio"] <= 1.0, b  # each M within 16 sqrt(N) eps32 of U U^T (float64)
        assert_as_accurate(b, "update")
        fractions.append(b["local_fraction"])
    # each rank holds only its shards, and the shards are uneven (37 and 45 rows over 2 ranks)
    assert abs(sum(fractions) - 1) < 1e-12 and fractions[0] != fractions[1]


def test_sharded_basis_save_load_round_trip(dist_results):
    for out in _ranks(dist_results, "fsdp"):
        assert all(out["roundtrip"].values()), out["roundtrip"]


def test_zero2_partition_projection_emulated_engine(dist_results):
    for out in _ranks(dist_results, "zero_fake"):
        assert out["type"] == "ZeroProjector"
        assert out["split_params"], "the emulated partition should cut a parameter"
        assert_gradients(out)
        assert_as_accurate(out, "update")
        assert out["collectives"] == ["c10d::allreduce_"], out["collectives"]
        assert out["wrapped_projections"] == 2 and out["restored"]


@pytest.mark.slow
@pytest.mark.skipif(not deepspeed_importable(), reason="deepspeed is not installed")
def test_deepspeed_zero2_real_engine_on_cpu(tmp_path):
    """The real DeepSpeed ZeRO-2 and ZeRO-1 engines (CPU accelerator, gloo): ~1 minute, and
    DeepSpeed JIT-builds an op on first use."""
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    results = _launch(str(tmp_path), "deepspeed,deepspeed_stage1", env=env)
    for stage, name in ((2, "deepspeed"), (1, "deepspeed_stage1")):
        for out in results[name]:
            assert "error" not in out, out["error"]
            assert out["type"] == "ZeroProjector" and out["stage"] == stage and out["projections"] == 1
            assert out["split_params"], "the partition should cut a parameter"
            assert_as_accurate(out, "update")
            assert out["unprojected_rel"] > 0.02, out  # the projection really changed the step


# ----------------------------------------------------------------------------------------
# single-process unit tests
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,dim", [("dim", 0), ("dim", 1), ("flat", 0)])
def test_local_slices_cover_the_full_basis(kind, dim):
    shape, world = (7, 5), 3
    gen = torch.Generator().manual_seed(3)
    u = torch.randn(2, 35, generator=gen)
    size = shape[dim] if kind == "dim" else 35
    chunk = -(-size // world)
    full = torch.full_like(u, float("nan"))  # poison: every column must be written
    for r in range(world):
        start = min(size, r * chunk)
        sl = LocalSlice(shape, kind, dim, start, max(0, min(size, start + chunk) - start))
        piece = sl.take_rows(u)
        assert piece.shape == (2, sl.numel) and piece.is_contiguous()
        sl.put_rows(full, piece)
    assert torch.equal(full, u)


def test_sharded_subspace_from_subspace_checks_names_and_shapes():
    u = torch.linalg.qr(torch.randn(12, 2, dtype=torch.float64))[0].T.float().contiguous()
    sub = ogpsa.Subspace(["w"], [(4, 3)], [u])
    sl = LocalSlice((4, 3), "dim", 0, 2, 2)
    sharded = ShardedSubspace.from_subspace(sub, {"w": sl})
    assert torch.equal(sharded.basis("w"), u[:, 6:])
    assert torch.equal(sharded.gram("w"), sub.gram("w"))
    with pytest.raises(ogpsa.SubspaceMismatchError, match="'w'.*shape"):
        ShardedSubspace.from_subspace(sub, {"w": LocalSlice((3, 4), "dim", 0, 0, 2)})
    with pytest.raises(ogpsa.SubspaceMismatchError, match="'w'"):
        ShardedSubspace.from_subspace(sub, {})


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_sharded_from_gradients_takes_the_build_gram_path(backend, monkeypatch):
    """One process, whole-tensor slices: ShardedSubspace.from_gradients runs the Gram pass of
    Subspace.from_gradients (ogpsa.basis_build.reference_grams: no full-size inf-norm pass, only
    out-of-range rows rescued) and gives its bases, also for rows that need the rescue."""
    if backend == "cpu" and not ogpsa.ops.backends()["cpu"][0]:
        pytest.skip("ogpsa._C not built")
    gen = torch.Generator().manual_seed(17)
    shapes = {"a": (37, 11), "b": (1001,), "c": (9, 5, 3)}
    refs = [{n: torch.randn(s, generator=gen) for n, s in shapes.items()} for _ in range(4)]
    refs[1]["a"] = refs[1]["a"] * 2.0 ** -90  # squares underflow float32: rescued by a rescale
    refs[2]["c"] = refs[2]["c"] * 2.0 ** 70  # squares overflow float32
    config = ogpsa.OGPSAConfig(allow_partial=True)
    want = ogpsa.Subspace.from_gradients(refs, config, backend=backend)
    slices = {n: LocalSlice(s, "flat", 0, 0, int(torch.Size(s).numel())) for n, s in shapes.items()}

    def full_size_pass(*a, **kw):
        raise AssertionError("ops.gram (full-size inf-norm pass) called")

    monkeypatch.setattr(ogpsa.ops, "gram", full_size_pass)
    got = ShardedSubspace.from_gradients(refs, slices, config, backend=backend)
    for n in shapes:
        u, w = got.basis(n).double(), want.basis(n).double()
        assert u.shape == w.shape and float((u - w).norm() / w.norm()) <= 1e-5, n
        assert float((got.gram(n).double() - want.gram(n).double()).norm() / want.gram(n).double().norm()) <= 1e-5


def test_attach_without_dtensors_is_the_plain_projector():
    model = torch.nn.Linear(3, 2)
    g = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    proj = ogpsa.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), ogpsa.Subspace.from_gradients([g]))
    assert type(proj) is ogpsa.Projector


def test_attach_deepspeed_rejects_unsupported_stages():
    model = torch.nn.Linear(3, 2)
    sub = ogpsa.Subspace.from_gradients([{n: torch.randn_like(p) for n, p in model.named_parameters()}])
    engine = SimpleNamespace(module=model, optimizer=object(), zero_optimization_stage=lambda: 3)
    with pytest.raises(UnsupportedSetupError, match="stage 3"):
        attach_deepspeed(engine, sub)
    engine.zero_optimization_stage = lambda: 0
    with pytest.raises(UnsupportedSetupError, match="stage 1 or 2"):
        attach_deepspeed(engine, sub)
    engine.optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert type(attach_deepspeed(engine, sub)) is ogpsa.Projector  # stage 0: gradients already all-reduced
    engine.zero_optimization_stage = lambda: 2
    with pytest.raises(UnsupportedSetupError, match="partitions"):
        attach_deepspeed(engine, sub)
