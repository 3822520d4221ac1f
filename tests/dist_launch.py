"""Run a 2-rank worker script (tests/*_worker.py) in its own process session and collect each
rank's JSON result file: shared by the distributed test files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from typing import Optional, Sequence

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def launch_worker(worker: str, outdir: str, scenarios: Sequence[str], timeout: float,
                  env: Optional[dict] = None, world_size: int = 2) -> dict:
    """``{scenario: [rank 0 result, rank 1 result, ...]}``; a rank that wrote no result file gets
    ``{"error": <worker exit code and the log's tail>}``. A worker running past ``timeout``
    seconds is killed with its ranks (its own session only) and the test fails with its log."""
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, worker), outdir, ",".join(scenarios)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, env=env,
                            cwd=os.path.dirname(HERE))
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the worker's own session: it and its ranks only
        log, _ = proc.communicate()
        pytest.fail(f"{worker} timed out after {timeout}s:\n{log.decode(errors='replace')[-4000:]}")
    results = {}
    for name in scenarios:
        ranks = []
        for r in range(world_size):
            path = os.path.join(outdir, f"{name}.rank{r}.json")
            if not os.path.exists(path):
                ranks.append({"error": f"no result from rank {r}; worker exit {proc.returncode}:\n"
                                       f"{log.decode(errors='replace')[-4000:]}"})
                continue
            with open(path) as f:
                ranks.append(json.load(f))
        results[name] = ranks
    return results
