"""Two-process (gloo, 127.0.0.1) checks of update-space projection (ProjectedAdamW and
``attach(space="update")``) under FSDP2 and DDP.

Run by tests/test_adamw_distributed.py as ``python tests/adamw_dist_worker.py OUTDIR``: one
spawn of 2 ranks runs every scenario; each rank also computes the single-process float32 run
(whole batch, ProjectedAdamW) and a float64 oracle itself and writes
``OUTDIR/<scenario>.rank<r>.json`` with per-step relative errors, orthogonality residuals and
collective counts. Scenarios:

* ``fsdp_tensor``: FSDP2 tiny language model (uneven shards), ProjectedAdamW, per-tensor scope,
  weight decay projected, 3 steps.
* ``fsdp_global``: FSDP2, ``ogpsa.attach(space="update", scope="global")`` on a torch AdamW,
  raw gradients clipped with the projector's ``clip_grad_norm_``, 3 steps.
* ``fsdp_empty_shard``: a parameter with one row (rank 1 holds an empty shard), ProjectedAdamW.
* ``ddp``: DistributedDataParallel + ProjectedAdamW (nothing special: the averaged gradient).
* ``errors``: FSDP1, a replicated DTensor parameter, a sharded subspace cut for another layout.
* ``deepspeed``: the real DeepSpeed ZeRO-2 engine (only where deepspeed is importable; launched
  alone): every way into update space raises UnsupportedSetupError.
"""

from __future__ import annotations

import math
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from dist_rank import run_scenarios

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dist_worker import WORLD, CollectiveCounter, _full, free_port, rel  # noqa: E402  (shared helpers)

STEPS = 3
LR, EPS, WD = 1e-2, 1e-8, 0.1
VOCAB, HIDDEN, INTER = 37, 24, 45  # 37 and 45 rows do not split evenly over 2 ranks
SEQ, PER_RANK = 9, 2


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = torch.nn.RMSNorm(HIDDEN, eps=1e-6)
        self.up = torch.nn.Linear(HIDDEN, INTER)
        self.down = torch.nn.Linear(INTER, HIDDEN)

    def forward(self, x):
        return x + self.down(torch.nn.functional.silu(self.up(self.norm(x))))


class TinyLM(torch.nn.Module):
    """A small pre-norm language model in plain torch (importing a transformers model costs ~7 s
    of CPU per rank): embedding, 2 MLP blocks, RMSNorm, untied head; uneven shapes."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, HIDDEN)
        self.layers = torch.nn.ModuleList([Block() for _ in range(2)])
        self.norm = torch.nn.RMSNorm(HIDDEN, eps=1e-6)
        self.head = torch.nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


def tiny_lm(seed: int = 0) -> TinyLM:
    torch.manual_seed(seed)
    model = TinyLM()
    with torch.no_grad():  # norms start at exactly 1; perturb so every tensor has a generic gradient
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    return model


def batch(seed: int, rows: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (rows, SEQ), generator=g)


def loss_of(model, ids):
    """Next-token cross-entropy."""
    logits = model(ids[:, :-1])
    return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))


def rank_batch(rank: int, step: int) -> torch.Tensor:
    return batch(1000 * step + rank, PER_RANK)


def single_subspace(config):
    """The subspace from 2 reference gradients (whole reference batches, one process)."""
    import ogpsa

    model = tiny_lm()
    refs = []
    for j in range(2):
        model.zero_grad(set_to_none=True)
        loss_of(model, batch(50 + j, 2 * WORLD)).backward()
        refs.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
    return ogpsa.Subspace.from_gradients(refs, config)


def _fsdp_model():
    from torch.distributed.fsdp import fully_shard

    model = tiny_lm()
    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def full_loss(model, step):
    """The single-process loss: the mean of the ranks' losses (what FSDP2 / DDP average)."""
    return sum(loss_of(model, rank_batch(r, step)) for r in range(WORLD)) / WORLD


def clip_coef(grads, max_norm):
    total = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))
    return min(1.0, max_norm / (total + 1e-6)), total


