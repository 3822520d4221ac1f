"""Models, tokenization and batching for the demo: a tiny Llama with a character tokenizer,
or any local Hugging Face causal LM (``--model PATH``)."""

from __future__ import annotations

import os
import random
import warnings
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import tasks
from .tasks import Example


class Codec:
    """Encodes prompts and answers with a Hugging Face tokenizer (no special tokens added);
    answers end with the tokenizer's EOS token."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError("the tokenizer has no eos_token_id; the demo ends every answer with EOS")
        self.eos_id = int(eos)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else self.eos_id
        self._cache: dict[str, list[int]] = {}

    def encode(self, text: str) -> list[int]:
        ids = self._cache.get(text)
        if ids is None:
            ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            if len(self._cache) < 200_000:
                self._cache[text] = ids
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


@dataclass
class Batch:
    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor  # -100 outside the answer (+ EOS)


def pairs(examples: Sequence[Example]) -> list[tuple[str, str]]:
    return [(e.prompt, e.answer) for e in examples]


def make_batch(codec: Codec, pairs_: Sequence[tuple[str, str]], device: torch.device) -> Batch:
    """Right-padded causal-LM batch; the loss covers the answer tokens and the final EOS."""
    rows = [(codec.encode(p), codec.encode(a) + [codec.eos_id]) for p, a in pairs_]
    width = max(len(p) + len(a) for p, a in rows)
    ids = torch.full((len(rows), width), codec.pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (p, a) in enumerate(rows):
        n = len(p) + len(a)
        ids[i, :n] = torch.tensor(p + a)
        labels[i, len(p):n] = torch.tensor(a)
        mask[i, :n] = 1
    return Batch(ids.to(device), mask.to(device), labels.to(device))


def answer_logprobs(model: torch.nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
    """Per-example summed log-probability of the answer tokens, and their counts."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1].float()
    target = batch.labels[:, 1:]
    keep = target != -100
    logp = torch.log_softmax(logits, dim=-1).gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (logp * keep).sum(-1), keep.sum(-1)


def lm_loss(model: torch.nn.Module, batch: Batch) -> Tensor:
    """Mean cross-entropy over answer tokens (the training, reference and evaluation loss)."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.labels[:, 1:].reshape(-1), ignore_index=-100)


def char_tokenizer():
    """The demo's character tokenizer over :data:`tasks.CHARSET` (built offline)."""
    from ogpsa.tiny import char_tokenizer as _char

    return _char(tasks.CHARSET, chat_template=None)


def build_tiny(hidden: int, layers: int, heads: int, intermediate: int, seed: int) -> tuple[torch.nn.Module, Codec]:
    """A small LlamaForCausalLM with seeded weights and the demo's character tokenizer."""
    from ogpsa.tiny import tiny_llama

    tok = char_tokenizer()
    model = tiny_llama(tok, hidden, layers, heads=heads, intermediate=intermediate, max_positions=64, seed=seed)
    return model, Codec(tok)


def load_checkpoint(path: str) -> tuple[torch.nn.Module, Codec]:
    """A local Hugging Face causal LM and its tokenizer (offline, float32 for CPU training)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not os.path.isdir(path):
        raise FileNotFoundError(f"--model {path!r} is not a directory holding a Hugging Face checkpoint")
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    return model, Codec(tok)


MIN_BASE_SCORE = 0.5
"""``--model``: the general score (mean exact match over the tasks) below which the base model,
after its format steps, is reported as unable to do the tasks (forgetting is then unmeasurable)."""


def teach_formats(model: torch.nn.Module, codec: Codec, steps: int, device: torch.device,
                  progress: bool = True) -> Optional[float]:
    """``--model``: a short pass over the general mix (and requests answered helpfully) so an
    outside checkpoint learns the task formats the protocol scores by exact match; a progress
    bar (tqdm) shows the steps and the loss. Returns the last loss (None for 0 steps)."""
    data = tasks.make_data(0)
    rng = random.Random(1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    model.train()
    bar = _progress(steps, progress)
    last = None
    for _ in range(steps):
        loss = lm_loss(model, make_batch(codec, pairs(data.pretrain_batch(rng, 32, 0.3)), device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        last = float(loss.detach())
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{last:.3f}")
    if bar is not None:
        bar.close()
    model.zero_grad(set_to_none=True)
    return last


def _progress(total: int, enabled: bool):
    if not enabled or total <= 0:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # never fail the demo for a progress bar
        return None
    return tqdm(total=total, desc="learning the task formats", unit="step")


def warn_if_base_incapable(before: dict, path: str, format_steps: int, threshold: float = MIN_BASE_SCORE) -> bool:
    """Warn (``UserWarning``) when the ``--model`` base scores below
    ``threshold`` on the general tasks after its format steps. Returns whether it warned."""
    score = float(before["general_score"])
    if score >= threshold:
        return False
    per_task = ", ".join(f"{k} {v:.0%}" for k, v in before.get("exact_match", {}).items())
    message = (f"ogpsa demo: the base model {path!r} scores {score:.1%} on the general tasks ({per_task}) after "
               f"{format_steps} format steps, below {threshold:.0%}: it cannot do the tasks, so the forgetting the "
               "demo measures is noise. Raise --model-steps, or use a stronger base")
    warnings.warn(message, UserWarning, stacklevel=2)  # on stderr even with --quiet
    return True
