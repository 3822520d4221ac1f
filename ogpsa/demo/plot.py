"""The demo's Pareto plot: general score against safety score, one curve per arm and stage."""

from __future__ import annotations

import os
from typing import Any

from .. import atomic

COLORS = {"plain": "#d62728", "orthogonal": "#1f77b4", "conflict": "#2ca02c", "update": "#9467bd",
          "replay": "#ff7f0e", "merge": "#8c564b", "lora": "#e377c2", "orthogonal+replay": "#17becf",
          "orthogonal-r5": "#7f7f7f", "orthogonal-task": "#bcbd22", "orthogonal-k16": "#393b79",
          "update-r5": "#6b3d9a", "update-r5-small": "#c5b0d5", "rich": "#000000", "rich-stream": "#e7ba52", "rich-gradient": "#843c39"}


def require_matplotlib() -> None:
    """Fail early, with the fix, when matplotlib is missing (before any training is spent)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise SystemExit("ogpsa demo draws its Pareto plot with matplotlib: pip install matplotlib") from exc


def pareto(summary: dict[str, Any], before: dict[str, Any], path: str) -> str:
    """One panel per stage: mean (over seeds) general score vs refusal rate along training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = list(summary["curves"])
    fig, axes = plt.subplots(1, len(stages), figsize=(max(7.5, 5.5 * len(stages)), 4.6), squeeze=False)
    start = (100 * before["refusal_rate"], 100 * before["general_score"])
    for ax, stage in zip(axes[0], stages):
        for arm, curve in summary["curves"][stage].items():
            xs = [start[0]] + [100 * p["refusal_rate"] for p in curve]
            ys = [start[1]] + [100 * p["general_score"] for p in curve]
            if arm == "merge":
                xs, ys = xs[1:], ys[1:]
            ax.plot(xs, ys, "-o" if arm != "merge" else "--s", ms=3, lw=1.4, color=COLORS.get(arm), label=arm)
        ax.scatter([start[0]], [start[1]], marker="*", s=120, color="black", zorder=5, label="base")
        ax.axvline(100 * summary["match_refusal"], color="gray", lw=0.8, ls=":")
        ax.set_xlabel("safety score: refusal on held-out harmful requests (%)")
        ax.set_ylabel("general score: mean exact match (%)")
        ax.set_title(f"stage {stage} (mean of {summary['seeds']} seeds)")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="lower left")
    fig.suptitle("ogpsa demo: general score vs safety score along safety-tuning (up-right is better)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic.save_figure(fig, path, dpi=100)
    plt.close(fig)
    return path


def pareto_cost(summary: dict[str, Any], path: str) -> str:
    """One panel per stage: forgetting at matched refusal (mean ± std over seeds) against the
    refresh cost in reference examples per optimizer step (log scale; arms without a subspace
    drawn as squares at the left edge). Down-left is better."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = list(summary["stages"])
    fig, axes = plt.subplots(1, len(stages), figsize=(max(7.5, 5.5 * len(stages)), 4.6), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        costs = [m["reference_per_step"]["mean"] for m in summary["stages"][stage].values()
                 if m.get("reference_per_step", {}).get("mean")]
        floor = min(costs) / 4 if costs else 0.1
        for arm, m in summary["stages"][stage].items():
            f, c = m["forgetting_matched"], m.get("reference_per_step", {"mean": None})
            if f["mean"] is None or c["mean"] is None:
                continue
            x = c["mean"] if c["mean"] > 0 else floor
            ax.errorbar([x], [100 * f["mean"]], yerr=[100 * f["std"]], fmt="o" if c["mean"] > 0 else "s",
                        color=COLORS.get(arm), capsize=3, ms=6)
            ax.annotate(arm, (x, 100 * f["mean"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("reference examples per step (log)")
        ax.set_ylabel(f"forgetting @ {100 * summary['match_refusal']:.0f} % refusal (EM points)")
        ax.set_title(f"stage {stage} (mean ± std, {summary['seeds']} seeds)")
        ax.grid(alpha=0.3, which="both")
    fig.suptitle("ogpsa demo: forgetting against refresh cost = reference examples through forward+backward per "
                 "optimizer step (squares: no subspace; down-left is better)", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic.save_figure(fig, path, dpi=100)
    plt.close(fig)
    return path
