"""benchmarks/gpu_check.sh on a machine without a GPU: the dry run lists every stage as
skipped with its reason, prints one line per target and the warm-up estimate, and exits 0."""

import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
STAGES = ["env", "install", "info", "selftest", "warmup", "tests", "memcheck", "racecheck", "initcheck", "deepspeed", "bench",
          "loop", "adamw"]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    if shutil.which("bash") is None or shutil.which("timeout") is None:
        pytest.skip("needs bash and coreutils timeout")
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "PYTHON": sys.executable}
    run = subprocess.run(["bash", SCRIPT, "--dry-run", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    return run, out


def test_script_parses():
    assert subprocess.run(["bash", "-n", SCRIPT]).returncode == 0


def test_dry_run_skips_every_stage_with_a_reason(dry_run):
    run, out = dry_run
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    rows = [line.split("\t") for line in (out / "stages.tsv").read_text().splitlines()[1:]]
    assert [r[0] for r in rows] == STAGES
    for name, status, seconds, detail in rows:
        assert status == "skipped" and seconds == "0", (name, status)
        assert "dry run" in detail and "would run" in detail, detail
    assert "nothing was built, run or timed" in run.stdout


def test_dry_run_reports_every_target_and_the_estimate(dry_run):
    run, out = dry_run
    targets = [line for line in run.stdout.splitlines() if line.startswith("target: ")]
    assert [t.split()[1] for t in targets] == ["P1", "P2", "P2", "P2", "P3", "P4", "P5"]
    assert all("not measured (dry run" in t for t in targets)
    assert (out / "summary.txt").read_text().count("target: ") == 7
    plan = [line for line in run.stdout.splitlines() if line.startswith("warmup plan: ")]
    est = json.loads(plan[0].split(": ", 1)[1])
    assert est["triton_compiles"] > 0 and est["estimated_seconds"] < 120  # within the warmup stage's limit


def test_summary_judges_measured_results(tmp_path):
    """met / short from a results.json shaped like the benchmark's (worst case decides)."""
    rows = [{"status": "ok", "contender": "ogpsa:triton", "workload": "lora", "k": 2, "grad_dtype": "fp32",
             "basis_dtype": "fp32", "pct_copy": 93.0, "x_reference": 25.0, "x_authors": 150.0, "over_clip": 1.1},
            {"status": "ok", "contender": "ogpsa:cuda", "workload": "125m", "k": 2, "grad_dtype": "fp32",
             "basis_dtype": "fp32", "pct_copy": 80.0, "x_reference": 6.0, "x_authors": 90.0, "over_clip": 1.2}]
    (tmp_path / "results.json").write_text(json.dumps({"results": rows}))
    (tmp_path / "loop.json").write_text(json.dumps(
        {"results": [{"status": "ok", "workload": "lora", "step_ratio": 1.4}]}))
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import gpu_summary
    finally:
        sys.path.pop(0)
    lines = gpu_summary.summarize(tmp_path)
    assert lines[0].endswith("SHORT") and "worst 80%" in lines[0]  # P1: 80 % in one case
    assert lines[2].endswith("MET") and lines[3].endswith("MET")  # P2 125m 6x, lora 25x
    assert "not measured" in lines[1]  # no llama8b case
    assert lines[4].endswith("SHORT") and lines[5].endswith("SHORT") and lines[6].endswith("MET")
