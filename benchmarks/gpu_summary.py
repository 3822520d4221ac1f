"""The last lines of ``benchmarks/gpu_check.sh``: one line per target, met or short, from the
benchmark's results (``OUTDIR/results.json`` of ``ogpsa bench --suite gpu`` and
``OUTDIR/loop.json`` of ``ogpsa bench --suite loop``).

Each target is judged on its worst measured case (the fastest ogpsa backend per case), so "met"
means met everywhere it was measured; the best case is shown too. A target without data says why
(dry run, stage skipped or failed, no such case).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# (label, results key, goal, "ge" or "le", workload filter or None, unit)
TARGETS = [
    ("P1 fused projection, % of copy bandwidth", "pct_copy", 90.0, "ge", None, "%"),
    ("P2 llama8b vs the reference", "x_reference", 5.0, "ge", "llama8b", "x"),
    ("P2 125m vs the reference", "x_reference", 5.0, "ge", "125m", "x"),
    ("P2 lora vs the reference", "x_reference", 20.0, "ge", "lora", "x"),
    ("P3 vs the authors' scheme per step", "x_authors", 100.0, "ge", None, "x"),
    ("P4 projection + clipping / clipping alone", "over_clip", 1.15, "le", None, "x"),
]


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _best_per_case(rows: list, key: str) -> list:
    """Per (workload, k, dtypes): the ogpsa contender with the best value of ``key``."""
    cases: dict = {}
    for r in rows:
        if r.get("status") != "ok" or not str(r.get("contender", "")).startswith("ogpsa") or r.get(key) is None:
            continue
        c = (r["workload"], r["k"], r["grad_dtype"], r["basis_dtype"])
        better = (lambda a, b: a < b) if key == "over_clip" else (lambda a, b: a > b)
        if c not in cases or better(r[key], cases[c][key]):
            cases[c] = r
    return list(cases.values())


def summarize(outdir: Path, why_missing: str = "") -> list[str]:
    lines = []
    micro = _load(outdir / "results.json")
    loop = _load(outdir / "loop.json")
    for label, key, goal, sense, workload, unit in TARGETS:
        goal_s = f"{'>=' if sense == 'ge' else '<='} {goal:g}{unit}"
        rows = [] if micro is None else [r for r in micro.get("results", []) if workload in (None, r.get("workload"))]
        best = _best_per_case(rows, key)
        if not best:
            reason = why_missing or ("no results.json" if micro is None else "no measured case")
            lines.append(f"{label} (target {goal_s}): not measured ({reason})")
            continue
        vals = [r[key] for r in best]
        worst = min(vals) if sense == "ge" else max(vals)
        top = max(vals) if sense == "ge" else min(vals)
        met = worst >= goal if sense == "ge" else worst <= goal
        lines.append(f"{label} (target {goal_s}): worst {worst:.3g}{unit}, best {top:.3g}{unit} over {len(vals)} "
                     f"cases: {'MET' if met else 'SHORT'}")
    label, goal = "P5 loop suite, optimizer.step() with OGPSA / AdamW alone (lora)", 1.5
    rows = [] if loop is None else [r for r in loop.get("results", []) if r.get("status") == "ok"
                                    and r.get("step_ratio") is not None]
    lora = [r for r in rows if r.get("workload") == "lora"] or rows
    if not lora:
        reason = why_missing or ("no loop.json" if loop is None else "no measured case")
        lines.append(f"{label} (target <= {goal:g}x): not measured ({reason})")
    else:
        worst = max(r["step_ratio"] for r in lora)
        lines.append(f"{label} (target <= {goal:g}x): {worst:.3g}x: {'MET' if worst <= goal else 'SHORT'}")
    return lines


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print("usage: gpu_summary.py OUTDIR [REASON_IF_MISSING]", file=sys.stderr)
        return 2
    for line in summarize(Path(argv[0]), argv[1] if len(argv) > 1 else ""):
        print("target:", line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
