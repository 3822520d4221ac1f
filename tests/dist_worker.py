"""Two-process (gloo, 127.0.0.1) checks of OGPSA under DDP, FSDP2 and DeepSpeed ZeRO-2.

Run by tests/test_distributed.py as ``python tests/dist_worker.py OUTDIR SCENARIO[,SCENARIO]``;
spawns 2 ranks; every rank also computes the single-process result itself (same seeds,
the whole batch in one process) and writes ``OUTDIR/<scenario>.rank<r>.json`` with the
relative errors and collective counts that the test asserts on. Scenarios:

* ``ddp``: DistributedDataParallel + ``ogpsa.attach`` (tensor scope, clipping).
* ``fsdp``: FSDP2 ``fully_shard``: tensor scope + ``clip_grad_norm_``, global scope +
  conflict mode + clipping in the step hook, sharded reference gradients -> sharded
  basis, sharded save/load round trips; collectives counted per projection.
* ``zero_fake``: the ZeRO-2 partition logic against an emulated engine (no DeepSpeed).
* ``deepspeed`` / ``deepspeed_stage1``: the real DeepSpeed ZeRO-2 / ZeRO-1 engine on the
  CPU (DeepSpeed's CPU accelerator, gloo; only if deepspeed is importable).
"""

from __future__ import annotations

import math
import os
import socket
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from dist_rank import run_scenarios

import ogpsa.config  # noqa: E402

ogpsa.config.DEFAULT_PRESET = "paper"  # these workers check the paper recipe (gradient space)

WORLD = 2
EPS32 = torch.finfo(torch.float32).eps
VOCAB, HIDDEN, INTER = 37, 24, 45  # 37 and 45 rows do not split evenly over 2 ranks
SEQ, PER_RANK = 9, 2


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                      tie_word_embeddings=False, attn_implementation="eager")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).float()
    with torch.no_grad():  # norms start at exactly 1; perturb so every tensor has a generic gradient
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    return model


def batch(seed: int, rows: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (rows, SEQ), generator=g)


def loss_of(model, ids):
    return model(input_ids=ids, labels=ids).loss


def rank_batch(rank: int, step: int) -> torch.Tensor:
    return batch(1000 * step + rank, PER_RANK)


def full_batch(step: int) -> torch.Tensor:
    return torch.cat([rank_batch(r, step) for r in range(WORLD)])


def reference_batch(j: int) -> torch.Tensor:
    return batch(50 + j, 2 * WORLD)


def single_subspace(config):
    import ogpsa

    model = tiny_llama()
    refs = []
    for j in range(2):
        model.zero_grad(set_to_none=True)
        loss_of(model, reference_batch(j)).backward()
        refs.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
    return ogpsa.Subspace.from_gradients(refs, config)


def rel(a: dict, b: dict) -> float:
    num = sum(float((a[n].double() - b[n].double()).pow(2).sum()) for n in b)
    den = sum(float(b[n].double().pow(2).sum()) for n in b)
    return math.sqrt(num / den)


def single_run(subspace, config, step_fn="hook", max_norm=None, lr=0.1):
    """Single-process reference: whole batch, projection on, one SGD step.
    Returns (projected grads, parameter updates)."""
    import ogpsa

    model = tiny_llama()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    proj = ogpsa.attach(model, opt, subspace, config)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    (sum(loss_of(model, rank_batch(r, 0)) for r in range(WORLD)) / WORLD).backward()
    if step_fn == "clip":
        proj.clip_grad_norm_(max_norm)
    grads = {}
    opt.register_step_pre_hook(lambda *a: grads.update({n: p.grad.detach().clone()
                                                       for n, p in model.named_parameters()}))
    opt.step()
    return grads, {n: p.detach() - before[n] for n, p in model.named_parameters()}, proj.last_stats


