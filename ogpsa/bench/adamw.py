"""The projected-AdamW suite (``ogpsa bench --suite adamw``): one optimizer step of
:class:`ogpsa.optim.ProjectedAdamW` (update-space projection) on every backend available for
that step, against torch's AdamW (foreach, and fused where the device has it), alone and
after a separate gradient projection (:meth:`ogpsa.Projector.project`, automatic backend).

Workloads: the micro suite's LoRA list (448 tensors, 41.9M elements) and GPT-2-small list
(148 tensors, 124.4M elements); ``tiny`` for smoke tests. fp32 parameters, gradients and
states, fp32 basis rows (k per tensor), no clipping, per-tensor scope, ``orthogonal`` rule.
All contenders step the same parameters with the same (fixed) gradients, and share one set
of moment tensors (each optimizer keeps its own step count), so the memory is that of one
optimizer; the values drift between contenders, which does not change the cost of the
elementwise work. Rounds are interleaved (the order reversed every other round) so that a
noisy neighbour slows every contender alike; the samples of all rounds are pooled.

Byte floors per element (b_g, b_p: gradient and parameter bytes; fp32 moments, 4 B each;
b_U: bytes of one basis element; k: basis rows of the tensor), summed over tensors:

* AdamW alone: read g, p, m, v and write p, m, v: ``b_g + 2 b_p + 16`` (28 B in fp32).
* projected AdamW, two passes (what the kernels do; moments written once): pass 1 reads g,
  m, v, writes m, v and reads the k rows for the dots c = U d (``b_g + 16 + k b_U``); pass 2
  re-reads m, v to rebuild d, reads and writes p and reads the k rows again to subtract
  U^T w (``8 + 2 b_p + k b_U``): ``b_g + 2 b_p + 24 + 2k b_U`` = 36 + 8k B in fp32. (A single
  pass for a tensor that stays on chip needs ``b_g + 2 b_p + 16 + k b_U``, reported as
  ``bytes_one_pass``; with ``project_weight_decay`` pass 1 also reads p: + b_p.)
* gradient projection + AdamW: the projection's two passes (``3 b_g + 2k b_U``) plus AdamW:
  ``4 b_g + 2 b_p + 16 + 2k b_U`` = 40 + 8k B in fp32.

GB/s = the contender's own floor / its median time; ``x_adamw`` = time / torch AdamW foreach
(``x_fused``: / fused).
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from .process import policy_text
from .timing import _free, environment, peak_copy_bandwidth, time_fn, write_suite_files
from .workloads import Workload, gpt2_125m_workload, lora_workload, make_tensors, tiny_workload

ADAMW_WORKLOADS = ("lora", "125m")
ADAMW_BACKENDS = ("cpu", "torch", "triton", "cuda")
LR = 1e-4

FORMULA = {
    "bytes_adamw": "N*(b_g + 2*b_p + 16): AdamW reads g, p, m, v and writes p, m, v (fp32 moments)",
    "bytes_projected": "N*(b_g + 2*b_p + 24) + 2*sum_i k_i*N_i*b_U: two passes; pass 1 reads g, m, v, writes m, v, "
                       "reads the k basis rows; pass 2 re-reads m, v, reads and writes p, reads the rows again",
    "bytes_one_pass": "N*(b_g + 2*b_p + 16) + sum_i k_i*N_i*b_U: a single pass (tensor kept on chip)",
    "bytes_separate": "bytes_adamw + 3*N*b_g + 2*sum_i k_i*N_i*b_U: gradient projection (two passes) then AdamW",
    "fp32": "b_g = b_p = b_U = 4: AdamW 28 B per element, projected AdamW 36 + 8k, separate 40 + 8k",
    "eff_gbps": "the contender's own byte floor / its median time; pct_copy: of one large contiguous copy",
    "x_adamw": "median time / median time of torch AdamW foreach (x_fused: / torch AdamW fused); x_best_separate: "
               "/ the faster of projection + AdamW foreach or fused; *_min: the same ratios of minimum times",
    "time": "median of the pooled samples of all rounds, each round after an explicit warm-up call",
}


def _increment_version(t: Tensor) -> None:
    bump = getattr(torch.autograd.graph, "increment_version", None)
    if bump is not None:
        bump(t)
    else:  # an in-place op on an empty view shares the base's version counter
        t.view(-1)[:0].add_(0)


def adamw_workloads() -> dict[str, Workload]:
    return {"lora": lora_workload(), "125m": gpt2_125m_workload(), "tiny": tiny_workload()}


def byte_counts(params: Sequence[Tensor], bases: Sequence[Tensor]) -> dict:
    """Byte floors of one step over ``params`` (their ``.grad`` set) with ``bases`` (see the module
    docstring); fp32 moments."""
    n = sum(p.numel() for p in params)
    b_g = sum(p.grad.numel() * p.grad.element_size() for p in params)
    b_p = sum(p.numel() * p.element_size() for p in params)
    kb_u = sum(u.numel() * u.element_size() for u in bases)
    adamw = b_g + 2 * b_p + 16 * n
    return {"numel": n, "bytes_g": b_g, "bytes_p": b_p, "bytes_kU": kb_u, "bytes_adamw": adamw,
            "bytes_projected": adamw + 8 * n + 2 * kb_u, "bytes_one_pass": adamw + kb_u,
            "bytes_separate": adamw + 3 * b_g + 2 * kb_u}


def projected_backends(device: torch.device) -> list[tuple[str, Optional[str]]]:
    """``(backend, skip reason or None)`` for the projected AdamW step on ``device``.

    A backend counts when :func:`ogpsa.optim.backends.requested` accepts it (an unavailable
    one raises there) and it runs on ``device``'s tensors; :func:`build_adamw_contenders` then
    checks, from the step's statistics, that it really ran (not the torch fallback).
    ``OGPSA_BACKEND`` overrides every config, so with it set only that backend is timed."""
    from ..optim import backends as ob

    env = os.environ.get("OGPSA_BACKEND", "")
    out = []
    for name in ADAMW_BACKENDS:
        why = None
        if env and name != env:
            why = f"OGPSA_BACKEND={env} overrides the config's backend: only {env} is timed"
        elif name == "cpu" and device.type != "cpu":
            why = "the compiled CPU kernel takes CPU tensors only"
        elif name in ("triton", "cuda") and device.type != "cuda":
            why = "GPU kernel: no CUDA device here (the Triton interpreter is a test tool, not a performance path)"
        elif name != "torch":
            check = getattr(ob, "requested", None) or ob.choose
            try:
                got = check(name)
            except Exception as exc:  # an unavailable backend requested by name is an error there
                why = f"{type(exc).__name__}: {exc}"
            else:
                if got != name:
                    why = f"backend={name!r} runs the {got} path for this step (no {name} kernel for it here)"
        out.append((name, why))
    return out


def _fused_supported(p: Tensor) -> Optional[str]:
    """None when torch's fused AdamW runs on ``p``'s device and dtype, else why not."""
    try:
        q = torch.nn.Parameter(torch.zeros(3, dtype=p.dtype, device=p.device))
        q.grad = torch.ones_like(q)
        torch.optim.AdamW([q], lr=LR, fused=True).step()
    except (RuntimeError, ValueError, TypeError) as exc:
        return f"torch AdamW fused=True is not available here ({type(exc).__name__}: {exc})"
    return None


class _Case:
    """Parameters, fixed gradients, bases and one shared set of moments for one workload."""

    def __init__(self, wl: Workload, k: int, device: torch.device, seed: int = 0):
        grads, bases = make_tensors(wl, k, torch.float32, torch.float32, device, seed=seed)
        gen = torch.Generator(device=device).manual_seed(seed + 1)
        self.model = torch.nn.Module()
        self.params = []
        for i, g in enumerate(grads):
            p = torch.nn.Parameter(torch.empty_like(g))
            p.data.normal_(generator=gen)
            g.mul_(1e-3)  # gradient-sized values: v stays far from subnormal floats
            p.grad = g
            self.model.register_parameter(f"p{i}", p)
            self.params.append(p)
        self.bases = bases
        self.moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in self.params]
        import ogpsa

        self.subspace = ogpsa.Subspace([f"p{i}" for i in range(len(grads))], [tuple(g.shape) for g in grads], bases,
                                       ogpsa.OGPSAConfig(rank=k, max_norm=None))

    def touch_grads(self) -> None:
        """Bump every gradient's version counter, as a backward pass writing it would, so that
        the projector projects them again (it skips gradients it projected and nobody wrote)."""
        for p in self.params:
            _increment_version(p.grad)

    def share_moments(self, opt: torch.optim.Optimizer) -> None:
        """Point ``opt``'s exp_avg/exp_avg_sq at the shared moments (after its first step
        allocated its own; its step count stays its own)."""
        for p, (m, v) in zip(self.params, self.moments):
            st = opt.state[p]
            st["exp_avg"], st["exp_avg_sq"] = m, v


def build_adamw_contenders(case: _Case, device: torch.device, only: Optional[Sequence[str]] = None
                           ) -> list[dict]:
    """Contenders as dicts: name, label, floor (which byte count), fn (one step) or skip."""
    import ogpsa

    from ..optim import ProjectedAdamW

    def wanted(name: str) -> bool:
        return not only or any(name.startswith(o) for o in only)

    out: list[dict] = []
    fused_why = _fused_supported(case.params[0])
    proj = None
    if any(wanted(n) for n in ("project+adamw:foreach", "project+adamw:fused")):
        # the subspace's config (rank k, no clipping), gradient space said explicitly (no fallback warning)
        cfg = dataclasses.replace(case.subspace.config, space="gradient")
        proj = ogpsa.attach(case.model, None, case.subspace, cfg)
    for kind in ("foreach", "fused"):
        why = fused_why if kind == "fused" else None
        for separate in (False, True):
            name = ("project+adamw:" if separate else "torch-adamw:") + kind
            if not wanted(name):
                continue
            label = (f"Projector.project() (gradient space) + torch AdamW {kind}" if separate
                     else f"torch AdamW {kind}=True, no projection")
            row = {"name": name, "label": label, "floor": "bytes_separate" if separate else "bytes_adamw"}
            if why:
                out.append(dict(row, skip=why))
                continue
            opt = torch.optim.AdamW(case.params, lr=LR, **{kind: True})
            opt.step()  # allocates its state, then the shared moments replace it
            case.share_moments(opt)
            row["fn"] = (lambda o=opt: (proj.project(), o.step())) if separate else opt.step
            if separate:  # the projector skips gradients it already projected: mark them written (untimed)
                row["setup"] = case.touch_grads
            out.append(row)
    for backend, why in projected_backends(device):
        name = f"projected-adamw:{backend}"
        if not wanted(name):
            continue
        row = {"name": name, "label": f"ogpsa ProjectedAdamW, backend={backend!r} (update space)",
               "floor": "bytes_projected"}
        if why:
            out.append(dict(row, skip=why))
            continue
        try:
            opt = ProjectedAdamW(case.model, case.subspace, lr=LR, config=ogpsa.OGPSAConfig(backend=backend))
            opt.step()
            case.share_moments(opt)
        except Exception as exc:  # report it and go on with the other contenders
            out.append(dict(row, skip=f"{type(exc).__name__}: {exc}"))
            continue
        ran = tuple(getattr(opt.last_stats, "backends", ()) or ())
        if ran and backend not in ran:
            out.append(dict(row, skip=f"backend={backend!r} ran {'/'.join(ran)} on these tensors"))
            continue
        out.append(dict(row, fn=opt.step, ran_backends=list(ran)))
    if proj is not None:
        for row in out:
            row.setdefault("cleanup", proj.remove)
    return out


def run_case(name: str, wl: Workload, k: int, device: torch.device, *, budget_s: float, rounds: int = 2,
             only: Optional[Sequence[str]] = None, peak_copy_gbps: Optional[float] = None,
             log: Callable[[str], object] = print) -> list[dict]:
    """Time every contender on one workload; one row per contender."""
    case = _Case(wl, k, device)
    counts = byte_counts(case.params, case.bases)
    contenders = build_adamw_contenders(case, device, only)
    samples: dict[str, list[float]] = {c["name"]: [] for c in contenders}
    warmups: dict[str, list[float]] = {c["name"]: [] for c in contenders}
    runnable = [c for c in contenders if "fn" in c]
    for r in range(rounds):
        for c in (runnable if r % 2 == 0 else runnable[::-1]):
            t = time_fn(c["fn"], device, budget_s=budget_s / rounds, min_reps=3, max_reps=10, setup=c.get("setup"))
            samples[c["name"]] += t.times_ms
            warmups[c["name"]] += t.warmup_ms
    rows = []
    for c in contenders:
        row = {"workload": name, "description": wl.description, "tensors": wl.tensors, "k": k, "contender": c["name"],
               "label": c["label"], "floor": c["floor"], **counts}
        if c.get("ran_backends"):
            row["ran_backends"] = c["ran_backends"]  # what the step's statistics say ran (a mix: some tensors fell back)
        if "fn" not in c:
            row.update(status="skipped", reason=c["skip"])
        else:
            xs = samples[c["name"]]
            row.update(status="ok", median_ms=statistics.median(xs), min_ms=min(xs), max_ms=max(xs), reps=len(xs),
                       raw_ms=[round(x, 4) for x in xs], warmup_ms=[round(x, 4) for x in warmups[c["name"]]])
        rows.append(row)
        log(f"  {c['name']:<26} " + (f"{row['median_ms']:10.2f} ms" if row["status"] == "ok"
                                     else "skipped: " + row["reason"]))
    if contenders and "cleanup" in contenders[0]:
        contenders[0]["cleanup"]()
    derive(rows, peak_copy_gbps)
    return rows


def derive(rows: list[dict], peak_copy_gbps: Optional[float] = None) -> None:
    """GB/s by each contender's own floor, % of copy, and the ratios to torch AdamW."""
    by = {r["contender"]: r for r in rows if r.get("status") == "ok"}
    foreach, fused = by.get("torch-adamw:foreach"), by.get("torch-adamw:fused")
    separate = [r for n, r in by.items() if n.startswith("project+adamw:")]
    best_sep = min(separate, key=lambda r: r["median_ms"]) if separate else None
    for r in by.values():
        t = r["median_ms"] * 1e-3
        r["bytes_per_element"] = r[r["floor"]] / r["numel"]
        r["eff_gbps"] = r[r["floor"]] / t / 1e9
        r["pct_copy"] = 100 * r["eff_gbps"] / peak_copy_gbps if peak_copy_gbps else None
        r["x_adamw"] = r["median_ms"] / foreach["median_ms"] if foreach else None
        r["x_fused"] = r["median_ms"] / fused["median_ms"] if fused else None
        r["x_best_separate"] = (r["median_ms"] / best_sep["median_ms"]
                                if best_sep and r["contender"].startswith("projected-adamw:") else None)
        # the same ratios by minima (the least disturbed sample of each contender, interleaved rounds)
        r["pct_copy_min"] = (100 * r[r["floor"]] / (r["min_ms"] * 1e-3) / 1e9 / peak_copy_gbps
                             if peak_copy_gbps else None)
        r["x_adamw_min"] = r["min_ms"] / foreach["min_ms"] if foreach else None
        r["x_fused_min"] = r["min_ms"] / fused["min_ms"] if fused else None
        best_sep_min = min(separate, key=lambda x: x["min_ms"]) if separate else None
        r["x_best_separate_min"] = (r["min_ms"] / best_sep_min["min_ms"]
                                    if best_sep_min and r["contender"].startswith("projected-adamw:") else None)


