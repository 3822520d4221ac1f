"""Two-process (gloo, 127.0.0.1) checks of update-space projection under DeepSpeed ZeRO-1/2.

Run by tests/test_adamw_zero.py as ``python tests/adamw_zero_worker.py OUTDIR SCENARIO[,SCENARIO]``;
spawns 2 ranks; every rank also computes the single-process float32 ProjectedAdamW run (whole
batch) and a float64 oracle itself (tests/adamw_dist_worker.py: ``single_adamw``,
``float64_adamw``) and writes ``OUTDIR/<scenario>.rank<r>.json``. Scenarios:

* ``zero_tensor``: the emulated ZeRO-2 engine of tests/dist_worker.py (its partition layout and
  gradient reduction) with a torch AdamW stepping the flat fp32 partition as DeepSpeed's
  stage_1_and_2 does; ``ogpsa.attach(engine, None, ...)``, per-tensor scope, 3 steps; then a
  paused step and ``remove()``.
* ``zero_global``: the same engine around a ProjectedAdamW (project_weight_decay=True, weight
  decay), ``attach_deepspeed``, global scope, one parameter without a basis.
* ``deepspeed``: the real DeepSpeed ZeRO-2 engine on the CPU (only where deepspeed is importable;
  launched alone): 2 param groups, 3 steps, then a checkpoint saved and loaded into a second
  engine, both stepped once more.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from dist_rank import run_scenarios

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from adamw_dist_worker import (  # noqa: E402  (shared helpers)
    EPS,
    LR,
    PER_RANK,
    STEPS,
    WD,
    batch,
    float64_adamw,
    loss_of,
    rank_batch,
    residuals,
    rounding_bound,
    single_adamw,
    tiny_lm,
)
from dist_worker import WORLD, CollectiveCounter, FakeEngine, FakeZeroOptimizer, free_port, rel  # noqa: E402


class FakeZeroAdamW(FakeZeroOptimizer):
    """The emulated ZeRO-2 optimizer (tests/dist_worker.py) with DeepSpeed's optimizer side: one
    flat fp32 partition per rank (``single_partition_of_fp32_groups``), a torch optimizer on it
    (``optimizer``), stepped one param group at a time with the flat reduced gradient as
    ``.grad`` (stage_1_and_2.py ``step`` / ``_optimizer_step``), then the parameters gathered."""

    def __init__(self, params, rank, make_optimizer):
        super().__init__(params, lr=0.0, rank=rank)
        self.bit16_groups = [self.params]
        flat = torch.zeros(self.partition_size[0])
        for p, start, n in self.ranges:
            hp = p._hp_mapping.hp_fragment_address
            flat[hp.start:hp.start + n] = p.detach().reshape(-1)[start:start + n]
        flat.requires_grad_(True)
        self.single_partition_of_fp32_groups = [flat]
        self.optimizer = make_optimizer([flat])
        self.inner_collectives = []  # c10d ops inside each inner optimizer step

    def _optimizer_step(self, gi):
        original = self.optimizer.param_groups
        self.optimizer.param_groups = [original[gi]]
        with CollectiveCounter() as cc:
            self.optimizer.step()
        self.inner_collectives.append(cc.ops)
        self.optimizer.param_groups = original

    def step(self):
        flat = self.single_partition_of_fp32_groups[0]
        flat.grad = torch.cat([g.reshape(-1) for g in self.averaged_gradients[0]])
        self.averaged_gradients[0] = None
        self._optimizer_step(0)
        flat.grad = None
        with torch.no_grad():  # all-gather the updated partitions into the parameters
            for p in self.params:
                mine = torch.zeros(p.numel())
                for q, start, n in self.ranges:
                    if q is p:
                        hp = q._hp_mapping.hp_fragment_address
                        mine[start:start + n] = flat.detach()[hp.start:hp.start + n]
                dist.all_reduce(mine)
                p.copy_(mine.view_as(p))


class DeepSpeedLikeEngine(FakeEngine):
    """The emulated engine under a DeepSpeed module name (how ogpsa recognises an engine)."""

    __module__ = "deepspeed.runtime.engine"


def subspace_of(config, skip=()):
    """The subspace of tests/adamw_dist_worker.single_subspace, without the parameters in ``skip``."""
    import ogpsa

    model = tiny_lm()
    refs = []
    for j in range(2):
        model.zero_grad(set_to_none=True)
        loss_of(model, batch(50 + j, 2 * WORLD)).backward()
        refs.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if n not in skip})
    return ogpsa.Subspace.from_gradients(refs, config)


def train(rank, model, proj, sub, scope, step_fn, zopt=None):
    """STEPS steps; per step the parameter change, its residual against the full basis (with
    the float32 rounding bound), the removed fraction and the inner step's collectives."""
    named = dict(model.named_parameters())
    run = {"updates": [], "p_residual": [], "p_bound": [], "fractions": []}
    for s in range(STEPS):
        before = {n: p.detach().clone() for n, p in named.items()}
        step_fn(s)
        after = {n: p.detach().clone() for n, p in named.items()}
        delta = {n: after[n] - before[n] for n in named}
        run["updates"].append(delta)
        run["p_residual"].append(residuals(sub, scope, delta))
        run["p_bound"].append(rounding_bound(sub, scope, after, delta))
        run["fractions"].append(proj.last_stats.removed_fraction)
    return run


