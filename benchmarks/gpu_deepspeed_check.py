"""GPU check: OGPSA under the real DeepSpeed ZeRO-2 engine (NCCL, fp32 and bf16).

    python benchmarks/gpu_deepspeed_check.py [--json PATH]

Spawns one rank per visible GPU (1 rank still runs the engine, its wrapped ZeRO step and
the CUDA/NCCL path; 2+ ranks also cut parameters across partitions), trains one SGD step
of a tiny Llama with ``ogpsa.distributed.attach_deepspeed`` and compares the parameter
update with the single-process projected update (float32 on the CPU): relative error
<= 1e-5 in fp32, <= 2e-2 in bf16. Prints one JSON line per case; exit 0 when all pass,
1 on a failure, 0 with status "skipped" when deepspeed or CUDA is missing (the GPU
machines have no network to install it; carry a wheel). Called by benchmarks/gpu_check.sh.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import dist_worker as dw  # noqa: E402  (the tiny Llama, batches and single-process reference)

TOLS = {"float32": 1e-5, "bfloat16": 2e-2}


def _rank(rank: int, world: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.cuda.set_device(rank)
    import deepspeed

    import ogpsa
    from ogpsa.distributed import attach_deepspeed

    dw.WORLD = world
    deepspeed.init_distributed(dist_backend="nccl")
    config = ogpsa.OGPSAConfig()
    subspace = dw.single_subspace(config)
    _, ref_upd, _ = dw.single_run(subspace, config)
    for dtype in ("float32", "bfloat16"):
        row = {"case": f"zero2-{dtype}", "world": world, "rank": rank}
        try:
            model = dw.tiny_llama()
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            ds_config = {"train_micro_batch_size_per_gpu": dw.PER_RANK, "gradient_accumulation_steps": 1,
                         "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True,
                         "gradient_clipping": 0.0, "bf16": {"enabled": dtype == "bfloat16"}}
            engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
            sub = subspace.to(f"cuda:{rank}")
            proj = attach_deepspeed(engine, sub)
            before = {n: p.detach().float().cpu().clone() for n, p in engine.module.named_parameters()}
            loss = dw.loss_of(engine, dw.rank_batch(rank, 0).cuda())
            engine.backward(loss)
            engine.step()
            upd = {n: p.detach().float().cpu() - before[n] for n, p in engine.module.named_parameters()}
            row.update(update_rel=dw.rel(upd, ref_upd), projections=proj.num_projections,
                       ok=dw.rel(upd, ref_upd) <= TOLS[dtype] and proj.num_projections == 1)
            proj.remove()
        except Exception:
            row.update(ok=False, error=traceback.format_exc()[-2000:])
        queue.put(row)


def main() -> int:
    out_path = sys.argv[sys.argv.index("--json") + 1] if "--json" in sys.argv else None
    try:
        import deepspeed  # noqa: F401
    except Exception as exc:
        print(json.dumps({"case": "deepspeed", "status": "skipped", "reason": f"deepspeed not importable: {exc}"}))
        return 0
    if not torch.cuda.is_available():
        print(json.dumps({"case": "deepspeed", "status": "skipped", "reason": "no CUDA device"}))
        return 0
    world = torch.cuda.device_count()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.spawn(_rank, args=(world, dw.free_port(), queue), nprocs=world)
    rows = [queue.get() for _ in range(2 * world)]
    for row in rows:
        print(json.dumps(row))
    if out_path:
        with open(out_path, "w") as f:
            json.dump(rows, f, indent=1)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
