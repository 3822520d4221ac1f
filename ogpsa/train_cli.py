"""``ogpsa train``: OGPSA safety fine-tuning (SFT or DPO) from the command line, offline.

Examples::

    ogpsa train --stage sft --model tiny --data safety.jsonl --reference general_a.jsonl \\
        --reference general_b.jsonl --output out/sft
    ogpsa train --stage dpo --model out/sft --data prefs.jsonl --reference general_prefs.jsonl \\
        --subspace out/sft --output out/dpo

Data files are JSON lines in any format TRL accepts (``text``, ``prompt``/``completion``,
``messages``; for DPO ``prompt``/``chosen``/``rejected``). Each ``--reference`` file is one
reference set (one reference gradient; see :mod:`ogpsa.collect` for the formats).
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stage", choices=("sft", "dpo"), required=True, help="training stage")
    parser.add_argument("--model", required=True, help="local checkpoint directory, or 'tiny'")
    parser.add_argument("--data", required=True, help="training data (.jsonl)")
    parser.add_argument("--reference", action="append", default=[], metavar="FILE.jsonl",
                        help="a reference set (.jsonl); repeat for several (one reference gradient each)")
    parser.add_argument("--output", required=True, help="output directory (model, tokenizer, subspace)")
    parser.add_argument("--subspace", default=None,
                        help="start from this saved subspace (file or directory, e.g. the SFT output)")
    parser.add_argument("--ref-model", default=None, help="DPO reference model directory (default: a copy of --model)")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default 1e-6; 1e-4 for tiny)")
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
    parser.add_argument("--mode", choices=MODES, default="orthogonal")
    parser.add_argument("--scope", choices=SCOPES, default="tensor")
    parser.add_argument("--rank", type=int, default=None, help="keep at most this many directions")
    parser.add_argument("--basis-dtype", choices=BASIS_DTYPES, default="float32")
    parser.add_argument("--refresh-every", type=int, default=None, help="optimizer steps (default: 30 SFT, 5 DPO)")
    parser.add_argument("--num-reference-samples", type=int, default=200, help="examples per reference set")
    parser.add_argument("--reference-batch-size", type=int, default=None,
                        help="micro-batch size of reference collection (default: the train batch size)")
    parser.add_argument("--reference-averaging", choices=("example", "batch"), default=None,
                        help="average reference losses per example or per batch (OGPSAConfig.reference_averaging)")
    parser.add_argument("--space", choices=("gradient", "update"), default=None,
                        help="project the gradient or the optimizer's update (OGPSAConfig.space)")
    parser.add_argument("--no-ogpsa", action="store_true", help="train without projection (a baseline)")
    # PEFT
    parser.add_argument("--lora-r", type=int, default=0, help="LoRA rank (0: full fine-tuning)")
    parser.add_argument("--lora-alpha", type=int, default=16)
    parser.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj",
                        help="comma-separated module names for LoRA")


def read_jsonl(path: str) -> list[dict]:
    """Rows of a JSON-lines file (blank lines skipped), with the line number in any error."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path!r} does not exist")
    rows = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{i}: not valid JSON ({exc.msg})") from exc
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{i}: each line must be a JSON object, got {type(row).__name__}")
            rows.append(row)
    if not rows:
        raise ValueError(f"data file {path!r} holds no examples")
    return rows


def load_model_and_tokenizer(spec: str, *, seed: int = 0) -> tuple[Any, Any]:
    """``tiny`` -> a small Llama + char tokenizer; otherwise a local checkpoint (offline)."""
    if spec == "tiny":
        from .tiny import char_tokenizer, tiny_llama

        tok = char_tokenizer()
        return tiny_llama(tok, hidden=64, layers=2, seed=seed), tok
    if not os.path.isdir(spec):
        raise FileNotFoundError(f"--model {spec!r} is neither 'tiny' nor a local checkpoint directory")
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


class UsageError(Exception):
    """A mistake in the command line or its files: reported as usage + one line, exit code 2."""


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
    except (UsageError, FileNotFoundError, NotADirectoryError, ValueError, TypeError) as exc:
        return _usage_error(str(exc) or type(exc).__name__)
    return _train(args, trainer)


def _config_kwargs(args: argparse.Namespace) -> dict:
    """OGPSAConfig fields from the flags; newer fields only where this OGPSAConfig has them."""
    import dataclasses

    from .config import OGPSAConfig

    fields = {f.name for f in dataclasses.fields(OGPSAConfig)}
    kw = dict(mode=args.mode, scope=args.scope, rank=args.rank, basis_dtype=args.basis_dtype,
              num_reference_samples=args.num_reference_samples)
    optional = {"space": args.space, "reference_averaging": args.reference_averaging,
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

    if not args.reference and not (args.subspace and args.refresh_every == 0) and not args.no_ogpsa:
        raise UsageError("give at least one --reference FILE.jsonl "
                         "(or --subspace with --refresh-every 0, or --no-ogpsa)")
    for flag in ("batch_size", "grad_accum", "max_length", "logging_steps"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.refresh_every is not None and args.refresh_every < 0:
        raise UsageError(f"--refresh-every must be >= 0, got {args.refresh_every}")
    if args.reference_batch_size is not None and args.reference_batch_size < 1:
        raise UsageError(f"--reference-batch-size must be >= 1, got {args.reference_batch_size}")
    if args.ref_model and args.stage != "dpo":
        raise UsageError("--ref-model is for --stage dpo")
    if args.subspace and not os.path.exists(args.subspace):
        raise UsageError(f"--subspace {args.subspace!r} does not exist")
    if args.space == "update" and not args.no_ogpsa and args.optim != "adamw_torch":
        raise UsageError(f"--space update projects the AdamW direction and needs --optim adamw_torch "
                         f"(got --optim {args.optim}); use --space gradient with other optimizers")
    args.resume_from_checkpoint = _resume_checkpoint(args)
    train_rows = read_jsonl(args.data)
    references = [read_jsonl(p) for p in args.reference]
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
    trainer._ogpsa_cli_tokenizer = tok
    return trainer


def _resume_checkpoint(args: argparse.Namespace) -> Any:
    """``--resume-from-checkpoint``: the checkpoint directory to resume (checked now), or None."""
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


def _train(args: argparse.Namespace, trainer: Any) -> int:
    tok = trainer._ogpsa_cli_tokenizer
    result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model(args.output)
    tok.save_pretrained(args.output)
    summary = {"stage": args.stage, "output": args.output, "steps": trainer.state.global_step,
               "train_loss": result.training_loss}
    og = None if args.no_ogpsa else trainer.ogpsa
    if og is not None:
        summary["refresh_steps"] = og.refresh_steps
        summary["subspace"] = og.subspace.memory_report()
        summary["space"] = og.config.space
        summary["refresh"] = og.timing()  # refreshes, refresh_seconds, train_seconds, refresh_share
    atomic.write_json(os.path.join(args.output, "ogpsa_train_summary.json"), summary)
    print(json.dumps(summary, indent=2))
    if og is not None:
        print(og.timing_summary())  # one line: refreshes, their seconds, their share of training time
    return 0
