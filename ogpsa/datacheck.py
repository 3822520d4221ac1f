"""Data and model files checked at the door, before any model loads.

:func:`read_jsonl` reads a JSON-lines file for one stage and checks every row against what the
stage accepts, so a bad row is reported as ``file:line`` with the missing or unknown field
and what the stage expects, instead of a TRL traceback after the model loaded:

* ``sft``: ``prompt`` + ``completion``, or ``text``, or ``messages`` (a chat);
* ``dpo``: ``prompt`` + ``chosen`` + ``rejected``;
* ``reference`` (one reference set, :mod:`ogpsa.collect`): any of ``text``,
  ``prompt`` + ``completion``, ``prompt`` + ``chosen`` + ``rejected``, ``messages``, or
  ``input_ids`` (with optional ``labels`` / ``completion_mask``).

Every row of a file must use the same fields (TRL builds one table from them; a row without
a column gets None, which failed deep inside TRL). Text fields are strings, or chats (lists
of ``{"role", "content"}``) where TRL takes conversational data.

:func:`check_model_dir` checks a local checkpoint for its config and tokenizer files (and a
LoRA adapter for a reachable base model).
"""

from __future__ import annotations

import difflib
import json
import os
from typing import Any, Optional

STAGES = ("sft", "dpo", "reference")

# stage -> accepted formats (required fields), most specific first
_FORMATS: dict[str, list[tuple[str, ...]]] = {
    "sft": [("prompt", "completion"), ("messages",), ("text",)],
    "dpo": [("prompt", "chosen", "rejected")],
    "reference": [("prompt", "chosen", "rejected"), ("chosen", "rejected"), ("prompt", "completion"),
                  ("input_ids",), ("messages",), ("text",)],
}
_OPTIONAL: dict[tuple[str, ...], tuple[str, ...]] = {("input_ids",): ("labels", "completion_mask")}
EXPECTS: dict[str, str] = {
    "sft": "SFT rows hold 'prompt' + 'completion', or 'text' (or 'messages')",
    "dpo": "DPO rows hold 'prompt' + 'chosen' + 'rejected'",
    "reference": ("reference rows hold 'text', or 'prompt' + 'completion', or 'prompt' + 'chosen' + 'rejected', "
                  "or 'messages', or 'input_ids'"),
}
_TEXT_FIELDS = ("text", "prompt", "completion", "chosen", "rejected")


class DataFileError(ValueError):
    """A data file that does not fit its stage; the message starts with ``file:line:``."""


class ModelDirError(ValueError):
    """A model directory without the files a checkpoint needs."""


def _fields(names: tuple[str, ...]) -> str:
    return " + ".join(repr(n) for n in names)


def _known(stage: str) -> set[str]:
    out: set[str] = set()
    for fmt in _FORMATS[stage]:
        out.update(fmt)
        out.update(_OPTIONAL.get(fmt, ()))
    return out


def _did_you_mean(name: str, candidates: set[str]) -> str:
    close = difflib.get_close_matches(name, sorted(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _is_chat(value: Any) -> bool:
    return (isinstance(value, list) and bool(value)
            and all(isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in value))


def row_format(row: dict, stage: str, where: str) -> tuple[str, ...]:
    """The format (required fields) ``row`` uses; :class:`DataFileError` if none fits."""
    keys = set(row)
    matches = [fmt for fmt in _FORMATS[stage] if set(fmt) <= keys]
    if not matches:
        # the closest format: most of its fields present (counting mis-typed ones), then the fewest missing
        unknown = sorted(keys - _known(stage))
        meant = {m for u in unknown for m in difflib.get_close_matches(u, sorted(_known(stage)), n=1, cutoff=0.6)}
        best = max(_FORMATS[stage], key=lambda f: (len(set(f) & keys), len(set(f) & meant), -len(f)))
        missing = [f for f in best if f not in keys]
        hint = "".join(_did_you_mean(u, _known(stage)) for u in unknown[:1])
        extra = f"; unknown field(s) {unknown}{hint}" if unknown else ""
        raise DataFileError(f"{where}: missing field {missing[0]!r}{extra} ({EXPECTS[stage]}; this row has "
                            f"{sorted(keys) or 'no fields'})")
    fmt = matches[0]
    allowed = set(fmt) | set(_OPTIONAL.get(fmt, ()))
    unknown = sorted(keys - allowed)
    if unknown:
        raise DataFileError(f"{where}: unknown field {unknown[0]!r}{_did_you_mean(unknown[0], _known(stage))} "
                            f"(this row is a {_fields(fmt)} row; {EXPECTS[stage]}; remove other fields)")
    for name in fmt + tuple(k for k in _OPTIONAL.get(fmt, ()) if k in row):
        _check_value(row[name], name, stage, where)
    return fmt


def _check_value(value: Any, name: str, stage: str, where: str) -> None:
    if value is None:
        raise DataFileError(f"{where}: field {name!r} is null ({EXPECTS[stage]})")
    if name in _TEXT_FIELDS:
        chat_ok = name != "text"
        if isinstance(value, str) or (chat_ok and _is_chat(value)):
            return
        kind = "a string or a chat (list of {'role', 'content'} objects)" if chat_ok else "a string"
        raise DataFileError(f"{where}: field {name!r} must be {kind}, got {type(value).__name__}")
    if name == "messages":
        if not _is_chat(value):
            raise DataFileError(f"{where}: field 'messages' must be a non-empty list of {{'role', 'content'}} "
                                "objects")
        return
    # input_ids, labels, completion_mask
    if not (isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool)
                                                      for t in value)):
        raise DataFileError(f"{where}: field {name!r} must be a non-empty list of integer token ids")