def summarize(run, single, exact, single_f, exact_f):
    return {"update_err": [rel(a, e) for a, e in zip(run["updates"], exact)],
            "update_single_err": [rel(a, e) for a, e in zip(single, exact)],
            "update_rel": [rel(a, b) for a, b in zip(run["updates"], single)],
            "p_residual": run["p_residual"], "p_bound": run["p_bound"], "fraction": run["fractions"],
            "fraction_single": single_f, "fraction_exact": exact_f}


def emulated(rank, make_optimizer):
    model = tiny_lm()
    zopt = FakeZeroAdamW(model.parameters(), rank, make_optimizer)
    engine = DeepSpeedLikeEngine(model, zopt)

    def step(s):
        loss_of(model, rank_batch(rank, s)).backward()
        zopt.reduce()
        engine.step()

    split = [n for n, p in model.named_parameters() if 0 < sum(k for q, _, k in zopt.ranges if q is p) < p.numel()]
    return model, zopt, engine, step, split


def state_layout(opt):
    """The inner optimizer's state as a checkpoint sees it: keys, shapes, dtypes, step."""
    st = opt.state_dict()["state"]
    return {str(i): {k: [list(v.shape), str(v.dtype)] + ([float(v)] if k == "step" else [])
                     for k, v in sorted(s.items())} for i, s in st.items()}


# ----------------------------------------------------------------------------------------


def scenario_zero_tensor(rank, out):
    import ogpsa

    config = ogpsa.OGPSAConfig(space="update", allow_partial=True)
    sub = subspace_of(config)
    single, single_f = single_adamw(sub, config, wd=0.0, project_wd=False)
    exact, exact_f = float64_adamw(sub, "tensor", wd=0.0, project_wd=False)
    model, zopt, engine, step, split = emulated(
        rank, lambda ps: torch.optim.AdamW(ps, lr=LR, eps=EPS, weight_decay=0.0))
    proj = ogpsa.attach(engine, None, sub, config)
    run = train(rank, model, proj, sub, "tensor", step)
    out.update(summarize(run, single, exact, single_f, exact_f), type=type(proj).__name__,
               collectives=list(zopt.inner_collectives), split_params=split,
               pieces={n: sum(k for q, _, k in zopt.ranges if q is p) for n, p in model.named_parameters()},
               layout=state_layout(zopt.optimizer), partition=zopt.partition_size[0],
               num_projections=proj.num_projections)
    # paused (reference collection): plain AdamW on the partition, no collective
    zopt.inner_collectives.clear()
    before = [p.detach().clone() for p in model.parameters()]
    with proj.paused():
        step(STEPS)
    out["paused"] = {"collectives": zopt.inner_collectives[-1],
                     "changed": all(not torch.equal(a, p) for a, p in zip(before, model.parameters())),
                     "num_projections": proj.num_projections}
    proj.remove()
    step(STEPS + 1)
    out["removed"] = {"collectives": zopt.inner_collectives[-1], "num_projections": proj.num_projections,
                      "step": float(zopt.optimizer.state[zopt.single_partition_of_fp32_groups[0]]["step"])}