def float64_run(subspace, config, max_norm=None, lr=0.1, bases=None):
    """The float64 oracle of :func:`single_run`: the float64 model's whole-batch gradient,
    projected and clipped by ``oracle.float64_project`` (NumPy, float64) onto ``bases``
    (default: the subspace's float32 bases, upcast), one SGD step computed exactly
    (update = -lr * g). Returns (grads, updates, total_norm, removed_fraction)."""
    import numpy as np
    from oracle import float64_project

    model = tiny_llama().double()
    (sum(loss_of(model, rank_batch(r, 0)) for r in range(WORLD)) / WORLD).backward()
    named = dict(model.named_parameters())
    names = list(subspace.names)
    grads = [named[n].grad for n in names]
    bases = bases if bases is not None else [subspace.basis(n) for n in names]
    kw = dict(mode=config.mode, scope=config.scope, aligned_scale=config.aligned_scale)
    raw, total = float64_project(grads, bases, max_norm=None, **kw)
    coef = 1.0 if max_norm is None else min(1.0, max_norm / (total + 1e-6))
    removed = sum(float(((g.numpy().reshape(-1) - o) ** 2).sum()) for g, o in zip(grads, raw))
    before = sum(float((g.numpy() ** 2).sum()) for g in grads)
    out = {n: torch.from_numpy(np.ascontiguousarray(o * coef)).view_as(named[n]) for n, o in zip(names, raw)}
    return out, {n: -lr * g for n, g in out.items()}, total, removed / before


def float64_bases(config, names) -> dict:
    """The float64 oracle of :func:`single_subspace`: bases built in float64 (``ogpsa.reference``)
    from the float64 model's reference gradients."""
    from ogpsa import reference

    model = tiny_llama().double()
    rows = {n: [] for n in names}
    for j in range(2):
        model.zero_grad(set_to_none=True)
        loss_of(model, reference_batch(j)).backward()
        for n, p in model.named_parameters():
            rows[n].append(p.grad.detach().reshape(-1).clone())
    bases = reference.build_bases([torch.stack(rows[n]) for n in names], scope=config.scope, method=config.method,
                                  rank=config.rank, energy=config.energy, normalize=config.normalize_reference,
                                  rank_tol=config.rank_tol, dtype=torch.float64)
    return dict(zip(names, bases))


def errors(name: str, got: dict, single: dict, exact: dict) -> dict:
    """Relative errors of the distributed (``got``) and the single-process float32 result
    against the float64 oracle, and between the two float32 results (for the record)."""
    return {f"{name}_rel": rel(got, single), f"{name}_err": rel(got, exact), f"{name}_single_err": rel(single, exact)}


def norm_errors(name: str, got: float, single: float, exact: float) -> dict:
    return {f"{name}_err": abs(got / exact - 1), f"{name}_single_err": abs(single / exact - 1)}


class CollectiveCounter:
    """Counts the process-group collectives (c10d ops, incl. DTensor's functional ones) run
    inside the block, via the profiler."""

    def __enter__(self):
        from torch.profiler import ProfilerActivity, profile

        self.prof = profile(activities=[ProfilerActivity.CPU])
        self.prof.__enter__()
        return self

    def __exit__(self, *exc):
        self.prof.__exit__(*exc)
        names = [e.name for e in self.prof.events()]
        self.ops = [n for n in names if n.startswith("c10d::") or n.startswith("_c10d_functional::")
                    or n.startswith("c10d_functional::")]
        return False


# ----------------------------------------------------------------------------------------


def scenario_ddp(rank, out):
    from torch.nn.parallel import DistributedDataParallel as DDP

    import ogpsa

    config = ogpsa.OGPSAConfig(max_norm=0.05)
    subspace = single_subspace(config)
    ref_grads, ref_upd, ref_stats = single_run(subspace, config)
    model = tiny_llama()
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    proj = ogpsa.attach(model, opt, subspace, config)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss_of(ddp, rank_batch(rank, 0)).backward()
    raw = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    grads = {}
    opt.register_step_pre_hook(lambda *a: grads.update({n: p.grad.detach().clone()
                                                       for n, p in model.named_parameters()}))
    opt.step()
    upd = {n: p.detach() - before[n] for n, p in model.named_parameters()}
    ex_grads, ex_upd, ex_total, _ = float64_run(subspace, config, config.max_norm)
    out.update(type=type(proj).__name__, clipped=float(proj.last_stats.clip_coef) < 0.99, changed=rel(raw, grads),
               **errors("grad", grads, ref_grads, ex_grads), **errors("update", upd, ref_upd, ex_upd),
               **norm_errors("total_norm", float(proj.last_stats.total_norm), float(ref_stats.total_norm), ex_total))


def _fsdp_model():
    from torch.distributed.fsdp import fully_shard

    model = tiny_llama()
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def _full(d):
    return {n: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone() for n, t in d.items()}