def float64_adamw(subspace, scope, *, wd, project_wd, max_norm=None, make=tiny_lm, loss=full_loss):
    """Independent float64 projected AdamW on the float64 model (full batch), projecting onto the
    subspace's float32 bases upcast. Returns per step {name: update} and the removed fraction."""
    model = make().double()
    named = dict(model.named_parameters())
    bases = {n: subspace.basis(n).double() for n in subspace.names}
    m = {n: torch.zeros_like(p) for n, p in named.items()}
    v = {n: torch.zeros_like(p) for n, p in named.items()}
    b1, b2 = 0.9, 0.999
    updates, fractions = [], []
    for s in range(1, STEPS + 1):
        model.zero_grad(set_to_none=True)
        loss(model, s - 1).backward()
        coef = clip_coef([p.grad for p in named.values()], max_norm)[0] if max_norm else 1.0
        d = {}
        for n, p in named.items():
            g = p.grad * coef
            m[n] = b1 * m[n] + (1 - b1) * g
            v[n] = b2 * v[n] + (1 - b2) * g * g
            d[n] = ((m[n] / (1 - b1 ** s)) / ((v[n] / (1 - b2 ** s)).sqrt() + EPS)).reshape(-1)
            if project_wd:
                d[n] = d[n] + wd * p.detach().reshape(-1)
        before = sum(float(d[n].dot(d[n])) for n in bases)
        if scope == "tensor":
            new = {n: d[n] - u.T @ torch.linalg.solve(u @ u.T, u @ d[n]) for n, u in bases.items()}
        else:
            c = sum(u @ d[n] for n, u in bases.items())
            w = torch.linalg.solve(sum(u @ u.T for u in bases.values()), c)
            new = {n: d[n] - u.T @ w for n, u in bases.items()}
        fractions.append(sum(float((d[n] - new[n]).pow(2).sum()) for n in bases) / before)
        d.update(new)
        step = {}
        with torch.no_grad():
            for n, p in named.items():
                q = p if project_wd else p * (1 - LR * wd)
                after = q - LR * d[n].view_as(p)
                step[n] = after - p
                p.copy_(after)
        updates.append(step)
    return updates, fractions


def single_adamw(subspace, config, *, wd, project_wd, max_norm=None, make=tiny_lm, loss=full_loss):
    """Single-process float32 ProjectedAdamW on the whole batch: per-step updates, removed fractions."""
    from ogpsa.optim import ProjectedAdamW

    model = make()
    opt = ProjectedAdamW(model, subspace, lr=LR, eps=EPS, weight_decay=wd, project_weight_decay=project_wd,
                         config=config)
    updates, fractions = [], []
    for s in range(STEPS):
        opt.zero_grad(set_to_none=True)
        loss(model, s).backward()
        if max_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.step()
        updates.append({n: p.detach() - before[n] for n, p in model.named_parameters()})
        fractions.append(opt.last_removed_fraction)
    return updates, fractions


def full_direction(p, local_d):
    """The whole direction from each rank's flattened local shard (collective)."""
    from torch.distributed.tensor import DTensor

    local = local_d.view(p.to_local().shape)
    return DTensor.from_local(local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()).full_tensor()


def residuals(subspace, scope, delta):
    """Relative residual ||U d|| / ||d|| (float64) over the full basis: per tensor (max), or of
    the whole-model subspace (global)."""
    if scope == "tensor":
        return max(float((subspace.basis(n).double() @ delta[n].double().reshape(-1)).norm()
                         / delta[n].double().norm()) for n in subspace.names)
    c = sum(subspace.basis(n).double() @ delta[n].double().reshape(-1) for n in subspace.names)
    return float(c.norm() / math.sqrt(sum(float(delta[n].double().pow(2).sum()) for n in subspace.names)))


def rounding_bound(subspace, scope, after, delta):
    """What rounding p - lr d to float32 alone can add to the residual of the parameter change
    (|error| <= eps32/2 (|p_new| + |lr d|) per element, and ||U r|| <= ||r|| for orthonormal rows)."""
    eps32 = torch.finfo(torch.float32).eps
    names = subspace.names
    if scope == "tensor":
        return max(eps32 * float(after[n].double().norm() + delta[n].double().norm())
                   / float(delta[n].double().norm()) for n in names)
    num = sum(float(after[n].double().norm() + delta[n].double().norm()) for n in names)
    return eps32 * num / math.sqrt(sum(float(delta[n].double().pow(2).sum()) for n in names))


