"""Update-space OGPSA: :class:`ProjectedAdamW` projects AdamW's final update, not the gradient.

See :mod:`ogpsa.optim.adamw` and docs/update-space.md.
"""

from .adamw import ProjectedAdamW
from .attach import RuleUpdateProjector, UpdateSpaceProjector, attach_update_space
from .rule import UpdateRule, registered_rules, rule_for

__all__ = ["ProjectedAdamW", "UpdateSpaceProjector", "RuleUpdateProjector", "attach_update_space", "UpdateRule",
           "rule_for", "registered_rules"]
