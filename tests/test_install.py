"""Installing ogpsa: what the build records, what `import ogpsa` says about it, and a fresh venv.

Fast tests: the extension records the torch it was built against; the import-time check warns
(once, with the fix) when `_C` is built but unloadable or built against another torch, and
`ogpsa info` shows the same text; an explicit CUDA_HOME without nvcc stops the build with a
message instead of being replaced.

Slow test: a new virtualenv (`python -m venv`, no system site-packages) gets the CPU torch wheel
from the local disk, then `pip install --no-build-isolation .` from a copy of the source tree,
then runs the README Quickstart and `ogpsa info`; finally it drops in an `_C` built against the
development torch (the isolated-build accident of issue 16) and checks that `import ogpsa` warns.
"""

from __future__ import annotations

import glob
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

import ogpsa
from ogpsa import buildcheck, cli
from ogpsa.backends import cext

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def fresh_check(monkeypatch):
    monkeypatch.setattr(buildcheck, "_warned", False)
    return monkeypatch


@pytest.mark.skipif(cext._C is None, reason="ogpsa._C is not built")
def test_extension_records_the_torch_it_was_built_against():
    assert cext.build_info()["torch_version"] == torch.__version__
    assert buildcheck.problem() is None


def test_unloadable_build_warns_once_with_the_fix(fresh_check, tmp_path):
    fresh_check.setattr(cext, "_C", None)
    fresh_check.setattr(cext, "_IMPORT_ERROR", "ImportError: libc10_cuda.so: cannot open shared object file")
    fresh_check.setattr(buildcheck, "_built_files", lambda: [str(tmp_path / "_C.cpython-311-x86_64-linux-gnu.so")])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = buildcheck.check()
        second = buildcheck.check()
    assert first == second and "does not load" in first and "libc10_cuda.so" in first
    assert "pip install --no-build-isolation ." in first and "ogpsa info" in first
    assert [w.category for w in caught] == [ogpsa.OGPSABuildWarning]  # once per process


def test_version_mismatch_warns_and_info_shows_it(fresh_check, capsys):
    fresh_check.setattr(cext, "_C", object())
    fresh_check.setattr(cext, "build_info", lambda: {"torch_version": "2.4.0+cu121"})
    with pytest.warns(ogpsa.OGPSABuildWarning, match=r"built against torch 2\.4\.0\+cu121"):
        buildcheck.check()
    fresh_check.setattr(cext, "info", lambda: {"built": True})
    assert cli.main(["info"]) == 0
    assert "build_check: ogpsa._C was built against torch 2.4.0+cu121" in capsys.readouterr().out


def test_pure_python_install_is_not_a_warning(fresh_check):
    fresh_check.setattr(cext, "_C", None)
    fresh_check.setattr(buildcheck, "_built_files", lambda: [])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert buildcheck.check() is None


@pytest.mark.skipif(not torch.version.cuda, reason="the CUDA_HOME check runs only when torch has CUDA")
def test_explicit_cuda_home_without_nvcc_is_an_error_not_replaced(tmp_path):
    env = {**os.environ, "CUDA_HOME": str(tmp_path), "OGPSA_BUILD_CUDA": ""}
    env.pop("CUDA_PATH", None)
    out = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert f"CUDA_HOME={tmp_path} has no bin/nvcc" in out.stderr and "OGPSA_BUILD_CUDA=0" in out.stderr


def _source_copy(dest: pathlib.Path) -> pathlib.Path:
    """The files a fresh clone has (tracked + new, not ignored), without build outputs."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for rel in files:
        src = ROOT / rel
        if src.is_file() and not rel.endswith(".so"):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def _local_torch_wheel() -> str | None:
    wheels = sorted(glob.glob(f"/opt/wheels/torch-*-cp{sys.version_info[0]}{sys.version_info[1]}-*.whl"))
    return wheels[-1] if wheels else None


@pytest.mark.slow
@pytest.mark.skipif(_local_torch_wheel() is None, reason="no torch wheel on the local disk (/opt/wheels)")
def test_fresh_venv_install_runs_quickstart(tmp_path):
    venv, src = tmp_path / "venv", _source_copy(tmp_path / "src")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    pins = dict(line.split("==") for line in (ROOT / "requirements-dev.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))

    def pip(*args: str) -> None:
        out = subprocess.run([py, "-m", "pip", "install", "-q", *args], cwd=src, capture_output=True, text=True)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    # what --no-build-isolation needs in the environment: torch (CPU wheel from disk) + build tools
    pip(_local_torch_wheel(), *(f"{p}=={pins[p]}" for p in ("setuptools", "wheel", "ninja")))
    pip("--no-build-isolation", ".")
    quickstart = re.search(r"## Quickstart.*?```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    run = subprocess.run([py, "-c", quickstart], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "OGPSABuildWarning" not in run.stderr, run.stderr[-3000:]
    assert "removed_fraction" in run.stdout
    info = json.loads(subprocess.run([str(venv / "bin" / "ogpsa"), "info", "--json"], cwd=tmp_path,
                                     capture_output=True, text=True, check=True).stdout)
    venv_torch = subprocess.run([py, "-c", "import torch; print(torch.__version__)"], capture_output=True,
                                text=True, check=True).stdout.strip()
    assert info["build_check"] == "ok" and info["extension"]["built"] is True
    assert info["backends"]["cpu"]["available"] is True
    built = subprocess.run([py, "-c", "from ogpsa import _C; print(_C.build_info()['torch_version'])"],
                           cwd=tmp_path, capture_output=True, text=True, check=True).stdout.strip()
    assert built == venv_torch
    # every subpackage and the demo's data files are installed (not only what an editable install sees)
    # (find_spec: the demo and kernels need the optional transformers / triton to import)
    found = subprocess.run([py, "-c", "import importlib.util as u, ogpsa.distributed, ogpsa.optim; "
                            "[u.find_spec(m).origin for m in ('ogpsa.kernels', 'ogpsa.bench', 'ogpsa.integrations')]; "
                            "print(u.find_spec('ogpsa.demo').submodule_search_locations[0])"],
                           cwd=tmp_path, capture_output=True, text=True)
    assert found.returncode == 0, found.stderr[-3000:]
    demo_base = found.stdout.strip()
    assert "site-packages" in demo_base
    assert sorted(os.listdir(os.path.join(demo_base, "data", "base"))) == sorted(
        os.listdir(ROOT / "ogpsa" / "demo" / "data" / "base"))

    # the accident: an _C compiled against another torch (here the development venv's) is installed
    mine = glob.glob(str(ROOT / "ogpsa" / "_C.*.so"))
    if mine and torch.__version__ != venv_torch:
        target = glob.glob(str(venv / "lib" / "python*" / "site-packages" / "ogpsa" / "_C.*.so"))[0]
        shutil.copy2(mine[0], target)
        out = subprocess.run([py, "-c", "import ogpsa"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and "OGPSABuildWarning" in out.stderr, out.stderr[-2000:]
        assert "pip install --no-build-isolation ." in out.stderr
