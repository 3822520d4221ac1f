"""ogpsa: Orthogonal Gradient Projection for Safety Alignment as a PyTorch package.

Quick start::

    import ogpsa
    subspace = ogpsa.Subspace.from_gradients([ref_grads_1, ref_grads_2])  # {name: tensor} dicts
    proj = ogpsa.attach(model, optimizer, subspace)  # projects before every optimizer.step()
"""

from . import buildcheck as _buildcheck
from .attaching import attach
from .buildcheck import OGPSABuildWarning
from .collect import build_subspace, collect_reference_gradients
from .config import OGPSAConfig
from .interface import ProjectorLike
from .ops import (
    BackendUnavailableError,
    ProjectionInputError,
    ProjectionStats,
    UnsupportedSetupError,
    backends,
    project_,
)
from .projector import GradientHooks, Projector, register_gradient_hooks
from .session import OGPSA
from .subspace import Subspace, SubspaceMismatchError

__version__ = "0.1.0"

# ogpsa._C built but unloadable, or built against another torch: warn once, with the fix
_buildcheck.check()

__all__ = [
    "OGPSA",
    "OGPSAConfig",
    "Subspace",
    "SubspaceMismatchError",
    "Projector",
    "ProjectorLike",
    "attach",
    "register_gradient_hooks",
    "GradientHooks",
    "collect_reference_gradients",
    "build_subspace",
    "project_",
    "ProjectionStats",
    "ProjectionInputError",
    "BackendUnavailableError",
    "UnsupportedSetupError",
    "OGPSABuildWarning",
    "backends",
    "__version__",
]
