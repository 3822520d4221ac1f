"""Shared by the example scripts: read JSON lines, load a model, tokenize SFT rows into batches.

Kept small and plain on purpose: each example script reads top to bottom without it, except for
these three chores.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import torch

DATA = pathlib.Path(__file__).resolve().parent / "data"


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The rows of a JSON-lines file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def load_model(spec: str, seed: int = 0) -> tuple[Any, Any]:
    """``tiny``: a small random Llama + character tokenizer (offline); else a local checkpoint directory."""
    if spec == "tiny":
        from ogpsa.tiny import char_tokenizer, tiny_llama

        tok = char_tokenizer()
        return tiny_llama(tok, hidden=32, layers=2, seed=seed), tok
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(spec)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return AutoModelForCausalLM.from_pretrained(spec, dtype=torch.float32), tok


def sft_features(rows: list[dict], tok: Any, max_length: int = 128) -> list[dict]:
    """prompt + completion -> input_ids and labels with the prompt masked (-100), as SFT trains."""
    out = []
    for r in rows:
        prompt = tok(r["prompt"], add_special_tokens=False).input_ids
        answer = tok(r["completion"], add_special_tokens=False).input_ids + [tok.eos_token_id]
        ids = (prompt + answer)[:max_length]
        out.append({"input_ids": ids, "labels": ([-100] * len(prompt) + answer)[:max_length]})
    return out


def collate(features: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of sft_features into tensors (padding is masked in the loss and attention)."""
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    labels = torch.full((len(features), width), -100, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        ids[i, :n] = torch.tensor(f["input_ids"])
        labels[i, :n] = torch.tensor(f["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
