"""The rank side of the 2-rank worker scripts (tests/*_worker.py): join the process group (gloo,
or DeepSpeed's when a DeepSpeed scenario runs), run the named scenarios in order and write each
one's result dict to ``<outdir>/<name>.rank<r>.json`` (read by tests/dist_launch.py)."""

from __future__ import annotations

import json
import os
import time
import traceback
from typing import Callable, Mapping, Sequence

import torch
import torch.distributed as dist


def run_scenarios(rank: int, port: int, outdir: str, names: Sequence[str],
                  scenarios: Mapping[str, Callable[[int, dict], None]], world: int) -> None:
    """Run ``scenarios[name](rank, out)`` for every name; an exception is recorded as the
    result's ``"error"`` (its traceback) and stops this rank (the other may be stuck in a
    collective). Each result also gets its wall time in ``"seconds"``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    if "deepspeed" in names:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    else:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for name in names:
            out: dict = {}
            start = time.perf_counter()
            try:
                scenarios[name](rank, out)
            except Exception:
                out["error"] = traceback.format_exc()
            out["seconds"] = time.perf_counter() - start
            with open(os.path.join(outdir, f"{name}.rank{rank}.json"), "w") as f:
                json.dump(out, f, indent=1, default=str)
            if "error" in out:
                break  # the other rank may be stuck in a collective; stop here
    finally:
        dist.destroy_process_group()
