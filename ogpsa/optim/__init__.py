"""Update-space OGPSA: :class:`ProjectedAdamW` projects AdamW's final update, not the gradient.

See :mod:`ogpsa.optim.adamw` and README "Update-space projection (projected AdamW)".
"""

from .adamw import ProjectedAdamW
from .attach import UpdateSpaceProjector, attach_update_space

__all__ = ["ProjectedAdamW", "UpdateSpaceProjector", "attach_update_space"]