def _fsdp_step(rank, subspace, config, use_clip: bool, max_norm):
    import ogpsa

    model = _fsdp_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    proj = ogpsa.attach(model, opt, subspace, config)
    before = _full(dict(model.named_parameters()))
    loss_of(model, rank_batch(rank, 0)).backward()
    counts = {}
    if use_clip:
        with CollectiveCounter() as cc:
            proj.clip_grad_norm_(max_norm)
        counts["clip"] = cc.ops
    grads = {}

    def snapshot(*a):
        grads.update(_full({n: p.grad for n, p in model.named_parameters()}))

    opt.register_step_pre_hook(snapshot)
    if use_clip:
        opt.step()
    else:
        with CollectiveCounter() as cc:
            proj.project()  # the step hook then sees the step already projected
        counts["project"] = cc.ops
        opt.step()
    after = _full(dict(model.named_parameters()))
    return proj, {n: after[n] - before[n] for n in after}, grads, counts


def scenario_fsdp(rank, out, tmp):
    import ogpsa
    from ogpsa.distributed import ShardedSubspace, fsdp_layout, reference_gradients
    from ogpsa.subspace import gram64

    # 1. tensor scope, orthogonal, projection + clipping in one clip_grad_norm_ call
    config = ogpsa.OGPSAConfig(max_norm=None)
    subspace = single_subspace(config)
    ref_grads, ref_upd, ref_stats = single_run(subspace, config, step_fn="clip", max_norm=0.05)
    proj, upd, grads, counts = _fsdp_step(rank, subspace, config, True, 0.05)
    ex_grads, ex_upd, ex_total, _ = float64_run(subspace, config, 0.05)
    out["tensor"] = dict(type=type(proj).__name__, collectives=counts["clip"],
                         clipped=float(proj.last_stats.clip_coef) < 0.99,
                         **errors("grad", grads, ref_grads, ex_grads), **errors("update", upd, ref_upd, ex_upd),
                         **norm_errors("total_norm", float(proj.last_stats.total_norm), float(ref_stats.total_norm),
                                       ex_total))

    # 2. global scope, conflict mode, clipping from the config, via project() (then the step hook)
    gconfig = ogpsa.OGPSAConfig(scope="global", mode="conflict", max_norm=0.05, rank=2)
    gsub = single_subspace(gconfig)
    ref_grads, ref_upd, ref_stats = single_run(gsub, gconfig)
    proj, upd, grads, counts = _fsdp_step(rank, gsub, gconfig, False, None)
    ex_grads, ex_upd, _, ex_removed = float64_run(gsub, gconfig, gconfig.max_norm)
    out["global"] = dict(collectives=counts["project"], clipped=float(proj.last_stats.clip_coef) < 0.99,
                         removed_fraction=ex_removed,
                         **errors("grad", grads, ref_grads, ex_grads), **errors("update", upd, ref_upd, ex_upd),
                         **norm_errors("removed", proj.last_stats.removed_fraction, ref_stats.removed_fraction,
                                       ex_removed))

    # 3. sharded reference gradients -> sharded basis (each rank sees half the reference batch)
    model = _fsdp_model()
    half = reference_batch(0).shape[0] // WORLD
    refs = [reference_gradients(model, lambda j=j: loss_of(model, reference_batch(j)[rank * half:(rank + 1) * half])
                                .backward()) for j in range(2)]
    slices, group = fsdp_layout(model)
    sharded = ShardedSubspace.from_gradients(refs, slices, config, process_group=group)
    local_numel = sum(sl.numel for sl in sharded.slices)
    full_numel = sum(sl.full_numel for sl in sharded.slices)
    gathered = sharded.gather(dst=None)
    exact_bases = float64_bases(config, subspace.names)
    basis = errors("basis", {n: gathered.basis(n) for n in subspace.names},
                   {n: subspace.basis(n) for n in subspace.names}, exact_bases)
    # each stored M = U U^T against the float64 product of the gathered basis, in units of the
    # float32 accumulation bound (16 sqrt(N) eps32 + 2 eps32, as Subspace.load checks it)
    gram_bound_ratio = max(float((sharded.gram(n).double() - gram64(gathered.basis(n))).abs().max())
                           / (16 * math.sqrt(gathered.basis(n).shape[1]) * EPS32 + 2 * EPS32) for n in subspace.names)
    # a step with the directly built sharded basis equals the single-process one
    ref_grads, ref_upd, _ = single_run(subspace, config, step_fn="clip", max_norm=0.05)
    m2 = _fsdp_model()
    opt = torch.optim.SGD(m2.parameters(), lr=0.1)
    proj = ogpsa.attach(m2, opt, sharded, config)
    before = _full(dict(m2.named_parameters()))
    loss_of(m2, rank_batch(rank, 0)).backward()
    proj.clip_grad_norm_(0.05)
    opt.step()
    after = _full(dict(m2.named_parameters()))
    upd = {n: after[n] - before[n] for n in after}
    _, ex_upd, _, _ = float64_run(subspace, config, 0.05, bases=[exact_bases[n] for n in subspace.names])
    out["sharded_build"] = dict(**basis, gram_bound_ratio=gram_bound_ratio, **errors("update", upd, ref_upd, ex_upd),
                                local_fraction=local_numel / full_numel,
                                ranks_equal=gathered.ranks() == subspace.ranks())

    # 4. save/load round trips: sharded -> file -> single process, single-process file -> sharded
    path = os.path.join(tmp, "fsdp_saved.safetensors")
    sharded.save(path)
    loaded = ogpsa.Subspace.load(path)
    single_path = os.path.join(tmp, "single.safetensors")
    if rank == 0:
        subspace.save(single_path)
    dist.barrier()
    from_single = ShardedSubspace.load(single_path, model)
    regathered = from_single.gather(dst=None)
    out["roundtrip"] = dict(
        fsdp_file_equals_gather=loaded.equal(gathered),
        fsdp_file_grams_equal=all(torch.equal(a, b) for a, b in zip(loaded.grams, gathered.grams)),
        single_file_slices_equal=all(torch.equal(from_single.basis(n), slices[n].take_rows(subspace.basis(n)))
                                     for n in subspace.names),
        single_file_regathered_equal=regathered.equal(subspace),
        config_equal=loaded.config == config,
    )