def fsdp_run(rank, model, opt, subspace, scope, *, engine=None, max_norm=None, clip=None, loss=None):
    """Train the FSDP2 ``model`` STEPS steps; record per-step full updates, the full applied
    directions' and parameter changes' residuals, collectives inside ``opt.step()``."""
    loss = loss or (lambda mdl, s: loss_of(mdl, rank_batch(rank, s)))
    engine = engine or opt
    engine.keep_updates = True
    named = dict(model.named_parameters())
    out = {"updates": [], "collectives": [], "d_residual": [], "p_residual": [], "p_bound": [], "fractions": [],
           "clip_collectives": []}
    for s in range(STEPS):
        opt.zero_grad(set_to_none=True)
        loss(model, s).backward()
        if max_norm:
            with CollectiveCounter() as cc:
                clip(max_norm)
            out["clip_collectives"].append(cc.ops)
        before = _full(named)
        with CollectiveCounter() as cc:
            opt.step()
        out["collectives"].append(cc.ops)
        after = _full(named)
        delta = {n: after[n] - before[n] for n in after}
        d = {n: full_direction(p, engine.last_updates[p]) for n, p in named.items() if n in subspace.names}
        out["updates"].append(delta)
        out["d_residual"].append(residuals(subspace, scope, d))
        out["p_residual"].append(residuals(subspace, scope, delta))
        out["p_bound"].append(rounding_bound(subspace, scope, after, delta))
        out["fractions"].append(engine.last_removed_fraction)
    return out


def summarize(run, single, exact, single_fractions, exact_fractions):
    """Per-step relative errors (distributed and single-process vs float64) for the JSON."""
    res = {k: run[k] for k in ("collectives", "d_residual", "p_residual", "p_bound", "clip_collectives")}
    res["update_err"] = [rel(a, e) for a, e in zip(run["updates"], exact)]
    res["update_single_err"] = [rel(a, e) for a, e in zip(single, exact)]
    res["update_rel"] = [rel(a, b) for a, b in zip(run["updates"], single)]
    res["fraction"] = run["fractions"]
    res["fraction_single"] = single_fractions
    res["fraction_exact"] = exact_fractions
    return res


# ----------------------------------------------------------------------------------------


def scenario_fsdp_tensor(rank, out):
    import ogpsa
    from ogpsa.optim import ProjectedAdamW

    config = ogpsa.OGPSAConfig(space="update", allow_partial=True)
    sub = single_subspace(config)
    single, single_f = single_adamw(sub, config, wd=WD, project_wd=True)
    exact, exact_f = float64_adamw(sub, "tensor", wd=WD, project_wd=True)
    model = _fsdp_model()
    opt = ProjectedAdamW(model, sub, lr=LR, eps=EPS, weight_decay=WD, project_weight_decay=True, config=config)
    local = {n: tuple(p.to_local().shape) for n, p in model.named_parameters()}
    run = fsdp_run(rank, model, opt, sub, "tensor")
    # paused (as while reference gradients are collected): plain AdamW on the shards, no collective
    opt.paused = True
    opt.zero_grad(set_to_none=True)
    loss_of(model, rank_batch(rank, STEPS)).backward()
    before = [p.to_local().clone() for p in model.parameters()]
    with CollectiveCounter() as cc:
        opt.step()
    out["paused"] = dict(collectives=cc.ops, changed=all(not torch.equal(a, p.to_local())
                                                         for a, p in zip(before, model.parameters())
                                                         if a.numel()))
    out.update(summarize(run, single, exact, single_f, exact_f), local_shapes=local,
               state_is_dtensor=all(type(st["exp_avg"]).__name__ == "DTensor" for st in opt.state.values()))


def scenario_fsdp_global(rank, out):
    import ogpsa

    config = ogpsa.OGPSAConfig(space="update", allow_partial=True, scope="global", rank=2)
    sub = single_subspace(config)
    max_norm = 0.3
    single, single_f = single_adamw(sub, config, wd=0.0, project_wd=False, max_norm=max_norm)
    exact, exact_f = float64_adamw(sub, "global", wd=0.0, project_wd=False, max_norm=max_norm)
    model = _fsdp_model()
    adamw = torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS, weight_decay=0.0)
    proj = ogpsa.attach(model, adamw, sub, config)
    run = fsdp_run(rank, model, adamw, sub, "global", engine=proj.engine, max_norm=max_norm,
                   clip=proj.clip_grad_norm_)
    # the float64 run's first gradient norm, to show that clipping was active
    ref = tiny_lm().double()
    full_loss(ref, 0).backward()
    out.update(summarize(run, single, exact, single_f, exact_f), type=type(proj).__name__,
               first_norm=clip_coef([p.grad for p in ref.parameters()], max_norm)[1], max_norm=max_norm,
               state_keys=sorted({k for st in adamw.state.values() for k in st}))


