"""Timing, memory measurement and the machine description written into every result file."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from .. import ops
from . import process
from .workloads import REPO_ROOT


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: the clock every sample is read from (a test replaces it with a fake one)
_clock = time.perf_counter


@dataclasses.dataclass
class Timing:
    """Timed samples of one contender (ms) and, apart, its untimed warm-up calls (ms).

    The warm-up calls (compilation, autotuning, allocation, first touch of the data) are never
    samples: :attr:`median` is over ``times_ms`` only."""

    times_ms: list[float]
    warmup_ms: list[float] = dataclasses.field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def warm(self) -> bool:
        """True: every sample was taken after at least one warm-up call (always, since the
        warm-up became explicit; kept for readers of older result files)."""
        return bool(self.warmup_ms)


def time_fn(fn: Callable[[], object], device: torch.device, *, budget_s: float = 2.0, min_reps: int = 3,
            max_reps: int = 20, slow_s: Optional[float] = None,
            setup: Optional[Callable[[], object]] = None, warmup: int = 1) -> Timing:
    """Median-ready samples of ``fn``, taken after ``warmup`` (at least 1) explicit warm-up calls.

    The warm-up calls run first and are never samples, so a contender whose first call compiles,
    autotunes or allocates does not record that call; their times are kept apart
    (``Timing.warmup_ms``). The number of samples follows from the first timed sample:
    ``budget_s`` / its time, clamped to [``min_reps``, ``max_reps``]; a contender whose first
    timed sample (already warm) takes longer than ``slow_s`` (default: 4 s on CUDA, 2 s on the
    CPU) keeps that one sample. CPU: the clock around each call. CUDA: events around each call,
    with the L2 cache flushed before each sample (a 256 MB write) so that repeated calls do not
    measure the cache. ``setup`` (untimed) runs before every call, warm-up calls included, e.g.
    to give ``fn`` fresh gradient tensors."""
    if warmup < 1:
        raise ValueError(f"time_fn: warmup must be >= 1 (the first call is never a sample), got {warmup}")
    if slow_s is None:
        slow_s = 4.0 if device.type == "cuda" else 2.0
    prepare = setup or (lambda: None)
    warm_ms = []
    for _ in range(warmup):
        prepare()
        _sync(device)
        t0 = _clock()
        fn()
        _sync(device)
        warm_ms.append((_clock() - t0) * 1e3)
    if device.type == "cuda":
        flush = torch.empty(256 << 20, dtype=torch.uint8, device=device)

        def sample() -> Callable[[], float]:
            flush.zero_()
            prepare()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            return lambda: s.elapsed_time(e)
    else:
        def sample() -> Callable[[], float]:
            prepare()
            t0 = _clock()
            fn()
            ms = (_clock() - t0) * 1e3
            return lambda: ms

    first = sample()
    _sync(device)
    first_ms = first()
    reps = 1 if first_ms > slow_s * 1e3 else int(min(max_reps, max(min_reps, budget_s * 1e3 / max(first_ms, 1e-6))))
    pending = [sample() for _ in range(reps - 1)]
    _sync(device)
    return Timing([first_ms] + [p() for p in pending], warm_ms)


def extra_peak_bytes(fn: Callable[[], object], device: torch.device,
                     setup: Optional[Callable[[], object]] = None) -> tuple[Optional[int], str]:
    """Memory ``fn`` allocates beyond what exists before the call (after ``setup``), at its peak.

    CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation before the call. CPU:
    the PyTorch profiler's allocation records (``profile_memory=True``), summed in time
    order at operator granularity (a peak inside one operator is not seen)."""
    if setup is not None:
        setup()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base), "cuda max_memory_allocated"
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage)
    cur = peak = 0
    for _, delta in events:
        cur += delta
        peak = max(peak, cur)
    return int(peak), "torch profiler (CPU allocations, operator granularity)"


def _git_commit() -> str:
    if os.environ.get("OGPSA_GIT_COMMIT"):
        return os.environ["OGPSA_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        if out.returncode == 0:
            dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return out.stdout.strip() + ("+dirty" if dirty else "")
    except Exception:
        pass
    return "unknown"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    """Hardware, versions, commit: written into every result file."""
    env = {
        "date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S"),
        "device": str(device),
        "hardware": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "git_commit": _git_commit(),
        "command": process.command_line(),
    }
    if process.POLICY:  # threads, OpenMP wait policy (and whether it is in effect), CPU kernel ISA
        env["process"] = dict(process.POLICY)
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception as exc:
        env["triton"] = f"not importable ({type(exc).__name__})"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu_memory_bytes"] = props.total_memory
        env["gpu_capability"] = f"{props.major}.{props.minor}"
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip()
        except Exception:
            env["driver"] = "unknown"
    env["env_vars"] = {v: os.environ[v] for v in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                                  "OGPSA_BACKEND", "TRITON_INTERPRET") if v in os.environ}
    if hasattr(os, "getloadavg"):
        env["loadavg_start"] = [round(x, 2) for x in os.getloadavg()]
    env["backends"] = {n: {"available": ok, "detail": why} for n, (ok, why) in ops.backends().items()}
    return env


def machine_slug(env: dict) -> str:
    base = env["hardware"] if env["device"].startswith("cuda") else f"cpu-{env['cpu']}-{env['torch_threads']}t"
    return re.sub(r"[^a-z0-9]+", "-", base.lower()).strip("-")


def peak_copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """GB/s (bytes read + written) of one large contiguous copy: the device's plain ceiling."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, budget_s=1.0, min_reps=5)
    return 2 * src.numel() * 4 / (t.median * 1e-3) / 1e9


def _free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def write_suite_files(data: dict, out_dir, name: str, markdown: Callable[[dict], str]) -> dict:
    """Finish a suite's result: the load average at the end into ``data["env"]``, then
    ``<name>.json`` and ``<name>.md`` (from ``markdown(data)``) written atomically into
    ``out_dir`` (created), listed in ``data["files"]``. Returns ``data``."""
    import json

    from .. import atomic

    if hasattr(os, "getloadavg"):
        data["env"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data["files"] = [f"{name}.json", f"{name}.md"]
    atomic.write_text(out_dir / f"{name}.json", json.dumps(data, indent=1, default=str) + "\n")
    atomic.write_text(out_dir / f"{name}.md", markdown(data))
    return data
