"""CPU extension (ogpsa._C) vs the pure-PyTorch reference, on realistic parameter lists.

    .venv/bin/python benchmarks/bench_cpu_ext.py [--repeats 7] [--lists lora,gpt2] [--k 2]

Lists:
  lora  r=16 LoRA adapters on q,k,v,o,gate,up,down of a 32-layer model (hidden 3072,
        MLP 8192): 448 small tensors, 29.9M elements
  gpt2  every parameter tensor of a 125M GPT-2-small-shaped model (148 tensors, 124M elements)

Each method projects the same fp32 gradients with a rank-k fp32 basis (orthogonal mode,
per-tensor scope), without clipping and with clipping (max_norm=1). Gradients are restored
from a copy before every repeat (not timed); the median of the timed repeats is reported
after one warm-up, at each thread count in --threads (default: all, then 1). Results (JSON +
markdown, with machine info and date) go to benchmarks/results/cpu_ext/. Nothing here asserts
on timings.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import statistics
import time
from pathlib import Path

# set before torch loads libgomp: spinning OpenMP threads on shared cores stall every short
# parallel region of the per-tensor PyTorch loops (override by exporting OMP_WAIT_POLICY)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

import ogpsa  # noqa: E402
from ogpsa import reference  # noqa: E402
from ogpsa.backends import cext  # noqa: E402

OUT_DIR = Path(__file__).resolve().parent / "results" / "cpu_ext"


def lora_shapes(layers=32, hidden=3072, mlp=8192, r=16):
    shapes = []
    for _ in range(layers):
        for d_in, d_out in [(hidden, hidden)] * 4 + [(hidden, mlp)] * 2 + [(mlp, hidden)]:
            shapes += [(r, d_in), (d_out, r)]  # lora_A, lora_B
    return shapes


def gpt2_shapes(layers=12, hidden=768, vocab=50257, ctx=1024):
    shapes = [(vocab, hidden), (ctx, hidden)]
    for _ in range(layers):
        shapes += [(hidden,), (hidden,), (hidden, 3 * hidden), (3 * hidden,), (hidden, hidden), (hidden,),
                   (hidden,), (hidden,), (hidden, 4 * hidden), (4 * hidden,), (4 * hidden, hidden), (hidden,)]
    return shapes + [(hidden,), (hidden,)]


LISTS = {"lora": lora_shapes, "gpt2": gpt2_shapes}


def make_list(shapes, k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(*s, generator=gen) for s in shapes]
    # random unit rows (orthonormal only approximately for k>1 in high dimension; the kernels do
    # not care, and an exact QR of 38M x k would dominate the setup time)
    bases = []
    for g in grads:
        kk = min(k, g.numel())
        u = torch.randn(kk, g.numel(), generator=gen)
        if kk > 1 and g.numel() <= 200_000:
            u = torch.linalg.qr(u.double().T)[0].T.float().contiguous()
        else:
            u = u / u.norm(dim=1, keepdim=True)
        bases.append(u)
    return grads, bases


def time_method(fn, grads, pristine, repeats):
    times = []
    for rep in range(repeats + 1):
        for g, p in zip(grads, pristine):
            g.copy_(p)
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        if rep:  # the first run is the warm-up
            times.append(dt)
    return statistics.median(times), min(times)


def _methods(grads, bases, plan, plan_t, max_norm):
    methods = {
        "reference.project_": lambda: reference.project_(grads, bases, max_norm=max_norm),
        "torch backend": lambda: ogpsa.ops.execute(plan_t, grads, max_norm=max_norm),
        "cpu (_C)": lambda: ogpsa.ops.execute(plan, grads, max_norm=max_norm),
    }
    if max_norm is None:
        # same kernels without the single-pass path: clip_coef is exactly 1
        methods["cpu (_C) two-pass"] = lambda: ogpsa.ops.execute(plan, grads, max_norm=1e30)
    return methods


def bench_list(name, k, repeats, thread_counts):
    shapes = LISTS[name]()
    grads, bases = make_list(shapes, k)
    pristine = [g.clone() for g in grads]
    numel = sum(g.numel() for g in grads)
    bytes_moved = 4 * numel * (3 + 2 * k)  # two-pass floor: read g, read U, read U, read+write g
    plan = ogpsa.ops.plan_projection(grads, bases, backend="cpu")
    plan_t = ogpsa.ops.plan_projection(grads, bases, backend="torch")
    rows = []
    default_threads = torch.get_num_threads()
    for threads, max_norm in itertools.product(thread_counts, (None, 1.0)):
        torch.set_num_threads(threads)
        row = {"list": name, "tensors": len(grads), "elements": numel, "k": k, "threads": threads,
               "max_norm": max_norm, "methods": {}}
        for label, fn in _methods(grads, bases, plan, plan_t, max_norm).items():
            med, best = time_method(fn, grads, pristine, repeats)
            row["methods"][label] = {"median_ms": med * 1e3, "min_ms": best * 1e3}
            print(f"{name:5s} threads={threads} clip={max_norm!s:5s} {label:20s} median {med * 1e3:8.2f} ms  "
                  f"min {best * 1e3:8.2f} ms", flush=True)
        cpu = row["methods"]["cpu (_C)"]["median_ms"]
        row["speedup_vs_reference"] = row["methods"]["reference.project_"]["median_ms"] / cpu
        row["speedup_vs_torch_backend"] = row["methods"]["torch backend"]["median_ms"] / cpu
        row["two_pass_byte_floor_ms_at_16.7GBps"] = bytes_moved / 16.7e9 * 1e3
        rows.append(row)
    torch.set_num_threads(default_threads)
    return rows


def run(list_names, k, repeats, thread_counts):
    return [row for name in list_names for row in bench_list(name, k, repeats, thread_counts)]


def machine():
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu": cpu, "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
            "ogpsa": ogpsa.__version__, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
            "load_average_1_5_15min": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
            "extension": cext.info()}


def write(results, meta, repeats):
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / "results.json").write_text(json.dumps({"machine": meta, "repeats": repeats, "results": results},
                                                     indent=2, default=str))
    lines = ["# CPU extension vs pure-PyTorch reference", "",
             f"{meta['date']} · {meta['cpu']} · {meta['torch_threads']} threads · torch {meta['torch']} · "
             f"median of {repeats} after a warm-up · fp32 gradients and basis, orthogonal mode, per-tensor scope · "
             f"OMP_WAIT_POLICY={meta['OMP_WAIT_POLICY']} · load average at the end {meta['load_average_1_5_15min']}",
             "",
             "| list | tensors | elements | k | threads | clip | method | median ms | min ms | speedup vs reference |",
             "| --- | ---: | ---: | ---: | ---: | --- | --- | ---: | ---: | ---: |"]
    for r in results:
        ref = r["methods"]["reference.project_"]["median_ms"]
        for label, m in r["methods"].items():
            lines.append(f"| {r['list']} | {r['tensors']} | {r['elements']:,} | {r['k']} | {r['threads']} | "
                         f"{'none' if r['max_norm'] is None else r['max_norm']} | {label} | {m['median_ms']:.1f} | "
                         f"{m['min_ms']:.1f} | {ref / m['median_ms']:.2f}x |")
    lines += ["", "The two-pass byte floor (read g and U, then read U and read+write g) at the measured "
              "16.7 GB/s copy bandwidth: " + ", ".join(
                  f"{r['list']} {r['two_pass_byte_floor_ms_at_16.7GBps']:.0f} ms" for r in results
                  if r["max_norm"] and r["threads"] == results[0]["threads"]),
              "The single-pass path (no clipping) re-reads each small tensor from cache, so it can go below it.", "",
              "These 2 cores are shared with other jobs: when they are busy, PyTorch's many short OpenMP regions "
              "(the reference and torch backend run a few ops per tensor) stall on descheduled threads, which "
              "inflates their 2-thread medians far more than the extension's few long regions; the 1-thread rows "
              "are the steadier comparison.", ""]
    (OUT_DIR / "results.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT_DIR / 'results.json'} and results.md")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--lists", default="lora,gpt2")
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--threads", default=f"{torch.get_num_threads()},1", help="comma-separated thread counts")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    if cext._C is None:
        raise SystemExit(f"ogpsa._C is not built: {cext._IMPORT_ERROR}")
    results = run([s for s in args.lists.split(",") if s], args.k, args.repeats,
                  [int(t) for t in args.threads.split(",") if t])
    if not args.no_write:
        write(results, machine(), args.repeats)


if __name__ == "__main__":
    main()
