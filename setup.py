"""Build script for ogpsa.

The Python package is declared in pyproject.toml. This file exists so the compiled
extension ogpsa._C can be added as ext_modules (torch.utils.cpp_extension) without
changing how the package installs; see `ext_modules()` below.
"""

import glob
import json
import os
import shutil
import sys
import time
import warnings
from typing import Callable, Optional

from setuptools import find_packages, setup

# ----------------------------------------------------------------------------------------
# ogpsa._C: CPU kernels always; CUDA kernels when a CUDA device is visible at build time (and
# torch has CUDA and nvcc is found), or when asked for:
#   OGPSA_BUILD_CUDA=0   never build CUDA kernels
#   OGPSA_BUILD_CUDA=1   require them (an error if torch lacks CUDA, nvcc is missing or nvcc fails);
#                        for a build machine without a GPU (CI sets it) or a GPU hidden at build time
#   unset                auto: build them when a CUDA device is visible; if nvcc fails, build
#                        CPU-only and say so. Without a device they are skipped: compiling them
#                        takes minutes on a small CPU and nothing here could run them.
#   OGPSA_BUILD_EXT=0    skip ogpsa._C entirely (pure-Python install; the torch backend still works)
#   TORCH_CUDA_ARCH_LIST defaults to "8.0;9.0"; MAX_JOBS is passed to ninja as usual.
# A failing C++ compiler never fails the install: the package then installs without _C.
# What was built and why is written next to _C as _C_build.json (read by `ogpsa info`).
# ----------------------------------------------------------------------------------------

_CPU_SOURCES = ["csrc/ops.cpp", "csrc/adamw.cpp"]
_CUDA_SOURCES = sorted(glob.glob("csrc/cuda/*.cu"))


def _log(msg: str) -> None:
    line = f"ogpsa setup: {msg}"
    print(line, file=sys.stderr, flush=True)
    to_terminal(line)


def to_terminal(line: str, tty: str = "/dev/tty") -> bool:
    """Also show a progress line on the terminal pip runs in; True when written.

    pip captures the build's output and shows it only with -v or when the build fails, so a
    compile of minutes looked hung (issue 23: 13 min 32 s without a line). The few "ogpsa setup:"
    lines go to the controlling terminal as well, when there is one and stderr is not it already.
    OGPSA_BUILD_PROGRESS=0 turns this off (`make build` does: it shows them from pip -v itself).
    """
    if os.environ.get("OGPSA_BUILD_PROGRESS", "").strip() == "0":
        return False
    try:
        if sys.stderr.isatty():
            return False
        with open(tty, "a") as out:
            out.write(line + "\n")
        return True
    except (OSError, ValueError):  # no controlling terminal (CI, pytest): pip's log has the line
        return False


