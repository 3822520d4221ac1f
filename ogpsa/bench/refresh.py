"""The basis-build suite (``ogpsa bench --suite refresh``): what a subspace refresh costs
after the reference gradients exist, against one plain pass over those gradients.

Timed on the same seeded reference gradients (m dicts ``{name: tensor}``, float32, never
zero), rounds interleaved (order reversed every other round), samples pooled, min and median:

* ``copy``: a clone of every reference tensor (reads and writes m x N floats: one pass, and
  what stacking the rows for the Gram pass costs at least);
* ``sum``: ``torch.sum`` of every reference tensor (reads m x N floats once);
* ``from_gradients``: :meth:`ogpsa.Subspace.from_gradients` (stack, Gram pass, host
  factorisation, combine pass U = A R, M = U U^T of the new bases);
* ``from_reference_rows``: :meth:`ogpsa.Subspace.from_reference_rows` on the same gradients
  already stacked per tensor ([m, N_i]): what a build costs when the collector writes each
  reference gradient into its row of a stacked buffer (no stacking copy);
* ``set_subspace``: :meth:`ogpsa.Projector.set_subspace` with that subspace on a model whose
  parameters have the workload's names and shapes (validation, Gram inverses, plan reset).

``x_copy`` = median / median of ``copy`` (``x_sum``: / ``sum``); ``build_x_copy`` =
(from_gradients + set_subspace) / copy, the number issue 22 item 3 bounds by 5.

On the CPU every sample also records the process CPU time (user + system, all threads) of
the call, and ``build_x_copy_cpu`` is the same ratio in CPU time: on a shared machine the
wall-clock ratio also measures how often the neighbours took our cores, the CPU-time ratio
much less so (it still includes page faults and memory-bandwidth stalls).

The reference gradient collection itself (forward + backward over the reference examples)
is not timed here: it equals a bare forward + backward (measured by the loop suite).
"""

from __future__ import annotations

import os
import resource
import statistics
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor

from .timing import _free, environment, time_fn, write_suite_files
from .workloads import Workload, gpt2_125m_workload, lora_workload, tiny_workload

#: workload -> numbers of reference gradients m timed by default (125m: 1 GB per m in float32
#: with its stacked copy and the bases; m = 8 would need 12 GB on a shared machine)
DEFAULT_MS = {"lora": (2, 8), "125m": (2,), "tiny": (2, 4)}
CONTENDERS = ("copy", "sum", "from_gradients", "from_reference_rows", "set_subspace")
FORMULA = {
    "copy": "clone every reference tensor: reads and writes m*N floats (one pass)",
    "sum": "torch.sum of every reference tensor: reads m*N floats",
    "x_copy": "median time / median time of copy (x_sum: / sum)",
    "build_x_copy": "(median from_gradients + median set_subspace) / median copy (issue 22 item 3: <= 5)",
    "rows_x_copy": "(median from_reference_rows + median set_subspace) / median copy: the build without stacking",
    "build_x_copy_cpu": "the same ratio in process CPU time (user + system, all threads; CPU runs only)",
    "time": "median (and min) of the pooled samples of all rounds, each contender warmed up first",
}


def refresh_workloads() -> dict[str, Workload]:
    return {"lora": lora_workload(), "125m": gpt2_125m_workload(), "tiny": tiny_workload()}


