"""Optimizer rules for update space, one module each (``RULE = SomeRule()``), found by
:func:`ogpsa.optim.rule.rules`: adding a rule is adding a file here."""
