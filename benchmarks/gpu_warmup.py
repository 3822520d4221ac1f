"""Compile every kernel variant a GPU check uses before anything is timed, and estimate how long
that takes (``benchmarks/gpu_check.sh``, stage ``warmup``).

Triton compiles a kernel the first time a new set of constexprs meets it and keeps the binary in
its on-disk cache, so compiling here (in parallel worker processes) makes the later test and
benchmark processes load binaries instead of compiling. The CUDA extension is loaded and every
op called once too. ``--estimate`` prints the plan without a GPU.

Variants: for every rank bucket of the benchmark and the tests (padded k 1, 2, 4, 8, 16), every
(gradient, basis) dtype pair the GPU suite times (fp32/fp32, bf16/bf16, bf16/fp32) plus
fp16/fp32 (tests), aligned (what real parameter lists take) and shifted by one element
(tests' odd cases): dots + update (two-pass), the single-pass kernel in both size classes,
plus the segment sum and the basis kernels.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

#: seconds per Triton compile assumed by the estimate (measured 0.2-0.3 s per projection
#: variant on 2 shared x86 cores with triton.compile for sm_90; doubled for slack)
SECONDS_PER_COMPILE = 0.6
K_PADS = (1, 2, 4, 8, 16)
PAIRS = (("float32", "float32"), ("bfloat16", "bfloat16"), ("bfloat16", "float32"), ("float16", "float32"))


def plan() -> list[tuple]:
    """One work item per (k, dtype pair, aligned): it compiles dots, update and the
    single-pass kernel (2 size classes) = 4 projection variants."""
    return [(k, g, u, aligned) for k in K_PADS for g, u in PAIRS for aligned in (True, False)]


def compile_count() -> int:
    # 4 projection variants per item; segment sum (float32 / float64 out), Gram (2 ref dtypes x
    # tile sizes 1..16) and combine (a few) on top
    return 4 * len(plan()) + 2 + 10 + 8


def _work(item: tuple) -> float:
    import torch

    import ogpsa  # noqa: F401  (registers the ops)
    from ogpsa.backends.triton_backend import TritonBackend

    k, gname, uname, aligned = item
    gdt, udt = getattr(torch, gname), getattr(torch, uname)
    t0 = time.perf_counter()
    sizes = (64, 3000, 20_000) if aligned else (63, 3001, 20_001)
    grads = [torch.randn(n, device="cuda").to(gdt) for n in sizes]
    bases = [torch.linalg.qr(torch.randn(n, k, device="cuda"))[0].T.contiguous().to(udt) for n in sizes]
    be = TritonBackend()
    be.dots(grads, bases, k)
    be.update_(grads, bases, torch.zeros(len(sizes), k, device="cuda"), 1.0, torch.ones(len(sizes), device="cuda"))
    inv = torch.eye(k, device="cuda").expand(len(sizes), k, k).contiguous()
    be.fused_project_(grads, bases, inv, "conflict", 1.0)  # 64 -> the 1024 class, 3000 -> the 8192 class
    if k in (1, 2, 4, 8, 16) and gname == "float32" and aligned:
        refs = [torch.randn(k, n, device="cuda").to(udt) for n in sizes]
        gram = be.gram(refs)
        be.combine(refs, torch.randn(len(sizes), k, k, device="cuda"), [k] * len(sizes), udt)
        del gram
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def _cuda_ext() -> str:
    import torch

    from ogpsa.backends import cext

    ok, why = cext.CudaBackend().availability()
    if not ok:
        return f"cuda backend unavailable: {why}"
    grads = [torch.randn(n, device="cuda") for n in (7, 70_001)]
    bases = [torch.linalg.qr(torch.randn(n, 2, device="cuda"))[0].T.contiguous() for n in (7, 70_001)]
    torch.ops.ogpsa.dots(grads, bases, 2)
    torch.cuda.synchronize()
    return "cuda extension loaded and called"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--estimate", action="store_true", help="print the plan and its time estimate, run nothing")
    parser.add_argument("--workers", type=int, default=min(8, max(1, (os.cpu_count() or 2) // 2)))
    args = parser.parse_args(argv)
    n = compile_count()
    est = n * SECONDS_PER_COMPILE / args.workers + 15  # + worker start-up (CUDA context, imports)
    summary = {"work_items": len(plan()), "triton_compiles": n, "workers": args.workers,
               "seconds_per_compile_assumed": SECONDS_PER_COMPILE, "estimated_seconds": round(est)}
    print(json.dumps(summary))
    if args.estimate:
        return 0
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: nothing to warm up", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    print(_cuda_ext())
    # spawn: a forked CUDA context is unusable in the children
    import multiprocessing as mp

    with ProcessPoolExecutor(max_workers=args.workers, mp_context=mp.get_context("spawn")) as pool:
        times = list(pool.map(_work, plan()))
    print(f"warm-up: {len(times)} work items ({n} compiles planned) in {time.perf_counter() - t0:.1f} s wall, "
          f"slowest item {max(times):.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
