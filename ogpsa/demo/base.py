"""The demo's base model: a fixed recipe, trained once, then reused.

``python -m ogpsa.demo.base --output DIR`` trains a tiny Llama on the general mix plus
requests answered helpfully (an unaligned but competent model) and saves it with
``save_pretrained`` next to ``recipe.json`` (the recipe, the before-scores and the SHA-256 of
``model.safetensors``). The committed copy lives in ``ogpsa/demo/data/base``;
:func:`load_base` verifies its hash, and when it is missing or its recipe differs from
:data:`RECIPE`, trains one and caches it under the demo's output directory, so ``make demo``
never re-pretrains on every run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import time
from typing import Any, Callable, Optional

import torch

from .. import atomic
from . import tasks
from .evaluate import evaluate
from .model import Codec, build_tiny, char_tokenizer, lm_loss, make_batch, pairs

RECIPE: dict[str, Any] = {
    "hidden": 128, "layers": 2, "heads": 4, "intermediate": 512, "init_seed": 0, "data_seed": 1,
    "steps": 1500, "batch": 64, "lr": 3e-3, "betas": [0.9, 0.98], "warmup": 75, "final_lr_fraction": 0.02,
    "request_fraction": 0.3, "max_grad_norm": 1.0, "threads": 2, "tasks_version": 2,
}
"""The base model's fixed recipe; changing any value invalidates the committed checkpoint."""

COMMITTED = os.path.join(os.path.dirname(__file__), "data", "base")


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def train_base(recipe: dict[str, Any], log: Callable[[str], None] = print) -> tuple[torch.nn.Module, Codec, dict]:
    """Train a base model by ``recipe`` (deterministic for a given torch build and thread count)."""
    model, codec = build_tiny(recipe["hidden"], recipe["layers"], recipe["heads"], recipe["intermediate"],
                              recipe["init_seed"])
    data = tasks.make_data(0)
    rng = random.Random(recipe["data_seed"])
    steps, warm = recipe["steps"], recipe["warmup"]
    opt = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=0.0, betas=tuple(recipe["betas"]))
    floor = recipe["final_lr_fraction"]

    def lr_at(s: int) -> float:
        if s < warm:
            return (s + 1) / warm
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    device = torch.device("cpu")
    model.train()
    t0 = time.perf_counter()
    for s in range(steps):
        batch = make_batch(codec, pairs(data.pretrain_batch(rng, recipe["batch"], recipe["request_fraction"])), device)
        loss = lm_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe["max_grad_norm"])
        opt.step()
        sched.step()
        if (s + 1) % max(1, steps // 10) == 0:
            log(f"  base step {s + 1}/{steps} loss {float(loss):.3f} ({time.perf_counter() - t0:.0f} s)")
    model.eval()
    scores = evaluate(model, codec, data, device)
    info = {"recipe": recipe, "seconds": time.perf_counter() - t0, "torch": torch.__version__, "scores": scores}
    return model, codec, info


def save_base(model: torch.nn.Module, codec: Codec, info: dict, path: str) -> str:
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    codec.tokenizer.save_pretrained(path)
    info = dict(info, sha256=sha256(os.path.join(path, "model.safetensors")))
    atomic.write_json(os.path.join(path, "recipe.json"), info, indent=1)  # written last: marks a complete base
    return path


def _load_verified(path: str) -> Optional[tuple[torch.nn.Module, Codec, dict]]:
    meta = os.path.join(path, "recipe.json")
    weights = os.path.join(path, "model.safetensors")
    if not (os.path.isfile(meta) and os.path.isfile(weights)):
        return None
    with open(meta) as f:
        info = json.load(f)
    if info.get("recipe") != RECIPE:
        return None
    if sha256(weights) != info.get("sha256"):
        raise ValueError(f"{weights}: SHA-256 differs from recipe.json; the file is damaged or was replaced")
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    return model, Codec(char_tokenizer()), info


def load_base(cache_dir: str, log: Callable[[str], None] = print) -> tuple[torch.nn.Module, Codec, dict]:
    """The committed base model, else the one cached in ``cache_dir``, else train and cache it."""
    for path in (COMMITTED, cache_dir):
        got = _load_verified(path)
        if got is not None:
            log(f"base model: {path} (sha256 {got[2]['sha256'][:12]})")
            return got
    log(f"base model: training by the fixed recipe (once; cached in {cache_dir})")
    model, codec, info = train_base(RECIPE, log)
    save_base(model, codec, info, cache_dir)
    return _load_verified(cache_dir)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ogpsa.demo.base", description=__doc__.split("\n")[0])
    parser.add_argument("--output", default=COMMITTED, help="where to save (default: %(default)s)")
    args = parser.parse_args(argv)
    torch.set_num_threads(RECIPE["threads"])
    model, codec, info = train_base(RECIPE)
    save_base(model, codec, info, args.output)
    print(json.dumps(info["scores"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
