"""``ogpsa demo``: does OGPSA reduce capability forgetting at matched safety?

A competent tiny Llama (committed, fixed recipe: :mod:`ogpsa.demo.base`) knows five general
tasks in their own formats and answers every request, harmful ones included. It is
safety-tuned (SFT, DPO, or SFT then DPO) in the paper's arms — plain, OGPSA (gradient space:
orthogonal, conflict; update space, ProjectedAdamW, when installed), general-data replay, model merging, LoRA,
OGPSA + replay — and evaluated along training. :mod:`ogpsa.demo.report` reads forgetting off
each trajectory at a matched refusal rate; :mod:`ogpsa.demo.plot` draws general score against
safety score. Results are reported as measured, whichever arm wins.

Python use::

    from ogpsa.demo import DemoConfig, run_experiment, report
    results = run_experiment(DemoConfig(seeds=1, sft_steps=10, arms=("plain", "orthogonal")))
    print(report.table(report.summarize(results), results["before"]))
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import time

from . import report, tasks
from .arms import ALL_ARMS, STAGES, available_arms
from .experiment import DEFAULT_ARMS, DemoConfig, run_experiment

__all__ = ["DemoConfig", "run_experiment", "report", "tasks", "ALL_ARMS", "available_arms", "add_arguments",
           "run", "main", "FULL_STUDY"]

_D = DemoConfig()

FULL_STUDY = ["--stages", "sft,dpo,sft+dpo", "--arms", ",".join(ALL_ARMS)]
"""``--full``: every stage and arm, including the refresh-cost (every 5, fewer reference samples) and
per-task reference arms."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--full", action="store_true",
                        help=f"the full study: {' '.join(FULL_STUDY)} (explicit options still win)")
    parser.add_argument("--model", default=None, metavar="PATH",
                        help="local Hugging Face causal-LM checkpoint to run the protocol on (it first learns the "
                             "task formats for --model-steps steps); default: the committed tiny base model")
    parser.add_argument("--model-steps", type=int, default=_D.model_pretrain_steps,
                        help="--model only: general-mix steps to learn the task formats (default: %(default)s)")
    parser.add_argument("--device", default=_D.device, help="torch device (default: %(default)s)")
    parser.add_argument("--seeds", type=int, default=_D.seeds, help="number of seeds (default: %(default)s)")
    parser.add_argument("--stages", default=None, help=f"comma-separated among {','.join(STAGES)} (default: sft)")
    parser.add_argument("--arms", default=None,
                        help=f"comma-separated among {','.join(ALL_ARMS)} (default: {','.join(DEFAULT_ARMS)}; "
                             "the update arms run only when ogpsa.optim.ProjectedAdamW exists)")
    parser.add_argument("--sft-steps", "--steps", type=int, default=None,
                        help=f"SFT steps (default: {_D.sft_steps})")
    parser.add_argument("--dpo-steps", type=int, default=None, help=f"DPO steps (default: {_D.dpo_steps})")
    parser.add_argument("--lr", type=float, default=_D.sft_lr, help="SFT learning rate (default: %(default)s)")
    parser.add_argument("--dpo-lr", type=float, default=_D.dpo_lr, help="DPO learning rate (default: %(default)s)")
    parser.add_argument("--dpo-beta", type=float, default=_D.dpo_beta, help="DPO beta (default: %(default)s)")
    parser.add_argument("--dpo-nll", type=float, default=_D.dpo_nll,
                        help="weight of the chosen answers' NLL added to the DPO loss (TRL's rpo_alpha; 0: pure "
                             "DPO) (default: %(default)s)")
    parser.add_argument("--eval-every", type=int, default=_D.eval_every,
                        help="evaluate every N steps (default: %(default)s)")
    parser.add_argument("--refresh-every", type=int, default=_D.sft_refresh_every,
                        help="SFT subspace refresh interval (DPO: 5; the -r5 arms: 5) (default: %(default)s)")
    parser.add_argument("--reference-size", type=int, default=_D.reference_size,
                        help="examples per reference set (default: %(default)s)")
    parser.add_argument("--match-refusal", type=float, default=_D.match_refusal,
                        help="refusal rate at which arms are compared (default: %(default)s)")
    parser.add_argument("--eval-size", type=int, default=_D.eval_per_task,
                        help="held-out prompts per general task and of harmful requests (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--output", default="demo_out", help="output directory, untracked (default: %(default)s)")
    parser.add_argument("--publish", default=None, metavar="DIR",
                        help="also copy table.md, results.json and pareto.png into DIR (make demo-publish)")
    parser.add_argument("--quiet", action="store_true", help="print only the final table")


