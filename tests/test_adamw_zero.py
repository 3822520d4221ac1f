"""Update-space projection (space="update") under DeepSpeed ZeRO-1/2 equals the single-process
ProjectedAdamW step; unsupported DeepSpeed setups raise naming what to use.

The two-rank checks run once per module in tests/adamw_zero_worker.py (gloo on 127.0.0.1): an
emulated ZeRO-2 engine (tests/dist_worker.py's partition layout and gradient reduction, with a
torch AdamW on the flat fp32 partition stepped as DeepSpeed's stage_1_and_2 does), and, where
deepspeed is importable, the real ZeRO-2 engine on the CPU. Each rank compares with the
single-process float32 ProjectedAdamW run and the float64 oracle of
tests/adamw_dist_worker.py, per step.

Tolerances: the rule of tests/test_adamw_distributed.py (float32 error analysis against float64):
the distributed update must be as accurate as the single-process float32 one up to RATIO = 4 on
its error plus EXTRA = 8 eps32 for the roundings only the distributed run has (the gradient
average over ranks, the all_reduce of the pass-1 dots). A step without projection, or with the
dots of one rank's pieces only, is off by about sqrt(removed fraction) >= 2e-3 here: the test
checks that this is far beyond the bound. Orthogonality: the parameter change's residual against
the FULL basis (float64) <= 1e-5 plus what rounding p - lr d to float32 alone can add.
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
from ogpsa.optim.distributed import ZeroUpdateProjector

pytestmark = pytest.mark.usefixtures("paper_preset")  # these tests mean the paper recipe (preset="paper")

TIMEOUT = 280
DEEPSPEED_TIMEOUT = 500  # importing and initialising DeepSpeed twice per rank on 2 busy cores: ~4 min
EPS32 = torch.finfo(torch.float32).eps
RATIO, EXTRA = 4.0, 8 * EPS32
SINGLE_FP32_TOL = 1e-5
ORTHO_TOL = 1e-5
STEPS = 3
ALL_REDUCE = ["c10d::allreduce_"]


def _launch(outdir: str, scenarios, timeout: int = TIMEOUT, env=None) -> dict:
    return launch_worker("adamw_zero_worker.py", outdir, scenarios, timeout, env=env)


@pytest.fixture(scope="module")
def zero_results(tmp_path_factory):
    return _launch(str(tmp_path_factory.mktemp("adamw_zero")), ("zero_tensor", "zero_global"))


def _ranks(results, name):
    ranks = results[name]
    for r, out in enumerate(ranks):
        assert "error" not in out, f"rank {r} failed in {name}:\n{out['error']}"
    return ranks


def bound(single_err: float) -> float:
    return RATIO * single_err + EXTRA


def assert_equals_single_process(out: dict) -> None:
    for s in range(STEPS):
        single = out["update_single_err"][s]
        assert single <= SINGLE_FP32_TOL, (s, out)
        assert out["update_err"][s] <= bound(single), (s, out["update_err"], out["update_single_err"])
        f = out["fraction_exact"][s]  # the removed fraction, from the summed dots and the full M
        assert abs(out["fraction"][s] / f - 1) <= 2 * (1 + f ** -0.5) * bound(single), (s, out)
        assert math.sqrt(f) > 100 * bound(single), (s, f)  # an unprojected step would fail


def assert_orthogonal(out: dict) -> None:
    for s in range(STEPS):
        assert out["p_residual"][s] <= ORTHO_TOL + out["p_bound"][s], (s, out["p_residual"], out["p_bound"])


def assert_adamw_layout(layout: dict, sizes: list, step: float) -> None:
    """The inner AdamW's state is torch AdamW's: flat fp32 moments, a float32 step count."""
    assert sorted(layout) == [str(i) for i in range(len(sizes))], layout
    for i, n in enumerate(sizes):
        assert layout[str(i)] == {"exp_avg": [[n], "torch.float32"], "exp_avg_sq": [[n], "torch.float32"],
                                  "step": [[], "torch.float32", step]}, layout


def test_emulated_zero2_tensor_scope_equals_single_process(zero_results):
    ranks = _ranks(zero_results, "zero_tensor")
    for out in ranks:
        assert out["type"] == "ZeroUpdateProjector"  # ogpsa.attach(engine, None, ...) routed to attach_deepspeed
        assert out["split_params"], out["pieces"]  # a parameter cut between the ranks' partitions
        assert 0 in out["pieces"].values()  # and parameters one rank holds nothing of (empty pieces)
        assert_equals_single_process(out)
        assert_orthogonal(out)
        assert out["collectives"] == [ALL_REDUCE] * STEPS, out["collectives"]  # one all_reduce per step
        assert out["num_projections"] == STEPS
        assert_adamw_layout(out["layout"], [out["partition"]], float(STEPS))
        # paused: AdamW's own step on the partition, no collective; removed: likewise, and no projection
        assert out["paused"] == {"collectives": [], "changed": True, "num_projections": STEPS}, out["paused"]
        assert out["removed"] == {"collectives": [], "num_projections": STEPS, "step": STEPS + 2.0}
    assert ranks[0]["fraction"] == ranks[1]["fraction"]  # weights from the same summed table on every rank


def test_emulated_zero2_global_scope_projected_adamw_with_decay(zero_results):
    """A ProjectedAdamW (project_weight_decay=True) handed to the ZeRO optimizer, global scope,
    one parameter without a basis (plain AdamW inside the same step)."""
    ranks = _ranks(zero_results, "zero_global")
    for out in ranks:
        assert out["type"] == "ZeroUpdateProjector"
        assert out["split_params"]
        assert_equals_single_process(out)
        assert_orthogonal(out)  # decay projected too: the whole update is orthogonal
        assert out["collectives"] == [ALL_REDUCE] * STEPS, out["collectives"]
        assert out["layout"]["0"]["step"][2] == float(STEPS)
    assert ranks[0]["fraction"] == ranks[1]["fraction"]


@pytest.mark.slow
@pytest.mark.skipif(not deepspeed_importable(), reason="deepspeed is not installed (optional; pip install deepspeed)")
def test_real_deepspeed_zero2_update_space(tmp_path):
    """DeepSpeed's ZeRO-2 engine (CPU accelerator, gloo), a torch AdamW with 2 param groups:
    equals the single-process step; one all_reduce per param group; a DeepSpeed checkpoint
    loads into a second engine and both take the same next step bit for bit."""
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    for out in _launch(str(tmp_path), ["deepspeed"], timeout=DEEPSPEED_TIMEOUT, env=env)["deepspeed"]:
        assert "error" not in out, out["error"]
        assert out["type"] == "ZeroUpdateProjector" and out["groups"] == 2
        assert out["split_params"]
        assert_equals_single_process(out)
        assert_orthogonal(out)
        assert out["collectives"] == [[ALL_REDUCE, ALL_REDUCE]] * STEPS, out["collectives"]
        assert [v["step"][2] for v in out["layout"].values()] == [float(STEPS)] * 2
        ck = out["checkpoint"]
        assert ck["loaded_equal"] and ck["next_step_equal"], ck
        assert ck["projections"] == [STEPS + 1, 1]
        assert [v["step"][2] for v in ck["layout2"].values()] == [STEPS + 1.0] * 2


# ----------------------------------------------------------------------------------------
# single process: several param groups, padding, errors
# ----------------------------------------------------------------------------------------


def _model_and_subspace(scope="tensor"):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    gen = torch.Generator().manual_seed(1)
    refs = [{n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters() if n != "2.bias"}
            for _ in range(2)]
    return model, ogpsa.Subspace.from_gradients(refs, ogpsa.OGPSAConfig(space="update", allow_partial=True, scope=scope))


class OneRankZero:
    """ZeRO-1/2's optimizer side on one rank: one flat fp32 partition per param group holding the
    whole group plus ``pad`` padding elements, a torch optimizer on the partitions, stepped one
    group at a time (stage_1_and_2.py ``_optimizer_step``)."""

    def __init__(self, groups, make_optimizer, pad=3):
        self.bit16_groups = [list(g) for g in groups]
        self.params_in_partition = self.bit16_groups
        self.real_dp_process_group = [None] * len(groups)
        self.single_partition_of_fp32_groups = []
        for g in self.bit16_groups:
            pos = 0
            for p in g:
                p._hp_mapping = SimpleNamespace(lp_fragment_address=SimpleNamespace(start=0, numel=p.numel()),
                                                hp_fragment_address=SimpleNamespace(start=pos, numel=p.numel()))
                pos += p.numel()
            flat = torch.cat([p.detach().reshape(-1) for p in g] + [torch.zeros(pad)])
            self.single_partition_of_fp32_groups.append(flat.requires_grad_(True))
        self.pad = pad
        self.optimizer = make_optimizer([{"params": [f]} for f in self.single_partition_of_fp32_groups])

    def step(self):
        for gi, (g, flat) in enumerate(zip(self.bit16_groups, self.single_partition_of_fp32_groups)):
            flat.grad = torch.cat([p.grad.reshape(-1) for p in g] + [torch.zeros(self.pad)])
            original = self.optimizer.param_groups
            self.optimizer.param_groups = [original[gi]]
            self.optimizer.step()
            self.optimizer.param_groups = original
            flat.grad = None
            with torch.no_grad():
                pos = 0
                for p in g:
                    p.copy_(flat.detach()[pos:pos + p.numel()].view_as(p))
                    pos += p.numel()


def _engine(model, zero, stage=2):
    return SimpleNamespace(module=model, optimizer=zero, zero_optimization_stage=lambda: stage)


def test_one_rank_two_groups_with_padding_equals_projected_adamw():
    """Two param groups (two partitions, each with padding), a parameter without a basis, no
    process group: the same steps as ProjectedAdamW with the same groups, and the padding stays 0."""
    model, sub = _model_and_subspace()
    twin = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    twin.load_state_dict(model.state_dict())
    ps, qs = list(model.parameters()), list(twin.parameters())
    zero = OneRankZero([ps[:2], ps[2:]], lambda groups: torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.0))
    proj = attach_deepspeed(_engine(model, zero), sub, ogpsa.OGPSAConfig(space="update", allow_partial=True))
    ref = ProjectedAdamW([{"params": qs[:2]}, {"params": qs[2:]}], sub, lr=1e-2, weight_decay=0.0, model=twin)
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        x, y = torch.randn(4, 5, generator=gen), torch.randn(4, 3, generator=gen)
        for mdl in (model, twin):
            mdl.zero_grad(set_to_none=True)
            (mdl(x) - y).pow(2).mean().backward()
        zero.step()
        ref.step()
        for p, q in zip(ps, qs):
            assert torch.allclose(p, q, rtol=1e-6, atol=1e-7), (p - q).abs().max()
    assert proj.num_projections == 3 and ref.num_projections == 3
    assert proj.last_stats.names == ref.last_stats.names == ["0.weight", "0.bias", "2.weight"]
    assert torch.allclose(proj.last_stats.removed_sq, ref.last_stats.removed_sq, rtol=1e-5)
    for flat in zero.single_partition_of_fp32_groups:
        assert torch.equal(flat.detach()[-3:], torch.zeros(3))
        assert float(zero.optimizer.state[flat]["step"]) == 3.0


def _inner(opt, name):
    """``opt`` under another class name (as DeepSpeed's own optimizers are named)."""
    opt.__class__ = type(name, (type(opt),), {})
    return opt


@pytest.mark.parametrize("kind,match", [
    ("FusedAdam", "FusedAdam.*torch_adam"),
    ("DeepSpeedCPUAdam", "DeepSpeedCPUAdam.*zero_force_ds_cpu_optimizer"),
    ("SGD", "SGD.*torch.optim.AdamW"),
    ("fused", "fused=True"),
])
def test_unsupported_inner_optimizers_name_what_to_use(kind, match):
    model, sub = _model_and_subspace()
    ps = list(model.parameters())
    if kind == "SGD":
        make = lambda g: torch.optim.SGD(g, lr=0.1)  # noqa: E731
    elif kind == "fused":
        make = lambda g: torch.optim.AdamW(g, fused=True)  # noqa: E731
    else:  # DeepSpeed's FusedAdam / DeepSpeedCPUAdam are no torch AdamW
        make = lambda g: _inner(torch.optim.Adam(g), kind)  # noqa: E731
    zero = OneRankZero([ps], make)
    with pytest.raises(UnsupportedSetupError, match=match):
        attach_deepspeed(_engine(model, zero), sub, ogpsa.OGPSAConfig(space="update", allow_partial=True))


def test_zero3_global_scope_over_groups_and_non_zero_optimizers_raise():
    model, sub = _model_and_subspace()
    ps = list(model.parameters())
    cfg = ogpsa.OGPSAConfig(space="update", allow_partial=True)
    zero = OneRankZero([ps], lambda g: torch.optim.AdamW(g))
    with pytest.raises(UnsupportedSetupError, match="stage 3.*ZeRO-2"):
        attach_deepspeed(_engine(model, zero, stage=3), sub, cfg)
    bf16 = type("BF16_Optimizer", (), {})()
    with pytest.raises(UnsupportedSetupError, match="BF16_Optimizer.*ZeRO stage 2"):
        attach_deepspeed(_engine(model, bf16, stage=1), sub, cfg)
    _, gsub = _model_and_subspace(scope="global")
    two = OneRankZero([ps[:2], ps[2:]], lambda g: torch.optim.AdamW(g))
    with pytest.raises(UnsupportedSetupError, match="scope='global'.*ONE"):
        attach_deepspeed(_engine(model, two), gsub, ogpsa.OGPSAConfig(space="update", allow_partial=True, scope="global"))
    one = OneRankZero([ps], lambda g: torch.optim.AdamW(g))  # (re)maps the parameters into one partition
    assert isinstance(attach_deepspeed(_engine(model, one), sub, cfg), ZeroUpdateProjector)


def test_zero_update_projector_surface():
    """What OGPSA sessions and trainers call: clipping is DeepSpeed's; remove() unhooks."""
    model, sub = _model_and_subspace()
    zero = OneRankZero([list(model.parameters())], lambda g: torch.optim.AdamW(g))
    with pytest.raises(UnsupportedSetupError, match="gradient_clipping"):  # rejected at attach, never ignored
        attach_deepspeed(_engine(model, zero), sub, ogpsa.OGPSAConfig(space="update", allow_partial=True, max_norm=1.0))
    proj = attach_deepspeed(_engine(model, zero), sub, ogpsa.OGPSAConfig(space="update", allow_partial=True))
    assert proj.config.max_norm is None and proj.subspace is sub
    with pytest.raises(RuntimeError, match="gradient_clipping"):
        proj.clip_grad_norm_(1.0)
    with pytest.raises(ValueError, match="gradient_clipping"):
        proj.project(max_norm=1.0)
    assert proj.project() is None
    with proj.paused():
        assert proj.is_paused  # a property, as on every projector
    assert not proj.is_paused
    with pytest.raises(ValueError, match="engine's own optimizer"):
        engine_cls = type("DeepSpeedEngine", (), {"__module__": "deepspeed.runtime.engine",
                                                  "zero_optimization_stage": lambda self: 2})
        engine = engine_cls()
        engine.module, engine.optimizer = model, zero
        ogpsa.attach(engine, torch.optim.AdamW(model.parameters()), sub, ogpsa.OGPSAConfig(space="update", allow_partial=True))
    proj.remove()
    assert not zero.optimizer._optimizer_step_pre_hooks and not zero.optimizer._optimizer_step_post_hooks
