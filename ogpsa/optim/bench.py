"""Benchmark: projected AdamW step vs torch AdamW + a separate (gradient) projection, on CPU.

``python -m ogpsa.optim.bench [--elements N] [--k K] [--repeats R] [--json PATH]``; the
function :func:`run_adamw_suite` returns the rows for a bench CLI.

Byte floor per element (fp32 params, grads and moments, fp32 basis of k rows): one streaming
pass must read g, read+write p, m, v (28 B) and read the k basis rows (4k B). The two-pass
step (moments written once; pass 2 re-reads m, v and the basis) moves 36 + 8k B per element:
pass 1 reads g, m, v and writes m, v (20 B) + U (4k); pass 2 reads m, v, p and writes p (16 B)
+ U (4k). GB/s below is the two-pass byte count divided by the measured time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from typing import Optional

import torch

import ogpsa
from ogpsa.optim import ProjectedAdamW


def _problem(elements: int, k: int, seed: int = 0):
    """A LoRA/MLP-like mix: a few large tensors and many small ones (odd sizes)."""
    torch.manual_seed(seed)
    sizes, left = [], elements
    big = max(elements // 8, 1)
    while left > 0:
        n = min(left, big if len(sizes) % 4 == 0 else max(big // 37, 1) + len(sizes))
        sizes.append(n)
        left -= n
    model = torch.nn.Module()
    for i, n in enumerate(sizes):
        model.register_parameter(f"t{i}", torch.nn.Parameter(torch.randn(n)))
    gen = torch.Generator().manual_seed(seed + 1)
    refs = [{n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()} for _ in range(k)]
    return model, ogpsa.Subspace.from_gradients(refs, ogpsa.OGPSAConfig())


def _time(fn, repeats: int) -> float:
    fn()  # warm-up (state allocation)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def run_adamw_suite(elements: int = 4_000_000, k: int = 2, repeats: int = 5) -> list[dict]:
    """Time one optimizer step per contender (gradients fixed, states already allocated)."""
    rows = []
    model, sub = _problem(elements, k)
    n_el = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(5)
    grads = [torch.randn(p.shape, generator=gen) * 1e-3 for p in model.parameters()]

    def set_grads():
        # the same gradient tensors every step (no copy timed); only the gradient projection
        # writes them, which does not change its cost
        for p, g in zip(model.parameters(), grads):
            p.grad = g

    contenders = {}
    foreach = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    proj = ogpsa.attach(model, None, sub, ogpsa.OGPSAConfig())
    contenders["torch AdamW foreach (no projection)"] = lambda: foreach.step()
    contenders["gradient projection + torch AdamW foreach"] = lambda: (proj.project(), foreach.step())
    try:
        fused = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        contenders["torch AdamW fused (no projection)"] = lambda: fused.step()
    except (RuntimeError, ValueError):
        pass
    for backend in ("torch", "cpu"):
        opt = ProjectedAdamW(model, sub, lr=1e-4, config=ogpsa.OGPSAConfig(backend=backend))
        contenders[f"ProjectedAdamW backend={backend}"] = opt.step
    set_grads()
    best = {name: float("inf") for name in contenders}
    for _ in range(2):  # interleaved rounds: a noisy neighbour hits every contender alike
        for name, step in contenders.items():
            best[name] = min(best[name], _time(step, repeats))
    for name in contenders:
        t = best[name]
        two_pass = (36 + 8 * k) * n_el
        rows.append({"contender": name, "elements": n_el, "tensors": len(grads), "k": k, "seconds": t,
                     "GB_per_s_two_pass_bytes": two_pass / t / 1e9})
    proj.remove()
    return rows


def machine() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor(),
            "threads": torch.get_num_threads(), "cores": os.cpu_count(),
            "note": "shared 2-core machine, other jobs running: noisy; compare rows of one run"}


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ogpsa.optim.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--elements", type=int, default=4_000_000)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None, help="write rows + machine conditions here")
    args = ap.parse_args(argv)
    rows = run_adamw_suite(args.elements, args.k, args.repeats)
    for r in rows:
        print(f"{r['contender']:48s} {r['seconds'] * 1e3:9.2f} ms  {r['GB_per_s_two_pass_bytes']:6.2f} GB/s "
              f"({r['elements']} elements, {r['tensors']} tensors, k={r['k']})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
