"""``ogpsa train``: OGPSA safety fine-tuning (SFT or DPO) from the command line, offline.

Examples::

    ogpsa train --stage sft --model tiny --data safety.jsonl --reference general_a.jsonl \\
        --reference general_b.jsonl --output out/sft
    ogpsa train --stage dpo --model out/sft --data prefs.jsonl --reference general_prefs.jsonl \\
        --subspace out/sft --output out/dpo

Data files are JSON lines: SFT rows hold ``prompt``/``completion``, ``text`` or ``messages``;
DPO rows ``prompt``/``chosen``/``rejected``. Each ``--reference`` file is one reference set (one
reference gradient; see :mod:`ogpsa.collect` for the formats). Every flag, path and row is
checked before the model loads (:mod:`ogpsa.train_args`, :mod:`ogpsa.datacheck`): a mistake
prints the usage line and one message naming the flag or ``file:line`` and field, exit code 2.
``--stage dpo --model <an SFT output>`` reuses that output's basis, ``--mode`` and ``--space``
(recorded with absolute paths in its ``ogpsa_train_summary.json``) unless given;
``--resume-from-checkpoint DIR|last`` continues an interrupted run (basis and schedule included).
``--model tiny`` builds a small Llama with a character tokenizer (:mod:`ogpsa.tiny`), so the
command runs anywhere; any other value is a local Hugging Face checkpoint directory (nothing
is downloaded). Defaults mirror the original work: lr 1e-6 (1e-4 for ``tiny``),
``max_grad_norm`` 1.0, 200 reference samples per set, refresh every 30 (SFT) / 5 (DPO) steps.
Reference collection shows a progress bar; at the end one line reports the subspace refreshes,
their seconds and their share of training time (also in ``ogpsa_train_summary.json``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from typing import Any

from . import atomic
from .config import BASIS_DTYPES, MODES, SCOPES
from .datacheck import DataFileError, ModelDirError, read_jsonl
from .train_args import SUMMARY_FILE, UsageError, check_args, stage_record


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stage", choices=("sft", "dpo"), required=True, help="training stage")
    parser.add_argument("--model", required=True, help="local checkpoint directory, or 'tiny'")
    parser.add_argument("--data", required=True, help="training data (.jsonl)")
    parser.add_argument("--reference", action="append", default=[], metavar="FILE.jsonl",
                        help="a reference set (.jsonl); repeat for several (one reference gradient each)")
    parser.add_argument("--output", required=True,
                        help="output directory (model, tokenizer, subspace); must not hold a run unless --overwrite "
                             "or --resume-from-checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --output")
    parser.add_argument("--subspace", default=None,
                        help="start from this saved subspace (file or directory); default for --stage dpo on an "
                             "'ogpsa train' SFT output: that output's basis")
    parser.add_argument("--fresh-subspace", action="store_true",
                        help="build the starting subspace from --reference instead of reusing the SFT output's basis")
    parser.add_argument("--ref-model", default=None, help="DPO reference model directory (default: a copy of --model)")
    parser.add_argument("--lr", "--learning-rate", type=float, default=None, help="learning rate (default 1e-6; 1e-4 for tiny)")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping after projection (0: off)")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after this many optimizer steps")
    parser.add_argument("--batch-size", type=int, default=8, help="per-device train batch size")
    parser.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--beta", type=float, default=0.1, help="DPO beta")
    parser.add_argument("--optim", default="adamw_torch", help="transformers optimizer name (e.g. adamw_torch, sgd)")
    parser.add_argument("--save-steps", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    parser.add_argument("--resume-from-checkpoint", default=None, metavar="DIR|last",
                        help="continue an interrupted run from a checkpoint directory (checkpoint-N of any run's "
                             "--output) or 'last' (the newest checkpoint in --output): weights, optimizer, data "
                             "order, and the ogpsa basis and refresh schedule")
    parser.add_argument("--logging-steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is present")
    # OGPSA
    parser.add_argument("--mode", choices=MODES, default=None,
                        help="projection mode (default: the SFT output's for --stage dpo, else orthogonal)")
    parser.add_argument("--scope", choices=SCOPES, default="tensor")
    parser.add_argument("--rank", type=int, default=None, help="keep at most this many directions")
    parser.add_argument("--basis-dtype", choices=BASIS_DTYPES, default="float32")
    parser.add_argument("--refresh-every", type=int, default=None, help="optimizer steps (default: the preset's: 10 for rich; 30 SFT / 5 DPO for paper)")
    parser.add_argument("--num-reference-samples", type=int, default=200, help="examples per reference set")
    parser.add_argument("--reference-batch-size", type=int, default=None,
                        help="micro-batch size of reference collection (default: the train batch size)")
    parser.add_argument("--reference-averaging", choices=("example", "batch"), default=None,
                        help="average reference losses per example or per batch (OGPSAConfig.reference_averaging)")
    parser.add_argument("--preset", choices=("rich", "paper"), default=None,
                        help="OGPSAConfig.preset: rich (default: update space, 8 chunk directions from 16 fresh "
                             "reference examples, refresh every 10) or paper (the original recipe)")
    parser.add_argument("--space", choices=("gradient", "update"), default=None,
                        help="project the gradient or the optimizer's update (OGPSAConfig.space; default: the SFT "
                             "output's for --stage dpo, else gradient)")
    parser.add_argument("--no-ogpsa", action="store_true", help="train without projection (a baseline)")
    # PEFT
    parser.add_argument("--lora-r", type=int, default=0, help="LoRA rank (0: full fine-tuning)")
    parser.add_argument("--lora-alpha", type=int, default=16)
    parser.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj",
                        help="comma-separated module names for LoRA")


def load_model_and_tokenizer(spec: str, *, seed: int = 0) -> tuple[Any, Any]:
    """``tiny`` -> a small Llama + char tokenizer; otherwise a local checkpoint (offline)."""
    if spec == "tiny":
        from .tiny import char_tokenizer, tiny_llama

        tok = char_tokenizer()
        return tiny_llama(tok, hidden=64, layers=2, seed=seed), tok
    if not os.path.isdir(spec):
        raise FileNotFoundError(f"--model {spec!r} is neither 'tiny' nor a local checkpoint directory")
    # Absolute: the path is stored in the outputs (a LoRA adapter's base_model_name_or_path), which a
    # later stage run from another directory must still find.
    spec = os.path.abspath(spec)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(spec, local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    adapter_config = os.path.join(spec, "adapter_config.json")
    if os.path.isfile(adapter_config):
        # A LoRA output of an earlier stage (e.g. `ogpsa train --stage sft --lora-r ...`): load its base and
        # the adapter *trainable*, so the next stage continues training the same adapter.
        from peft import PeftModel

        with open(adapter_config) as f:
            base_path = json.load(f).get("base_model_name_or_path")
        if not base_path or not os.path.isdir(base_path):
            raise FileNotFoundError(f"--model {spec!r} is a LoRA adapter whose base model {base_path!r} is not a "
                                    "local directory; pass a merged checkpoint or keep the base where it was")
        base = AutoModelForCausalLM.from_pretrained(base_path, local_files_only=True, dtype=torch.float32)
        return PeftModel.from_pretrained(base, spec, is_trainable=True), tok
    model = AutoModelForCausalLM.from_pretrained(spec, local_files_only=True, dtype=torch.float32)
    return model, tok


def _usage_error(message: str) -> int:
    parser = argparse.ArgumentParser(prog="ogpsa train")
    add_arguments(parser)
    parser.print_usage(sys.stderr)
    print(f"ogpsa train: error: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    """Check the arguments, load the data and model, build the trainer, train, save.

    Mistakes found before training starts (missing or malformed files, bad flag
    combinations, settings OGPSAConfig rejects) print the usage and one line, exit code 2;
    errors during training propagate with their traceback."""
    try:
        trainer = _prepare(args)
    except (UsageError, DataFileError, ModelDirError, FileNotFoundError, NotADirectoryError, ValueError,
            TypeError) as exc:
        return _usage_error(str(exc) or type(exc).__name__)
    return _train(args, trainer)


def _config_kwargs(args: argparse.Namespace) -> dict:
    """OGPSAConfig fields from the flags; newer fields only where this OGPSAConfig has them."""
    import dataclasses

    from .config import OGPSAConfig

    fields = {f.name for f in dataclasses.fields(OGPSAConfig)}
    kw = dict(mode=args.mode, scope=args.scope, rank=args.rank, basis_dtype=args.basis_dtype,
              num_reference_samples=args.num_reference_samples)
    optional = {"preset": args.preset, "space": args.space, "reference_averaging": args.reference_averaging,
                "reference_batch_size": args.reference_batch_size}
    for name, value in optional.items():
        if value is None:
            continue
        if name not in fields:
            if name == "reference_batch_size":
                continue  # still passed to the trainer as reference_batch_size
            raise UsageError(f"--{name.replace('_', '-')} needs a newer ogpsa (OGPSAConfig has no {name!r})")
        kw[name] = value
    return kw


def _prepare(args: argparse.Namespace) -> Any:
    from datasets import Dataset

    import ogpsa

    check_args(args)  # flags, paths, output, resume directory: nothing loaded yet
    train_rows = read_jsonl(args.data, args.stage)  # every row checked for the stage, still before the model
    references = [read_jsonl(p, "reference") for p in args.reference]
    config = ogpsa.OGPSAConfig(**_config_kwargs(args))
    model, tok = load_model_and_tokenizer(args.model, seed=args.seed)
    lr = args.lr if args.lr is not None else (1e-4 if args.model == "tiny" else 1e-6)
    common = dict(output_dir=args.output, learning_rate=lr, max_grad_norm=args.max_grad_norm,
                  num_train_epochs=args.epochs, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
                  gradient_accumulation_steps=args.grad_accum, optim=args.optim, seed=args.seed,
                  logging_steps=args.logging_steps, report_to="none", bf16=args.bf16, use_cpu=args.cpu or None,
                  save_strategy="steps" if args.save_steps else "no", save_steps=args.save_steps or 500,
                  max_length=args.max_length)
    if common["use_cpu"] is None:
        import torch

        common["use_cpu"] = not torch.cuda.is_available()
    peft_config = None
    is_adapter = hasattr(model, "peft_config")
    if is_adapter and args.lora_r:
        # A new adapter on top of the old one would stack them: merge the old one first, start a new one.
        model = model.merge_and_unload()
        is_adapter = False
    if args.lora_r:
        from peft import LoraConfig

        peft_config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                                 target_modules=[t.strip() for t in args.lora_targets.split(",") if t.strip()])
    ogpsa_kwargs = dict(ogpsa_config=config, reference_datasets=references or None, refresh_every=args.refresh_every,
                        subspace=args.subspace, reference_batch_size=args.reference_batch_size)
    dataset = Dataset.from_list(train_rows)
    if args.stage == "sft":
        from trl import SFTConfig, SFTTrainer

        from .integrations.trl import OGPSASFTTrainer

        targs = SFTConfig(**common)
        if args.no_ogpsa:
            trainer = SFTTrainer(model=model, args=targs, train_dataset=dataset, processing_class=tok,
                                 peft_config=peft_config)
        else:
            trainer = OGPSASFTTrainer(model=model, args=targs, train_dataset=dataset, processing_class=tok,
                                      peft_config=peft_config, **ogpsa_kwargs)
    else:
        from trl import DPOConfig, DPOTrainer

        from .integrations.trl import OGPSADPOTrainer

        targs = DPOConfig(beta=args.beta, **common)
        ref_model = None
        if args.ref_model:
            ref_model = load_model_and_tokenizer(args.ref_model)[0].eval()
        elif is_adapter:
            # Continuing an SFT adapter: the reference policy is the SFT model (base + adapter), not the base
            # that TRL's "disable the adapter" reference would give.
            ref_model = copy.deepcopy(model).merge_and_unload().eval()
        elif peft_config is None:  # with a new adapter, PEFT disables it for reference log-probs instead
            ref_model = copy.deepcopy(model).eval()
        cls = DPOTrainer if args.no_ogpsa else OGPSADPOTrainer
        extra = {} if args.no_ogpsa else ogpsa_kwargs
        trainer = cls(model=model, ref_model=ref_model, args=targs, train_dataset=dataset, processing_class=tok,
                      peft_config=peft_config, **extra)
    if not args.no_ogpsa and trainer.ogpsa.initial_subspace is not None:
        from .errors import SubspaceMismatchError

        try:  # the trainer's final (PEFT-wrapped) parameters: a basis of another model is a mistake found now
            trainer.ogpsa.initial_subspace.check_model(trainer.model)
        except SubspaceMismatchError as exc:
            raise UsageError(f"--subspace {args.subspace!r} does not fit --model {args.model!r}: {exc}") from exc
    trainer._ogpsa_cli_tokenizer = tok
    return trainer


def _save_tiny_base(args: argparse.Namespace) -> None:
    """``--model tiny --lora-r``: the adapter's base exists only in memory (PEFT records no path
    for it). Save the same seeded tiny model (LoRA leaves the base untouched) into
    ``<output>/tiny_base`` and point the adapter at it (absolute path), so a later stage
    (``--stage dpo --model <output>``) can load base + adapter."""
    base_dir = os.path.abspath(os.path.join(args.output, "tiny_base"))
    model, tok = load_model_and_tokenizer("tiny", seed=args.seed)
    model.save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    path = os.path.join(args.output, "adapter_config.json")
    with open(path, encoding="utf-8") as f:
        adapter = json.load(f)
    adapter["base_model_name_or_path"] = base_dir
    atomic.write_json(path, adapter)


def _train(args: argparse.Namespace, trainer: Any) -> int:
    tok = trainer._ogpsa_cli_tokenizer
    if not args.no_ogpsa:  # which preset runs, one line at start (the library logs it at INFO)
        print(trainer.ogpsa.config.describe(), file=sys.stderr, flush=True)
    result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model(args.output)
    tok.save_pretrained(args.output)
    if args.model == "tiny" and args.lora_r:
        _save_tiny_base(args)
    summary = {"stage": args.stage, "output": os.path.abspath(args.output), "steps": trainer.state.global_step,
               "train_loss": result.training_loss,
               "model": args.model if args.model == "tiny" else os.path.abspath(args.model),
               "data": os.path.abspath(args.data), "reference": [os.path.abspath(p) for p in args.reference]}
    og = None if args.no_ogpsa else trainer.ogpsa
    if og is not None:
        summary["ogpsa"] = stage_record(args, og)  # what the DPO stage reuses (absolute paths)
        summary["refresh_steps"] = og.refresh_steps
        summary["subspace"] = og.subspace.memory_report()
        summary["space"] = og.config.space
        summary["refresh"] = og.timing()  # refreshes, refresh_seconds, train_seconds, refresh_share
    atomic.write_json(os.path.join(args.output, SUMMARY_FILE), summary)
    print(json.dumps(summary, indent=2))
    if og is not None:
        print(og.timing_summary())  # one line: refreshes, their seconds, their share of training time
    return 0
