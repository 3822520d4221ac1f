"""DeepSpeed ZeRO-2 training loop with OGPSA (projection inside the engine's step).

    deepspeed --num_gpus 8 examples/train_deepspeed.py --model path/to/checkpoint --steps 200
    DS_ACCELERATOR=cpu torchrun --standalone --nproc-per-node 2 examples/train_deepspeed.py   # CPU, gloo

Needs ``pip install deepspeed`` (not a dependency of ogpsa). DeepSpeed reduces gradients into
per-rank flat partitions and clips and steps inside ``engine.step()``, so
``ogpsa.distributed.attach_deepspeed(engine, subspace)`` slices every basis along this rank's
partition and wraps the ZeRO optimizer's step: project -> DeepSpeed's ``gradient_clipping`` ->
update. Every rank builds the same subspace from the same reference data before
``deepspeed.initialize`` (or loads the same file). ZeRO-3 raises ``ogpsa.UnsupportedSetupError``
(use FSDP2: examples/train_fsdp2.py).
"""

from __future__ import annotations

import argparse

import torch
from _common import DATA, collate, load_model, read_jsonl, sft_features

import ogpsa
from ogpsa.distributed import attach_deepspeed


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    args = ap.parse_args(argv)

    import deepspeed  # imported here so --help works without it

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    torch.manual_seed(0)  # same initial weights on every rank
    model, tok = load_model(args.model)

    # the subspace, built before DeepSpeed wraps the model (same data on every rank -> same basis)
    references = [read_jsonl(DATA / "general.jsonl"), read_jsonl(DATA / "general_b.jsonl")]
    subspace = ogpsa.build_subspace(model, references, ogpsa.OGPSAConfig(mode="orthogonal"), tokenizer=tok,
                                    progress=rank == 0)

    ds_config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": 2}, "gradient_clipping": 1.0,
                 "zero_allow_untested_optimizer": True}
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    proj = attach_deepspeed(engine, subspace)

    train = sft_features(read_jsonl(DATA / "safety.jsonl"), tok)
    for step in range(args.steps):
        batch = collate(train[rank::world][step * 2:(step + 1) * 2] or train[:2], tok.pad_token_id)
        loss = engine(**{k: v.to(engine.device) for k, v in batch.items()}).loss
        engine.backward(loss)
        engine.step()              # projected inside, before DeepSpeed's clipping and update
        if rank == 0:
            print(f"step {step + 1}: loss {loss.item():.4f}  projections {proj.num_projections}")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
