"""A plain transformers.Trainer with OGPSA as a callback (no trainer subclass).

    python examples/train_trainer_callback.py                 # tiny offline model, CPU, a few steps
    python examples/train_trainer_callback.py --model path/to/checkpoint --steps 300 --output out/cb

``OGPSACallback`` builds the subspace at train begin, refreshes it every ``refresh_every``
optimizer steps, projects in the optimizer's step pre-hook and puts ``ogpsa/*`` metrics into the
Trainer's logs (so TensorBoard / W&B see them). A callback only sees gradients after the Trainer
clipped them (clip -> project -> step); for project -> clip -> step use the TRL trainers or mix
``ogpsa.integrations.trl.OGPSATrainerMixin`` into your Trainer subclass.
"""

from __future__ import annotations

import argparse
import tempfile

from _common import DATA, collate, load_model, read_jsonl, sft_features
from transformers import Trainer, TrainingArguments

import ogpsa
from ogpsa.integrations.transformers import OGPSACallback


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--data", default=str(DATA / "safety.jsonl"))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--output", default=None, help="Trainer output directory (default: a temporary one)")
    args = ap.parse_args(argv)

    model, tok = load_model(args.model)
    train = sft_features(read_jsonl(args.data), tok)
    references = [read_jsonl(DATA / "general.jsonl"), read_jsonl(DATA / "general_b.jsonl")]
    callback = OGPSACallback(ogpsa.OGPSAConfig(mode="orthogonal", refresh_every=2), references, tokenizer=tok)
    output = args.output or tempfile.mkdtemp(prefix="ogpsa-callback-")
    trainer = Trainer(
        model=model, train_dataset=train, data_collator=lambda f: collate(f, tok.pad_token_id),
        args=TrainingArguments(output_dir=output, max_steps=args.steps, per_device_train_batch_size=4,
                               gradient_accumulation_steps=2, learning_rate=args.lr, logging_steps=1,
                               report_to="none", use_cpu=True, save_strategy="no",
                               remove_unused_columns=False),
        callbacks=[callback])
    trainer.train()
    logs = [{k: v for k, v in entry.items() if k.startswith("ogpsa/") or k == "loss"}
            for entry in trainer.state.log_history if "loss" in entry]
    for entry in logs:
        print(entry)
    return logs


if __name__ == "__main__":
    main()
