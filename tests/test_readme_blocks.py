"""Every fenced code block of README.md and docs/*.md runs as written.

Convention (also in docs/contributing.md):

- Fenced blocks labelled ``python`` run in a fresh interpreter (this venv, ``TRITON_INTERPRET=1``)
  in a temporary working directory; blocks labelled ``bash``/``sh``/``shell`` run with
  ``bash -euo pipefail`` in the repository root (this venv's bin/ first on PATH). Blocks
  with another label (``text``, ``json``, ``yaml``, ...) or none are documentation, not run.
- A block that must not run here (a long run such as ``make demo``, several processes, a GPU, an
  install into the current environment) has this HTML comment on the last non-blank line before
  its opening fence::

      <!-- readme-test: skip (reason) -->

  The reason is required. Every path under ``examples/``, ``benchmarks/`` or ``tests/`` that the
  reason names must exist, so multi-process and GPU fragments point at a runnable file.
- A python block that imports ``trl``/``transformers``/``peft``/``deepspeed`` skips when that
  package is missing (the ``trl`` extra is optional).
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import subprocess
import sys
from dataclasses import dataclass

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
#: the pages whose blocks run: the README and every docs page (not the generated docs/demo/** runs)
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
RUN_LANGS = {"python": "python", "py": "python", "bash": "bash", "sh": "bash", "shell": "bash"}
SKIP_RE = re.compile(r"<!--\s*readme-test:\s*skip\s*(?:\((?P<reason>.*?)\))?\s*-->")
FENCE_RE = re.compile(r"^(?P<indent>\s*)(?P<fence>```+|~~~+)\s*(?P<lang>[\w+-]*)")
OPTIONAL = ("trl", "transformers", "peft", "deepspeed", "datasets")


@dataclass
class Block:
    page: str           # the file, relative to the repository root
    line: int           # 1-based line of the opening fence
    heading: str        # the nearest heading above
    lang: str
    code: str
    skip: str | None    # the marker's reason, "" for a marker without one, None: no marker

    @property
    def id(self) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", self.heading.lower()).strip("-")[:40]
        return f"{self.page}:L{self.line}-{slug}"


def blocks(text: str, page: str = "README.md") -> list[Block]:
    """The fenced blocks of a markdown text, with the skip marker before each (if any)."""
    out, lines, heading, i = [], text.splitlines(), "top", 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        m = FENCE_RE.match(line)
        if not m:
            i += 1
            continue
        fence, start = m.group("fence"), i
        body = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i])
            i += 1
        prev = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        marker = SKIP_RE.search(prev)
        skip = None if marker is None else (marker.group("reason") or "").strip()
        out.append(Block(page, start + 1, heading, m.group("lang").lower(), "\n".join(body) + "\n", skip))
        i += 1
    return out


ALL = [b for p in PAGES for b in blocks(p.read_text(), p.relative_to(ROOT).as_posix())]
RUNNABLE = [b for b in ALL if b.lang in RUN_LANGS]


def test_parser_sees_blocks_and_markers():
    sample = ("# A\n```python\nprint(1)\n```\n<!-- readme-test: skip (two ranks; examples/x.py) -->\n\n"
              "```bash\nmake demo\n```\n```text\nnot run\n```\n")
    got = blocks(sample)
    assert {b.page for b in got} == {"README.md"}
    assert [(b.lang, b.skip, b.line) for b in got] == [("python", None, 2), ("bash", "two ranks; examples/x.py", 7),
                                                        ("text", None, 10)]
    assert got[0].code == "print(1)\n"


def test_every_skip_marker_has_a_reason_and_its_files_exist():
    assert [b for b in RUNNABLE if b.page == "README.md"], "README.md has no runnable blocks"
    for b in ALL:
        if b.skip is None:
            continue
        assert b.skip, f"{b.page}:{b.line}: a readme-test skip marker needs a reason: skip (why)"
        for path in re.findall(r"(?:examples|benchmarks|tests)/[\w./-]+\w", b.skip):
            assert (ROOT / path).exists(), f"{b.page}:{b.line}: the skip reason names {path}, which does not exist"


def _env() -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT),
           "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


@pytest.mark.parametrize("block", RUNNABLE, ids=[b.id for b in RUNNABLE])
def test_readme_block_runs_as_written(block: Block, tmp_path):
    if block.skip is not None:
        pytest.skip(f"{block.page}:{block.line} marked: {block.skip}")
    lang = RUN_LANGS[block.lang]
    if lang == "python":
        for mod in OPTIONAL:
            if re.search(rf"^\s*(from|import)\s+{mod}\b", block.code, re.M) and importlib.util.find_spec(mod) is None:
                pytest.skip(f"needs {mod}")
        cmd = [sys.executable, "-c", block.code]
        cwd = tmp_path  # python blocks write their outputs (e.g. ogpsa-sft/) where they run
    else:
        cmd = ["bash", "-euo", "pipefail", "-c", block.code]
        cwd = ROOT  # shell blocks are written for the repository root (make ..., benchmarks/...)
    out = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, (f"{block.page}:{block.line} ({block.heading}) failed with exit {out.returncode}:\n"
                                 f"{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
