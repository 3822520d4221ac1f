"""`ogpsa info` and the README quickstart, run as written."""

import json
import pathlib
import re
import subprocess
import sys

from ogpsa import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_info_reports_versions_and_backends(capsys):
    assert cli.main(["info", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    for key in ("ogpsa", "torch", "triton", "cuda_available", "backends", "selected_backend"):
        assert key in data
    assert data["backends"]["torch"]["available"] is True
    assert set(data["backends"]) == {"cuda", "triton", "cpu", "torch"}


def test_info_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "ogpsa.cli", "info"], capture_output=True, text=True, check=True)
    assert "backends:" in out.stdout and "torch" in out.stdout


def _block_after(heading: str) -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split(heading, 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_quickstart_runs_as_written():
    code = _block_after("## Quickstart")
    namespace: dict = {}
    exec(compile(code, "README quickstart", "exec"), namespace)
    assert namespace["proj"].last_stats.removed_fraction > 0
