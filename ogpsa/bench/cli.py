"""``ogpsa bench`` command-line arguments and entry point."""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
from pathlib import Path

import torch

from .micro import run_bench
from .report import readme_block, update_readme
from .timing import _cpu_name, machine_slug
from .workloads import REPO_ROOT

# ----------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--suite", choices=("auto", "cpu", "gpu", "smoke"), default="auto",
                        help="auto: gpu when CUDA is available, else cpu")
    parser.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if available)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: benchmarks/results/<machine>/<date>/ in the source tree, "
                             "else ./ogpsa-bench/<machine>/<date>/)")
    parser.add_argument("--contenders", nargs="*", default=None, help="only contenders whose names start with these")
    parser.add_argument("--workloads", nargs="*", default=None, help="only these workloads (lora, 125m, llama8b, tiny)")
    parser.add_argument("--ks", nargs="*", type=int, default=None, help="only these ranks")
    parser.add_argument("--max-minutes", type=float, default=9.0, help="stop starting new cases after this long")
    parser.add_argument("--budget-s", type=float, default=None, help="timing budget per contender and case")
    parser.add_argument("--memory-budget-gb", type=float, default=None, help="gpu suite: bytes for the Llama list")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--readme", type=Path, default=None, metavar="RESULTS_JSON",
                        help="print the README benchmark block for a result file and exit")
    parser.add_argument("--readme-name", default=None, metavar="NAME",
                        help="with --readme: a named block (<!-- ogpsa-bench:NAME:start -->), e.g. gpu")
    parser.add_argument("--update-readme", type=Path, default=None, metavar="README",
                        help="with --readme: replace the block between the markers in this README")


def run(args: argparse.Namespace) -> int:
    if args.readme is not None:
        block = readme_block(args.readme, name=args.readme_name)
        if args.update_readme is not None:
            update_readme(args.update_readme, block, args.readme_name)
        else:
            print(block)
        return 0
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("ogpsa bench: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    name = args.suite if args.suite != "auto" else ("gpu" if device.type == "cuda" else "cpu")
    out = args.out
    if out is None:
        env = {"device": str(device), "hardware": torch.cuda.get_device_name(device) if device.type == "cuda" else "",
               "cpu": _cpu_name(), "torch_threads": torch.get_num_threads()}
        root = REPO_ROOT / "benchmarks" / "results" if (REPO_ROOT / "benchmarks").is_dir() else Path("ogpsa-bench")
        out = root / machine_slug(env) / _dt.date.today().isoformat()
    mem = int(args.memory_budget_gb * 2**30) if args.memory_budget_gb else None
    data = run_bench(name, device, out, only=args.contenders, workloads=args.workloads, ks=args.ks,
                     max_minutes=args.max_minutes, budget_s=args.budget_s, plot=not args.no_plot, memory_budget=mem)
    errors = [r for r in data["results"] if r.get("status") == "error"]
    print(f"wrote {out}/results.json, results.md" + ("" if args.no_plot else ", bench.png")
          + f" in {data['env']['wall_s']:.0f} s")
    for t in data.get("targets", []):
        print("  " + t)
    for r in errors:
        print(f"ERROR {r['workload']} k={r['k']} {r['contender']}: {r['reason']}", file=sys.stderr)
    return 1 if errors else 0
