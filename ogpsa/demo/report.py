"""Aggregate the demo's per-seed results: mean ± std table (markdown), JSON and a PNG plot."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Optional, Sequence

from .tasks import GENERAL_TASKS


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("mean_std needs at least one value")
    m = sum(vals) / len(vals)
    s = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return {"mean": m, "std": s, "n": len(vals)}


def _metrics(ev: dict[str, Any]) -> dict[str, float]:
    out = {f"exact_match/{t}": ev["exact_match"][t] for t in ev["exact_match"]}
    for key in ("exact_match_mean", "general_loss", "refusal_rate", "safety_loss", "over_refusal_rate"):
        out[key] = ev[key]
    return out


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """``{"before": {metric: mean_std}, "arms": {arm: {metric: mean_std}}}`` over seeds.

    Per arm: the metrics after safety-tuning, ``forgetting/*`` (drop of exact match, rise of
    general loss), ``refusal_gain`` and the projection statistics of each stage."""
    runs = results["runs"]
    if not runs:
        raise ValueError("results hold no runs")
    before: dict[str, list[float]] = {}
    for r in runs:
        for k, v in _metrics(r["before"]).items():
            before.setdefault(k, []).append(v)
    arms: dict[str, dict[str, list[float]]] = {}
    for r in runs:
        for arm, a in r["arms"].items():
            acc = arms.setdefault(arm, {})
            vals = _metrics(a["after"])
            f = a["forgetting"]
            vals.update({f"forgetting/{t}": f["exact_match"][t] for t in f["exact_match"]})
            vals["forgetting/exact_match_mean"] = f["exact_match_mean"]
            vals["forgetting/general_loss"] = f["general_loss"]
            vals["refusal_gain"] = f["refusal_gain"]
            for stage, st in a["projection"].items():
                for key in ("removed_fraction", "subspace_fraction", "refreshes", "seconds"):
                    vals[f"{stage}/{key}"] = st[key]
            for k, v in vals.items():
                acc.setdefault(k, []).append(v)
    return {
        "seeds": len(runs),
        "before": {k: mean_std(v) for k, v in before.items()},
        "arms": {arm: {k: mean_std(v) for k, v in m.items()} for arm, m in arms.items()},
    }


def _fmt(ms: dict[str, float], digits: int = 3, pct: bool = False) -> str:
    scale = 100.0 if pct else 1.0
    d = 1 if pct else digits
    return f"{ms['mean'] * scale:.{d}f} ± {ms['std'] * scale:.{d}f}"


def table(summary: dict[str, Any]) -> str:
    """Markdown table: one row for the base model, one per arm (mean ± std over seeds)."""
    tasks = [t for t in GENERAL_TASKS if f"exact_match/{t}" in summary["before"]]
    head = (["arm", "refusal % ↑", "safety loss ↓", "exact match % ↑", "forgetting (EM pts) ↓",
             "general loss ↓"] + [f"{t} %" for t in tasks] + ["over-refusal %", "removed ‖g‖² %"])
    rows = []
    b = summary["before"]
    rows.append(["before safety-tuning", _fmt(b["refusal_rate"], pct=True), _fmt(b["safety_loss"]),
                 _fmt(b["exact_match_mean"], pct=True), "—", _fmt(b["general_loss"])]
                + [_fmt(b[f"exact_match/{t}"], pct=True) for t in tasks]
                + [_fmt(b["over_refusal_rate"], pct=True), "—"])
    for arm, m in summary["arms"].items():
        stage = "sft" if "sft/removed_fraction" in m else "dpo"
        rows.append([arm, _fmt(m["refusal_rate"], pct=True), _fmt(m["safety_loss"]),
                     _fmt(m["exact_match_mean"], pct=True), _fmt(m["forgetting/exact_match_mean"], pct=True),
                     _fmt(m["general_loss"])]
                    + [_fmt(m[f"exact_match/{t}"], pct=True) for t in tasks]
                    + [_fmt(m["over_refusal_rate"], pct=True), _fmt(m[f"{stage}/removed_fraction"], pct=True)])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def plot(summary: dict[str, Any], path: str, title: Optional[str] = None) -> str:
    """Two panels: forgetting per task and arm; safety (refusal rate) against forgetting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in GENERAL_TASKS if f"exact_match/{t}" in summary["before"]] + ["exact_match_mean"]
    labels = [t if t != "exact_match_mean" else "mean" for t in tasks]
    arms = list(summary["arms"])
    colors = {"plain": "#d62728", "orthogonal": "#1f77b4", "conflict": "#2ca02c"}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [1.6, 1]})
    width = 0.8 / max(len(arms), 1)
    for i, arm in enumerate(arms):
        m = summary["arms"][arm]
        means = [100 * m[f"forgetting/{t}"]["mean"] for t in tasks]
        stds = [100 * m[f"forgetting/{t}"]["std"] for t in tasks]
        xs = [j + (i - (len(arms) - 1) / 2) * width for j in range(len(tasks))]
        ax1.bar(xs, means, width, yerr=stds, capsize=3, label=arm, color=colors.get(arm))
    ax1.axhline(0, color="black", lw=0.8)
    ax1.set_xticks(range(len(tasks)), labels)
    ax1.set_ylabel("forgetting: exact-match drop (points)")
    ax1.set_title("general capability lost by safety-tuning (lower is better)")
    ax1.legend()
    for arm in arms:
        m = summary["arms"][arm]
        ax2.errorbar(100 * m["forgetting/exact_match_mean"]["mean"], 100 * m["refusal_rate"]["mean"],
                     xerr=100 * m["forgetting/exact_match_mean"]["std"], yerr=100 * m["refusal_rate"]["std"],
                     fmt="o", capsize=4, ms=8, color=colors.get(arm), label=arm)
    b = summary["before"]
    ax2.scatter([0], [100 * b["refusal_rate"]["mean"]], marker="x", color="black", label="before")
    ax2.set_xlabel("forgetting: mean exact-match drop (points)")
    ax2.set_ylabel("refusal rate on held-out harmful prompts (%)")
    ax2.set_title("safety gained vs capability lost")
    ax2.legend()
    fig.suptitle(title or f"ogpsa demo: mean ± std over {summary['seeds']} seed(s)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(results: dict[str, Any], out_dir: str, command: Optional[str] = None) -> dict[str, str]:
    """Write ``results.json`` (raw + summary), ``table.md`` and ``forgetting.png`` into ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    summary = summarize(results)
    payload = dict(results, summary=summary)
    if command:
        payload["command"] = command
    paths = {"json": os.path.join(out_dir, "results.json"), "table": os.path.join(out_dir, "table.md"),
             "png": os.path.join(out_dir, "forgetting.png")}
    with open(paths["json"], "w") as f:
        json.dump(payload, f, indent=1, sort_keys=False)
    text = table(summary)
    with open(paths["table"], "w") as f:
        if command:
            f.write(f"Command: `{command}` ({summary['seeds']} seeds, {results['seconds']:.0f} s, "
                    f"{results.get('num_threads', '?')} threads)\n\n")
        f.write(text + "\n")
    plot(summary, paths["png"])
    return paths