def reference_gradients(workload: Workload, m: int, device: torch.device, seed: int = 0) -> list[dict[str, Tensor]]:
    """m seeded random gradient dicts for the workload (standard normal, never zero)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    out = []
    for _ in range(m):
        d = {}
        for name, shape in workload.shapes:
            t = torch.empty(shape, dtype=torch.float32, device=device)
            t.normal_(generator=gen)
            d[name] = t
        out.append(d)
    return out


def shaped_model(workload: Workload, device: torch.device) -> torch.nn.Module:
    """A module whose named parameters are exactly the workload's names and shapes (values
    uninitialised: only names, shapes and devices matter to ``set_subspace``)."""
    root = torch.nn.Module()
    for name, shape in workload.shapes:
        *path, leaf = name.split(".")
        mod = root
        for part in path:
            if not hasattr(mod, part):
                mod.add_module(part, torch.nn.Module())
            mod = getattr(mod, part)
        mod.register_parameter(leaf, torch.nn.Parameter(torch.empty(shape, device=device)))
    return root


def run_case(workload: Workload, m: int, device: torch.device, rounds: int = 3, budget_s: float = 1.0,
             log=print) -> dict:
    """Time the four contenders on one workload and m; returns one result row."""
    import ogpsa

    grads = reference_gradients(workload, m, device)
    tensors = [t for d in grads for t in d.values()]
    model = shaped_model(workload, device)
    holder: dict = {}

    def build() -> None:
        holder["sub"] = ogpsa.Subspace.from_gradients(grads)

    names = [n for n, _ in workload.shapes]
    shapes = [s for _, s in workload.shapes]
    stacked = [torch.stack([d[n].reshape(-1) for d in grads]) for n in names]

    def build_rows() -> None:
        holder["sub"] = ogpsa.Subspace.from_reference_rows(names, shapes, stacked)

    build()
    proj = ogpsa.attach(model, None, holder["sub"])
    fns = {
        "copy": lambda: [t.clone() for t in tensors],
        "sum": lambda: [t.sum() for t in tensors],
        "from_gradients": build,
        "from_reference_rows": build_rows,
        "set_subspace": lambda: proj.set_subspace(holder["sub"]),
    }
    samples: dict[str, list[float]] = {c: [] for c in CONTENDERS}
    cpu_ms: dict[str, list[float]] = {c: [] for c in CONTENDERS}
    loads = []
    for r in range(rounds):
        order = CONTENDERS if r % 2 == 0 else tuple(reversed(CONTENDERS))
        for c in order:
            samples[c] += time_fn(fns[c], device, budget_s=budget_s, min_reps=2, max_reps=10).times_ms
            if device.type == "cpu":
                cpu_ms[c] += [_cpu_ms(fns[c]) for _ in range(2)]
        if hasattr(os, "getloadavg"):
            loads.append(round(os.getloadavg()[0], 2))
    sub = holder["sub"]
    row = {"workload": workload.name, "m": m, "tensors": workload.tensors, "numel": workload.numel,
           "ranks": sorted(set(sub.ranks().values())), "loadavg_1m": loads}
    for c in CONTENDERS:
        row[c] = {"median_ms": statistics.median(samples[c]), "min_ms": min(samples[c]), "samples": len(samples[c])}
        if cpu_ms[c]:
            row[c]["cpu_median_ms"] = statistics.median(cpu_ms[c])
    copy, total = row["copy"], row["sum"]
    for c in ("from_gradients", "from_reference_rows", "set_subspace"):
        row[c]["x_copy"] = row[c]["median_ms"] / copy["median_ms"]
        row[c]["x_copy_min"] = row[c]["min_ms"] / copy["min_ms"]
        row[c]["x_sum"] = row[c]["median_ms"] / total["median_ms"]
    row["build_x_copy"] = (row["from_gradients"]["median_ms"] + row["set_subspace"]["median_ms"]) / copy["median_ms"]
    row["build_x_copy_min"] = (row["from_gradients"]["min_ms"] + row["set_subspace"]["min_ms"]) / copy["min_ms"]
    row["build_x_sum"] = (row["from_gradients"]["median_ms"] + row["set_subspace"]["median_ms"]) / total["median_ms"]
    row["rows_x_copy"] = ((row["from_reference_rows"]["median_ms"] + row["set_subspace"]["median_ms"])
                          / copy["median_ms"])
    if cpu_ms["copy"]:
        row["build_x_copy_cpu"] = ((row["from_gradients"]["cpu_median_ms"] + row["set_subspace"]["cpu_median_ms"])
                                   / copy["cpu_median_ms"])
    log(f"{workload.name} m={m}: copy {copy['median_ms']:.1f} ms, from_gradients "
        f"{row['from_gradients']['median_ms']:.1f} ms, set_subspace {row['set_subspace']['median_ms']:.1f} ms: "
        f"build {row['build_x_copy']:.2f}x copy (min {row['build_x_copy_min']:.2f}x), "
        f"{row['build_x_sum']:.2f}x sum, from stacked rows {row['rows_x_copy']:.2f}x copy" + (f", CPU time {row['build_x_copy_cpu']:.2f}x copy" if cpu_ms["copy"] else "")
        + f"; load {loads}")
    proj.remove()
    return row


def _cpu_ms(fn) -> float:
    """Process CPU time (user + system, every thread) of one call, in ms."""
    before = resource.getrusage(resource.RUSAGE_SELF)
    fn()
    after = resource.getrusage(resource.RUSAGE_SELF)
    return 1e3 * ((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime))


def run_refresh_suite(device: torch.device, out_dir: Path, *, workloads: Optional[Sequence[str]] = None,
                      ms: Optional[Sequence[int]] = None, rounds: int = 3, budget_s: Optional[float] = None,
                      max_minutes: float = 9.0, log=print) -> dict:
    """Run the suite; write refresh.json and refresh.md into ``out_dir``."""

    start = time.time()
    known = refresh_workloads()
    names = list(workloads) if workloads else ["lora", "125m"]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown refresh workloads {unknown}; choose from {sorted(known)}")
    data = {"suite": "refresh", "env": environment(device), "formula": FORMULA, "results": []}
    for name in names:
        for m in (ms or DEFAULT_MS[name]):
            if time.time() - start > 60 * max_minutes:
                log(f"time limit: skipping {name} m={m}")
                continue
            data["results"].append(run_case(known[name], int(m), device, rounds=rounds,
                                            budget_s=budget_s if budget_s is not None else 1.0, log=log))
            _free(device)  # the case's gradients, bases and model are gone once it returns
    data["env"]["wall_s"] = time.time() - start
    return write_suite_files(data, out_dir, "refresh", refresh_markdown)


def refresh_markdown(data: dict) -> str:
    env = data["env"]
    lines = [f"# Basis build (refresh) on {env['hardware']} ({env['torch_threads']} threads)", "",
             f"{env['date']}, commit {env['git_commit']}, load average at start {env.get('loadavg_start')}, "
             f"at end {env.get('loadavg_end')}.", "",
             "| workload | m | tensors | elements | copy ms | sum ms | from_gradients ms | from_reference_rows ms | "
             "set_subspace ms | build / copy (median, min) | build / sum | build / copy in CPU time | "
             "stacked rows + set / copy | load (1 min) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["results"]:
        lines.append(
            f"| {r['workload']} | {r['m']} | {r['tensors']} | {r['numel'] / 1e6:.1f}M | "
            f"{r['copy']['median_ms']:.1f} (min {r['copy']['min_ms']:.1f}) | {r['sum']['median_ms']:.1f} | "
            f"{r['from_gradients']['median_ms']:.1f} (min {r['from_gradients']['min_ms']:.1f}) | "
            f"{r['from_reference_rows']['median_ms']:.1f} (min {r['from_reference_rows']['min_ms']:.1f}) | "
            f"{r['set_subspace']['median_ms']:.1f} (min {r['set_subspace']['min_ms']:.1f}) | "
            f"{r['build_x_copy']:.2f}x, {r['build_x_copy_min']:.2f}x | {r['build_x_sum']:.2f}x | "
            f"{(format(r['build_x_copy_cpu'], '.2f') + 'x') if 'build_x_copy_cpu' in r else 'n/a'} | "
            f"{r['rows_x_copy']:.2f}x | "
            f"{', '.join(str(x) for x in r['loadavg_1m'])} |")
    lines += ["", "Definitions:"] + [f"- `{k}`: {v}" for k, v in data["formula"].items()]
    return "\n".join(lines) + "\n"
