"""The training-loop suite (``ogpsa bench --suite loop``): OGPSA as users run it.

A tiny Llama (:func:`ogpsa.tiny.tiny_llama`) trained with AdamW in a plain loop that calls
``optimizer.zero_grad()`` with its default ``set_to_none=True`` (as the HF Trainer does), so
every step has new gradient tensors. Two workloads: PEFT LoRA adapters on every linear
(``lora``; the adapters' B matrices start random so every adapter has a direction) and a full
fine-tune (``full``). Gradient space (``space="gradient"``; the update-space step is timed by
the adamw suite), k=2 (two reference gradients), tensor scope, no clipping (the AdamW
baseline does not clip either). Per workload, after ``warmup`` untimed iterations, ``repeats`` x
``steps`` timed iterations, each running the four kinds back to back so that a busy machine slows
all alike (the 1-minute load average is recorded at the start of every repeat):

* ``adamw_step_ms``: ``optimizer.step()`` with the projector paused (AdamW alone, torch's default
  implementation: a for-loop on the CPU, foreach on CUDA);
* ``ogpsa_step_ms``: ``optimizer.step()`` with OGPSA attached (its step pre-hook projects);
* ``fused_step_ms``: a second AdamW with ``fused=True`` over the same parameters (its own state)
  stepping alone, and ``ogpsa_fused_step_ms``: ``proj.project()`` then that fused step (what the
  attached step pre-hook does before a fused AdamW), where torch has a fused AdamW for the device;
* ``train_*_ms``: the whole training step of each of those four: ``zero_grad()``, forward,
  backward and the step (``train_ratio`` = OGPSA / AdamW, ``train_ratio_fused`` likewise fused);
* ``project_fresh_ms``: ``proj.project()`` on fresh gradients (after ``zero_grad()``);
* ``project_reused_ms``: ``proj.project()`` on the same gradient buffers, zeroed in place
  (``zero_grad(set_to_none=False)``).

Ratios of medians over all timed iterations: ``step_ratio`` = ogpsa / adamw step (target <= 1.5
for LoRA, k=2) and ``fresh_over_reused`` = fresh / reused projection (target <= 1.2); the
``*_paired`` ratios are medians of the per-iteration ratios (robust to slow phases of a shared
machine). The ``*_min`` ratios are ratios of the minima.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable, Optional, Sequence

import torch

from .. import atomic
from .process import policy_text
from .timing import _free, _sync, environment

LOOP_WORKLOADS = ("lora", "full")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _model(workload: str, hidden: int, layers: int, vocab: int, lora_rank: int, seed: int):
    from ..tiny import tiny_llama

    model = tiny_llama(vocab, hidden, layers, heads=max(1, hidden // 32), seed=seed)
    if workload == "full":
        return model
    from peft import LoraConfig, get_peft_model

    # init_lora_weights=False: B random instead of zero, so every adapter (A too) has a
    # reference gradient and therefore a basis, as after the first steps of real training
    cfg = LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, target_modules=LORA_TARGETS, lora_dropout=0.0,
                     init_lora_weights=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        return get_peft_model(model, cfg)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call, device work included (synchronised before and after on CUDA)."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _ms(xs: Sequence[float]) -> float:
    return statistics.median(xs) * 1e3


def _paired(num: Sequence[float], den: Sequence[float]) -> float:
    """Median of the per-iteration ratios (the two kinds of one iteration ran back to back)."""
    return statistics.median(a / b for a, b in zip(num, den))


def _summary(times: dict[str, list[float]]) -> dict:
    """Medians (ms) and ratios of one set of samples (fused and train_* kinds when present)."""
    out = {"adamw_step_ms": _ms(times["adamw"]), "ogpsa_step_ms": _ms(times["ogpsa"]),
           "project_fresh_ms": _ms(times["fresh"]), "project_reused_ms": _ms(times["reused"])}
    out["step_ratio"] = out["ogpsa_step_ms"] / out["adamw_step_ms"]
    out["fresh_over_reused"] = out["project_fresh_ms"] / out["project_reused_ms"]
    out["step_ratio_paired"] = _paired(times["ogpsa"], times["adamw"])
    out["fresh_over_reused_paired"] = _paired(times["fresh"], times["reused"])
    out["step_ratio_min"] = min(times["ogpsa"]) / min(times["adamw"])
    # (ratio key, numerator kind, denominator kind): fused AdamW and the whole training step
    pairs = [("step_ratio_fused", "ogpsa_fused", "fused"), ("train_ratio", "train_ogpsa", "train_adamw"),
             ("train_ratio_fused", "train_ogpsa_fused", "train_fused")]
    for kind in ("fused", "ogpsa_fused", "train_adamw", "train_ogpsa", "train_fused", "train_ogpsa_fused"):
        if times.get(kind):
            out[f"{kind}_step_ms" if not kind.startswith("train_") else f"{kind}_ms"] = _ms(times[kind])
    for key, num, den in pairs:
        if times.get(num) and times.get(den):
            out[key] = statistics.median(times[num]) / statistics.median(times[den])
            out[key + "_paired"] = _paired(times[num], times[den])
            out[key + "_min"] = min(times[num]) / min(times[den])
    return out


def _load1() -> Optional[float]:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def _fused_adamw(params: list) -> Optional[torch.optim.Optimizer]:
    """torch AdamW(fused=True) over ``params`` (its own state), or None where torch has none."""
    try:
        return torch.optim.AdamW(params, lr=1e-4, fused=True)
    except (RuntimeError, ValueError, TypeError):
        return None


def run_workload(workload: str, *, device: Optional[torch.device] = None, hidden: int = 256, layers: int = 12,
                 vocab: int = 512, seq: int = 64, batch: int = 4, lora_rank: int = 16, steps: int = 20,
                 warmup: int = 3, repeats: int = 1, seed: int = 0, log: Callable[[str], object] = print) -> dict:
    """Time one workload; returns its result row (times in ms, ratios, sizes).

    ``warmup`` untimed iterations first, then ``repeats`` x ``steps`` timed iterations; the
    headline medians and ratios are over all timed iterations, and each repeat's own medians,
    ratios and 1-minute load average (at its start) are kept in ``row["repeats"]``."""
    import ogpsa

    if workload not in LOOP_WORKLOADS:
        raise ValueError(f"loop workload {workload!r} is not one of {LOOP_WORKLOADS}")
    if steps < 1 or repeats < 1 or warmup < 0:
        raise ValueError(f"steps ({steps}) and repeats ({repeats}) must be >= 1 and warmup ({warmup}) >= 0")
    device = torch.device(device or "cpu")
    model = _model(workload, hidden, layers, vocab, lora_rank, seed).to(device)
    model.train()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(seed)

    def ids():
        return torch.randint(0, vocab, (batch, seq), generator=gen).to(device)

    def backward(x):
        model(input_ids=x, labels=x).loss.backward()

    refs = []
    for _ in range(2):  # k=2: two reference gradients
        model.zero_grad(set_to_none=True)
        backward(ids())
        refs.append({n: p.grad.detach().clone() for n, p in params})
    model.zero_grad(set_to_none=True)
    # gradient space, said explicitly (the default preset projects AdamW's update instead, inside the
    # step, where proj.project() has nothing to do): the update-space step is the adamw suite's
    config = ogpsa.OGPSAConfig(rank=2, max_norm=None, space="gradient")
    subspace = ogpsa.Subspace.from_gradients(refs, config)
    del refs
    opt = torch.optim.AdamW([p for _, p in params], lr=1e-4)
    proj = ogpsa.attach(model, opt, subspace, config)
    fused = _fused_adamw([p for _, p in params])
    kinds = ("adamw", "ogpsa", "fresh", "reused", "train_adamw", "train_ogpsa")
    if fused is not None:
        kinds += ("fused", "ogpsa_fused", "train_fused", "train_ogpsa_fused")
    per_repeat: list[dict] = []
    times: dict[str, list[float]] = {k: [] for k in kinds}

    def fused_projected() -> None:
        proj.project()  # what the attached pre-hook runs before the step
        fused.step()

    def iteration(rec: Optional[dict]) -> None:
        # AdamW alone, then AdamW with OGPSA (default, then fused): fresh gradients each (zero_grad
        # default); the whole training step (zero_grad, forward, backward, step) timed too
        for kind in ("adamw", "ogpsa") + (("fused", "ogpsa_fused") if fused is not None else ()):
            x = ids()
            t0 = time.perf_counter()
            opt.zero_grad()
            backward(x)
            fb = _timed(lambda: None, device) + time.perf_counter() - t0
            if kind == "adamw":
                with proj.paused():
                    dt = _timed(opt.step, device)
            elif kind == "ogpsa":
                dt = _timed(opt.step, device)
            elif kind == "fused":
                dt = _timed(fused.step, device)
            else:
                dt = _timed(fused_projected, device)
            if rec is not None:
                rec[kind].append(dt)
                rec["train_" + kind].append(fb + dt)
        # projection alone: fresh tensors, then the same buffers zeroed in place
        for kind, set_to_none in (("fresh", True), ("reused", False)):
            opt.zero_grad(set_to_none=set_to_none)
            backward(ids())
            dt = _timed(proj.project, device)
            if rec is not None:
                rec[kind].append(dt)
            opt.step()  # already projected: the hook does not project again

    try:
        for _ in range(warmup):
            iteration(None)
        for _ in range(repeats):
            rec: dict[str, list[float]] = {k: [] for k in kinds}
            load = _load1()
            for _ in range(steps):
                iteration(rec)
            per_repeat.append(dict(_summary(rec), loadavg_1min=load))
            for k in kinds:
                times[k] += rec[k]
        projections = proj.num_projections
    finally:
        proj.remove()
    row = {
        "workload": workload,
        "description": (f"tiny Llama {layers} layers x {hidden} wide, vocab {vocab}, "
                        + (f"PEFT LoRA r={lora_rank} on {', '.join(LORA_TARGETS)}" if workload == "lora"
                           else "full fine-tune")),
        "trainable_tensors": len(params),
        "trainable_numel": sum(p.numel() for _, p in params),
        "k": 2, "batch": batch, "seq": seq, "steps": steps, "warmup": warmup, "repeats": repeats,
        **_summary(times),
        "projections": projections,
        "repeat_results": per_repeat,
        "raw_ms": {k: [round(x * 1e3, 4) for x in v] for k, v in times.items()},
    }
    log(f"  {workload}: {row['trainable_tensors']} tensors, {row['trainable_numel'] / 1e6:.2f}M elements: "
        f"AdamW step {row['adamw_step_ms']:.2f} ms, with OGPSA {row['ogpsa_step_ms']:.2f} ms "
        f"({row['step_ratio']:.2f}x; paired {row['step_ratio_paired']:.2f}x)"
        + (f"; fused AdamW {row['fused_step_ms']:.2f} ms, with OGPSA {row['ogpsa_fused_step_ms']:.2f} ms "
           f"({row['step_ratio_fused']:.2f}x)" if "step_ratio_fused" in row else "")
        + f"; whole training step {row['train_ratio']:.2f}x"
        + (f" (fused {row['train_ratio_fused']:.2f}x)" if "train_ratio_fused" in row else "")
        + "; project fresh "
        f"{row['project_fresh_ms']:.2f} ms vs reused {row['project_reused_ms']:.2f} ms "
        f"({row['fresh_over_reused']:.2f}x; paired {row['fresh_over_reused_paired']:.2f}x)")
    return row


def run_loop(workloads: Optional[Sequence[str]] = None, *, log: Callable[[str], object] = print,
             **kwargs) -> list[dict]:
    """Every loop workload (or those named); a workload that cannot run (e.g. PEFT missing)
    gives a row with ``status="skipped"`` and the reason."""
    rows = []
    for name in workloads or LOOP_WORKLOADS:
        try:
            if name == "lora":
                import peft  # noqa: F401
        except ImportError as exc:
            rows.append({"workload": name, "status": "skipped", "reason": f"peft is not installed ({exc})"})
            continue
        rows.append(dict(run_workload(name, log=log, **kwargs), status="ok"))
    return rows


#: the issue's targets: (row key, goal, workloads it applies to (None: all))
LOOP_GOALS = (("step_ratio", 1.5, ("lora",)), ("fresh_over_reused", 1.2, None))


def _verdict(value: float, goal: float) -> str:
    return "met" if value <= goal else "short"


def loop_targets(rows: Sequence[dict]) -> list[str]:
    """The issue's loop targets as measured ratios, each judged met or short on the ratio of
    medians (the paired ratio, median of per-iteration ratios, is shown beside it). Never asserts."""
    out = []
    for r in rows:
        if r.get("status") != "ok":
            continue
        step_goal = r["workload"] == "lora"
        out.append(f"{r['workload']}: optimizer.step() with OGPSA / AdamW alone = {r['step_ratio']:.2f}x "
                   f"(paired {r['step_ratio_paired']:.2f}x)"
                   + (f" (target <= 1.5x: {_verdict(r['step_ratio'], 1.5)})" if step_goal else " (no target)"))
        if "step_ratio_fused" in r:
            out.append(f"{r['workload']}: optimizer.step() with OGPSA / AdamW alone, both fused=True = "
                       f"{r['step_ratio_fused']:.2f}x (paired {r['step_ratio_fused_paired']:.2f}x, minima "
                       f"{r['step_ratio_fused_min']:.2f}x) (no target)")
        if "train_ratio" in r:
            out.append(f"{r['workload']}: whole training step (zero_grad, forward, backward, step) with OGPSA / "
                       f"without = {r['train_ratio']:.2f}x (paired {r['train_ratio_paired']:.2f}x)"
                       + (f", with fused AdamW {r['train_ratio_fused']:.2f}x (paired "
                          f"{r['train_ratio_fused_paired']:.2f}x)" if "train_ratio_fused" in r else "")
                       + " (no target)")
        out.append(f"{r['workload']}: projection with fresh gradients / reused buffers = "
                   f"{r['fresh_over_reused']:.2f}x (paired {r['fresh_over_reused_paired']:.2f}x) "
                   f"(target <= 1.2x: {_verdict(r['fresh_over_reused'], 1.2)})")
    return out


def _r(r: dict, key: str, paired: bool = True) -> str:
    """A ratio and, in brackets, its paired version; n/a when the row lacks it."""
    if key not in r:
        return "n/a"
    return f"{r[key]:.2f} ({r[key + '_paired']:.2f})" if paired else f"{r[key]:.2f}"


def _v(r: dict, key: str) -> str:
    return f"{r[key]:.2f}" if key in r else "n/a"


def _loop_table(results: Sequence[dict]) -> list[str]:
    if not any("train_ratio" in r for r in results):
        return _loop_table_v1(results)
    out = ["| workload | tensors | elements | AdamW step ms | OGPSA step ms | step ratio (paired) | fused AdamW step ms "
           "| OGPSA + fused step ms | fused step ratio (paired) | training step ratio (paired) | fused training step "
           "ratio (paired) | project fresh ms | project reused ms | fresh / reused (paired) |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        if r.get("status") != "ok":
            out.append(f"| {r['workload']} | {r['status']}: {r.get('reason', '')} |" + " |" * 12)
            continue
        out.append(f"| {r['workload']} | {r['trainable_tensors']} | {r['trainable_numel'] / 1e6:.2f}M | "
                   f"{r['adamw_step_ms']:.2f} | {r['ogpsa_step_ms']:.2f} | {_r(r, 'step_ratio')} | "
                   f"{_v(r, 'fused_step_ms')} | {_v(r, 'ogpsa_fused_step_ms')} | {_r(r, 'step_ratio_fused')} | "
                   f"{_r(r, 'train_ratio')} | {_r(r, 'train_ratio_fused')} | "
                   f"{r['project_fresh_ms']:.2f} | {r['project_reused_ms']:.2f} | {_r(r, 'fresh_over_reused')} |")
    return out


def _loop_table_v1(results: Sequence[dict]) -> list[str]:
    """The table of result files written before the fused and training-step columns existed."""
    out = ["| workload | tensors | elements | AdamW step ms | OGPSA step ms | step ratio (paired) | project fresh ms "
           "| project reused ms | fresh / reused (paired) |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        if r.get("status") != "ok":
            out.append(f"| {r['workload']} | {r['status']}: {r.get('reason', '')} | | | | | | | |")
            continue
        out.append(f"| {r['workload']} | {r['trainable_tensors']} | {r['trainable_numel'] / 1e6:.2f}M | "
                   f"{r['adamw_step_ms']:.2f} | {r['ogpsa_step_ms']:.2f} | {r['step_ratio']:.2f} "
                   f"({r['step_ratio_paired']:.2f}) | {r['project_fresh_ms']:.2f} | {r['project_reused_ms']:.2f} | "
                   f"{r['fresh_over_reused']:.2f} ({r['fresh_over_reused_paired']:.2f}) |")
    return out


def _conditions(data: dict) -> str:
    s = data.get("settings", {})
    rows = [r for r in data["results"] if r.get("status") == "ok"]
    r = rows[0] if rows else {}
    steps, repeats = r.get("steps", s.get("steps")), r.get("repeats", s.get("repeats", 1))
    new = any("train_ratio" in x for x in rows)
    return (f"AdamW (torch default implementation{', and fused=True where torch has it' if new else ''}), "
            f"`optimizer.zero_grad()` default (set_to_none=True), k=2, tensor "
            f"scope, no clipping, batch {r.get('batch', s.get('batch'))} x {r.get('seq', s.get('seq'))} tokens; "
            f"{r.get('warmup', s.get('warmup'))} untimed iterations, then {repeats} x {steps} timed iterations, the "
            f"{'' if new else 'four '}kinds interleaved in every iteration; medians over all timed iterations (ratio of medians; in "
            "brackets the median of per-iteration ratios)")


def loop_markdown(data: dict) -> str:
    env = data["env"]
    out = [f"# ogpsa bench: {env['hardware']} (loop suite)", "",
           f"- date {env['date']}, git {env['git_commit']}, torch {env['torch']}, python {env['python']}, "
           f"{env['torch_threads']} torch threads on {env['cpu_count']} CPUs, environment {env.get('env_vars') or '{}'}",
           *([f"- process: {policy_text(env['process'])}"] if env.get("process") else []),
           f"- load average at start/end: {env.get('loadavg_start')} / {env.get('loadavg_end')} "
           "(the CPU may be shared: timings include that noise)",
           f"- command: `{env['command']}`",
           f"- {_conditions(data)}", ""]
    out += _loop_table(data["results"]) + [""]
    out += [f"- `{r['workload']}`: {r['description']}" for r in data["results"] if r.get("status") == "ok"]
    reps = [(r["workload"], i, x) for r in data["results"] if r.get("status") == "ok"
            for i, x in enumerate(r.get("repeat_results", []))]
    if len(reps) > len([r for r in data["results"] if r.get("status") == "ok"]):
        out += ["", "## Per repeat", "", "| workload | repeat | load average (1 min) | step ratio (paired) "
                "| fresh / reused (paired) |", "| --- | ---: | ---: | ---: | ---: |"]
        out += [f"| {w} | {i + 1} | {x['loadavg_1min']} | {x['step_ratio']:.2f} ({x['step_ratio_paired']:.2f}) | "
                f"{x['fresh_over_reused']:.2f} ({x['fresh_over_reused_paired']:.2f}) |" for w, i, x in reps]
    if data.get("targets"):
        out += ["", "## Targets (measured ratios, not asserts)", ""] + [f"- {t}" for t in data["targets"]]
    return "\n".join(out) + "\n"


def loop_readme_block(data: dict, rel: str, start: str, end: str) -> str:
    """The README block for a committed loop.json (``rel``: its path from the repository root)."""
    env = data["env"]
    folder = rel.rsplit("/", 1)[0]
    out = [start, f"Source: [`{rel}`]({rel}) (full tables: [`{folder}/loop.md`]({folder}/loop.md)), written by "
           f"`{env['command']}` on {env['date'][:10]}, git `{env['git_commit'][:12]}`: {env['hardware']}, "
           f"{env['torch_threads']} torch threads, torch {env['torch']}, environment {env.get('env_vars') or '{}'}, "
           f"load average {env.get('loadavg_start')} at the start and {env.get('loadavg_end')} at the end. "
           f"{_conditions(data)}.", ""]
    out += _loop_table(data["results"]) + [""]
    out += [f"- `{r['workload']}`: {r['description']}" for r in data["results"] if r.get("status") == "ok"]
    if data.get("targets"):
        out += ["", "Targets, as measured:", ""] + [f"- {t}" for t in data["targets"]]
    out += ["", end]
    return "\n".join(out)


def plot_loop(data: dict, path) -> Optional[object]:
    """loop.png: step and projection times per workload (None if nothing to plot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in data["results"] if r.get("status") == "ok"]
    if not rows:
        return None
    keys = [("adamw_step_ms", "AdamW step"), ("ogpsa_step_ms", "AdamW step + OGPSA"),
            ("project_fresh_ms", "project, fresh grads"), ("project_reused_ms", "project, reused buffers")]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    width = 0.8 / len(keys)
    for j, (key, label) in enumerate(keys):
        ax.bar([i + j * width for i in range(len(rows))], [r[key] for r in rows], width, label=label)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))])
    ax.set_xticklabels([f"{r['workload']} ({r['trainable_tensors']} tensors)" for r in rows])
    ax.set_ylabel("ms (median)")
    ax.legend(fontsize=8)
    env = data["env"]
    ax.set_title(f"ogpsa loop suite on {env['hardware']} ({env['torch_threads']} threads)\n"
                 f"git {env['git_commit'][:12]}, {env['date'][:10]}", fontsize=9)
    fig.tight_layout()
    atomic.save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def run_loop_suite(device: torch.device, out_dir, *, workloads: Optional[Sequence[str]] = None, plot: bool = True,
                   log: Callable[[str], object] = print, **kwargs) -> dict:
    """Run the loop suite and write loop.json, loop.md (and loop.png with ``plot``) into ``out_dir``.
    ``data["files"]`` lists the files actually written."""
    import json
    import os
    from pathlib import Path

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    env = environment(device)
    data = {"schema": 1, "suite": "loop", "env": env, "settings": dict(kwargs), "results": []}
    data["results"] = run_loop(workloads, device=device, log=log, **kwargs)
    _free(device)
    if hasattr(os, "getloadavg"):
        env["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    env["wall_s"] = time.perf_counter() - start
    data["targets"] = loop_targets(data["results"])
    files = [out_dir / "loop.json", out_dir / "loop.md"]
    if plot and plot_loop(data, out_dir / "loop.png") is not None:
        files.append(out_dir / "loop.png")
    data["files"] = [f.name for f in files]
    atomic.write_text(out_dir / "loop.json", json.dumps(data, indent=1, default=str) + "\n")
    atomic.write_text(out_dir / "loop.md", loop_markdown(data))
    return data
