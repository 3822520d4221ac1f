"""The micro suite (``ogpsa bench --suite cpu|gpu|smoke``): every contender on every
workload, k and dtype pair, with byte accounting and derived bandwidth."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor

from .contenders import MAX_NORM, MICRO_BATCHES, build_contenders
from .report import targets, write_results
from .timing import _free, environment, extra_peak_bytes, peak_copy_bandwidth, time_fn
from .workloads import (
    DTYPES,
    Workload,
    gpt2_125m_workload,
    llama8b_workload,
    lora_workload,
    make_tensors,
    tiny_workload,
)

# ----------------------------------------------------------------------------------------
# Suites and the run
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Config:
    workload: str
    k: int
    grad_dtype: str
    basis_dtype: str
    skip: dict = dataclasses.field(default_factory=dict)  # contender -> why it is not run here


def byte_counts(grads: Sequence[Tensor], bases: Sequence[Tensor]) -> dict:
    """Byte accounting for one case (see the module docstring)."""
    b_g = sum(g.numel() * g.element_size() for g in grads)
    kb_u = sum(u.numel() * u.element_size() for u in bases)  # = sum_i k_i * N_i * sizeof(basis)
    return {"bytes_g": b_g, "bytes_kU": kb_u, "bytes_floor": 3 * b_g + 2 * kb_u,
            "bytes_one_pass": 2 * b_g + kb_u, "bytes_copy": 2 * (b_g + kb_u)}


def suite(name: str, device: torch.device, memory_budget: Optional[int] = None) -> tuple[dict, list[Config]]:
    """Workloads and the ordered list of configurations for a named suite.

    ``cpu`` (the default on a CPU): LoRA and 125M lists for k in {1,2,4,8} with fp32
    gradients and basis and one Llama-3.1-8B layer at k=2 (fp32), then k=2 with bf16/bf16
    and bf16/fp32 (LoRA) and bf16/bf16 (125M), most important first; ``max_minutes`` stops it from starting new cases
    (on a busy machine the tail is listed as not run).
    ``gpu``: all three workloads x k in {1,2,4,8} x (fp32/fp32, bf16/bf16, bf16/fp32), the
    Llama list scaled to as many layers as fit ``memory_budget`` bytes at k=8.
    ``smoke``: one tiny case per contender.
    """
    if name == "smoke":
        return {"tiny": tiny_workload()}, [Config("tiny", 2, "fp32", "fp32")]
    pairs = [("fp32", "fp32"), ("bf16", "bf16"), ("bf16", "fp32")]
    if name == "cpu":
        wl = {"lora": lora_workload(), "125m": gpt2_125m_workload(), "llama8b": llama8b_workload(1)}
        # the README's k=2 cases first, so that a run cut short by --max-minutes still has them
        cfgs = [Config(w, 2, "fp32", "fp32") for w in ("lora", "125m")]
        cfgs.append(Config("llama8b", 2, "fp32", "fp32", skip={
            "authors-hooks": "not run on the CPU Llama layer: one step would take minutes on 2 cores "
                             "(its per-element cost is measured on the 125m list)"}))
        cfgs += [Config(w, k, "fp32", "fp32") for w in ("lora", "125m") for k in (1, 4, 8)]
        # all three dtype pairs on the LoRA list, bf16/bf16 on the 125m list (time)
        cfgs += [Config("lora", 2, g, u) for g, u in pairs[1:]] + [Config("125m", 2, "bf16", "bf16")]
        return wl, cfgs
    if name == "gpu":
        if memory_budget is None:
            memory_budget = int(torch.cuda.get_device_properties(device).total_memory * 0.45) \
                if device.type == "cuda" else 4 << 30
        one = llama8b_workload(1).numel
        # per layer at the worst case (fp32 grads, 8 fp32 basis rows, the copy scratch, temporaries)
        layers = max(1, min(32, memory_budget // (one * 4 * (1 + 8 + 1 + 2))))
        wl = {"llama8b": llama8b_workload(int(layers)), "lora": lora_workload(), "125m": gpt2_125m_workload()}
        # k=2 of every workload and dtype pair first: a run cut short still has the headline cases
        cfgs = [Config(w, k, g, u) for ks_ in ((2,), (1, 4, 8)) for g, u in pairs for w in ("llama8b", "lora", "125m")
                for k in ks_]
        return wl, cfgs
    raise ValueError(f"suite {name!r} is not one of ('cpu', 'gpu', 'smoke')")


def run_config(cfg: Config, wl: Workload, grads: list[Tensor], bases: list[Tensor], device: torch.device, *,
               budget_s: float, measure_memory: bool, only: Optional[Sequence[str]] = None,
               deadline: Optional[float] = None, peak_copy_gbps: Optional[float] = None,
               log=print) -> list[dict]:
    """Time every contender on one case; returns one row per contender."""
    names = [n for n, _ in wl.shapes]
    counts = byte_counts(grads, bases)
    rows = []
    for c in build_contenders(grads, bases, names, only):
        row = {"workload": cfg.workload, "k": cfg.k, "grad_dtype": cfg.grad_dtype, "basis_dtype": cfg.basis_dtype,
               "contender": c.name, "label": c.label, "note": c.note, "numel": wl.numel, "tensors": wl.tensors,
               **counts}
        if c.skip is None and c.name in cfg.skip:
            c.skip = cfg.skip[c.name]
        if c.skip is None and deadline is not None and time.perf_counter() > deadline:
            c.skip = "time budget of the run spent before this contender"
        if c.skip:
            row.update(status="skipped", reason=c.skip)
            rows.append(row)
            continue
        try:
            t = time_fn(c.fn, device, budget_s=budget_s, setup=c.setup)
            row.update(status="ok", median_ms=t.median, min_ms=min(t.times_ms), max_ms=max(t.times_ms),
                       reps=len(t.times_ms), warmup_ms=t.warmup_ms, plan_ms=c.plan_ms)
            if measure_memory and t.median < 3000:
                peak, how = extra_peak_bytes(c.fn, device, setup=c.setup)
                row.update(extra_peak_bytes=peak, memory_method=how)
            else:
                row.update(extra_peak_bytes=None,
                           memory_method="not measured" + (" (contender too slow on this device)" if measure_memory else ""))
        except Exception as exc:  # report and go on: one broken contender must not lose the run
            row.update(status="error", reason=f"{type(exc).__name__}: {exc}")
        rows.append(row)
        log(f"  {c.name:<16} " + (f"{row['median_ms']:10.3f} ms" if row.get("status") == "ok" else row["status"] + ": "
                                  + row.get("reason", "")))
    _derive(rows, wl, peak_copy_gbps)
    return rows


def _derive(rows: list[dict], wl: Workload, peak_copy_gbps: Optional[float] = None) -> None:
    """Bandwidth, % of copy, speed-ups and extrapolation for the rows of one case."""
    by = {r["contender"]: r for r in rows if r.get("status") == "ok"}
    copy = by.get("copy")
    copy_gbps = copy["bytes_copy"] / (copy["median_ms"] * 1e-3) / 1e9 if copy else None
    # the ceiling is the better of this list's copy and one large copy, so that a copy slowed
    # by many small tensors (or by a noisy neighbour) cannot inflate the percentages
    ceiling = max(x for x in (copy_gbps, peak_copy_gbps) if x) if (copy_gbps or peak_copy_gbps) else None
    for r in rows:
        if r.get("status") != "ok":
            continue
        t = r["median_ms"] * 1e-3
        moved = r["bytes_copy"] if r["contender"] == "copy" else r["bytes_floor"]
        if r["contender"] == "clip_grad_norm_":
            moved = 3 * r["bytes_g"]  # clipping alone: read for the norm, read + write to scale
        r["eff_gbps"] = moved / t / 1e9
        r["copy_gbps"] = copy_gbps
        r["ceiling_gbps"] = ceiling
        r["pct_copy"] = 100 * r["eff_gbps"] / ceiling if ceiling else None
        r["ns_per_elem"] = r["median_ms"] * 1e6 / r["numel"]
        if wl.full_numel:
            r["full_numel"] = wl.full_numel
            r["extrapolated_full_ms"] = r["ns_per_elem"] * wl.full_numel * 1e-6
        for ref, key in (("reference", "x_reference"), ("authors-hooks", "x_authors"), ("clip_grad_norm_", "x_clip")):
            r[key] = by[ref]["median_ms"] / r["median_ms"] if ref in by else None
        # x_clip above is "clip is N times faster"; the target wants our time over clip's
        r["over_clip"] = r["median_ms"] / by["clip_grad_norm_"]["median_ms"] if "clip_grad_norm_" in by else None


def run_bench(suite_name: str, device: torch.device, out_dir: Path, *, only: Optional[Sequence[str]] = None,
              workloads: Optional[Sequence[str]] = None, ks: Optional[Sequence[int]] = None,
              max_minutes: float = 9.0, budget_s: Optional[float] = None, plot: bool = True,
              memory_budget: Optional[int] = None, log=print) -> dict:
    """Run a suite and write results.json, results.md and bench.png into ``out_dir``."""
    start = time.perf_counter()
    wls, cfgs = suite(suite_name, device, memory_budget)
    if workloads:
        cfgs = [c for c in cfgs if c.workload in workloads]
    if ks:
        cfgs = [c for c in cfgs if c.k in ks]
    env = environment(device)
    budget_s = budget_s if budget_s is not None else (0.3 if suite_name == "smoke" else 1.5 if device.type == "cpu" else 0.5)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = {"schema": 1, "suite": suite_name, "env": env, "formula": FORMULA, "max_norm": MAX_NORM,
            "micro_batches": MICRO_BATCHES,
            "workloads": {n: {"description": w.description, "tensors": w.tensors, "numel": w.numel,
                              "full_numel": w.full_numel} for n, w in wls.items()},
            "results": [], "skipped_configs": []}
    if suite_name != "smoke":
        data["peak_copy_gbps"] = peak_copy_bandwidth(device, (1 << 30) if device.type == "cuda" else (256 << 20))
        log(f"peak copy bandwidth: {data['peak_copy_gbps']:.1f} GB/s (read + write)")
    cache: dict = {}
    for cfg in cfgs:
        elapsed = (time.perf_counter() - start) / 60
        if elapsed > max_minutes:
            data["skipped_configs"].append({"workload": cfg.workload, "k": cfg.k, "grad_dtype": cfg.grad_dtype,
                                            "basis_dtype": cfg.basis_dtype,
                                            "reason": f"time budget ({max_minutes} min) spent"})
            continue
        key = (cfg.workload, cfg.grad_dtype, cfg.basis_dtype)
        if cache.get("key") != key:
            grads = bases = None  # drop the previous case's tensors before making the next ones
            cache.clear()
            _free(device)
            k_max = max(c.k for c in cfgs if (c.workload, c.grad_dtype, c.basis_dtype) == key)
            g, u = make_tensors(wls[cfg.workload], k_max, DTYPES[cfg.grad_dtype], DTYPES[cfg.basis_dtype], device)
            cache.update(key=key, grads=g, bases=u)
        grads = cache["grads"]
        # the first k rows of a contiguous [k_max, N] basis are a contiguous [k, N] view
        bases = [u[:min(cfg.k, u.shape[0])] for u in cache["bases"]]
        log(f"{cfg.workload} k={cfg.k} grads {cfg.grad_dtype} basis {cfg.basis_dtype} "
            f"({wls[cfg.workload].tensors} tensors, {wls[cfg.workload].numel / 1e6:.1f}M elements)")
        measure = device.type == "cuda" or cfg.k == 2
        data["results"] += run_config(cfg, wls[cfg.workload], grads, bases, device, budget_s=budget_s,
                                      measure_memory=measure, only=only, deadline=start + 60 * max_minutes,
                                      peak_copy_gbps=data.get("peak_copy_gbps"), log=log)
        write_results(data, out_dir, plot=False)
    cache.clear()
    if hasattr(os, "getloadavg"):
        env["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    env["wall_s"] = time.perf_counter() - start
    data["targets"] = targets(data)
    data["files"] = write_results(data, out_dir, plot=plot)
    return data


FORMULA = {
    "bytes_floor": "3*B_g + 2*k*B_u: two-pass projection (pass 1 reads g and k basis rows, pass 2 reads them again "
                   "and writes g); B_g = gradient bytes, B_u = bytes of one basis row set (sum_i N_i * sizeof(basis))",
    "bytes_one_pass": "2*B_g + k*B_u: each input read once, g written once (what a one-pass kernel moves)",
    "bytes_copy": "2*(B_g + k*B_u): the copy contender reads every gradient and basis byte once and writes as many",
    "eff_gbps": "bytes_floor / median time (copy: bytes_copy / time; clip_grad_norm_: 3*B_g / time)",
    "pct_copy": "eff_gbps / ceiling_gbps, the higher of the same case's copy and one large contiguous copy",
    "time": "median over the timed samples, all taken after an explicit warm-up call that is never a sample "
            "(its time is in warmup_ms); CPU: perf_counter; CUDA: events, L2 flushed before each sample; a "
            "contender still slower than 2 s (CPU) / 4 s (CUDA) once warm gets one timed sample",
    "per_step": "every projection contender also clips to max_norm=1.0; authors-hooks = 8 micro-batches of hooks "
                "+ one clip_grad_norm_",
}

