"""``ogpsa bench`` command-line arguments and entry point."""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
from pathlib import Path
from typing import Optional

import torch

from . import process
from .micro import run_bench
from .report import readme_block, update_readme
from .timing import _cpu_name, machine_slug
from .workloads import REPO_ROOT

# ----------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--suite", choices=("auto", "cpu", "gpu", "smoke", "loop", "adamw", "refresh", "chunks"),
                        default="auto",
                        help="auto: gpu when CUDA is available, else cpu (the micro suites); loop: OGPSA in a "
                             "tiny-Llama AdamW training loop (LoRA and full fine-tune); adamw: the projected AdamW "
                             "step (every backend) vs torch AdamW foreach/fused + a separate gradient projection; refresh: "
                             "the basis build (from_gradients + set_subspace) vs one pass over the reference gradients "
                             "(--ks: numbers of reference gradients); chunks: K chunk gradients in one forward+backward "
                             "vs K passes (--ks: K)")
    parser.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if available)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: out/bench/<machine>/<date>/ in the source tree, which git "
                             "ignores, else ./ogpsa-bench/<machine>/<date>/)")
    parser.add_argument("--publish", action="store_true",
                        help="write to benchmarks/results/<machine>/<date>/ in the source tree instead (the "
                             "committed results the README quotes)")
    parser.add_argument("--contenders", nargs="*", default=None, help="only contenders whose names start with these")
    parser.add_argument("--workloads", nargs="*", default=None,
                        help="only these workloads (micro: lora, 125m, llama8b, tiny; loop: lora, full; "
                             "adamw: lora, 125m, tiny)")
    parser.add_argument("--ks", nargs="*", type=int, default=None, help="only these ranks")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch/OpenMP threads (default: torch's default, one per core); the header says which, "
                             "and the OpenMP wait policy (PASSIVE unless OMP_WAIT_POLICY is set)")
    parser.add_argument("--max-minutes", type=float, default=9.0, help="stop starting new cases after this long")
    parser.add_argument("--budget-s", type=float, default=None, help="timing budget per contender and case")
    parser.add_argument("--memory-budget-gb", type=float, default=None, help="gpu suite: bytes for the Llama list")
    loop = parser.add_argument_group("loop suite")
    loop.add_argument("--steps", type=int, default=20, help="timed steps per kind")
    loop.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    loop.add_argument("--hidden", type=int, default=256, help="tiny Llama width")
    loop.add_argument("--layers", type=int, default=12, help="tiny Llama layers (12: 168 LoRA adapters)")
    loop.add_argument("--seq", type=int, default=64, help="tokens per sequence")
    loop.add_argument("--batch", type=int, default=4, help="sequences per step")
    loop.add_argument("--repeats", type=int, default=None,
                      help="loop: measure each workload this many times (default 1; load average recorded per repeat); "
                           "adamw: interleaved rounds per case (default 2)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--readme", type=Path, default=None, metavar="RESULTS_JSON",
                        help="print the README benchmark block for a result file and exit")
    parser.add_argument("--readme-name", default=None, metavar="NAME",
                        help="with --readme: a named block (<!-- ogpsa-bench:NAME:start -->), e.g. gpu")
    parser.add_argument("--update-readme", type=Path, default=None, metavar="README",
                        help="with --readme: replace the block between the markers in this page (e.g. docs/benchmarks.md)")


def _matplotlib_missing() -> Optional[str]:
    try:
        import matplotlib  # noqa: F401
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def default_out(device: torch.device, publish: bool) -> Path:
    """Where results go without --out: an ignored folder, or benchmarks/results/ with --publish."""
    env = {"device": str(device), "hardware": torch.cuda.get_device_name(device) if device.type == "cuda" else "",
           "cpu": _cpu_name(), "torch_threads": torch.get_num_threads()}
    checkout = (REPO_ROOT / "benchmarks").is_dir()
    if publish:
        root = REPO_ROOT / "benchmarks" / "results" if checkout else Path("benchmarks") / "results"
    else:
        root = REPO_ROOT / "out" / "bench" if checkout else Path("ogpsa-bench")
    return root / machine_slug(env) / _dt.date.today().isoformat()


