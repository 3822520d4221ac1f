"""ogpsa has no import cycle, and every module imports on its own in a fresh interpreter.

The graph is read from each module's source (``ast``): every ``import`` / ``from ... import``
statement counts, also those inside functions (a "lazy" import that closes a circle is still a
circle: it only moves the failure to the first call), except those under ``if TYPE_CHECKING:``.
``from package import name`` is an edge to ``package.name`` when that is a module (a ``.py``
file, a subpackage or the compiled extension), else to ``package`` itself. ``kernels/`` is
installed as ``ogpsa.kernels`` and is part of the graph.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"ogpsa": ROOT / "ogpsa", "ogpsa.kernels": ROOT / "kernels"}


def _modules() -> dict[str, Path]:
    mods: dict[str, Path] = {}
    for prefix, folder in PACKAGES.items():
        for f in sorted(folder.rglob("*.py")):
            rel = list(f.relative_to(folder).with_suffix("").parts)
            if rel[-1] == "__init__":
                rel = rel[:-1]
            mods[".".join([prefix] + rel)] = f
    return mods


def _is_module(name: str, mods: dict[str, Path]) -> bool:
    if name in mods:
        return True
    pkg, _, leaf = name.rpartition(".")
    folder = PACKAGES.get(pkg) or (mods[pkg].parent if pkg in mods and mods[pkg].name == "__init__.py" else None)
    if folder is None:
        return False
    return any(folder.glob(f"{leaf}.*.so")) or any(folder.glob(f"{leaf}.*.pyd"))  # the compiled extension


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                skip.update(id(n) for n in ast.walk(sub))
    return skip


def import_graph() -> dict[str, set[str]]:
    """module -> the ogpsa modules it imports (anywhere in its source)."""
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for mod, path in mods.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        skip = _type_checking_nodes(tree)
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    parts = parts[:len(parts) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                targets = [f"{base}.{a.name}" if _is_module(f"{base}.{a.name}", mods) else base for a in node.names]
            for t in targets:
                if t.split(".")[0] != "ogpsa":
                    continue
                while t and t not in mods and not _is_module(t, mods):
                    t = t.rpartition(".")[0]
                if t in mods and t != mod:
                    deps.add(t)
        graph[mod] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            nxt = next(it, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on.add(nxt)
                    work.append((nxt, iter(sorted(graph.get(nxt, ())))))
                elif nxt in on:
                    low[v] = min(low[v], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def _edges_within(graph: dict[str, set[str]], comp: list[str]) -> list[str]:
    members = set(comp)
    return [f"{a} -> {b}" for a in comp for b in sorted(graph[a]) if b in members]


def test_cycle_finder_finds_a_cycle():
    """The checker itself: a planted circle is found, a chain is not."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_no_import_cycle_in_ogpsa():
    graph = import_graph()
    assert "ogpsa.projector" in graph and "ogpsa.kernels.adamw" in graph  # the walk saw the package
    found = cycles(graph)
    assert not found, "import cycles in ogpsa/:\n" + "\n".join(
        f"{comp}:\n    " + "\n    ".join(_edges_within(graph, comp)) for comp in found)


def test_every_module_imports_in_a_fresh_interpreter():
    """Every ogpsa module (demo and Triton kernels aside: optional dependencies) imports in one
    fresh interpreter; a failure names the module."""
    names = sorted(m for m in _modules() if not m.startswith(("ogpsa.kernels", "ogpsa.demo")))
    code = ("import importlib, sys\nbad = []\nfor m in sys.argv[1:]:\n    try:\n        importlib.import_module(m)\n"
            "    except Exception as exc:\n        bad.append(f'{m}: {type(exc).__name__}: {exc}')\n"
            "print('\\n'.join(bad)); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