def run_adamw_suite(device: torch.device, out_dir, *, workloads: Optional[Sequence[str]] = None,
                    ks: Optional[Sequence[int]] = None, only: Optional[Sequence[str]] = None,
                    budget_s: Optional[float] = None, rounds: int = 2, max_minutes: float = 9.0,
                    log: Callable[[str], object] = print) -> dict:
    """Run the suite; write adamw.json and adamw.md into ``out_dir``; ``data["files"]`` lists them."""

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    env = environment(device)
    wls = adamw_workloads()
    names = list(workloads or ADAMW_WORKLOADS)
    for n in names:
        if n not in wls:
            raise ValueError(f"adamw workload {n!r} is not one of {tuple(wls)}")
    ks = list(ks or [2])
    budget_s = budget_s if budget_s is not None else (3.0 if device.type == "cpu" else 1.0)
    data = {"schema": 1, "suite": "adamw", "env": env, "formula": FORMULA, "lr": LR, "rounds": rounds,
            "workloads": {n: {"description": wls[n].description, "tensors": wls[n].tensors, "numel": wls[n].numel}
                          for n in names}, "results": [], "skipped_configs": []}
    if names != ["tiny"]:
        data["peak_copy_gbps"] = peak_copy_bandwidth(device, (1 << 30) if device.type == "cuda" else (256 << 20))
        log(f"peak copy bandwidth: {data['peak_copy_gbps']:.1f} GB/s (read + write)")
    for n in names:
        for k in ks:
            if (time.perf_counter() - start) / 60 > max_minutes:
                data["skipped_configs"].append({"workload": n, "k": k, "reason": f"time budget ({max_minutes} min) spent"})
                continue
            log(f"{n} k={k} ({wls[n].tensors} tensors, {wls[n].numel / 1e6:.1f}M elements, fp32 params and states)")
            data["results"] += run_case(n, wls[n], k, device, budget_s=budget_s, rounds=rounds, only=only,
                                        peak_copy_gbps=data.get("peak_copy_gbps"), log=log)
            _free(device)
    env["wall_s"] = time.perf_counter() - start
    return write_suite_files(data, out_dir, "adamw", adamw_markdown)


