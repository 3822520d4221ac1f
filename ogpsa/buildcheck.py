"""Is the compiled extension ``ogpsa._C`` usable with the torch that is running?

Two ways an install goes quietly wrong, both seen with plain ``pip install .``: pip's build
isolation compiles ``_C`` against whatever torch it downloads into the isolated build
environment, so ``_C`` either fails to load next to the user's torch (e.g. ``libc10_cuda.so``
missing under a CPU-only torch) or loads but was compiled against another torch version. Both
would silently drop every projection onto the slow pure-PyTorch backend, so ``import ogpsa``
warns once, loudly and with the fix, and ``ogpsa info`` shows the same text.

A pure-Python install (no ``_C`` file at all, e.g. ``OGPSA_BUILD_EXT=0``) is a choice, not a
mistake: no warning.
"""

from __future__ import annotations

import glob
import os
import warnings
from typing import Optional

FIX = ("Fix: with your torch installed, run `pip install --no-build-isolation .` in the ogpsa "
       "source tree (add `-e` for an editable install; `make build` does this), then check with "
       "`ogpsa info`.")


class OGPSABuildWarning(RuntimeWarning):
    """``ogpsa._C`` exists but cannot be used as built (fallback: the pure-PyTorch backend)."""


_warned = False


def _built_files() -> list[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    return sorted(glob.glob(os.path.join(here, "_C.*.so")) + glob.glob(os.path.join(here, "_C.*.pyd")))


def problem() -> Optional[str]:
    """One paragraph describing what is wrong with the build, or None when it is usable or absent."""
    import torch

    from .backends import cext

    if cext._C is None:
        files = _built_files()
        if not files:
            return None  # never built: a pure-Python install, reported by `ogpsa info` only
        return (f"ogpsa._C was built ({os.path.basename(files[0])}) but does not load: {cext._IMPORT_ERROR}. "
                f"Projection falls back to the slow pure-PyTorch backend. This usually means it was "
                f"compiled against another torch (pip's isolated build) than the installed "
                f"torch {torch.__version__}. {FIX}")
    built = cext.build_info().get("torch_version", "")
    if built and built != torch.__version__:
        return (f"ogpsa._C was built against torch {built} but torch {torch.__version__} is running; "
                f"its kernels may crash or misbehave. {FIX}")
    return None


def check(warn: bool = True) -> Optional[str]:
    """Warn (once per process) when the build is unusable; return the problem text."""
    global _warned
    text = problem()
    if text and warn and not _warned:
        _warned = True
        warnings.warn(text, OGPSABuildWarning, stacklevel=3)
    return text
