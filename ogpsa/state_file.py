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
import tempfile
import warnings
from typing import Any, Optional, Union

from .config import OGPSAConfig
from .integrations.common import STATE_FILE, SUBSPACE_FILE
from .subspace import Subspace

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
    if "subspace_sha256" in schedule and not (isinstance(schedule["subspace_sha256"], str)
                                              and len(schedule["subspace_sha256"]) == 64):
        raise StateFileError(f"{where}: field 'subspace_sha256' is {schedule['subspace_sha256']!r}, expected the "
                             "64-character SHA-256 of the basis file's tensors")
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


def subspace_checksum(path: Union[str, os.PathLike]) -> Optional[str]:
    """The SHA-256 a subspace file records for its tensors (its ``sha256`` metadata), or None."""
    from safetensors import safe_open

    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            return (f.metadata() or {}).get("sha256")
    except Exception:  # an unreadable file: Subspace.load reports it with the field at fault
        return None


def check_pair(state_path: Union[str, os.PathLike], schedule: dict, subspace_path: Union[str, os.PathLike]) -> None:
    """Raise :class:`StateFileError` when the schedule names a basis other than the one in
    ``subspace_path`` (the two files are replaced one after the other: a save killed between
    them leaves a new basis next to the old schedule)."""
    expected = schedule.get("subspace_sha256")
    if expected is None:  # written before the field existed
        return
    found = subspace_checksum(subspace_path)
    if found is not None and found != expected:
        raise StateFileError(f"{os.fspath(state_path)}: field 'subspace_sha256' does not match "
                             f"{os.fspath(subspace_path)}: the basis was replaced after this schedule was written (a "
                             "save interrupted between the two files?); restore both files from one save")


def subspace_bytes(sub: Subspace) -> bytes:
    """The bytes of ``sub``'s safetensors file (for :meth:`ogpsa.OGPSA.state_dict`)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, SUBSPACE_FILE)
        sub.save(path)
        with open(path, "rb") as f:
            return f.read()


def subspace_from_bytes(data: bytes) -> Subspace:
    """A :class:`Subspace` from :func:`subspace_bytes` output, validated as a file would be."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, SUBSPACE_FILE)
        with open(path, "wb") as f:  # atomic-exempt: a private temporary directory, not an output
            f.write(data)
        return Subspace.load(path)


__all__ = ["STATE_VERSION", "StateFileError", "check_schedule", "check_pair", "read_state", "subspace_checksum",
           "subspace_bytes", "subspace_from_bytes", "warn_not_restored"]