def _f(x, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def adamw_table(rows: Sequence[dict]) -> list[str]:
    if not any("x_fused_min" in r for r in rows if r.get("status") == "ok"):
        return _adamw_table_v1(rows)
    lines = ["| contender | ms / step (median, min) | bytes / element (floor) | GB/s | % of copy (median, min) "
             "| × torch AdamW foreach | × torch AdamW fused (median, min) | × projection + AdamW (median, min) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"| {r['contender']} | {r['status']}: {r.get('reason', '')[:100]} | | | | | | |")
            continue
        sep = (f"{_f(r.get('x_best_separate'), '.2f')}, {_f(r.get('x_best_separate_min'), '.2f')}"
               if r.get("x_best_separate") is not None else "")
        lines.append(f"| {r['contender']} | {r['median_ms']:.2f}, {r['min_ms']:.2f} | {r['bytes_per_element']:.0f} | "
                     f"{r['eff_gbps']:.1f} | {_f(r['pct_copy'], '.0f')}, {_f(r.get('pct_copy_min'), '.0f')} | "
                     f"{_f(r['x_adamw'], '.2f')} | {_f(r['x_fused'], '.2f')}, {_f(r.get('x_fused_min'), '.2f')} | "
                     f"{sep} |")
    return lines


def _adamw_table_v1(rows: Sequence[dict]) -> list[str]:
    """The table of result files written before the ratios by minima existed."""
    lines = ["| contender | ms / step | bytes / element (floor) | GB/s | % of copy | × torch AdamW foreach "
             "| × torch AdamW fused |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"| {r['contender']} | {r['status']}: {r.get('reason', '')[:100]} | | | | | |")
            continue
        lines.append(f"| {r['contender']} | {r['median_ms']:.2f} | {r['bytes_per_element']:.0f} | {r['eff_gbps']:.1f} | "
                     f"{_f(r['pct_copy'], '.0f')} | {_f(r['x_adamw'], '.2f')} | {_f(r['x_fused'], '.2f')} |")
    return lines


def _verdict(values: Sequence[Optional[float]], goal: float) -> str:
    ok = all(v is not None and v <= goal for v in values)
    return "met" if ok else "short"


def adamw_claims(data: dict) -> list[str]:
    """The performance sentences the docs state, generated from a result file (new-format files only):
    the compiled CPU step against torch's fused AdamW and against projection + AdamW, by medians and minima."""
    out = []
    for wl, k in _cases(data):
        by = {r["contender"]: r for r in data["results"] if (r["workload"], r["k"]) == (wl, k) and r.get("status") == "ok"}
        r = by.get("projected-adamw:cpu")
        if r is None or r.get("x_fused_min") is None:
            continue
        out.append(f"{wl}, k={k}: ProjectedAdamW (cpu kernel) takes {r['x_fused']:.2f}× (median) / {r['x_fused_min']:.2f}× "
                   f"(minimum) torch's fused AdamW step (goal <= 2.0×: {_verdict([r['x_fused'], r['x_fused_min']], 2.0)}; "
                   "its byte floor is 52 B per element against fused AdamW's 28, 1.86×)")
        if r.get("x_best_separate") is not None:
            out.append(f"{wl}, k={k}: it takes {r['x_best_separate']:.2f}× (median) / {r['x_best_separate_min']:.2f}× "
                       "(minimum) the faster of gradient projection + torch AdamW (foreach or fused) (goal <= 0.77×, "
                       "i.e. 1.3× faster: "
                       f"{_verdict([r['x_best_separate'], r['x_best_separate_min']], 1 / 1.3)}; byte floors 52 vs 56 B)")
        if r.get("pct_copy") is not None:
            out.append(f"{wl}, k={k}: {r['eff_gbps']:.1f} GB/s by its byte floor, {r['pct_copy']:.0f} % (median) / "
                       f"{r['pct_copy_min']:.0f} % (minimum) of the copy bandwidth measured in the same run "
                       f"({data.get('peak_copy_gbps', 0):.1f} GB/s; on a shared machine that copy is itself noisy)")
    return out


def _cases(data: dict) -> list[tuple[str, int]]:
    return list(dict.fromkeys((r["workload"], r["k"]) for r in data["results"]))


def adamw_markdown(data: dict) -> str:
    env = data["env"]
    out = [f"# ogpsa bench: {env['hardware']} (adamw suite)", "",
           f"- date {env['date']}, git {env['git_commit']}, torch {env['torch']}, python {env['python']}, "
           f"{env['torch_threads']} torch threads on {env['cpu_count']} CPUs, environment {env.get('env_vars') or '{}'}",
           *([f"- process: {policy_text(env['process'])}"] if env.get("process") else []),
           f"- load average at start/end: {env.get('loadavg_start')} / {env.get('loadavg_end')} "
           "(the CPU may be shared: timings include that noise)",
           f"- command: `{env['command']}`",
           f"- peak copy bandwidth (one large copy, read + write): {_f(data.get('peak_copy_gbps'), '.1f')} GB/s",
           "- fp32 parameters, gradients, moments and basis; no clipping; lr 1e-4, default betas/eps/decay; "
           f"{data['rounds']} interleaved rounds, medians of the pooled samples", ""]
    out += [f"- {key}: {text}" for key, text in data["formula"].items()] + [""]
    for wl, k in _cases(data):
        rows = [r for r in data["results"] if (r["workload"], r["k"]) == (wl, k)]
        w = data["workloads"][wl]
        out += [f"## {wl}, k={k}: {w['description']} ({w['tensors']} tensors, {w['numel'] / 1e6:.1f}M elements)", ""]
        out += adamw_table(rows) + [""]
    if data.get("skipped_configs"):
        out += ["## Not run", ""] + [f"- {c['workload']} k={c['k']}: {c['reason']}" for c in data["skipped_configs"]]
    return "\n".join(out) + "\n"


def adamw_readme_block(data: dict, rel: str, start: str, end: str) -> str:
    """The README block for a committed adamw.json (``rel``: its path from the repository root)."""
    env = data["env"]
    folder = rel.rsplit("/", 1)[0]
    out = [start, f"Source: [`{rel}`]({rel}) (full tables: [`{folder}/adamw.md`]({folder}/adamw.md)), written by "
           f"`{env['command']}` on {env['date'][:10]}, git `{env['git_commit'][:12]}`: {env['hardware']}, "
           f"{env['torch_threads']} torch threads, torch {env['torch']}, environment {env.get('env_vars') or '{}'}, "
           f"load average {env.get('loadavg_start')} at the start and {env.get('loadavg_end')} at the end. Peak copy "
           f"bandwidth {_f(data.get('peak_copy_gbps'), '.1f')} GB/s. One optimizer step, fp32 parameters, gradients, "
           "moments and basis; GB/s by each contender's byte floor per element: AdamW 28 B, projected AdamW "
           "36 + 8k B (two passes), gradient projection + AdamW 40 + 8k B.", ""]
    for wl, k in _cases(data):
        rows = [r for r in data["results"] if (r["workload"], r["k"]) == (wl, k)]
        w = data["workloads"][wl]
        out += [f"**{wl}** ({w['description']}; {w['tensors']} tensors, {w['numel'] / 1e6:.1f}M elements), k={k}:", ""]
        out += adamw_table(rows) + [""]
    claims = adamw_claims(data)
    if claims:
        out += ["Measured in this file (goals of issue 22 item 1; met only when met by both medians and minima):", ""]
        out += [f"- {c}" for c in claims] + [""]
    out.append(end)
    return "\n".join(out)


__all__ = ["ADAMW_WORKLOADS", "FORMULA", "adamw_markdown", "adamw_readme_block", "adamw_table", "adamw_workloads",
           "build_adamw_contenders", "byte_counts", "derive", "projected_backends", "run_adamw_suite", "run_case"]
