"""``ogpsa train``: every flag, path and data file checked before anything heavy loads.

:func:`check_args` runs first in ``ogpsa train`` and raises :class:`UsageError` (usage line +
one message, exit code 2) for: numbers out of range (a negative or zero ``--lr``...), missing
files and directories, a model directory without config or tokenizer files, an ``--output``
that is a file or already holds a run, an unknown ``--optim`` (with "did you mean"), a
resume directory that is not a checkpoint, and flag combinations that cannot work. The data
files are then read and checked per stage (:mod:`ogpsa.datacheck`), still before the model.

It also carries the SFT stage into DPO: an ``ogpsa train`` output records (absolute paths) its
basis, mode and space in ``ogpsa_train_summary.json``; ``--stage dpo --model <that output>``
reuses them unless ``--subspace`` / ``--fresh-subspace``, ``--mode`` or ``--space`` say otherwise.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import sys
from typing import Any, Optional

from .datacheck import check_model_dir

SUMMARY_FILE = "ogpsa_train_summary.json"


class UsageError(Exception):
    """A mistake in the command line or its files: reported as usage + one line, exit code 2."""


def _did_you_mean(value: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(value, choices, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _check_numbers(args: argparse.Namespace) -> None:
    def need(ok: bool, flag: str, rule: str) -> None:
        if not ok:
            raise UsageError(f"--{flag} must be {rule}, got {getattr(args, flag.replace('-', '_'))}")

    for flag in ("batch-size", "grad-accum", "max-length", "logging-steps", "num-reference-samples", "lora-alpha"):
        need(getattr(args, flag.replace("-", "_")) >= 1, flag, ">= 1")
    if args.lr is not None:
        need(math.isfinite(args.lr) and args.lr > 0, "lr", "a positive number")
    need(math.isfinite(args.max_grad_norm) and args.max_grad_norm >= 0, "max-grad-norm", ">= 0 (0: no clipping)")
    need(math.isfinite(args.epochs) and args.epochs > 0, "epochs", "a positive number")
    need(args.max_steps == -1 or args.max_steps >= 1, "max-steps", ">= 1 (or -1: run --epochs)")
    need(math.isfinite(args.beta) and args.beta > 0, "beta", "a positive number")
    need(args.save_steps >= 0, "save-steps", ">= 0")
    need(args.lora_r >= 0, "lora-r", ">= 0 (0: full fine-tuning)")
    if args.rank is not None:
        need(args.rank >= 1, "rank", ">= 1")
    if args.refresh_every is not None:
        need(args.refresh_every >= 0, "refresh-every", ">= 0")
    if args.reference_batch_size is not None:
        need(args.reference_batch_size >= 1, "reference-batch-size", ">= 1")


def _check_optim(args: argparse.Namespace) -> None:
    try:
        from transformers.training_args import OptimizerNames
    except ImportError:  # pragma: no cover - trl (and so transformers) is required by `ogpsa train`
        return
    names = [o.value for o in OptimizerNames]
    if args.optim not in names:
        raise UsageError(f"--optim {args.optim!r} is not a transformers optimizer{_did_you_mean(args.optim, names)} "
                         "(e.g. adamw_torch, sgd)")


def inherit_from_previous_stage(args: argparse.Namespace) -> list[str]:
    """``--stage dpo`` on an ``ogpsa train`` SFT output: take its basis, mode and space where the
    command line leaves them unset. Returns the inherited settings, as flags."""
    if args.stage != "dpo" or args.model == "tiny" or not os.path.isdir(args.model):
        return []
    path = os.path.join(args.model, SUMMARY_FILE)
    if not os.path.isfile(path):
        return []
    try:
        with open(path, encoding="utf-8") as f:
            previous = json.load(f).get("ogpsa") or {}
    except (OSError, ValueError, AttributeError) as exc:
        raise UsageError(f"{path}: not a valid ogpsa train summary ({exc}); delete it or pass --subspace, --mode "
                         "and --space explicitly") from exc
    inherited = []
    if args.mode is None and isinstance(previous.get("mode"), str):
        args.mode = previous["mode"]
        inherited.append(f"--mode {args.mode}")
    if args.space is None and isinstance(previous.get("space"), str):
        args.space = previous["space"]
        args.space_inherited = True
        inherited.append(f"--space {args.space}")
    sub = previous.get("subspace")
    # A new LoRA adapter (--lora-r) trains other tensors than the SFT basis covers: build a new one.
    if (args.subspace is None and not args.fresh_subspace and not args.no_ogpsa and not args.lora_r
            and isinstance(sub, str) and os.path.isfile(sub)):
        args.subspace = sub
        inherited.append(f"--subspace {sub}")
    return inherited


def resume_checkpoint(args: argparse.Namespace) -> Optional[str]:
    """``--resume-from-checkpoint``: the absolute checkpoint directory (checked now), or None."""
    value = args.resume_from_checkpoint
    if value is None:
        return None
    if value == "last":
        from transformers.trainer_utils import get_last_checkpoint

        last = get_last_checkpoint(args.output) if os.path.isdir(args.output) else None
        if last is None:
            raise UsageError(f"--resume-from-checkpoint last: no checkpoint-N directory in --output {args.output!r}")
        return os.path.abspath(last)
    if not os.path.isdir(value):
        raise UsageError(f"--resume-from-checkpoint {value!r} is not a directory (give a checkpoint-N directory "
                         "or 'last')")
    if not os.path.isfile(os.path.join(value, "trainer_state.json")):
        raise UsageError(f"--resume-from-checkpoint {value!r} holds no trainer_state.json (not a Trainer checkpoint; "
                         "checkpoints are written with --save-steps N)")
    return os.path.abspath(value)


def _check_paths(args: argparse.Namespace) -> None:
    for flag, path in [("--data", args.data)] + [("--reference", p) for p in args.reference]:
        if not os.path.exists(path):
            raise UsageError(f"{flag} {path!r} does not exist")
        if not os.path.isfile(path):
            raise UsageError(f"{flag} {path!r} is not a file (give a .jsonl file)")
    if args.model != "tiny":
        if not os.path.exists(args.model):
            raise UsageError(f"--model {args.model!r} is neither 'tiny' nor an existing local checkpoint directory")
        check_model_dir(args.model, "--model")
    if args.ref_model:
        check_model_dir(args.ref_model, "--ref-model")
    if args.subspace and not os.path.exists(args.subspace):
        raise UsageError(f"--subspace {args.subspace!r} does not exist")
    out = args.output
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--output {out!r} is an existing file (give a directory)")
    if (os.path.isdir(out) and os.listdir(out) and not args.overwrite and args.resume_from_checkpoint is None):
        raise UsageError(f"--output {out!r} is not empty (it holds {sorted(os.listdir(out))[:3]}...); pass "
                         "--overwrite to write into it, --resume-from-checkpoint to continue a run, or another "
                         "--output")


def check_args(args: argparse.Namespace) -> None:
    """Every check that needs no model (see the module docs); fills inherited settings in
    ``args`` and resolves ``args.resume_from_checkpoint`` to an absolute directory."""
    _check_numbers(args)
    if args.subspace and args.fresh_subspace:
        raise UsageError("--subspace and --fresh-subspace exclude each other")
    if args.ref_model and args.stage != "dpo":
        raise UsageError("--ref-model is for --stage dpo")
    args.space_inherited = False
    inherited = inherit_from_previous_stage(args)
    if args.mode is None:
        args.mode = "orthogonal"
    if not args.reference and not (args.subspace and args.refresh_every == 0) and not args.no_ogpsa:
        raise UsageError("give at least one --reference FILE.jsonl "
                         "(or --subspace with --refresh-every 0, or --no-ogpsa)")
    _check_paths(args)
    _check_optim(args)
    if args.space == "update" and not args.no_ogpsa and args.optim != "adamw_torch":
        origin = f" (taken from the SFT output {args.model!r}; pass --space gradient)" if args.space_inherited else ""
        raise UsageError(f"--space update projects the AdamW direction and needs --optim adamw_torch "
                         f"(got --optim {args.optim}){origin}; use --space gradient with other optimizers")
    args.resume_from_checkpoint = resume_checkpoint(args)
    if inherited:
        print(f"ogpsa train: from the SFT output {args.model}: {' '.join(inherited)} (override with these flags"
              f"{', or --fresh-subspace' if any(i.startswith('--subspace') for i in inherited) else ''})",
              file=sys.stderr)


def stage_record(args: argparse.Namespace, og: Any) -> dict:
    """What a later stage reuses, with absolute paths (the ``ogpsa`` entry of the summary)."""
    from .integrations.common import SUBSPACE_FILE

    return {"mode": og.config.mode, "space": og.config.space, "scope": og.config.scope,
            "subspace": os.path.abspath(os.path.join(args.output, SUBSPACE_FILE))}


__all__ = ["UsageError", "SUMMARY_FILE", "check_args", "inherit_from_previous_stage", "resume_checkpoint",
           "stage_record"]