# ----------------------------------------------------------------------------------------
# ZeRO-2 emulation: the layout DeepSpeed's stage_1_and_2 uses (one flat fp32 group padded to a
# multiple of the world size, split into equal contiguous partitions; every parameter exposes
# its piece through _hp_mapping.lp_fragment_address; averaged_gradients[g] is the list of pieces)
# ----------------------------------------------------------------------------------------


class FakeZeroOptimizer:
    def __init__(self, params, lr, rank):
        self.params = list(params)
        self.lr, self.rank = lr, rank
        total = sum(p.numel() for p in self.params)
        self.partition_size = [-(-total // WORLD)]
        lo, hi = rank * self.partition_size[0], (rank + 1) * self.partition_size[0]
        self.params_in_partition, self.first_offset, self.ranges = [[]], [0], []
        self.real_dp_process_group = [None]
        self.cpu_offload = False
        off = 0
        for p in self.params:
            a, b = max(lo, off), min(hi, off + p.numel())
            if a < b:
                if not self.params_in_partition[0]:
                    self.first_offset[0] = a - off
                self.params_in_partition[0].append(p)
                p._hp_mapping = SimpleNamespace(lp_fragment_address=SimpleNamespace(start=a - off, numel=b - a),
                                                hp_fragment_address=SimpleNamespace(start=a - lo, numel=b - a))
                self.ranges.append((p, a - off, b - a))
            off += p.numel()
        self.averaged_gradients = {}

    def reduce(self):  # what the engine's backward does: average, keep only this rank's partition
        flat = torch.cat([p.grad.reshape(-1) for p in self.params])
        dist.all_reduce(flat)
        flat /= WORLD
        part = torch.zeros(self.partition_size[0])
        pieces, pos = [], 0
        offsets = {id(p): o for p, o in zip(self.params, torch.tensor([0] + [p.numel() for p in self.params])
                                            .cumsum(0).tolist())}
        for p, start, n in self.ranges:
            part[pos:pos + n] = flat[offsets[id(p)] + start:offsets[id(p)] + start + n]
            pieces.append(part[pos:pos + n])
            pos += n
        if pos < part.numel():
            pieces.append(part[pos:])  # padding of the last partition
        self.averaged_gradients[0] = pieces
        self.partition = part
        for p in self.params:
            p.grad = None

    def step(self):  # SGD on this partition, then all-gather the parameters
        pieces = self.averaged_gradients[0]
        with torch.no_grad():
            for (p, start, n), g in zip(self.ranges, pieces):
                p.view(-1)[start:start + n] -= self.lr * g
            for p in self.params:
                mine = torch.zeros_like(p).view(-1)
                for q, start, n in self.ranges:
                    if q is p:
                        mine[start:start + n] = p.view(-1)[start:start + n]
                dist.all_reduce(mine)
                p.copy_(mine.view_as(p))
        self.averaged_gradients[0] = None


class FakeEngine:
    def __init__(self, module, optimizer):
        self.module, self.optimizer = module, optimizer

    def zero_optimization_stage(self):
        return 2

    def step(self):
        self.optimizer.step()


def scenario_zero_fake(rank, out):
    import ogpsa
    from ogpsa.distributed import attach_deepspeed

    config = ogpsa.OGPSAConfig(mode="orthogonal")
    subspace = single_subspace(config)
    ref_grads, ref_upd, _ = single_run(subspace, config)
    model = tiny_llama()
    engine = FakeEngine(model, FakeZeroOptimizer(model.parameters(), 0.1, rank))
    proj = attach_deepspeed(engine, subspace)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss_of(model, rank_batch(rank, 0)).backward()
    engine.optimizer.reduce()
    with CollectiveCounter() as cc:
        proj.project()
    zopt = engine.optimizer
    named = dict(model.named_parameters())
    by_id = {id(p): n for n, p in named.items()}
    projected = {n: torch.zeros(p.numel()) for n, p in named.items()}
    for (p, start, n), g in zip(zopt.ranges, zopt.averaged_gradients[0]):
        projected[by_id[id(p)]][start:start + n] = g
    for t in projected.values():
        dist.all_reduce(t)
    projected = {n: t.view_as(named[n]) for n, t in projected.items()}
    proj._orig_step()  # the unwrapped step: this step is already projected
    upd = {n: p.detach() - before[n] for n, p in named.items()}
    split = [n for n, p in named.items() if hasattr(p, "_hp_mapping")
             and p._hp_mapping.lp_fragment_address.numel < p.numel()]
    # the wrapped step projects by itself at the next boundary
    loss_of(model, rank_batch(rank, 1)).backward()
    zopt.reduce()
    engine.step()
    wrapped_projections = proj.num_projections
    proj.remove()
    ex_grads, ex_upd, _, _ = float64_run(subspace, config, config.max_norm)
    out.update(**errors("grad", projected, ref_grads, ex_grads), **errors("update", upd, ref_upd, ex_upd),
               collectives=cc.ops,
               split_params=split, type=type(proj).__name__, wrapped_projections=wrapped_projections,
               restored="step" not in zopt.__dict__)


def scenario_deepspeed(rank, out, stage=2):
    import deepspeed

    import ogpsa
    from ogpsa.distributed import attach_deepspeed

    config = ogpsa.OGPSAConfig(mode="orthogonal")
    subspace = single_subspace(config)
    ref_grads, ref_upd, _ = single_run(subspace, config)
    model = tiny_llama()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ds_config = {"train_micro_batch_size_per_gpu": PER_RANK, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": stage, "reduce_bucket_size": 500, "allgather_bucket_size": 500},
                 "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0}
    plain = tiny_llama()  # the same step without projection, to show the projection matters
    plain_before = {n: p.detach().clone() for n, p in plain.named_parameters()}
    (sum(loss_of(plain, rank_batch(r, 0)) for r in range(WORLD)) / WORLD).backward()
    torch.optim.SGD(plain.parameters(), lr=0.1).step()
    plain_upd = {n: p.detach() - plain_before[n] for n, p in plain.named_parameters()}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
    proj = attach_deepspeed(engine, subspace)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = loss_of(engine, rank_batch(rank, 0))
    engine.backward(loss)
    engine.step()
    upd = {n: p.detach() - before[n] for n, p in model.named_parameters()}
    split = [n for n, p in model.named_parameters() if getattr(p, "_hp_mapping", None) is not None
             and p._hp_mapping.lp_fragment_address.numel < p.numel()]
    _, ex_upd, _, _ = float64_run(subspace, config, config.max_norm)
    out.update(**errors("update", upd, ref_upd, ex_upd), projections=proj.num_projections, type=type(proj).__name__,
               stage=engine.zero_optimization_stage(), unprojected_rel=rel(plain_upd, ref_upd), split_params=split)


SCENARIOS = {"ddp": scenario_ddp, "fsdp": scenario_fsdp, "zero_fake": scenario_zero_fake,
             "deepspeed": scenario_deepspeed,
             "deepspeed_stage1": lambda rank, out: scenario_deepspeed(rank, out, stage=1)}


def run(rank, port, outdir, names):
    tmp = os.path.join(outdir, "files")
    os.makedirs(tmp, exist_ok=True)
    scenarios = {**SCENARIOS, "fsdp": lambda r, out: SCENARIOS["fsdp"](r, out, tmp)}
    run_scenarios(rank, port, outdir, names, scenarios, WORLD)


if __name__ == "__main__":
    outdir, names = sys.argv[1], sys.argv[2].split(",")
    mp.spawn(run, args=(free_port(), outdir, names), nprocs=WORLD)