def _cuda_home():
    """A CUDA toolkit directory with bin/nvcc, or None; exports CUDA_HOME for torch when found.

    An explicit CUDA_HOME / CUDA_PATH is respected: if it has no bin/nvcc the build stops with
    an error naming it (never a silent switch to another toolkit). Unset, /usr/local/cuda and
    then the toolkit around `nvcc` on PATH are tried.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home:
            if os.path.exists(os.path.join(home, "bin", "nvcc")):
                return home
            raise SystemExit(f"ogpsa setup: {var}={home} has no bin/nvcc. Point {var} at a CUDA toolkit root, "
                             "unset it to use /usr/local/cuda or nvcc on PATH, or set OGPSA_BUILD_CUDA=0 "
                             "for a CPU-only build.")
    # torch would guess from `which nvcc`, which may be a shim outside the toolkit
    candidates = ["/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for home in candidates:
        if os.path.exists(os.path.join(home, "bin", "nvcc")) and os.path.isdir(os.path.join(home, "include")):
            os.environ["CUDA_HOME"] = home
            return home
    return None


def _arch_token(archs: str) -> str:
    # a macro-safe spelling of the arch list ("8.0;9.0+PTX" -> "80_90PTX"), decoded by ogpsa.backends.cext
    return "_".join(a.replace(".", "").replace("+", "") for a in archs.replace(" ", ";").split(";") if a)


#: the file next to ogpsa._C that records what the build contains and why (see ogpsa/backends/cext.py)
BUILD_RECORD = "_C_build.json"
#: how to get the CUDA kernels when they were skipped (printed by the build and by `ogpsa info`)
HOW_TO_GET_CUDA = "reinstall with OGPSA_BUILD_CUDA=1 (e.g. OGPSA_BUILD_CUDA=1 pip install --no-build-isolation -e .)"


def how_to_get_cuda(reason: str) -> str:
    """What to do to get the CUDA kernels, for the reason they were not built."""
    if "torch is built without CUDA" in reason:
        return "install a CUDA build of torch, then " + HOW_TO_GET_CUDA
    if "nvcc not found" in reason:
        return "install the CUDA toolkit (nvcc) or point CUDA_HOME at it, then " + HOW_TO_GET_CUDA
    if "nvcc failed" in reason:
        return "fix the nvcc error in the build log, then " + HOW_TO_GET_CUDA
    return HOW_TO_GET_CUDA


def decide_cuda(forced: str, has_sources: bool, torch_cuda: Optional[str], device_count: Callable[[], int],
                find_nvcc: Callable[[], Optional[str]]) -> "tuple[bool, str]":
    """Build the CUDA kernels? Returns (yes/no, why); raises SystemExit when OGPSA_BUILD_CUDA=1 cannot be met.

    forced: the value of OGPSA_BUILD_CUDA ("", "0" or "1"); torch_cuda: torch.version.cuda;
    device_count: how many CUDA devices are visible now; find_nvcc: the toolkit root with bin/nvcc,
    or None. Cheap checks first, and the device before the toolkit, so a machine without a GPU
    never looks for nvcc unless asked to (an explicit CUDA_HOME without nvcc is an error there).
    """
    forced = forced.strip()
    if forced not in ("", "0", "1"):
        raise SystemExit(f"OGPSA_BUILD_CUDA={forced!r}: use 0, 1 or leave it unset")
    if forced == "0":
        return False, "OGPSA_BUILD_CUDA=0"
    if not has_sources:
        why = "no CUDA sources in csrc/cuda"
    elif not torch_cuda:
        why = "torch is built without CUDA"
    elif forced == "" and device_count() == 0:
        return False, f"no CUDA device was visible at build time; to build them anyway, {HOW_TO_GET_CUDA}"
    else:
        home = find_nvcc()
        if home is None:
            why = "nvcc not found (set CUDA_HOME to a CUDA toolkit root)"
        else:
            return True, ("OGPSA_BUILD_CUDA=1" if forced == "1" else "a CUDA device is visible") + f", nvcc in {home}"
    if forced == "1":
        raise SystemExit(f"OGPSA_BUILD_CUDA=1 but CUDA kernels cannot be built: {why}")
    return False, why


def _cuda_plan():
    """(build CUDA?, reason) for this machine and environment."""
    import torch

    def devices() -> int:
        try:
            return torch.cuda.device_count()
        except Exception:  # a broken driver counts as no device
            return 0

    return decide_cuda(os.environ.get("OGPSA_BUILD_CUDA", ""), bool(_CUDA_SOURCES), torch.version.cuda, devices,
                       _cuda_home)


def _torch_version_macro() -> list:
    """OGPSA_TORCH_VERSION: the torch this build compiles against, stringified in csrc/ops.cpp.

    `import ogpsa` compares it with the running torch (ogpsa/buildcheck.py): an extension built
    in an isolated environment against another torch loads badly or not at all.
    """
    import re

    import torch

    version = torch.__version__
    if not re.fullmatch(r"[0-9A-Za-z.+]+", version):  # only what survives as macro tokens
        _log(f"torch version {version!r} cannot be recorded in ogpsa._C; the import-time check is skipped")
        return []
    return [("OGPSA_TORCH_VERSION", version)]


def _extension(with_cuda: bool):
    from torch.utils import cpp_extension

    # -fno-math-errno: std::sqrt vectorises (still correctly rounded; errno is never read);
    # -ffp-contract=off: no FMA contraction, so the baseline, AVX2 and AVX-512 builds of the CPU
    # kernels (csrc/cpu_simd.h) give bit-for-bit the same results
    cxx = ["-O3", "-fopenmp", "-DNDEBUG", "-fno-math-errno", "-ffp-contract=off"]
    macros = _torch_version_macro()
    if with_cuda:
        archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        macros += [("OGPSA_WITH_CUDA", "1"), ("OGPSA_CUDA_ARCHS", _arch_token(archs))]
        return cpp_extension.CUDAExtension(
            "ogpsa._C", _CPU_SOURCES + _CUDA_SOURCES, define_macros=macros,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-DNDEBUG", "-lineinfo"]},
            extra_link_args=["-fopenmp"],
        )
    return cpp_extension.CppExtension("ogpsa._C", _CPU_SOURCES, define_macros=macros,
                                      extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])


#: compiling now (not only the metadata hooks pip calls first, which run this file as well)
_BUILDING = any(cmd in sys.argv for cmd in ("build", "build_ext", "bdist_wheel", "editable_wheel", "develop", "install"))
#: set by ext_modules(): why the CUDA kernels are (not) in this build, for _C_build.json
_CUDA_REASON = {"cuda_kernels": False, "cuda_reason": "not decided"}


def ext_modules() -> list:
    """ogpsa._C, with CUDA kernels when they are built (see the table above)."""
    if os.environ.get("OGPSA_BUILD_EXT", "").strip() == "0":
        _log("OGPSA_BUILD_EXT=0: not building ogpsa._C")
        return []
    try:
        import torch  # noqa: F401
    except ImportError:
        _log("torch is not importable at build time (build with --no-build-isolation): not building ogpsa._C")
        return []
    with_cuda, why = _cuda_plan()
    _CUDA_REASON.update(cuda_kernels=with_cuda, cuda_reason=why)
    if not _BUILDING:  # the metadata hooks run this file too: say it once, when compiling
        return [_extension(with_cuda)]
    # `make build` shows the "ogpsa setup:" lines (pip hides them without -v); `ogpsa info` reports the same
    _log(f"ogpsa._C will have {'CPU and CUDA' if with_cuda else 'CPU'} kernels, against torch "
         f"{torch.__version__} ({'CUDA kernels: ' + why if with_cuda else 'no CUDA kernels: ' + why})")
    return [_extension(with_cuda)]


def cmdclass() -> dict:
    """build_ext that falls back: CUDA build fails -> CPU-only; CPU build fails -> no _C."""
    try:
        from torch.utils.cpp_extension import BuildExtension
    except ImportError:
        return {}

    class FallbackBuildExtension(BuildExtension):
        def build_extensions(self):
            started = time.perf_counter()
            n = sum(len(e.sources) for e in self.extensions)
            _log(f"compiling {n} source files with ninja ({os.environ.get('MAX_JOBS') or 'default'} parallel jobs; "
                 f"{'the CUDA ones take minutes' if _CUDA_REASON['cuda_kernels'] else 'about a minute on 2 cores'})")
            try:
                super().build_extensions()
                self._record(started)
                return
            except Exception as exc:
                failed = exc
            strict = os.environ.get("OGPSA_BUILD_CUDA", "").strip() == "1"
            if any(s.endswith(".cu") for e in self.extensions for s in e.sources) and not strict:
                _log(f"CUDA kernels failed to build ({type(failed).__name__}: {failed}); building CPU-only ogpsa._C")
                _CUDA_REASON.update(cuda_kernels=False, cuda_reason=f"nvcc failed at build time ({type(failed).__name__}); "
                                    "the build log has the error")
                cpu = _extension(False)  # fresh: BuildExtension adds its flags again
                for attr, value in vars(self.extensions[0]).items():
                    if attr.startswith("_") and not hasattr(cpu, attr):  # set by build_ext.finalize_options
                        setattr(cpu, attr, value)
                self.extensions = [cpu]
                try:
                    super().build_extensions()
                    self._record(started)
                    return
                except Exception as exc:
                    failed = exc
            elif strict:
                raise failed
            _log(f"ogpsa._C failed to build ({type(failed).__name__}: {failed}); installing without it "
                 "(the pure-PyTorch backend still works)")
            self.extensions = []

        def copy_extensions_to_source(self) -> None:
            """Editable installs build in a temporary folder and copy _C into the source tree:
            copy its _C_build.json along (the regular build leaves it next to _C in the wheel)."""
            super().copy_extensions_to_source()
            if not self.extensions:
                return
            inplace_file, regular_file = self._get_inplace_equivalent(self.get_finalized_command("build_py"),
                                                                      self.extensions[0])
            built = os.path.join(os.path.dirname(regular_file), BUILD_RECORD)
            if os.path.exists(built):
                shutil.copyfile(built, os.path.join(os.path.dirname(inplace_file), BUILD_RECORD))

        def _record(self, started: float) -> None:
            """Write _C_build.json next to the built module (the wheel or the source tree)."""
            path = os.path.join(os.path.dirname(self.get_ext_fullpath("ogpsa._C")), BUILD_RECORD)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            record = dict(_CUDA_REASON)
            if not record["cuda_kernels"]:
                record["how_to_get_cuda_kernels"] = how_to_get_cuda(record["cuda_reason"])
            with open(path, "w") as f:
                json.dump(record, f, indent=1)
            _log(f"built ogpsa._C in {time.perf_counter() - started:.0f} s")

    # ninja compiles the .cpp and .cu in parallel; flags are stable, so ccache (if configured) hits
    return {"build_ext": FallbackBuildExtension.with_options(use_ninja=True)}


def _quiet_setuptools_notes() -> None:
    """The editable install's 'Editable installation' note (setuptools' InformationOnly: not a
    problem, only advice about folders named like the package) would be the only setuptools text
    in `make demo` output; silence that one note."""
    try:
        from setuptools.warnings import InformationOnly
    except ImportError:  # older setuptools: no such note
        return
    warnings.filterwarnings("ignore", message="Editable installation", category=InformationOnly)


if __name__ == "__main__":  # setuptools runs this file as __main__; tests import decide_cuda from it
    _quiet_setuptools_notes()
    setup(
        # every subpackage (a hand-kept list missed ogpsa.distributed, found by tests/test_install.py),
        # kernels/ as ogpsa.kernels (package-dir in pyproject.toml), and the demo's committed base model
        # (a data-only package, listed so setuptools does not warn that it "would be ignored")
        packages=find_packages(include=["ogpsa", "ogpsa.*"]) + ["ogpsa.kernels", "ogpsa.demo.data.base"],
        package_data={"ogpsa.demo.data.base": ["*"]},
        ext_modules=ext_modules(),
        cmdclass=cmdclass(),
    )
