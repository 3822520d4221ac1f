"""The front door: README.md stays short, every relative link in README.md and docs/*.md resolves,
and the README's measured headline quotes the committed demo tables (no hand-typed numbers).

(Every fenced code block of README.md and docs/*.md runs in tests/test_readme_blocks.py; the
generated benchmark blocks are checked against their result files in tests/test_bench_smoke.py.)
"""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
MAX_README_LINES = 300

LINK_RE = re.compile(r"!?\[(?P<text>[^\]]*)\]\((?P<target>[^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE_RE = re.compile(r"^\s*(```+|~~~+)")
HEADLINE_START, HEADLINE_END = "<!-- demo-headline:start -->", "<!-- demo-headline:end -->"


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(1-based line number, line) of the lines outside fenced code blocks."""
    out, fence = [], None
    for i, line in enumerate(text.splitlines(), 1):
        m = FENCE_RE.match(line)
        if m and (fence is None or m.group(1).startswith(fence)):
            fence = m.group(1)[:3] if fence is None else None
            continue
        if fence is None:
            out.append((i, line))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped, spaces to '-'."""
    text = re.sub(r"`", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: pathlib.Path) -> set[str]:
    """Every heading anchor of a markdown file (duplicates get -1, -2, ... as on GitHub)."""
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose_lines(path.read_text()):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, target) of every relative link or image of a markdown file (no http/mailto)."""
    out = []
    for i, line in prose_lines(path.read_text()):
        for m in LINK_RE.finditer(line):
            target = m.group("target")
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):
                continue
            out.append((i, target))
    return out


def broken_links(path: pathlib.Path, root: pathlib.Path = ROOT) -> list[str]:
    bad = []
    for line, target in links(path):
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(root)}:{line}: {target}"
        if not dest.exists():
            bad.append(f"{where} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{where} (no heading #{anchor} in {dest.relative_to(root)})")
    return bad


def test_readme_is_a_front_door_of_at_most_300_lines():
    n = len(README.read_text().splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines (at most {MAX_README_LINES}): move reference material to docs/"


def test_docs_pages_exist_and_the_readme_links_each_one():
    text = README.read_text()
    for name in ("demo", "benchmarks", "update-space", "distributed", "fidelity", "backends", "architecture",
                 "contributing", "training"):
        assert (ROOT / "docs" / f"{name}.md").is_file(), f"docs/{name}.md is missing"
        assert f"(docs/{name}.md)" in text, f"README.md does not link docs/{name}.md"


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_relative_link_resolves(page):
    assert broken_links(page) == []


def test_link_checker_sees_broken_links_and_anchors(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# Page A\n\n## Projected AdamW step (`--suite adamw`)\n## Same\n## Same\n")
    readme = tmp_path / "README.md"
    readme.write_text("[ok](docs/a.md#page-a) [ok2](docs/a.md#projected-adamw-step---suite-adamw) "
                      "[dup](docs/a.md#same-1) [web](https://x.org/y) ![img](docs/missing.png)\n"
                      "[bad anchor](docs/a.md#nope)\n```text\n[in code](nowhere.md)\n```\n[self](#top)\n")
    got = broken_links(readme, tmp_path)
    assert got == ["README.md:1: docs/missing.png (no such file)",
                   "README.md:2: docs/a.md#nope (no heading #nope in docs/a.md)",
                   "README.md:6: #top (no heading #top in README.md)"]


def _published_lines() -> set[str]:
    lines: set[str] = set()
    for table in sorted((ROOT / "docs" / "demo").glob("*/table.md")):
        lines |= set(table.read_text().splitlines())
    return lines


def test_readme_headline_quotes_the_committed_demo_tables():
    """Inside the README's headline markers: every table line is a line of a committed
    docs/demo/*/table.md, and every number in the prose appears in a table row of those files."""
    text = README.read_text()
    assert text.count(HEADLINE_START) == 1 and text.count(HEADLINE_END) == 1, "README needs one demo headline block"
    block = text.split(HEADLINE_START, 1)[1].split(HEADLINE_END, 1)[0]
    published = _published_lines()
    rows = [line for line in block.splitlines() if line.startswith("|")]
    assert len(rows) >= 3, "the headline quotes no table rows"
    assert [r for r in rows if r not in published] == []
    # prose numbers: in the quoted rows or in the refresh-cost rows of the same tables
    quoted = " ".join(rows + sorted(line for line in published if line.startswith("|")))
    prose = " ".join(line for line in block.splitlines() if not line.startswith("|") and not line.startswith("!["))
    prose = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", prose)  # link targets are paths, not claims
    numbers = re.findall(r"(?<![\w.])\d+(?:\.\d+)?(?![\w.])", prose)
    missing = [n for n in numbers if not re.search(rf"(?<![\d.]){re.escape(n)}(?![\d])", quoted)]
    assert missing == [], f"README headline numbers not in the committed demo table rows: {missing}"