def run(args: argparse.Namespace) -> int:
    if args.readme is not None:
        # links in the block are relative to the page that holds it (e.g. docs/benchmarks.md)
        base = args.update_readme.resolve().parent if args.update_readme is not None else REPO_ROOT
        block = readme_block(args.readme, base, name=args.readme_name)
        if args.update_readme is not None:
            update_readme(args.update_readme, block, args.readme_name)
        else:
            print(block)
        return 0
    try:  # may re-execute this process with OMP_WAIT_POLICY set (see ogpsa/bench/process.py)
        policy = process.prepare(args.threads)
    except ValueError as exc:
        print(f"ogpsa bench: {exc}", file=sys.stderr)
        return 2
    print(process.header(policy), flush=True)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("ogpsa bench: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    if args.out is not None and args.publish:
        print("ogpsa bench: give --out or --publish, not both", file=sys.stderr)
        return 2
    plot = not args.no_plot
    missing = _matplotlib_missing() if plot else None
    if missing:  # said at the start, not after minutes of timing
        print(f"ogpsa bench: matplotlib is not importable ({missing}): no plot will be written. Install it with "
              "`pip install matplotlib` (it is in requirements-dev.txt), or pass --no-plot.", file=sys.stderr)
        plot = False
    name = args.suite if args.suite != "auto" else ("gpu" if device.type == "cuda" else "cpu")
    out = args.out if args.out is not None else default_out(device, args.publish)
    if name == "loop":
        from .loop import run_loop_suite

        data = run_loop_suite(device, out, workloads=args.workloads, plot=plot, steps=args.steps, warmup=args.warmup,
                              hidden=args.hidden, layers=args.layers, seq=args.seq, batch=args.batch,
                              repeats=args.repeats or 1)
        _wrote(out, data["files"], data["env"]["wall_s"])
        for t in data["targets"]:
            print("  " + t)
        return 0
    if name == "adamw":
        from .adamw import run_adamw_suite

        data = run_adamw_suite(device, out, workloads=args.workloads, ks=args.ks, only=args.contenders,
                               budget_s=args.budget_s, rounds=args.repeats or 2, max_minutes=args.max_minutes)
        _wrote(out, data["files"], data["env"]["wall_s"])
        return 0
    if name == "refresh":
        from .refresh import run_refresh_suite

        data = run_refresh_suite(device, out, workloads=args.workloads, ms=args.ks, rounds=args.repeats or 3,
                                 budget_s=args.budget_s, max_minutes=args.max_minutes)
        _wrote(out, data["files"], data["env"]["wall_s"])
        return 0
    if name == "chunks":  # one-pass chunk gradients vs K backward passes (ogpsa.bench.chunks)
        from .chunks import run_chunks_suite

        data = run_chunks_suite(device, out, ks=args.ks, rounds=args.repeats or 3, budget_s=args.budget_s,
                                max_minutes=args.max_minutes)
        _wrote(out, data["files"], data["env"]["wall_s"])
        return 0
    mem = int(args.memory_budget_gb * 2**30) if args.memory_budget_gb else None
    data = run_bench(name, device, out, only=args.contenders, workloads=args.workloads, ks=args.ks,
                     max_minutes=args.max_minutes, budget_s=args.budget_s, plot=plot, memory_budget=mem)
    errors = [r for r in data["results"] if r.get("status") == "error"]
    _wrote(out, data["files"], data["env"]["wall_s"])
    for t in data.get("targets", []):
        print("  " + t)
    for r in errors:
        print(f"ERROR {r['workload']} k={r['k']} {r['contender']}: {r['reason']}", file=sys.stderr)
    return 1 if errors else 0


def _wrote(out: Path, files, seconds: float) -> None:
    """Name only files that exist now (a plot that could not be drawn is not claimed)."""
    present = [f for f in files if (Path(out) / f).is_file()]
    print(f"wrote {out}/" + ", ".join(present) + f" in {seconds:.0f} s")
