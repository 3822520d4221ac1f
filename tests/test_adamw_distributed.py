"""Update-space projection (ProjectedAdamW, attach(space="update")) under FSDP2 and DDP equals the
single-process step; DeepSpeed ZeRO and FSDP1 are refused with a clear error.

The multi-process checks run once per session in tests/adamw_dist_worker.py (2 ranks, gloo on
127.0.0.1, one torch.multiprocessing.spawn for every scenario; ~40 s on 2 shared cores); each
rank compares with the single-process float32 ProjectedAdamW run and a float64 oracle it
computes itself, and the tests below assert on what the ranks report.

Tolerances (the same float32 error analysis as tests/test_distributed.py): every run is compared
with the float64 oracle (float64 model, float64 Adam moments, direction and projection onto the
float32 bases upcast, exact update), per step. The distributed run must be as accurate as the
single-process float32 run, up to a factor RATIO = 4 on the single run's error (both errors are
norms over thousands of elements of independent-looking roundings of the same size, so their
ratio stays near 1) plus EXTRA = 8 eps32 for the roundings only the distributed run has (the
gradient reduce-scatter: an add and a halving; the all_reduce of the pass-1 dots; the clip factor),
each at most eps32 / 2 relative per element. A step without projection is off by
sqrt(removed fraction) >= 2e-2 here, a missed all_reduce (weights from one rank's half of the dots)
by O(sqrt(removed fraction)) as well: orders of magnitude beyond the bound, which the tests check.
"""

from __future__ import annotations

import math
import os
from types import SimpleNamespace

import pytest
import torch
from dist_launch import launch_worker
from oracle import deepspeed_importable

import ogpsa
from ogpsa.distributed import attach_deepspeed
from ogpsa.errors import UnsupportedSetupError
from ogpsa.optim import ProjectedAdamW

pytestmark = pytest.mark.usefixtures("paper_preset")  # these tests mean the paper recipe (preset="paper")

TIMEOUT = 280
EPS32 = torch.finfo(torch.float32).eps
RATIO, EXTRA = 4.0, 8 * EPS32
SINGLE_FP32_TOL = 1e-5  # the project's fp32 standard for the single-process run (measured ~2e-6)
ORTHO_TOL = 1e-5  # relative residual of the applied direction against the full basis, float64
STEPS = 3
SCENARIOS = ("fsdp_tensor", "fsdp_global", "fsdp_empty_shard", "ddp", "errors")


def _launch(outdir: str, scenarios, env=None) -> dict:
    return launch_worker("adamw_dist_worker.py", outdir, scenarios, TIMEOUT, env=env)


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory):
    return _launch(str(tmp_path_factory.mktemp("adamw_dist")), SCENARIOS)


def _ranks(dist_results, name):
    ranks = dist_results[name]
    for r, out in enumerate(ranks):
        assert "error" not in out, f"rank {r} failed in {name}:\n{out['error']}"
    return ranks


def bound(single_err: float) -> float:
    return RATIO * single_err + EXTRA


def assert_equals_single_process(out: dict) -> None:
    """Every step's update as accurate as the single-process run's; the removed fraction (the
    step's statistics, from the summed dots) likewise; the test could fail."""
    for s in range(STEPS):
        single = out["update_single_err"][s]
        assert single <= SINGLE_FP32_TOL, (s, out)
        assert out["update_err"][s] <= bound(single), (s, out["update_err"], out["update_single_err"])
        # f = |r|^2 / |d|^2 with r the removed part: |dr| <= |dd| (a contraction), so
        # df / f <= 2 |dd| / |d| (1 / sqrt(f) + 1)
        f = out["fraction_exact"][s]
        assert abs(out["fraction"][s] / f - 1) <= 2 * (1 + f ** -0.5) * bound(single), (s, out)
        # an unprojected (or one-rank-dots) step would be off by about sqrt(f): far beyond the bound
        assert math.sqrt(f) > 100 * bound(single), (s, f)


def assert_orthogonal(out: dict) -> None:
    for s in range(STEPS):
        assert out["d_residual"][s] <= ORTHO_TOL, (s, out["d_residual"])
        if out["p_residual"]:  # the parameter change also carries the rounding of p - lr d to float32
            assert out["p_residual"][s] <= ORTHO_TOL + out["p_bound"][s], (s, out["p_residual"], out["p_bound"])


def test_fsdp2_tensor_scope_projected_adamw(dist_results):
    ranks = _ranks(dist_results, "fsdp_tensor")
    for out in ranks:
        assert_equals_single_process(out)
        assert_orthogonal(out)
        assert out["collectives"] == [["c10d::allreduce_"]] * STEPS, out["collectives"]  # one per step
        assert out["state_is_dtensor"]  # m, v sharded like p
        assert out["paused"] == {"collectives": [], "changed": True}  # paused: plain AdamW, no collective
    assert ranks[0]["fraction"] == ranks[1]["fraction"]  # weights from the same summed dots on every rank
    shapes = [out["local_shapes"]["embed.weight"] for out in ranks]
    assert shapes == [[19, 24], [18, 24]]  # 37 rows: uneven shards


def test_fsdp2_global_scope_attach_on_torch_adamw_with_clipping(dist_results):
    ranks = _ranks(dist_results, "fsdp_global")
    for out in ranks:
        assert out["type"] == "UpdateSpaceProjector"
        assert out["first_norm"] > 2 * out["max_norm"]  # clipping was active
        assert_equals_single_process(out)
        assert_orthogonal(out)
        assert out["collectives"] == [["c10d::allreduce_"]] * STEPS, out["collectives"]
        assert out["state_keys"] == ["exp_avg", "exp_avg_sq", "step"]  # still torch AdamW's state
    assert ranks[0]["fraction"] == ranks[1]["fraction"]


