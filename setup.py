"""Build script for ogpsa.

The Python package is declared in pyproject.toml. This file exists so the compiled
extension ogpsa._C can be added as ext_modules (torch.utils.cpp_extension) without
changing how the package installs; see `ext_modules()` below.
"""

from setuptools import setup


def ext_modules() -> list:
    """Compiled extensions to build (none yet: the pure-Python package works on its own)."""
    return []


def cmdclass() -> dict:
    return {}


setup(
    packages=["ogpsa", "ogpsa.backends", "ogpsa.integrations", "ogpsa.kernels"],
    ext_modules=ext_modules(),
    cmdclass=cmdclass(),
)
