"""Build script for ogpsa.

The Python package is declared in pyproject.toml. This file exists so the compiled
extension ogpsa._C can be added as ext_modules (torch.utils.cpp_extension) without
changing how the package installs; see `ext_modules()` below.
"""

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

# ----------------------------------------------------------------------------------------
# ogpsa._C: CPU kernels always; CUDA kernels when torch has CUDA and nvcc is found.
#   OGPSA_BUILD_CUDA=0   never build CUDA kernels
#   OGPSA_BUILD_CUDA=1   require them (an error if torch lacks CUDA, nvcc is missing or nvcc fails)
#   unset                auto: build them when possible; if nvcc fails, build CPU-only and say so
#   OGPSA_BUILD_EXT=0    skip ogpsa._C entirely (pure-Python install; the torch backend still works)
#   TORCH_CUDA_ARCH_LIST defaults to "8.0;9.0"; MAX_JOBS is passed to ninja as usual.
# A failing C++ compiler never fails the install: the package then installs without _C.
# ----------------------------------------------------------------------------------------

_CPU_SOURCES = ["csrc/ops.cpp", "csrc/adamw.cpp"]
_CUDA_SOURCES = sorted(glob.glob("csrc/cuda/*.cu"))


def _log(msg: str) -> None:
    print(f"ogpsa setup: {msg}", file=sys.stderr, flush=True)


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


def _cuda_plan():
    """(build CUDA?, reason)."""
    forced = os.environ.get("OGPSA_BUILD_CUDA", "").strip()
    if forced not in ("", "0", "1"):
        raise SystemExit(f"OGPSA_BUILD_CUDA={forced!r}: use 0, 1 or leave it unset")
    if forced == "0":
        return False, "OGPSA_BUILD_CUDA=0"
    if not _CUDA_SOURCES:
        why = "no CUDA sources in csrc/cuda"
    else:
        import torch

        if not torch.version.cuda:
            why = f"torch {torch.__version__} is built without CUDA"
        elif _cuda_home() is None:
            why = "nvcc not found (set CUDA_HOME)"
        else:
            return True, f"nvcc in {os.environ['CUDA_HOME']}"
    if forced == "1":
        raise SystemExit(f"OGPSA_BUILD_CUDA=1 but CUDA kernels cannot be built: {why}")
    return False, why


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

    cxx = ["-O3", "-fopenmp", "-DNDEBUG"]
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


def ext_modules() -> list:
    """ogpsa._C, with CUDA kernels when they can be built (see the table above)."""
    if os.environ.get("OGPSA_BUILD_EXT", "").strip() == "0":
        _log("OGPSA_BUILD_EXT=0: not building ogpsa._C")
        return []
    try:
        import torch  # noqa: F401
    except ImportError:
        _log("torch is not importable at build time (build with --no-build-isolation): not building ogpsa._C")
        return []
    with_cuda, why = _cuda_plan()
    # pip shows this only with -v (or when the build fails); `ogpsa info` reports the same afterwards
    _log(f"building ogpsa._C with {'CPU and CUDA' if with_cuda else 'CPU'} kernels against torch "
         f"{torch.__version__} ({why}); check the result with `ogpsa info`")
    return [_extension(with_cuda)]


def cmdclass() -> dict:
    """build_ext that falls back: CUDA build fails -> CPU-only; CPU build fails -> no _C."""
    try:
        from torch.utils.cpp_extension import BuildExtension
    except ImportError:
        return {}

    class FallbackBuildExtension(BuildExtension):
        def build_extensions(self):
            try:
                return super().build_extensions()
            except Exception as exc:
                failed = exc
            strict = os.environ.get("OGPSA_BUILD_CUDA", "").strip() == "1"
            if any(s.endswith(".cu") for e in self.extensions for s in e.sources) and not strict:
                _log(f"CUDA kernels failed to build ({type(failed).__name__}: {failed}); building CPU-only ogpsa._C")
                cpu = _extension(False)  # fresh: BuildExtension adds its flags again
                for attr, value in vars(self.extensions[0]).items():
                    if attr.startswith("_") and not hasattr(cpu, attr):  # set by build_ext.finalize_options
                        setattr(cpu, attr, value)
                self.extensions = [cpu]
                try:
                    return super().build_extensions()
                except Exception as exc:
                    failed = exc
            elif strict:
                raise failed
            _log(f"ogpsa._C failed to build ({type(failed).__name__}: {failed}); installing without it "
                 "(the pure-PyTorch backend still works)")
            self.extensions = []

    # ninja compiles the .cpp and .cu in parallel; flags are stable, so ccache (if configured) hits
    return {"build_ext": FallbackBuildExtension.with_options(use_ninja=True)}


setup(
    # every subpackage (a hand-kept list missed ogpsa.distributed, found by tests/test_install.py),
    # kernels/ as ogpsa.kernels (package-dir in pyproject.toml), and the demo's committed base model
    packages=find_packages(include=["ogpsa", "ogpsa.*"]) + ["ogpsa.kernels"],
    package_data={"ogpsa.demo": ["data/base/*"]},
    ext_modules=ext_modules(),
    cmdclass=cmdclass(),
)
