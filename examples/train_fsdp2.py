"""FSDP2 (``fully_shard``) training loop with OGPSA: sharded reference gradients, sharded basis.

    torchrun --standalone --nproc-per-node 2 examples/train_fsdp2.py          # CPU, gloo, tiny model
    torchrun --standalone --nproc-per-node 8 examples/train_fsdp2.py --model path/to/checkpoint --steps 200

Under FSDP2 gradients are DTensors sharded on dim 0, tensor hooks do not fire and
``torch.autograd.grad`` returns None for the parameters, so reference gradients come from
``backward`` (``ogpsa.distributed.reference_gradients``), each rank feeding its share of every
reference set. ``ShardedSubspace.from_gradients`` builds each rank's slice of the basis with two
small all_reduces; ``ogpsa.attach`` returns a ``ShardedProjector`` whose ``clip_grad_norm_``
projects and clips with one all_reduce. Runs on CPU ranks (gloo) and on GPUs (nccl).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from _common import DATA, collate, load_model, read_jsonl, sft_features
from torch.distributed.fsdp import fully_shard

import ogpsa
from ogpsa.distributed import ShardedSubspace, fsdp_layout, reference_gradients


def as_sft(row: dict) -> dict:
    """A reference row as prompt/completion (text rows: the whole text is the completion)."""
    return row if "completion" in row else {"prompt": "", "completion": row["text"]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--output", default=None, help="write the basis here (gathered to rank 0)")
    args = ap.parse_args(argv)

    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    device = torch.device("cuda") if use_cuda else torch.device("cpu")
    torch.manual_seed(0)  # same initial weights on every rank

    model, tok = load_model(args.model)
    model.to(device)
    for block in model.model.layers:
        fully_shard(block)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)

    def on_device(batch: dict) -> dict:
        return {k: v.to(device) for k, v in batch.items()}

    # one reference gradient per reference set; each rank backpropagates its share of the set
    # (FSDP2 averages the shards' gradients across ranks, so the result is the mean over the set)
    config = ogpsa.OGPSAConfig(mode="orthogonal")
    refs = []
    for path in (DATA / "general.jsonl", DATA / "general_b.jsonl"):
        mine = on_device(collate(sft_features([as_sft(r) for r in read_jsonl(path)][rank::world], tok),
                                 tok.pad_token_id))
        refs.append(reference_gradients(model, lambda b=mine: model(**b).loss.backward()))
    slices, group = fsdp_layout(model)
    subspace = ShardedSubspace.from_gradients(refs, slices, config, process_group=group)
    proj = ogpsa.attach(model, optimizer, subspace)

    train = sft_features(read_jsonl(DATA / "safety.jsonl"), tok)
    for step in range(args.steps):
        batch = on_device(collate(train[rank::world][step * 2:(step + 1) * 2] or train[:2], tok.pad_token_id))
        loss = model(**batch).loss
        loss.backward()
        proj.clip_grad_norm_(1.0)   # project + clip on the shards: one all_reduce
        optimizer.step()
        optimizer.zero_grad()
        if rank == 0:
            print(f"step {step + 1}: loss {loss.item():.4f}  removed {proj.last_stats.removed_fraction:.3f}")
    if args.output:
        os.makedirs(args.output, exist_ok=True)
        subspace.save(os.path.join(args.output, "basis.safetensors"))  # collective: every rank calls it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