class Toy(torch.nn.Module):
    """A parameter with one row (rank 1 holds an empty shard) and an odd-sized one."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.a = torch.nn.Parameter(torch.randn(1, 7))
        self.b = torch.nn.Parameter(torch.randn(5, 7) / 3)

    def forward(self, x):
        return torch.tanh(x * self.a) @ self.b.T


def toy_batch(rank, step):
    g = torch.Generator().manual_seed(700 + 10 * step + rank)
    return torch.randn(4, 7, generator=g), torch.randn(4, 5, generator=g)


def toy_loss(model, x, y):
    return (model(x.to(next(model.parameters()).dtype)) - y.to(next(model.parameters()).dtype)).pow(2).mean()


def toy_full_loss(model, step):
    return sum(toy_loss(model, *toy_batch(r, step)) for r in range(WORLD)) / WORLD


def scenario_fsdp_empty_shard(rank, out):
    from torch.distributed.fsdp import fully_shard

    import ogpsa
    from ogpsa.optim import ProjectedAdamW

    config = ogpsa.OGPSAConfig(space="update", allow_partial=True)
    gen = torch.Generator().manual_seed(9)
    refs = [{"a": torch.randn(1, 7, generator=gen), "b": torch.randn(5, 7, generator=gen)} for _ in range(2)]
    sub = ogpsa.Subspace.from_gradients(refs, config)
    single, single_f = single_adamw(sub, config, wd=WD, project_wd=True, make=Toy, loss=toy_full_loss)
    exact, exact_f = float64_adamw(sub, "tensor", wd=WD, project_wd=True, make=Toy, loss=toy_full_loss)
    model = Toy()
    fully_shard(model)
    opt = ProjectedAdamW(model, sub, lr=LR, eps=EPS, weight_decay=WD, project_weight_decay=True, config=config)
    run = fsdp_run(rank, model, opt, sub, "tensor", loss=lambda mdl, s: toy_loss(mdl, *toy_batch(rank, s)))
    out.update(summarize(run, single, exact, single_f, exact_f),
               local_shapes={n: tuple(p.to_local().shape) for n, p in model.named_parameters()})


def scenario_ddp(rank, out):
    from torch.nn.parallel import DistributedDataParallel as DDP

    import ogpsa
    from ogpsa.optim import ProjectedAdamW

    config = ogpsa.OGPSAConfig(space="update", allow_partial=True)
    sub = single_subspace(config)
    single, single_f = single_adamw(sub, config, wd=WD, project_wd=True)
    exact, exact_f = float64_adamw(sub, "tensor", wd=WD, project_wd=True)
    model = tiny_lm()
    ddp = DDP(model)
    opt = ProjectedAdamW(model, sub, lr=LR, eps=EPS, weight_decay=WD, project_weight_decay=True, config=config,
                         keep_updates=True)
    named = dict(model.named_parameters())
    updates, collectives, d_res, fractions = [], [], [], []
    for s in range(STEPS):
        opt.zero_grad(set_to_none=True)
        loss_of(ddp, rank_batch(rank, s)).backward()
        before = {n: p.detach().clone() for n, p in named.items()}
        with CollectiveCounter() as cc:
            opt.step()
        collectives.append(cc.ops)
        updates.append({n: p.detach() - before[n] for n, p in named.items()})
        d_res.append(residuals(sub, "tensor", {n: opt.last_updates[named[n]] for n in sub.names}))
        fractions.append(opt.last_removed_fraction)
    flat = torch.cat([p.detach().reshape(-1) for p in named.values()])
    other = flat.clone()
    dist.broadcast(other, src=0)
    run = {"updates": updates, "collectives": collectives, "d_residual": d_res, "p_residual": [], "p_bound": [],
           "fractions": fractions, "clip_collectives": []}
    out.update(summarize(run, single, exact, single_f, exact_f), ranks_identical=bool(torch.equal(flat, other)))


def scenario_errors(rank, out):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1
    from torch.distributed.tensor import Replicate, distribute_tensor

    import ogpsa
    from ogpsa.distributed import ShardedSubspace, fsdp_layout
    from ogpsa.optim import ProjectedAdamW

    config = ogpsa.OGPSAConfig(space="update", allow_partial=True)
    found = {}

    def expect(key, fn):
        try:
            fn()
            found[key] = "no error"
        except Exception as e:  # the test asserts on type and message
            found[key] = f"{type(e).__name__}: {e}"

    sub = single_subspace(config)
    fsdp1 = FSDP1(tiny_lm(), device_id=torch.device("cpu"))
    expect("fsdp1_attach", lambda: ogpsa.attach(fsdp1, torch.optim.AdamW(fsdp1.parameters()), sub, config))
    expect("fsdp1_projected", lambda: ProjectedAdamW(fsdp1, sub))
    mesh = init_device_mesh("cpu", (WORLD,))
    rep = torch.nn.Linear(4, 3)
    rep.weight = torch.nn.Parameter(distribute_tensor(rep.weight.detach(), mesh, [Replicate()]))
    rep.bias = torch.nn.Parameter(distribute_tensor(rep.bias.detach(), mesh, [Replicate()]))
    rsub = ogpsa.Subspace.from_gradients([{n: torch.randn(p.shape) for n, p in rep.named_parameters()}], config)
    expect("replicated", lambda: ProjectedAdamW(rep, rsub))
    model = _fsdp_model()
    slices, group = fsdp_layout(model)
    name = "embed.weight"
    wrong = dict(slices)
    wrong[name] = type(slices[name])(slices[name].shape, "dim", 0, 0, slices[name].shape[0])  # rank 0's full rows
    expect("other_layout", lambda: ProjectedAdamW(model, ShardedSubspace.from_subspace(sub, wrong, group)))
    # a ShardedSubspace cut for this very layout is accepted and used as is
    sharded = ShardedSubspace.from_subspace(sub, slices, group)
    opt = ProjectedAdamW(model, sharded, config=config)
    out["sharded_ok"] = all(torch.equal(opt._bases[p][1], sharded.basis(n))
                            for n, p in model.named_parameters())
    out.update(found)


def scenario_deepspeed(rank, out):
    """The real DeepSpeed ZeRO-2 engine: update space attaches through the engine; the ZeRO optimizer
    alone (without its engine) and a ProjectedAdamW stepped by ZeRO without attach are refused."""
    import deepspeed

    import ogpsa
    from ogpsa.distributed import attach_deepspeed
    from ogpsa.optim import ProjectedAdamW

    config = ogpsa.OGPSAConfig(space="update", allow_partial=True)
    sub = single_subspace(config)
    ds_config = {"train_micro_batch_size_per_gpu": PER_RANK, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True}

    def expect(key, fn):
        try:
            fn()
            out[key] = "no error"
        except Exception as e:  # the test asserts on type and message
            out[key] = f"{type(e).__name__}: {e}"

    model = tiny_lm()
    engine, zero, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=LR),
                                              config=ds_config)
    # through the engine: supported (tests/test_adamw_zero.py checks the steps); detached again at once
    expect("attach_engine", lambda: ogpsa.attach(engine, zero, sub, config).remove())
    expect("attach_zero_optimizer", lambda: ogpsa.attach(engine.module, engine.optimizer, sub, config))
    expect("attach_deepspeed", lambda: attach_deepspeed(engine, sub, config).remove())

    def wrapped():  # ZeRO steps the wrapped optimizer at initialize (state allocation) or at the first step
        m2 = tiny_lm()
        eng, *_ = deepspeed.initialize(model=m2, optimizer=ProjectedAdamW(m2, sub, lr=LR), config=ds_config)
        eng.backward(loss_of(eng, rank_batch(rank, 0)))
        eng.step()

    expect("projected_adamw", wrapped)


SCENARIOS = {"fsdp_tensor": scenario_fsdp_tensor, "fsdp_global": scenario_fsdp_global,
             "fsdp_empty_shard": scenario_fsdp_empty_shard, "ddp": scenario_ddp, "errors": scenario_errors,
             "deepspeed": scenario_deepspeed}


def run(rank, port, outdir, names):
    run_scenarios(rank, port, outdir, names, SCENARIOS, WORLD)


if __name__ == "__main__":
    outdir = sys.argv[1]
    names = sys.argv[2].split(",") if len(sys.argv) > 2 else [n for n in SCENARIOS if n != "deepspeed"]
    mp.spawn(run, args=(free_port(), outdir, names), nprocs=WORLD)
