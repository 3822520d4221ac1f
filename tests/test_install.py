"""Installing ogpsa: what the build records, what `import ogpsa` says about it, and a fresh venv.

Fast tests: the extension records the torch it was built against; the import-time check warns
(once, with the fix) when `_C` is built but unloadable or built against another torch, and
`ogpsa info` shows the same text; an explicit CUDA_HOME without nvcc stops the build with a
message instead of being replaced; CUDA kernels are built only for a visible device or with
OGPSA_BUILD_CUDA=1, and `ogpsa info` says why they are missing and how to get them; setuptools
has nothing to warn about.

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
    # looked for only when CUDA kernels are to be built: OGPSA_BUILD_CUDA=1 (or a visible device)
    env = {**os.environ, "CUDA_HOME": str(tmp_path), "OGPSA_BUILD_CUDA": "1", "OGPSA_BUILD_PROGRESS": "0"}
    env.pop("CUDA_PATH", None)
    out = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert f"CUDA_HOME={tmp_path} has no bin/nvcc" in out.stderr and "OGPSA_BUILD_CUDA=0" in out.stderr


def _setup_module():
    """setup.py as a module (its setup() call runs only as __main__, i.e. under pip/setuptools)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("ogpsa_setup_under_test", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _never():
    raise AssertionError("must not be consulted for this decision")


def test_cuda_kernels_are_built_only_for_a_visible_device_or_when_asked():
    decide = _setup_module().decide_cuda
    # auto: a visible device and nvcc -> built; no device -> skipped without looking for nvcc
    assert decide("", True, "13.0", lambda: 1, lambda: "/usr/local/cuda") == (
        True, "a CUDA device is visible, nvcc in /usr/local/cuda")
    built, why = decide("", True, "13.0", lambda: 0, _never)
    assert built is False and "no CUDA device was visible at build time" in why and "OGPSA_BUILD_CUDA=1" in why
    assert decide("", True, "13.0", lambda: 2, lambda: None) == (
        False, "nvcc not found (set CUDA_HOME to a CUDA toolkit root)")
    assert decide("", True, None, _never, _never) == (False, "torch is built without CUDA")
    assert decide("", False, "13.0", _never, _never) == (False, "no CUDA sources in csrc/cuda")
    # forced: 1 builds without a device (CI), 0 never builds, 1 that cannot be met stops the build
    assert decide("1", True, "13.0", _never, lambda: "/opt/cuda") == (True, "OGPSA_BUILD_CUDA=1, nvcc in /opt/cuda")
    assert decide(" 0 ", True, "13.0", _never, _never) == (False, "OGPSA_BUILD_CUDA=0")
    with pytest.raises(SystemExit, match="OGPSA_BUILD_CUDA=1 but CUDA kernels cannot be built: torch is built without"):
        decide("1", True, None, _never, _never)
    with pytest.raises(SystemExit, match="cannot be built: nvcc not found"):
        decide("1", True, "13.0", _never, lambda: None)
    with pytest.raises(SystemExit, match="use 0, 1 or leave it unset"):
        decide("yes", True, "13.0", _never, _never)


def test_build_progress_reaches_the_terminal_past_pip(tmp_path, monkeypatch):
    """pip hides the build's output: setup.py's progress lines also go to the terminal."""
    module, tty = _setup_module(), tmp_path / "tty"
    tty.touch()
    monkeypatch.delenv("OGPSA_BUILD_PROGRESS", raising=False)
    assert module.to_terminal("ogpsa setup: compiling 2 source files", str(tty)) is True
    monkeypatch.setenv("OGPSA_BUILD_PROGRESS", "0")  # make build shows them from pip -v itself
    assert module.to_terminal("ogpsa setup: not shown", str(tty)) is False
    monkeypatch.delenv("OGPSA_BUILD_PROGRESS")
    assert module.to_terminal("ogpsa setup: no terminal", str(tmp_path / "missing" / "tty")) is False
    assert tty.read_text() == "ogpsa setup: compiling 2 source files\n"


def test_how_to_get_cuda_kernels_fits_the_reason():
    how = _setup_module().how_to_get_cuda
    assert how("no CUDA device was visible at build time; ...").startswith("reinstall with OGPSA_BUILD_CUDA=1")
    assert how("OGPSA_BUILD_CUDA=0").startswith("reinstall with OGPSA_BUILD_CUDA=1")
    assert how("torch is built without CUDA").startswith("install a CUDA build of torch, then reinstall")
    assert how("nvcc not found (set CUDA_HOME to a CUDA toolkit root)").startswith("install the CUDA toolkit")
    assert how("nvcc failed at build time (CalledProcessError)").startswith("fix the nvcc error")


@pytest.mark.skipif(torch.cuda.device_count() > 0, reason="checks the decision on a machine without a CUDA device")
def test_this_machine_without_a_device_skips_cuda_kernels_unless_asked(monkeypatch):
    module = _setup_module()
    monkeypatch.delenv("OGPSA_BUILD_CUDA", raising=False)
    built, why = module._cuda_plan()
    assert built is False
    assert ("no CUDA device was visible" in why) if torch.version.cuda else why == "torch is built without CUDA"


def test_ogpsa_info_says_why_cuda_kernels_are_missing_and_how_to_get_them(monkeypatch):
    record = {"cuda_kernels": False, "how_to_get_cuda_kernels": "reinstall with OGPSA_BUILD_CUDA=1 (e.g. ...)",
              "cuda_reason": "no CUDA device was visible at build time; to build them anyway, reinstall with "
                             "OGPSA_BUILD_CUDA=1 (e.g. ...)"}
    monkeypatch.setattr(cext, "build_record", lambda: dict(record))
    assert cext.no_cuda_kernels_reason() == record["cuda_reason"]  # the how-to is not repeated
    monkeypatch.setattr(cext, "build_record", lambda: {**record, "cuda_reason": "OGPSA_BUILD_CUDA=0"})
    assert cext.no_cuda_kernels_reason() == "OGPSA_BUILD_CUDA=0; reinstall with OGPSA_BUILD_CUDA=1 (e.g. ...)"
    if cext._C is not None and not cext.build_info()["cuda"]:
        assert cext.info()["cuda_kernels_not_built"].startswith("OGPSA_BUILD_CUDA=0; reinstall")
        ok, detail = cext.CudaBackend().availability()
        assert not ok and detail == "ogpsa._C was built without CUDA kernels: " + cext.no_cuda_kernels_reason()


@pytest.mark.skipif(cext._C is None, reason="ogpsa._C is not built")
def test_the_build_records_what_it_built_next_to_the_extension():
    path = pathlib.Path(cext._C.__file__).with_name("_C_build.json")
    if not path.exists():
        pytest.skip(f"{path.name} is missing: ogpsa._C was built by an older setup.py (rebuild: make build)")
    record = json.loads(path.read_text())
    assert record["cuda_kernels"] is bool(cext.build_info()["cuda"])
    assert record["cuda_reason"]
    assert ("how_to_get_cuda_kernels" in record) is (not record["cuda_kernels"])


def test_setuptools_prints_no_warnings_for_this_project(tmp_path):
    """pyproject.toml and setup.py give setuptools nothing to warn about (make demo showed ~70 lines:
    project.license as a table, the demo's data directory not listed as a package)."""
    src = _source_copy(tmp_path / "src")
    env = {**os.environ, "OGPSA_BUILD_EXT": "0", "PYTHONWARNINGS": "always", "OGPSA_BUILD_PROGRESS": "0"}
    out = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path / "lib")],
                         cwd=src, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Warning" not in out.stderr and "!!" not in out.stderr, out.stderr[-3000:]
    assert (tmp_path / "lib" / "ogpsa" / "demo" / "data" / "base" / "model.safetensors").is_file()


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
        out = subprocess.run([py, "-m", "pip", "install", "-q", *args], cwd=src, capture_output=True, text=True,
                             env={**os.environ, "OGPSA_BUILD_PROGRESS": "0"})  # not onto a developer's terminal
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
    if not info["extension"]["cuda_kernels"]:  # the build's record (_C_build.json) is installed with _C
        assert info["extension"]["cuda_kernels_not_built"].startswith(
            "torch is built without CUDA; install a CUDA build of torch" if not info["torch_cuda"] else "no CUDA device")
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