def _split(text: str) -> tuple[str, ...]:
    return tuple(a.strip() for a in text.split(",") if a.strip())


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    full = dict(zip(FULL_STUDY[::2], FULL_STUDY[1::2])) if args.full else {}
    stages = args.stages or full.get("--stages") or ",".join(_D.stages)
    arms = args.arms or full.get("--arms") or ",".join(DEFAULT_ARMS)
    sft = args.sft_steps if args.sft_steps is not None else int(full.get("--sft-steps", _D.sft_steps))
    dpo = args.dpo_steps if args.dpo_steps is not None else int(full.get("--dpo-steps", _D.dpo_steps))
    return DemoConfig(seeds=args.seeds, arms=_split(arms), stages=_split(stages), model=args.model,
                      model_pretrain_steps=args.model_steps, device=args.device,
                      sft_steps=sft, dpo_steps=dpo, sft_lr=args.lr, dpo_lr=args.dpo_lr,
                      dpo_beta=args.dpo_beta, dpo_nll=args.dpo_nll, eval_every=args.eval_every,
                      sft_refresh_every=args.refresh_every, reference_size=args.reference_size,
                      match_refusal=args.match_refusal, eval_per_task=args.eval_size, eval_harmful=args.eval_size)


def command_line(args: argparse.Namespace) -> str:
    """The ``ogpsa demo`` command that reproduces ``args`` (options differing from the defaults)."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    defaults = vars(parser.parse_args([]))
    parts = ["ogpsa", "demo"]
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", "quiet", "output", "publish", "threads"):
            continue
        value = getattr(args, action.dest, defaults[action.dest])
        if value != defaults[action.dest]:
            parts += [action.option_strings[0]] + ([] if isinstance(value, bool) else [shlex.quote(str(value))])
    return " ".join(parts)


def run(args: argparse.Namespace) -> int:
    import torch

    from .plot import require_matplotlib

    try:
        cfg = config_from_args(args)
        if args.model:
            from ..datacheck import check_model_dir

            check_model_dir(args.model, "--model")  # config and tokenizer files, before anything loads
    except (ValueError, FileNotFoundError) as exc:
        return _usage_error(str(exc))
    require_matplotlib()
    if args.threads:
        torch.set_num_threads(args.threads)
    log = (lambda _msg: None) if args.quiet else (lambda msg: print(msg, flush=True))
    t0 = time.perf_counter()
    results = run_experiment(cfg, log=log)
    paths = report.write(results, args.output, command=command_line(args))
    print(report.table(report.summarize(results), results["before"]))
    print(f"\n{cfg.seeds} seed(s), {time.perf_counter() - t0:.0f} s on {cfg.device} "
          f"({torch.get_num_threads()} threads); wrote {', '.join(paths.values())}")
    if args.publish:
        os.makedirs(args.publish, exist_ok=True)
        for p in paths.values():
            shutil.copy(p, os.path.join(args.publish, os.path.basename(p)))
        print(f"published to {args.publish}")
    return 0


def _usage_error(message: str) -> int:
    """A mistake in the command line: the usage line and one message, exit code 2."""
    parser = argparse.ArgumentParser(prog="ogpsa demo")
    add_arguments(parser)
    parser.print_usage(sys.stderr)
    print(f"ogpsa demo: error: {message}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ogpsa demo", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
