"""Result files (JSON, markdown, plot) and the README block generated from a result file."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Optional, Sequence

from .. import atomic
from .process import policy_text
from .workloads import KS, REPO_ROOT

README_START = "<!-- ogpsa-bench:start -->"
README_END = "<!-- ogpsa-bench:end -->"
#: every generated README block, default (CPU) or named (e.g. ``gpu``): group 1 is the name
README_BLOCK_RE = re.compile(r"<!-- ogpsa-bench(?::([a-z0-9-]+))?:start -->.*?<!-- ogpsa-bench(?::\1)?:end -->", re.S)


def readme_markers(name: Optional[str] = None) -> tuple[str, str]:
    """Start and end markers of the README block called ``name`` (None: the default block)."""
    if name is None:
        return README_START, README_END
    if not re.fullmatch(r"[a-z0-9-]+", name):
        raise ValueError(f"README block name {name!r} must be lowercase letters, digits or '-'")
    return f"<!-- ogpsa-bench:{name}:start -->", f"<!-- ogpsa-bench:{name}:end -->"


# ----------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------


def _fmt(x, spec: str, none: str = "n/a") -> str:
    return none if x is None else format(x, spec)


def _mem(b: Optional[int]) -> str:
    if b is None:
        return "n/a"
    return f"{b / 2**20:.1f} MiB" if b >= 2**20 else f"{b / 2**10:.0f} KiB"


def _table(rows: Sequence[dict]) -> list[str]:
    lines = ["| contender | ms / step | GB/s (byte floor) | % of copy | × reference | × authors | time / clip alone | extra peak memory |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"| {r['contender']} | {r['status']}: {r.get('reason', '')[:90]} | | | | | | |")
            continue
        lines.append(
            f"| {r['contender']} | {r['median_ms']:.2f} | {r['eff_gbps']:.1f} | {_fmt(r['pct_copy'], '.0f')} | "
            f"{_fmt(r['x_reference'], '.2f')} | {_fmt(r['x_authors'], '.1f')} | {_fmt(r['over_clip'], '.2f')} | "
            f"{_mem(r.get('extra_peak_bytes'))} |")
    return lines


def _cases(data: dict) -> list[tuple]:
    seen = []
    for r in data["results"]:
        key = (r["workload"], r["k"], r["grad_dtype"], r["basis_dtype"])
        if key not in seen:
            seen.append(key)
    return seen


def markdown(data: dict) -> str:
    env = data["env"]
    out = [f"# ogpsa bench: {env['hardware']} ({data['suite']} suite)", "",
           f"- date {env['date']}, git {env['git_commit']}, torch {env['torch']}, triton {env['triton']}, "
           f"python {env['python']}, {env['torch_threads']} torch threads on {env['cpu_count']} CPUs",
           f"- device {env['device']}" + (f", driver {env.get('driver')}" if env.get("driver") else "")
           + f", environment {env.get('env_vars') or '{}'}",
           *([f"- process: {policy_text(env['process'])}"] if env.get("process") else []),
           f"- load average at start/end: {env.get('loadavg_start')} / {env.get('loadavg_end')} "
           "(the CPU may be shared: timings include that noise)",
           f"- peak copy bandwidth (one large copy, read + write): {_fmt(data.get('peak_copy_gbps'), '.1f')} GB/s",
           f"- byte floor: {data['formula']['bytes_floor']}",
           f"- per step: {data['formula']['per_step']}", ""]
    for name, w in data["workloads"].items():
        extra = f"; stands for {w['full_numel'] / 1e9:.2f}B elements" if w.get("full_numel") else ""
        out.append(f"- workload `{name}`: {w['description']}: {w['tensors']} tensors, {w['numel'] / 1e6:.1f}M elements{extra}")
    out.append("")
    for key in _cases(data):
        rows = [r for r in data["results"] if (r["workload"], r["k"], r["grad_dtype"], r["basis_dtype"]) == key]
        out += [f"## {key[0]}, k={key[1]}, grads {key[2]}, basis {key[3]}", ""] + _table(rows)
        ext = [r for r in rows if r.get("extrapolated_full_ms") is not None]
        if ext:
            out += ["", "Extrapolated to the full model per element: " + ", ".join(
                f"{r['contender']} {r['extrapolated_full_ms']:.0f} ms" for r in ext)]
        out.append("")
    if data.get("skipped_configs"):
        out += ["## Not run", ""] + [f"- {c['workload']} k={c['k']} {c['grad_dtype']}/{c['basis_dtype']}: {c['reason']}"
                                     for c in data["skipped_configs"]] + [""]
    if data.get("targets"):
        out += ["## Targets (measured ratios, not asserts)", ""] + [f"- {t}" for t in data["targets"]] + [""]
    return "\n".join(out)


def _best_ours(data: dict) -> list[dict]:
    """Per case, the fastest ``ogpsa:<backend>`` row (what a user with the auto backend would
    get; the ``ogpsa:projector-*`` rows time the Projector around it and are reported apart)."""
    best: dict = {}
    for r in data["results"]:
        if r.get("status") == "ok" and r["contender"].startswith("ogpsa:") \
                and not r["contender"].startswith("ogpsa:projector"):
            key = (r["workload"], r["k"], r["grad_dtype"], r["basis_dtype"])
            if key not in best or r["median_ms"] < best[key]["median_ms"]:
                best[key] = r
    return list(best.values())


def targets(data: dict) -> list[str]:
    """The issue's targets, each stated as the measured range over cases of the fastest
    ogpsa backend per case (or why it cannot be measured here)."""
    ours = _best_ours(data)
    device = data["env"]["device"]
    out = []

    def case(r):
        return f"{r['contender']}, {r['workload']} k={r['k']} {r['grad_dtype']}/{r['basis_dtype']}"

    def span(rows, key, unit="x", spec=".2f"):
        rows = [r for r in rows if r.get(key) is not None]
        if not rows:
            return None
        lo, hi = min(rows, key=lambda r: r[key]), max(rows, key=lambda r: r[key])
        if lo is hi:
            return f"{format(lo[key], spec)}{unit} ({case(lo)})"
        return f"{format(lo[key], spec)}{unit} ({case(lo)}) to {format(hi[key], spec)}{unit} ({case(hi)})"

    checks = [("fused projection, % of copy bandwidth (target >= 90% on H100)", ours, "pct_copy", "%", ".0f")]
    for wl, goal in (("llama8b", 5), ("125m", 5), ("lora", 20)):
        checks.append((f"{wl}: vs the reference (target >= {goal}x)", [r for r in ours if r["workload"] == wl],
                       "x_reference", "x", ".2f"))
    checks += [("vs the authors' scheme per optimizer step (target >= 100x)", ours, "x_authors", "x", ".1f"),
               ("projection + clipping over clipping alone (target <= 1.15x)", ours, "over_clip", "x", ".2f"),
               ("CPU extension vs the reference (target >= 1.5x on 2 cores)",
                [r for r in data["results"] if r.get("status") == "ok" and r["contender"] == "ogpsa:cpu"],
                "x_reference", "x", ".2f")]
    for text, rows, key, unit, spec in checks:
        got = span(rows, key, unit, spec)
        if got:
            out.append(f"{text}: {got}")
    fresh = {(r["workload"], r["k"], r["grad_dtype"], r["basis_dtype"]): r for r in data["results"]
             if r.get("status") == "ok" and r["contender"] == "ogpsa:projector-fresh"}
    ratios = []
    for r in data["results"]:
        key = (r["workload"], r["k"], r["grad_dtype"], r["basis_dtype"])
        if r.get("status") == "ok" and r["contender"] == "ogpsa:projector-reused" and key in fresh:
            ratios.append(dict(fresh[key], fresh_over_reused=fresh[key]["median_ms"] / r["median_ms"]))
    got = span(ratios, "fresh_over_reused")
    if got:
        out.append(f"Projector.project with fresh gradient tensors over reused buffers (target <= 1.2x): {got}")
    if device == "cpu":
        out.append("GPU targets (H100 bandwidth, CUDA/Triton kernels) await a GPU run of benchmarks/gpu_check.sh")
    return out


def plot_results(data: dict, path: Path) -> Optional[Path]:
    """bench.png: time per step (top) and % of copy bandwidth (bottom) against k, one panel
    per workload, for the first dtype pair of the suite (fp32 gradients and basis)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    ok = [r for r in data["results"] if r.get("status") == "ok"]
    if not ok:
        return None
    pair = (ok[0]["grad_dtype"], ok[0]["basis_dtype"])
    wls = list(dict.fromkeys(r["workload"] for r in ok))
    # one colour (and marker) per contender in every panel, one legend for the figure
    names = list(dict.fromkeys(r["contender"] for r in ok if (r["grad_dtype"], r["basis_dtype"]) == pair))
    palette = plt.get_cmap("tab10").colors
    style = {n: (palette[i % len(palette)], "osD^v<>ph*"[i % 10]) for i, n in enumerate(names)}
    fig, axes = plt.subplots(2, len(wls), figsize=(4.6 * len(wls), 7.8), squeeze=False)
    short = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}
    for j, wl in enumerate(wls):
        rows = [r for r in ok if r["workload"] == wl and (r["grad_dtype"], r["basis_dtype"]) == pair]
        for name in names:
            pts = sorted((r["k"], r["median_ms"], r["pct_copy"]) for r in rows if r["contender"] == name)
            if not pts:
                continue
            color, marker = style[name]
            ks_ = [p[0] for p in pts]
            axes[0][j].plot(ks_, [p[1] for p in pts], marker=marker, color=color, label=name)
            if name != "copy" and all(p[2] is not None for p in pts):
                axes[1][j].plot(ks_, [p[2] for p in pts], marker=marker, color=color, label=name)
        axes[0][j].set_yscale("log")
        axes[0][j].set_title(f"{wl}: {short.get(pair[0], pair[0])} grads, {short.get(pair[1], pair[1])} basis",
                             fontsize=9)
        axes[0][j].set_ylabel("ms per optimizer step (log)", fontsize=8)
        axes[1][j].set_ylabel("% of copy bandwidth (byte floor)", fontsize=8)
        for ax in (axes[0][j], axes[1][j]):
            ax.set_xlabel("k (basis rank)", fontsize=8)
            ax.set_xticks(KS)
            ax.grid(True, alpha=0.3)
    handles = [plt.Line2D([], [], color=style[n][0], marker=style[n][1], label=n) for n in names]
    ncol = max(1, min(len(names), 2 * len(wls)))  # about two legend columns per 4.6-inch panel
    fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    env = data["env"]
    fig.suptitle(f"ogpsa bench on {env['hardware']} ({env['torch_threads']} threads), torch {env['torch']}\n"
                 f"git {env['git_commit'][:12]}, {env['date'][:10]}", fontsize=9)
    rows_of_legend = -(-len(names) // ncol)
    fig.tight_layout(rect=(0, 0.01 + 0.027 * rows_of_legend, 1, 0.95))
    atomic.save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def write_results(data: dict, out_dir: Path, plot: bool = True) -> list[str]:
    """Write results.json, results.md and (with ``plot``) bench.png; returns the names of
    the files this call wrote (a plot that could not be drawn is not among them)."""
    atomic.write_text(out_dir / "results.json", json.dumps(data, indent=1, default=str) + "\n")
    atomic.write_text(out_dir / "results.md", markdown(data) + "\n")
    written = ["results.json", "results.md"]
    if plot and plot_results(data, out_dir / "bench.png") is not None:
        written.append("bench.png")
    return written


# ----------------------------------------------------------------------------------------
# README block (generated from a committed result file, checked by a test)
# ----------------------------------------------------------------------------------------


def readme_block(results_json: Path, repo_root: Path = REPO_ROOT, name: Optional[str] = None) -> str:
    """The README's benchmark block for a result file: provenance, the k=2 table per
    workload for the suite's first dtype pair, and the plot. Deterministic in the file.
    A loop.json (``--suite loop``) or adamw.json (``--suite adamw``) gets that suite's table."""
    data = json.loads(Path(results_json).read_text())
    rel = Path(os.path.relpath(Path(results_json).resolve(), repo_root.resolve())).as_posix()
    folder = rel.rsplit("/", 1)[0]
    env = data["env"]
    if data.get("suite") in ("loop", "adamw"):  # the training-loop and projected-AdamW suites' own blocks
        from .adamw import adamw_readme_block
        from .loop import loop_readme_block

        make = loop_readme_block if data["suite"] == "loop" else adamw_readme_block
        return make(data, rel, *readme_markers(name))
    ok = [r for r in data["results"] if r.get("status") == "ok"]
    pair = (ok[0]["grad_dtype"], ok[0]["basis_dtype"]) if ok else ("fp32", "fp32")
    start, end = readme_markers(name)
    out = [start, f"Source: [`{rel}`]({rel}) (full tables: [`{folder}/results.md`]({folder}/results.md)), "
           f"written by `{env['command']}` on {env['date'][:10]}, git `{env['git_commit'][:12]}`: "
           f"{env['hardware']}, {env['torch_threads']} torch threads, torch {env['torch']}, "
           f"environment {env.get('env_vars') or '{}'}, "
           f"load average {env.get('loadavg_start')} at the start (a shared machine: expect noise). "
           f"Peak copy bandwidth {_fmt(data.get('peak_copy_gbps'), '.1f')} GB/s. One optimizer step's work each "
           f"(projection + clipping to 1.0; the authors' scheme: {data['micro_batches']} micro-batches of hooks "
           "+ clip_grad_norm_); GB/s by the byte floor 3·B_g + 2·k·B_u; % of copy: of the higher of the list's copy "
           "and one large copy.", ""]
    for wl in dict.fromkeys(r["workload"] for r in ok):
        rows = [r for r in data["results"] if r["workload"] == wl and r["k"] == 2
                and (r["grad_dtype"], r["basis_dtype"]) == pair]
        if not rows:
            continue
        w = data["workloads"][wl]
        out += [f"**{wl}** ({w['description']}; {w['tensors']} tensors, {w['numel'] / 1e6:.1f}M elements), "
                f"k=2, {pair[0]} gradients, {pair[1]} basis:", ""] + _table(rows) + [""]
    if data.get("targets"):
        out += ["Targets, as measured:", ""] + [f"- {t}" for t in data["targets"]] + [""]
    out += [f"![benchmark plot]({folder}/bench.png)", "", end]
    return "\n".join(out)


def update_readme(readme: Path, block: str, name: Optional[str] = None) -> None:
    """Replace the README block called ``name`` (between its markers) with ``block``."""
    start, end = readme_markers(name)
    text = readme.read_text()
    if start not in text or end not in text:
        raise ValueError(f"{readme} has no {start} ... {end} markers to replace")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    atomic.write_text(readme, head + block + tail)

