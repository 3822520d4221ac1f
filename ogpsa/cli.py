"""The ``ogpsa`` command: ``info`` and the subcommands registered in SUBCOMMANDS."""

from __future__ import annotations

import argparse
import difflib
import importlib
import platform
import re
import sys
from typing import Optional, Sequence

# name -> (module, help). Each module defines add_arguments(parser) and run(args) -> int.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "info": ("ogpsa.cli", "versions, backends, CUDA/Triton presence"),
    "bench": ("ogpsa.bench", "benchmarks: projection + clipping per backend vs the PyTorch reference, the authors' hooks and a copy "
              "(--suite cpu|gpu), the training-loop overhead (--suite loop), projected AdamW (--suite adamw)"),
    "demo": ("ogpsa.demo", "offline forgetting experiment: the paper's arms (plain, OGPSA gradient/update space, replay, merge, "
             "LoRA) on a competent tiny base; matched-safety table + Pareto plot"),
    "train": ("ogpsa.train_cli", "OGPSA safety fine-tuning with TRL (SFT or DPO), offline, on a local or tiny model"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument("--selftest", action="store_true",
                        help="check every available backend on a small random problem, for every device and "
                             "grad/basis dtype: gradient space (projection ops) against the torch backend, update "
                             "space (the fused projected AdamW op) against the reference step; print a table "
                             "(exit 1 on a mismatch)")
    mem = parser.add_argument_group("basis memory dry run (no weights are loaded)")
    mem.add_argument("--model", default=None, metavar="PATH_OR_CONFIG",
                     help="a transformers model directory (its config.json) or a config.json: report the basis bytes "
                          "per parameter per rank, the model built on the meta device")
    mem.add_argument("--world-size", type=int, default=1, help="ranks the bases are laid out over (default 1)")
    mem.add_argument("--rank", type=int, default=None, help="report this rank (default: the one holding the most)")
    mem.add_argument("--sharding", choices=("fsdp2", "zero", "replicated"), default=None,
                     help="fsdp2: sharded with the parameters on dim 0 (default when --world-size > 1); zero: ZeRO-1/2 "
                          "flat partitions; replicated: DDP / single process")
    mem.add_argument("--basis-dtype", choices=("float32", "bfloat16"), default="float32", help="basis storage")
    mem.add_argument("--k", type=int, default=None, help="basis rows per tensor (default 16, the largest supported)")
    mem.add_argument("--lora-r", type=int, default=None, help="LoRA adapters of this rank are the trainable tensors")
    mem.add_argument("--lora-targets", nargs="*", default=None, metavar="MODULE",
                     help="with --lora-r: target modules (default: PEFT's default for the model type; all-linear)")
    mem.add_argument("--peft-config", default=None, metavar="PATH",
                     help="a PEFT LoRA adapter_config.json (or its directory) instead of --lora-r")


def info() -> dict:
    """Everything `ogpsa info` reports, as a dict."""
    import torch

    import ogpsa
    from ogpsa import ops

    out = {
        "ogpsa": ogpsa.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import triton

        out["triton"] = triton.__version__
    except Exception as exc:
        out["triton"] = f"not importable ({type(exc).__name__})"
    out["backends"] = {name: {"available": ok, "detail": why} for name, (ok, why) in ops.backends().items()}
    out["selected_backend"] = ops.requested_backend()
    from ogpsa import buildcheck

    # the same text `import ogpsa` warns with; "ok" when _C is usable or deliberately absent
    out["build_check"] = buildcheck.check(warn=False) or "ok"
    for name, extra in EXTRA_INFO.items():
        try:
            out[name] = importlib.import_module(extra).info()
        except Exception as exc:
            out[name] = f"unavailable ({type(exc).__name__}: {exc})"
    return out


# name -> module with an info() -> dict; extensions add themselves here.
EXTRA_INFO: dict[str, str] = {"extension": "ogpsa.backends.cext", "adamw_backends": "ogpsa.optim.backends"}


def run_selftest(as_json: bool) -> int:
    """``ogpsa info --selftest``: the first-contact checks of :mod:`ogpsa.selftest` over every
    available backend (the interpreted Triton included), device and dtype."""
    from ogpsa import ops, selftest

    available = {name: ops.get_backend(name) for name, (ok, _) in ops.backends().items() if ok}
    rows = selftest.run_all(available)
    if as_json:
        import json

        print(json.dumps([{"backend": r.backend, "device": r.device, "grad_dtype": str(r.grad_dtype),
                           "basis_dtype": str(r.basis_dtype), "space": r.space, "ok": r.ok, "err_over_tol": r.worst,
                           "detail": r.detail, "seconds": r.seconds} for r in rows], indent=2))
    else:
        print(selftest.format_table(rows))
    return 0 if all(r.ok for r in rows) else 1


def run_memory(args: argparse.Namespace) -> int:
    """``ogpsa info --model``: the basis memory dry run of :mod:`ogpsa.memory`."""
    from ogpsa import memory

    try:
        report = memory.dry_run(args.model, k=args.k if args.k is not None else memory.DEFAULT_K,
                                basis_dtype=args.basis_dtype, world_size=args.world_size, rank=args.rank,
                                sharding=args.sharding, lora_r=args.lora_r, lora_targets=args.lora_targets,
                                peft_config=args.peft_config)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        print(f"ogpsa info --model: {exc}", file=sys.stderr)
        return 2
    if args.json:
        import json

        print(json.dumps(report.as_dict(), indent=2))
    else:
        print(report.text())
    return 0


def run(args: argparse.Namespace) -> int:
    if getattr(args, "selftest", False):
        return run_selftest(args.json)
    if getattr(args, "model", None) is not None:
        return run_memory(args)
    memory_only = ("rank", "sharding", "k", "lora_r", "lora_targets", "peft_config")
    given = [f"--{a.replace('_', '-')}" for a in memory_only if getattr(args, a, None) is not None]
    given += ["--world-size"] if getattr(args, "world_size", 1) != 1 else []
    if given:
        print(f"ogpsa info: {', '.join(given)} need --model PATH_OR_CONFIG", file=sys.stderr)
        return 2
    data = info()
    if args.json:
        import json

        print(json.dumps(data, indent=2, default=str))
        return 0
    for key, value in data.items():
        if key == "backends":
            print("backends:")
            for name, d in value.items():
                print(f"  {name:<7} {'yes' if d['available'] else 'no ':<4} {d['detail']}")
        else:
            print(f"{key}: {value}")
    return 0


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser (usage + one message, exit code 2) with "did you mean" for a mis-typed
    choice (``--stage sfft``) or option (``--learning-rate``); subcommand parsers inherit it."""

    def _all_options(self) -> list[str]:
        out = []
        for action in self._actions:
            out += [o for o in action.option_strings if o.startswith("--")]
            if isinstance(action, argparse._SubParsersAction):  # the subcommands' options too
                for sub in action.choices.values():
                    out += sub._all_options() if isinstance(sub, ArgumentParser) else []
        return out

    def error(self, message: str):  # type: ignore[override]
        m = re.search(r"invalid choice: '?([^'()]*?)'? \(choose from (.*)\)", message)
        if m:
            choices = [c.strip().strip("'\"") for c in m.group(2).split(",")]
            close = difflib.get_close_matches(m.group(1), choices, n=1, cutoff=0.5)
            if close:
                message += f"; did you mean {close[0]!r}?"
        m = re.search(r"unrecognized arguments: (.*)", message)
        if m:
            options = self._all_options()
            for word in m.group(1).split():
                close = difflib.get_close_matches(word.split("=")[0], options, n=1, cutoff=0.6) \
                    if word.startswith("--") else []
                if close:
                    message += f"; did you mean {close[0]}?"
                    break
        super().error(message)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = ArgumentParser(prog="ogpsa", description="Orthogonal Gradient Projection for Safety Alignment")
    sub = parser.add_subparsers(dest="command", required=True)
    parsers: dict[str, argparse.ArgumentParser] = {}
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        parsers[name] = p
        try:
            mod = sys.modules[__name__] if module == __name__ else importlib.import_module(module)
        except ImportError as exc:
            # one subcommand missing an optional dependency (e.g. trl) must not break the others
            p.set_defaults(_run=_unavailable(name, exc))
            continue
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    args, extra = parser.parse_known_args(argv)
    if extra:  # reported by the subcommand's parser: its usage line, its options in "did you mean"
        parsers[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    return int(args._run(args) or 0)


def _unavailable(name: str, exc: Exception):
    def run(args: argparse.Namespace) -> int:
        print(f"ogpsa {name} is unavailable: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2

    return run


if __name__ == "__main__":
    sys.exit(main())
