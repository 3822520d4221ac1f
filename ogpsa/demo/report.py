"""Aggregate the demo's trajectories: matched-safety forgetting, mean ± std tables, JSON.

Forgetting = general score before - general score after (exact-match points, mean over the
general tasks). *At matched safety*: each arm's trajectory (general score and over-refusal
against refusal rate, step by step; for ``merge``, against the mixing weight) is linearly
interpolated at the first point where the refusal rate reaches ``match_refusal``. A run that
never reaches it counts as "not reached" and is left out of the mean (the table says how many
seeds reached it).
"""

from __future__ import annotations

import math
import os
from typing import Any, Optional, Sequence

from .. import atomic


def mean_std(values: Sequence[Optional[float]]) -> dict[str, Any]:
    """Mean and sample standard deviation of the values that are not None (n counts them)."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"mean": None, "std": None, "n": 0, "of": len(values)}
    m = sum(vals) / len(vals)
    s = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return {"mean": m, "std": s, "n": len(vals), "of": len(values)}


def at_refusal(points: Sequence[dict], target: float, key: str, start: Optional[dict] = None) -> Optional[float]:
    """``key`` interpolated where the refusal rate first reaches ``target`` along ``points``
    (preceded by ``start``, the base model's scores); None when it is never reached."""
    pts = ([start] if start is not None else []) + list(points)
    for i, p in enumerate(pts):
        if p["refusal_rate"] >= target:
            if i == 0:
                return p[key]
            q = pts[i - 1]
            dr = p["refusal_rate"] - q["refusal_rate"]
            t = (target - q["refusal_rate"]) / dr if dr > 0 else 1.0
            return q[key] + t * (p[key] - q[key])
    return None


def run_metrics(arm: dict, before: dict, target: float, first_part_steps: Optional[int] = None
                ) -> dict[str, Optional[float]]:
    """Per-run numbers of one arm: at the end and at matched refusal (read along the whole
    trajectory: for SFT→DPO, wherever the model first reaches ``target``, SFT part included).

    ``first_part_steps``: for a two-part stage, the last step of the first part (SFT); adds
    ``forgetting_part2`` = forgetting at the end − forgetting at the end of the first part."""
    traj = arm["trajectory"]
    end = traj[-1]
    if traj[0].get("merge_weight") is not None:
        end = max(traj, key=lambda p: p["merge_weight"])  # weight 1 = the plain arm's end point
        traj = sorted(traj, key=lambda p: p["merge_weight"])
    g = at_refusal(traj, target, "general_score", before)
    o = at_refusal(traj, target, "over_refusal_rate", before)
    out = {"refusal_end": end["refusal_rate"], "general_end": end["general_score"],
           "forgetting_end": before["general_score"] - end["general_score"],
           "over_refusal_end": end["over_refusal_rate"],
           "forgetting_matched": None if g is None else before["general_score"] - g,
           "over_refusal_matched": o}
    for task, v in end["exact_match"].items():
        out[f"forgetting_end/{task}"] = before["exact_match"][task] - v
    if traj[0].get("merge_weight") is not None:
        out["merge_weight_matched"] = at_refusal(traj, target, "merge_weight", dict(before, merge_weight=0.0))
    if first_part_steps is not None:
        mid = [p for p in traj if p.get("step") == first_part_steps]
        out["forgetting_part2"] = (mid[0]["general_score"] - end["general_score"]) if mid else None
    proj = arm.get("projection", {})
    out["removed_fraction"] = max((st["removed_fraction"] for st in proj.values()), default=0.0)
    train = sum(st["seconds"] for st in proj.values()) if proj else None
    refresh = sum(st["refresh_seconds"] for st in proj.values()) if proj else None
    out["train_seconds"], out["refresh_seconds"] = train, refresh
    out["refreshes"] = sum(st.get("refreshes", 0) for st in proj.values()) if proj else None
    out["refresh_share"] = refresh / train if proj and train else None
    # load-independent refresh cost: reference examples through forward+backward (every rebuild,
    # the one before step 1 included) per safety training example and per optimizer step
    ref_total = sum(st.get("reference_total", 0) for st in proj.values()) if proj else 0
    train_ex = sum(st.get("train_examples", 0) for st in proj.values()) if proj else 0
    steps = sum(st.get("steps", 0) for st in proj.values()) if proj else 0
    projected = bool(proj) and any(st.get("refreshes") for st in proj.values())
    out["reference_per_train_example"] = ref_total / train_ex if projected and train_ex else (0.0 if proj else None)
    out["reference_per_step"] = ref_total / steps if projected and steps else (0.0 if proj else None)
    return out


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """``{stage: {arm: {metric: mean_std}}}`` over seeds, plus the mean trajectories for plots."""
    target = results["config"]["match_refusal"]
    before = results["before"]
    sft_steps = results["config"].get("sft_steps")
    per: dict[str, dict[str, dict[str, list]]] = {}
    curves: dict[str, dict[str, list]] = {}
    for run in results["runs"]:
        for arm, a in run["arms"].items():
            acc = per.setdefault(run["stage"], {}).setdefault(arm, {})
            split = sft_steps if "+" in run["stage"] else None
            for k, v in run_metrics(a, before, target, split).items():
                acc.setdefault(k, []).append(v)
            curves.setdefault(run["stage"], {}).setdefault(arm, []).append(a["trajectory"])
    stages = {}
    for stage, arms in per.items():
        stages[stage] = {arm: {k: mean_std(v) for k, v in m.items()} for arm, m in arms.items()}
    mean_curves = {stage: {arm: _mean_curve(ts) for arm, ts in arms.items()} for stage, arms in curves.items()}
    return {"seeds": results["config"]["seeds"], "match_refusal": target, "stages": stages, "curves": mean_curves,
            "refresh_design": refresh_design(results)}


def _mean_curve(trajectories: list[list[dict]]) -> list[dict]:
    n = min(len(t) for t in trajectories)
    out = []
    for i in range(n):
        pts = [t[i] for t in trajectories]
        out.append({k: sum(p[k] for p in pts) / len(pts) for k in ("general_score", "refusal_rate",
                                                                      "over_refusal_rate")})
    return out


def _pct(ms: dict[str, Any], sign: float = 1.0) -> str:
    if ms["mean"] is None:
        return f"not reached (0/{ms['of']})"
    text = f"{100 * sign * ms['mean']:.1f} ± {100 * ms['std']:.1f}"
    return text + (f" ({ms['n']}/{ms['of']})" if ms["n"] < ms["of"] else "")


def refresh_design(results: dict[str, Any]) -> dict[str, dict[str, str]]:
    """``{stage: {arm: "every N, E examples"}}`` of the projection arms (from the first seed;
    two-part stages join the parts with "/")."""
    out: dict[str, dict[str, str]] = {}
    for run in results["runs"]:
        for arm, a in run["arms"].items():
            parts = [st for st in a.get("projection", {}).values() if st.get("refreshes")]
            if parts and arm not in out.setdefault(run["stage"], {}):
                every = "/".join(str(st.get("refresh_every", "?")) for st in parts)
                examples = "/".join(str(st.get("reference_examples", "?")) for st in parts)
                out[run["stage"]][arm] = f"{every} | {examples}"
    return out


def _num(ms: dict[str, Any], fmt: str = "{:.1f}", scale: float = 1.0) -> str:
    return "—" if ms["mean"] is None else fmt.format(scale * ms["mean"])


def _main_table(stage: str, arms: dict[str, Any], seeds: int, target: float) -> list[str]:
    two_part = "+" in stage
    plain = arms.get("plain", {}).get("forgetting_matched", {}).get("mean")
    head = ["arm", f"forgetting @ {target:.0f} % refusal ↓", "vs plain", f"over-refusal @ {target:.0f} % ↓",
            "refusal end ↑", "forgetting end ↓"] + (["DPO part adds ↓"] if two_part else []) + [
            "over-refusal end ↓", "removed ‖·‖² %", "train s"]
    lines = ["", f"**Stage {stage}** (mean ± std over {seeds} seeds; (n/N): seeds that reached {target:.0f} % "
             "refusal)", "", "| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
    for arm, m in arms.items():
        fm = m["forgetting_matched"]["mean"]
        rel = "—" if fm is None or not plain or arm == "plain" else f"{100 * (1 - fm / plain):+.0f} %"
        name = arm
        if arm == "merge" and m.get("merge_weight_matched", {}).get("mean") is not None:
            name = f"merge (weight {m['merge_weight_matched']['mean']:.2f})"
        extra = [_pct(m["forgetting_part2"]) if arm != "merge" else "—"] if two_part else []
        lines.append("| " + " | ".join([
            name, _pct(m["forgetting_matched"]), rel, _pct(m["over_refusal_matched"]), _pct(m["refusal_end"]),
            _pct(m["forgetting_end"])] + extra + [_pct(m["over_refusal_end"]), _pct(m["removed_fraction"]),
            _num(m["train_seconds"])]) + " |")
    return lines


def _refresh_table(stage: str, arms: dict[str, Any], design: dict[str, str], target: float) -> list[str]:
    rows = [(arm, m) for arm, m in arms.items() if arm in design]
    if not rows:
        return []
    head = ["arm", "refresh every (steps)", "examples per rebuild", "rebuilds", "reference ex. per training ex.",
            "reference ex. per step", "refresh s", "train s", "refresh share of train time",
            f"forgetting @ {target:.0f} % ↓", "forgetting end ↓"]
    lines = ["", f"Refresh cost, stage {stage} (mean over seeds; rebuilds include the one before step 1)", "",
             "| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
    for arm, m in rows:
        lines.append("| " + " | ".join([
            arm, design[arm], _num(m["refreshes"], "{:.0f}"), _num(m["reference_per_train_example"], "{:.3f}"),
            _num(m["reference_per_step"], "{:.2f}"), _num(m["refresh_seconds"], "{:.2f}"),
            _num(m["train_seconds"], "{:.2f}"), _num(m["refresh_share"], "{:.0f} %", 100.0),
            _pct(m["forgetting_matched"]), _pct(m["forgetting_end"])]) + " |")
    return lines


LEGEND = (
    "\"vs plain\": reduction of forgetting at matched refusal relative to plain (+50 % is the goal). "
    "Forgetting = drop of the mean exact match over the general tasks (points). Matched refusal is read along "
    "the whole trajectory: for sft+dpo wherever the model first reaches the target, SFT part included, because "
    "matched safety is a property of the model, not of the stage that produced it; where the SFT part reaches "
    "it, those columns equal the sft stage's (same seeds and SFT batches), and the DPO part shows in the end "
    "columns and in \"DPO part adds\" (forgetting at the end − forgetting at the end of the SFT part). "
    "removed ‖·‖² %: share of the squared norm the projection removed, mean over steps (max over parts): of "
    "the clipped gradient for gradient-space arms, of the AdamW direction for the update arms. train s: the "
    "arm's training wall time, every subspace rebuild included, evaluation excluded. Reference ex. per training "
    "ex. / per step: reference examples through forward+backward over all rebuilds (the one before step 1 "
    "included) per safety training example (DPO: per preference pair) / per optimizer step; the load-independent "
    "refresh cost (seconds and time shares depend on the shared machine's load).")


def table(summary: dict[str, Any], before: dict[str, Any]) -> str:
    """One markdown table per stage (forgetting in exact-match points, lower is better), each
    followed by the refresh-cost table of its projection arms (rebuild design from
    ``summary["refresh_design"]``, see :func:`refresh_design`)."""
    design = summary.get("refresh_design", {})
    target = 100 * summary["match_refusal"]
    lines = [f"Before safety-tuning: general score {100 * before['general_score']:.1f} % "
             f"({', '.join(f'{t} {100 * v:.0f}' for t, v in before['exact_match'].items())}), refusal "
             f"{100 * before['refusal_rate']:.0f} %, over-refusal {100 * before['over_refusal_rate']:.0f} %."]
    for stage, arms in summary["stages"].items():
        lines += _main_table(stage, arms, summary["seeds"], target)
        lines += _refresh_table(stage, arms, design.get(stage, {}), target)
    lines += ["", LEGEND]
    return "\n".join(lines)


def write(results: dict[str, Any], out_dir: str, command: Optional[str] = None) -> dict[str, str]:
    """Write ``results.json`` (raw + summary), ``table.md`` and ``pareto.png`` into ``out_dir``."""
    from .plot import pareto, pareto_cost

    os.makedirs(out_dir, exist_ok=True)
    summary = summarize(results)
    payload = dict(results, summary=summary)
    if command:
        payload["command"] = command
    paths = {"json": os.path.join(out_dir, "results.json"), "table": os.path.join(out_dir, "table.md"),
             "png": os.path.join(out_dir, "pareto.png"), "cost_png": os.path.join(out_dir, "pareto_cost.png")}
    atomic.write_json(paths["json"], payload, indent=1)
    with atomic.open_atomic(paths["table"], "w") as f:
        if command:
            load = results.get("load_average")
            load_text = (f", 1-min load average {load['mean']:.1f} (min {load['min']:.1f}, max {load['max']:.1f}) "
                         f"on {results.get('cpu_count', '?')} CPUs" if load else "")
            f.write(f"Command: `{command}` ({results['seconds']:.0f} s, {results.get('num_threads', '?')} "
                    f"threads{load_text}; arms not available: {', '.join(results['arms_missing']) or 'none'})\n\n")
        f.write(table(summary, results["before"]) + "\n")
    pareto(summary, results["before"], paths["png"])
    pareto_cost(summary, paths["cost_png"])
    return paths
