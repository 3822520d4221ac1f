"""2 ranks (gloo, CPU): chunked reference directions under DDP-style data parallelism. Each rank
takes its own pool slice, computes its K chunk gradients and the K directions are averaged over
ranks (ogpsa.pool). Writes rank{r}.pt into argv[1] for tests/test_rich.py."""

from __future__ import annotations

import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SET_A = [f"the cat {i} sat" + " on the mat" * (i % 3) for i in range(12)]
SET_B = [f"{i}+{2 * i}={3 * i}" for i in range(12)]


def _rank(rank: int, outdir: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    import ogpsa
    from ogpsa.pool import collect_chunk_gradients, rebuild_examples, reference_pool
    from ogpsa.tiny import char_tokenizer, tiny_llama

    tok = char_tokenizer()
    model = tiny_llama(tok, 16, 1, heads=2, intermediate=19, seed=2)
    cfg = ogpsa.OGPSAConfig(chunks=2, chunk_samples=2)
    examples = rebuild_examples(reference_pool([SET_A, SET_B], 12), 1, cfg)
    local, _ = collect_chunk_gradients(model, examples, 2, tokenizer=tok, sync=False)
    synced, info = collect_chunk_gradients(model, examples, 2, tokenizer=tok)
    sub = ogpsa.Subspace.from_gradients(synced, cfg)
    torch.save({"examples": examples, "local": local, "synced": synced, "world": info["world_size"],
                "bases": {n: sub.basis(n) for n in sub.names}}, os.path.join(outdir, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    mp.spawn(_rank, args=(sys.argv[1], port), nprocs=2, join=True)