def scenario_zero_global(rank, out):
    import ogpsa
    from ogpsa.distributed import attach_deepspeed
    from ogpsa.optim import ProjectedAdamW

    config = ogpsa.OGPSAConfig(space="update", allow_partial=True, scope="global", rank=2)
    skip = "layers.0.norm.weight"
    sub = subspace_of(config, skip=(skip,))
    single, single_f = single_adamw(sub, config, wd=WD, project_wd=True)
    exact, exact_f = float64_adamw(sub, "global", wd=WD, project_wd=True)
    model, zopt, engine, step, split = emulated(
        rank, lambda ps: ProjectedAdamW(ps, lr=LR, eps=EPS, weight_decay=WD, project_weight_decay=True))
    proj = attach_deepspeed(engine, sub, config)
    run = train(rank, model, proj, sub, "global", step)
    out.update(summarize(run, single, exact, single_f, exact_f), type=type(proj).__name__,
               collectives=list(zopt.inner_collectives), split_params=split, skipped=skip,
               layout=state_layout(zopt.optimizer))


def scenario_deepspeed(rank, out, tmp):
    import deepspeed

    import ogpsa

    config = ogpsa.OGPSAConfig(space="update", allow_partial=True)
    sub = subspace_of(config)
    single, single_f = single_adamw(sub, config, wd=0.0, project_wd=False)
    exact, exact_f = float64_adamw(sub, "tensor", wd=0.0, project_wd=False)
    ds_config = {"train_micro_batch_size_per_gpu": PER_RANK, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": 2, "reduce_bucket_size": 500, "allgather_bucket_size": 500},
                 "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0}

    def make():
        model = tiny_lm()
        norms = [p for n, p in model.named_parameters() if "norm" in n]
        rest = [p for n, p in model.named_parameters() if "norm" not in n]
        opt = torch.optim.AdamW([{"params": rest}, {"params": norms}], lr=LR, eps=EPS, weight_decay=0.0)
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
        return model, engine

    model, engine = make()
    zopt = engine.optimizer
    counts = []
    inner_step = zopt._optimizer_step

    def counted(gi):
        with CollectiveCounter() as cc:
            inner_step(gi)
        counts[-1].append(cc.ops)

    zopt._optimizer_step = counted
    proj = ogpsa.attach(engine, None, sub, config)

    def step(s):
        counts.append([])
        engine.backward(loss_of(engine, rank_batch(rank, s)))
        engine.step()

    run = train(rank, model, proj, sub, "tensor", step)
    split = [n for n, p in model.named_parameters() if getattr(p, "_hp_mapping", None) is not None
             and p._hp_mapping.lp_fragment_address.numel < p.numel()]
    out.update(summarize(run, single, exact, single_f, exact_f), type=type(proj).__name__,
               collectives=[list(c) for c in counts],
               split_params=split, groups=len(zopt.bit16_groups), layout=state_layout(zopt.optimizer))
    # DeepSpeed checkpoint: save, load into a second engine (attached too), one more step on each
    engine.save_checkpoint(tmp, tag="t")
    model2, engine2 = make()
    engine2.load_checkpoint(tmp, tag="t")
    proj2 = ogpsa.attach(engine2, None, sub, config)
    loaded = all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))
    for eng in (engine, engine2):
        eng.backward(loss_of(eng, rank_batch(rank, STEPS)))
        eng.step()
    out["checkpoint"] = {"loaded_equal": loaded, "layout2": state_layout(engine2.optimizer.optimizer),
                         "next_step_equal": all(torch.equal(a, b)
                                                for a, b in zip(model.parameters(), model2.parameters())),
                         "projections": [proj.num_projections, proj2.num_projections]}


SCENARIOS = {"zero_tensor": scenario_zero_tensor, "zero_global": scenario_zero_global,
             "deepspeed": scenario_deepspeed}


def run(rank, port, outdir, names):
    ckpt = os.path.join(outdir, "ckpt")
    scenarios = {**SCENARIOS, "deepspeed": lambda r, out: scenario_deepspeed(r, out, ckpt)}
    run_scenarios(rank, port, outdir, names, scenarios, WORLD)


if __name__ == "__main__":
    outdir, names = sys.argv[1], sys.argv[2].split(",")
    mp.spawn(run, args=(free_port(), outdir, names), nprocs=WORLD)