def check_rows(rows: list[dict], stage: str, source: str, lines: Optional[list[int]] = None) -> None:
    """Check parsed rows (``source`` names the file; ``lines`` their line numbers)."""
    if stage not in _FORMATS:
        raise ValueError(f"stage={stage!r} must be one of {STAGES}")
    first: Optional[tuple[tuple[str, ...], int]] = None
    for i, row in enumerate(rows):
        line = lines[i] if lines is not None else i + 1
        where = f"{source}:{line}"
        if not isinstance(row, dict):
            raise DataFileError(f"{where}: each line must be a JSON object, got {type(row).__name__} "
                                f"({EXPECTS[stage]})")
        fmt = row_format(row, stage, where)
        if first is None:
            first = (fmt, line)
        elif fmt != first[0] or (fmt == ("input_ids",) and set(row) != set(rows[0])):
            raise DataFileError(f"{where}: a {_fields(tuple(sorted(row)))} row, but line {first[1]} is a "
                                f"{_fields(tuple(sorted(rows[0])))} row: every row of a file needs the same fields")


def read_jsonl(path: str, stage: str) -> list[dict]:
    """Rows of a JSON-lines file (blank lines skipped), checked for ``stage``; every problem is
    a :class:`DataFileError` (or ``FileNotFoundError``) naming ``path:line``."""
    if stage not in _FORMATS:
        raise ValueError(f"stage={stage!r} must be one of {STAGES}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file {path!r} does not exist")
    if os.path.isdir(path):
        raise DataFileError(f"data file {path!r} is a directory (give a .jsonl file)")
    rows, lines = [], []
    with open(path, encoding="utf-8") as f:
        try:
            for i, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataFileError(f"{path}:{i}: not valid JSON ({exc.msg} at column {exc.colno})") from exc
                rows.append(row)
                lines.append(i)
        except UnicodeDecodeError as exc:
            raise DataFileError(f"{path}: not UTF-8 text ({exc.reason}); JSON lines files are UTF-8") from exc
    if not rows:
        raise DataFileError(f"data file {path!r} holds no examples ({EXPECTS[stage]})")
    check_rows(rows, stage, path, lines)
    return rows


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json", "spiece.model")


def check_model_dir(path: str, flag: str = "--model") -> str:
    """Check a local checkpoint directory before loading it; returns ``"model"`` or
    ``"adapter"`` (a LoRA adapter whose base model directory exists)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{flag} {path!r} does not exist (give a local checkpoint directory)")
    if not os.path.isdir(path):
        raise ModelDirError(f"{flag} {path!r} is a file, not a checkpoint directory")
    files = set(os.listdir(path))
    if not any(t in files for t in _TOKENIZER_FILES):
        raise ModelDirError(f"{flag} {path!r} holds no tokenizer files (expected one of "
                            f"{', '.join(_TOKENIZER_FILES)}; save it with tokenizer.save_pretrained)")
    if "adapter_config.json" in files:
        try:
            with open(os.path.join(path, "adapter_config.json"), encoding="utf-8") as f:
                base = json.load(f).get("base_model_name_or_path")
        except (OSError, ValueError) as exc:
            raise ModelDirError(f"{os.path.join(path, 'adapter_config.json')}: not readable JSON ({exc})") from exc
        if not base or not os.path.isdir(base):
            raise ModelDirError(f"{flag} {path!r} is a LoRA adapter whose base model {base!r} is not a local "
                                "directory (outputs of this ogpsa store it as an absolute path; for older ones "
                                "run from the directory the base path is relative to, or merge the adapter)")
        check_model_dir(base, f"{flag} {path!r}: base model")
        return "adapter"
    if "config.json" not in files:
        raise ModelDirError(f"{flag} {path!r} holds no config.json (not a Hugging Face model checkpoint; save one "
                            "with model.save_pretrained)")
    return "model"


__all__ = ["DataFileError", "ModelDirError", "EXPECTS", "STAGES", "read_jsonl", "check_rows", "row_format",
           "check_model_dir"]
