"""``ogpsa demo``: an offline forgetting experiment — safety-tuning with and without OGPSA.

A small Llama learns a procedurally generated general-capability mix (arithmetic, copying,
reversal, key-value recall, benign requests), is then safety-tuned to refuse a family of
harmful-style requests in three arms (plain, OGPSA ``orthogonal``, OGPSA ``conflict``), and
each arm is scored before and after: refusal rate and safety loss on held-out harmful
requests, exact match per general task, general loss, forgetting. Mean ± std over seeds is
printed as a table and saved as JSON and PNG. See :mod:`ogpsa.demo.experiment` for the
protocol; results are reported as measured, whichever arm wins.

Python use::

    from ogpsa.demo import DemoConfig, run_experiment, report
    results = run_experiment(DemoConfig(seeds=1, pretrain_steps=100, sft_steps=10))
    print(report.table(report.summarize(results)))
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

from . import report, tasks
from .experiment import ARMS, DemoConfig, run_experiment

__all__ = ["DemoConfig", "run_experiment", "report", "tasks", "ARMS", "add_arguments", "run", "main"]

_D = DemoConfig()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, metavar="PATH",
                        help="local Hugging Face causal-LM checkpoint (directory) to run the same protocol on; "
                             "default: a tiny Llama (~1M parameters) trained from scratch")
    parser.add_argument("--device", default=_D.device, help="torch device, e.g. cpu or cuda (default: %(default)s)")
    parser.add_argument("--seeds", type=int, default=_D.seeds, help="number of seeds (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=_D.sft_steps,
                        help="safety SFT optimizer steps per arm (default: %(default)s)")
    parser.add_argument("--dpo-steps", type=int, default=_D.dpo_steps,
                        help="DPO steps after SFT (refusal chosen, compliance rejected; 0: SFT only; "
                             "default: %(default)s)")
    parser.add_argument("--pretrain-steps", type=int, default=_D.pretrain_steps,
                        help="base-model training steps on the general mix (0: use the model as is; "
                             "default: %(default)s)")
    parser.add_argument("--lr", type=float, default=_D.sft_lr, help="safety SFT learning rate (default: %(default)s)")
    parser.add_argument("--refresh-every", type=int, default=_D.sft_refresh_every,
                        help="rebuild the subspace every N SFT steps (0: never; default: %(default)s)")
    parser.add_argument("--reference-size", type=int, default=_D.reference_size,
                        help="examples per reference set (default: %(default)s)")
    parser.add_argument("--reference-sets", type=int, default=_D.reference_sets,
                        help="reference sets for SFT, one gradient (direction) each (default: %(default)s)")
    parser.add_argument("--reference-split", choices=("mixed", "task"), default=_D.reference_split,
                        help="reference sets: 'mixed' samples of the general mix (as the original work) or one "
                             "set per general task (default: %(default)s)")
    parser.add_argument("--pretrain-per-seed", action="store_true",
                        help="train a separate base model for every seed (default: one base model shared by "
                             "all seeds; seeds then vary reference sets and safety batches)")
    parser.add_argument("--eval-size", type=int, default=_D.eval_per_task,
                        help="held-out evaluation prompts per general task and of the harmful family "
                             "(default: %(default)s)")
    parser.add_argument("--arms", default=",".join(_D.arms),
                        help=f"comma-separated arms among {','.join(ARMS)} (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--output", default="demo_out", help="output directory (default: %(default)s)")
    parser.add_argument("--publish", default=None, metavar="DIR",
                        help="also copy table.md, results.json and forgetting.png into DIR "
                             "(the README's docs/demo uses this)")
    parser.add_argument("--quiet", action="store_true", help="print only the final table")


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    arms = tuple(a.strip() for a in args.arms.split(",") if a.strip())
    return DemoConfig(seeds=args.seeds, arms=arms, model=args.model, device=args.device, sft_steps=args.steps,
                      dpo_steps=args.dpo_steps, pretrain_steps=args.pretrain_steps, sft_lr=args.lr,
                      sft_refresh_every=args.refresh_every, reference_size=args.reference_size,
                      reference_sets=args.reference_sets, reference_split=args.reference_split,
                      pretrain_once=not args.pretrain_per_seed, eval_per_task=args.eval_size,
                      eval_harmful=args.eval_size)


def command_line(args: argparse.Namespace) -> str:
    """The ``ogpsa demo`` command that reproduces ``args`` (options differing from the defaults)."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    defaults = vars(parser.parse_args([]))
    parts = ["ogpsa", "demo"]
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", "quiet", "output", "publish"):
            continue
        value = getattr(args, action.dest, defaults[action.dest])
        if value != defaults[action.dest]:
            parts += [action.option_strings[0]] + ([] if isinstance(value, bool) else [shlex.quote(str(value))])
    return " ".join(parts)


def run(args: argparse.Namespace) -> int:
    import shutil

    import torch

    try:
        cfg = config_from_args(args)
    except ValueError as exc:
        print(f"ogpsa demo: {exc}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    command = command_line(args)
    log = (lambda _msg: None) if args.quiet else (lambda msg: print(msg, flush=True))
    t0 = time.perf_counter()
    results = run_experiment(cfg, log=log)
    paths = report.write(results, args.output, command=command.strip())
    print(report.table(report.summarize(results)))
    print(f"\n{cfg.seeds} seed(s), {time.perf_counter() - t0:.0f} s on {cfg.device} "
          f"({torch.get_num_threads()} threads); wrote {', '.join(paths.values())}")
    if args.publish:
        os.makedirs(args.publish, exist_ok=True)
        for p in paths.values():
            shutil.copy(p, os.path.join(args.publish, os.path.basename(p)))
        print(f"published to {args.publish}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ogpsa demo", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