def test_fsdp2_empty_shard(dist_results):
    ranks = _ranks(dist_results, "fsdp_empty_shard")
    assert [out["local_shapes"]["a"] for out in ranks] == [[1, 7], [0, 7]]
    for out in ranks:
        assert_equals_single_process(out)
        assert_orthogonal(out)
        assert out["collectives"] == [["c10d::allreduce_"]] * STEPS, out["collectives"]


def test_ddp_needs_nothing_special(dist_results):
    for out in _ranks(dist_results, "ddp"):
        assert out["ranks_identical"]  # replicated parameters stay bit-identical
        assert_equals_single_process(out)  # the averaged gradient gives the single-process step
        assert_orthogonal(out)
        assert out["collectives"] == [[]] * STEPS  # the step itself communicates nothing


def test_unsupported_distributed_setups_name_what_to_do(dist_results):
    for out in _ranks(dist_results, "errors"):
        for key in ("fsdp1_attach", "fsdp1_projected"):
            assert out[key].startswith("UnsupportedSetupError") and "FSDP1" in out[key] and "fully_shard" in out[key]
        assert out["replicated"].startswith("UnsupportedSetupError") and "'weight'" in out["replicated"]
        assert out["other_layout"].startswith("SubspaceMismatchError")
        assert "'embed.weight'" in out["other_layout"]
        assert out["sharded_ok"]  # a ShardedSubspace cut for the model's layout is used as is


# ----------------------------------------------------------------------------------------
# DeepSpeed ZeRO: refused (single process; the real engine where deepspeed is installed)
# ----------------------------------------------------------------------------------------


def _model_and_subspace():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    gen = torch.Generator().manual_seed(1)
    refs = [{n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()} for _ in range(2)]
    return model, ogpsa.Subspace.from_gradients(refs, ogpsa.OGPSAConfig(space="update", allow_partial=True))


def _deepspeed_like(name: str, module: str, **attrs):
    """An object whose class lives in ``module`` (as DeepSpeed's engine / ZeRO optimizer do)."""
    return type(name, (), {"__module__": module, **attrs})()


def test_attach_update_space_refuses_deepspeed_objects():
    model, sub = _model_and_subspace()
    cfg = ogpsa.OGPSAConfig(space="update", allow_partial=True)
    zero = _deepspeed_like("DeepSpeedZeroOptimizer", "deepspeed.runtime.zero.stage_1_and_2",
                           param_groups=[{"params": list(model.parameters())}])
    with pytest.raises(UnsupportedSetupError, match="DeepSpeed ZeRO.*space='gradient'"):
        ogpsa.attach(model, zero, sub, cfg)
    engine_cls = type("DeepSpeedEngine", (torch.nn.Module,), {"__module__": "deepspeed.runtime.engine"})
    engine = engine_cls()
    engine.module = model
    with pytest.raises(UnsupportedSetupError, match="DeepSpeed"):
        ogpsa.attach(engine, torch.optim.AdamW(model.parameters()), sub, cfg)
    fake = SimpleNamespace(module=model, optimizer=zero, zero_optimization_stage=lambda: 2)
    with pytest.raises(UnsupportedSetupError, match="space='update'.*DeepSpeed"):
        attach_deepspeed(fake, sub, cfg)


def test_projected_adamw_inside_zero_raises_instead_of_plain_adamw():
    """DeepSpeed's ZeRO-1/2 optimizer replaces the wrapped optimizer's param groups with one flat
    fp32 partition each (stage_1_and_2.py: ``param_group['params'] = [single_partition]``) and steps
    it; the projected step must refuse rather than run unprojected AdamW on it."""
    model, sub = _model_and_subspace()
    opt = ProjectedAdamW(model, sub, lr=1e-2)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).requires_grad_()
    flat.grad = torch.zeros_like(flat)
    opt.param_groups[0]["params"] = [flat]  # what ZeRO does
    with pytest.raises(UnsupportedSetupError, match="replaced.*DeepSpeed"):
        opt.step()
    with pytest.raises(UnsupportedSetupError, match="none of the optimizer's parameters"):
        opt.set_subspace(sub)  # a refresh after ZeRO wrapped it
    opt.paused = True
    opt.step()  # paused (reference collection): plain AdamW is what was asked for


@pytest.mark.slow
@pytest.mark.skipif(not deepspeed_importable(), reason="deepspeed is not installed")
def test_real_deepspeed_zero2_update_space_routes(tmp_path):
    """The real ZeRO-2 engine (CPU accelerator, gloo): attach(space='update') on the engine and
    attach_deepspeed with space='update' attach (their steps are checked in test_adamw_zero.py);
    the ZeRO optimizer without its engine, and a ProjectedAdamW handed to deepspeed.initialize
    but never attached, raise UnsupportedSetupError naming DeepSpeed (never a silent plain step)."""
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    for out in _launch(str(tmp_path), ["deepspeed"], env=env)["deepspeed"]:
        assert "error" not in out, out["error"]
        for key in ("attach_engine", "attach_deepspeed"):
            assert out[key] == "no error", (key, out[key])
        for key in ("attach_zero_optimizer", "projected_adamw"):
            assert out[key].startswith("UnsupportedSetupError") and "DeepSpeed" in out[key], (key, out[key])
