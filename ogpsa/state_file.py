"""``ogpsa_state.json``: the schedule file next to a saved basis, read with errors that name
the file and the field; and the loud warning when a resumed run finds no such state.

:meth:`ogpsa.OGPSA.save_pretrained` writes it (atomically, :mod:`ogpsa.atomic`); the
trainer checkpoints hold it, and :meth:`ogpsa.OGPSA.from_pretrained` and the trainers'
resume read it back through :func:`read_state`.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from typing import Any, Union

from .config import OGPSAConfig
from .integrations.common import STATE_FILE, SUBSPACE_FILE

logger = logging.getLogger("ogpsa")

STATE_VERSION = 1
"""Format version written into ``ogpsa_state.json``."""


class StateFileError(ValueError):
    """A malformed ``ogpsa_state.json`` (or ``state_dict()['schedule']``); the message names the
    file and the field."""


def warn_not_restored(step: int, why: str) -> None:
    message = (f"ogpsa: training resumes at step {step} but {why}: the capability subspace and its refresh "
               f"schedule are NOT restored; a new subspace is built at step {step}, so this run will not match "
               "an uninterrupted one. Pass the checkpoint directory (resume_from_checkpoint=...) that holds "
               f"{SUBSPACE_FILE} and {STATE_FILE}.")
    logger.warning(message)
    warnings.warn(message, UserWarning, stacklevel=3)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_schedule(schedule: Any, where: str) -> None:
    """Raise :class:`StateFileError` naming ``where`` and the field unless ``schedule`` is a
    valid OGPSA schedule (what :meth:`OGPSA.save_pretrained` writes to ``ogpsa_state.json``)."""
    if not isinstance(schedule, dict):
        raise StateFileError(f"{where}: must hold a JSON object, got {type(schedule).__name__}")
    checks = {
        "version": (lambda v: v == STATE_VERSION, f"the state format version, {STATE_VERSION}"),
        "step": (_is_count, "an integer >= 0 (optimizer steps taken)"),
        "built_at": (lambda v: v is None or _is_count(v), "null or an integer >= 0 (step the basis was built at)"),
        "refresh_every": (_is_count, "an integer >= 0"),
        "refresh_steps": (lambda v: isinstance(v, list) and all(_is_count(x) for x in v),
                          "a list of integers >= 0"),
        "config": (lambda v: isinstance(v, dict), "a JSON object (OGPSAConfig.to_dict())"),
    }
    for field, (ok, expected) in checks.items():
        if field not in schedule:
            raise StateFileError(f"{where}: field {field!r} is missing (expected {expected})")
        if not ok(schedule[field]):
            raise StateFileError(f"{where}: field {field!r} is {schedule[field]!r}, expected {expected}")
    try:
        OGPSAConfig.from_dict(schedule["config"])
    except (TypeError, ValueError) as exc:
        raise StateFileError(f"{where}: field 'config' is invalid: {exc}") from exc


def read_state(path: Union[str, os.PathLike]) -> dict:
    """Read and check an ``ogpsa_state.json``; errors name the file and the field."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as exc:
        raise StateFileError(f"{path}: not UTF-8 text ({exc.reason}); the file is damaged") from exc
    if not text.strip():
        raise StateFileError(f"{path}: the file is empty (an interrupted save by an older ogpsa?); "
                             "delete the checkpoint or restore the file")
    try:
        schedule = json.loads(text)
    except ValueError as exc:
        raise StateFileError(f"{path}: not valid JSON ({exc})") from exc
    check_schedule(schedule, path)
    return schedule


__all__ = ["STATE_VERSION", "StateFileError", "check_schedule", "read_state", "warn_not_restored"]
