"""A hand-written training loop: LoRA + AdamW + gradient accumulation, with ogpsa.OGPSA.

    python examples/train_loop.py                      # tiny offline model, a few steps, CPU
    python examples/train_loop.py --model path/to/checkpoint --steps 200 --lr 1e-6 --output out/loop

``ogpsa.OGPSA`` builds the capability subspace from the reference sets before the first step
(progress bar), projects the accumulated gradient once per ``optimizer.step()`` (in the
optimizer's step pre-hook; ``og.clip_grad_norm_`` projects and clips in one call), rebuilds the
subspace every ``refresh_every`` optimizer steps, and saves/restores basis + schedule.
"""

from __future__ import annotations

import argparse
import random

import torch
from _common import DATA, collate, load_model, read_jsonl, sft_features
from peft import LoraConfig, get_peft_model

import ogpsa


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--data", default=str(DATA / "safety.jsonl"))
    ap.add_argument("--reference", action="append", help="reference set(s) (default: general + general_b)")
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps")
    ap.add_argument("--accum", type=int, default=2, help="micro-batches per optimizer step")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--refresh-every", type=int, default=2)
    ap.add_argument("--output", default=None, help="save the LoRA adapter and the OGPSA state here")
    args = ap.parse_args(argv)
    torch.manual_seed(0)

    model, tok = load_model(args.model)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    # LoRA's B starts at zero, so A's reference gradients are zero at step 0: A gets directions from
    # the first refresh on (B moves in the first steps).
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    references = [read_jsonl(p) for p in (args.reference or [DATA / "general.jsonl", DATA / "general_b.jsonl"])]
    og = ogpsa.OGPSA(model, optimizer, reference=references, tokenizer=tok,
                     config=ogpsa.OGPSAConfig(mode="orthogonal", refresh_every=args.refresh_every))

    train = sft_features(read_jsonl(args.data), tok)
    rng = random.Random(0)
    removed = []
    for step in range(args.steps):
        for _ in range(args.accum):  # gradients accumulate; OGPSA projects the sum once, at the step
            batch = collate(rng.sample(train, min(args.batch_size, len(train))), tok.pad_token_id)
            (model(**batch).loss / args.accum).backward()
        og.clip_grad_norm_(1.0)      # project, then clip (the step hook does not project again)
        optimizer.step()             # every refresh_every steps the subspace is rebuilt after this step
        optimizer.zero_grad()
        stats = og.projector.last_stats
        removed.append(stats.removed_fraction)
        print(f"step {step + 1}: loss {batch_loss(model, batch):.4f}  removed {stats.removed_fraction:.3f}")
    if args.output:
        model.save_pretrained(args.output)   # the LoRA adapter
        og.save_pretrained(args.output)      # basis + schedule; resume with ogpsa.OGPSA.from_pretrained
    return {"removed": removed, "refresh_steps": og.refresh_steps, "og": og, "model": model}


@torch.no_grad()
def batch_loss(model: torch.nn.Module, batch: dict) -> float:
    return float(model(**batch).loss)


if __name__ == "__main__":
    main()
