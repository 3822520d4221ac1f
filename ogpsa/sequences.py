"""Reference examples -> token sequences, and the next-token losses of a padded batch.

Used by :mod:`ogpsa.collect`; see its module docs for the example formats. A sequence is
``(input_ids, labels)`` with -100 in ``labels`` where no loss is taken (prompt tokens).
"""

from __future__ import annotations

import itertools
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

_SEQ = tuple[list[int], list[int]]  # (input ids, labels with -100 where no loss)


def _looks_like_example(item: Any) -> bool:
    """True for what can only be one example, never a dataset of examples."""
    if isinstance(item, (str, bytes, int, float)) or (isinstance(item, dict) and not hasattr(item, "select")):
        return True
    if isinstance(item, Tensor):
        return item.dim() <= 1
    if isinstance(item, (list, tuple)) and item:
        first = item[0]
        return isinstance(first, int) or (isinstance(first, dict) and "role" in first)  # token ids, a chat
    return False


def _check_datasets(datasets: Any) -> None:
    """``datasets`` must be a list of datasets; a list of examples is the common mistake."""
    if isinstance(datasets, dict) or isinstance(datasets, str) or not isinstance(datasets, (list, tuple)):
        raise TypeError("datasets must be a list of reference datasets (wrap a single dataset in a list: "
                        f"[dataset]), got {type(datasets).__name__}")
    if not datasets:
        raise ValueError("datasets is empty: give at least one reference dataset")
    for j, ds in enumerate(datasets):
        if _looks_like_example(ds):
            raise TypeError(
                f"datasets[{j}] is a {type(ds).__name__}, i.e. one example, but datasets must be a list of reference "
                "datasets, each a list of examples. To use these examples as one reference dataset, wrap the "
                "list: pass [texts] instead of texts (e.g. build_subspace(model, [texts], ...)); for two sets, "
                "[set_a, set_b]")


def _first(dataset: Any, n: int) -> list:
    if hasattr(dataset, "select") and hasattr(dataset, "__len__"):  # datasets.Dataset: avoid a full scan
        return [dataset[i] for i in range(min(n, len(dataset)))]
    return list(itertools.islice(iter(dataset), n))


def _is_chat(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and isinstance(value[0], dict) and "role" in value[0]


def _need_tokenizer(tokenizer: Any, what: str) -> None:
    if tokenizer is None:
        raise ValueError(f"reference example holds {what}: pass tokenizer= (or token ids, or loss_fn=)")


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _render_pair(tokenizer: Any, prompt: Any, completion: Any) -> _SEQ:
    """Tokens of prompt+completion with the loss on the completion only."""
    if _is_chat(prompt) or _is_chat(completion):
        _need_tokenizer(tokenizer, "a conversation")
        prompt_msgs = list(prompt) if _is_chat(prompt) else [{"role": "user", "content": str(prompt)}]
        completion_msgs = list(completion) if _is_chat(completion) else [{"role": "assistant", "content": str(completion)}]
        head = tokenizer.apply_chat_template(prompt_msgs, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(prompt_msgs + completion_msgs, tokenize=False)
        if not full.startswith(head):  # templates that rewrite earlier turns: fall back to no prefix masking
            ids = _encode(tokenizer, full)
            return ids, list(ids)
        p, c = _encode(tokenizer, head), _encode(tokenizer, full[len(head):])
    else:
        _need_tokenizer(tokenizer, "text")
        p, c = _encode(tokenizer, str(prompt)), _encode(tokenizer, str(completion))
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is not None:  # as TRL does for prompt/completion data: the completion ends with EOS
            c = c + [int(eos)]
    return p + c, [-100] * len(p) + c


def _to_ids(value: Any, where: str) -> list[int]:
    if isinstance(value, Tensor):
        if value.dim() != 1:
            raise ValueError(f"{where}: token ids must be 1-D, got shape {tuple(value.shape)}")
        return [int(v) for v in value.tolist()]
    ids = list(value)
    if not all(isinstance(v, int) or (hasattr(v, "__index__") and not isinstance(v, bool)) for v in ids):
        raise ValueError(f"{where}: expected a list of integer token ids")
    return [int(v) for v in ids]


def example_to_sequences(example: Any, tokenizer: Any = None, where: str = "example") -> list[_SEQ]:
    """The ``(input_ids, labels)`` sequences of one reference example (see the module docs)."""
    if isinstance(example, str):
        _need_tokenizer(tokenizer, "text")
        ids = _encode(tokenizer, example)
        return [(ids, list(ids))]
    if isinstance(example, Tensor) or (isinstance(example, (list, tuple)) and example
                                       and not isinstance(example[0], dict)):
        ids = _to_ids(example, where)
        return [(ids, list(ids))]
    if isinstance(example, dict):
        if "input_ids" in example:
            ids = _to_ids(example["input_ids"], f"{where}['input_ids']")
            if example.get("labels") is not None:
                labels = _to_ids(example["labels"], f"{where}['labels']")
            elif example.get("completion_mask") is not None:
                mask = _to_ids(example["completion_mask"], f"{where}['completion_mask']")
                labels = [t if m else -100 for t, m in zip(ids, mask)]
            else:
                labels = list(ids)
            if len(labels) != len(ids):
                raise ValueError(f"{where}: labels ({len(labels)}) and input_ids ({len(ids)}) differ in length")
            return [(ids, labels)]
        if "chosen" in example and "rejected" in example:
            prompt = example.get("prompt", "")
            return [_render_pair(tokenizer, prompt, example["chosen"]),
                    _render_pair(tokenizer, prompt, example["rejected"])]
        if "prompt" in example and "completion" in example:
            return [_render_pair(tokenizer, example["prompt"], example["completion"])]
        if "messages" in example:
            _need_tokenizer(tokenizer, "a conversation")
            ids = _encode(tokenizer, tokenizer.apply_chat_template(example["messages"], tokenize=False))
            return [(ids, list(ids))]
        if "text" in example:
            return example_to_sequences(str(example["text"]), tokenizer, where)
        raise ValueError(f"{where}: a dict example needs one of 'input_ids', 'prompt'+'chosen'+'rejected', "
                         f"'prompt'+'completion', 'messages' or 'text'; got keys {sorted(example)}")
    raise TypeError(f"{where}: unsupported example type {type(example).__name__} "
                    "(use a string, token ids, a dict, or pass loss_fn=)")


def encode_reference_example(example: Any, tokenizer: Any, max_length: Optional[int], where: str) -> list[_SEQ]:
    """:func:`example_to_sequences`, each sequence cut to ``max_length`` tokens; an example that
    tokenizes to an empty sequence is an error naming ``where`` (it would give no gradient)."""
    seqs = example_to_sequences(example, tokenizer, where=where)
    if max_length is not None:
        seqs = [(ids[:max_length], lab[:max_length]) for ids, lab in seqs]
    if any(len(ids) == 0 for ids, _ in seqs):
        raise ValueError(f"{where} tokenizes to an empty sequence")
    return seqs


def _pad(seqs: Sequence[_SEQ], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    width = max(len(ids) for ids, _ in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, (i, lab) in enumerate(seqs):
        ids[row, :len(i)] = torch.tensor(i, dtype=torch.long)
        labels[row, :len(lab)] = torch.tensor(lab, dtype=torch.long)
        mask[row, :len(i)] = 1
    return ids.to(device), labels.to(device), mask.to(device)


def lm_token_loss_sums(model: torch.nn.Module, seqs: Sequence[_SEQ], pad_id: int = 0,
                       device: Optional[torch.device] = None) -> tuple[Tensor, Tensor]:
    """Summed next-token cross-entropy of each sequence of a right-padded batch (labels -100
    on the padding, as a causal-LM collator pads), and its number of loss tokens."""
    device = device or next(model.parameters()).device
    ids, labels, mask = _pad(seqs, pad_id, device)
    logits = model(input_ids=ids, attention_mask=mask).logits
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    tok = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                          ignore_index=-100, reduction="none").view(shift_labels.shape)
    return tok.sum(1), (shift_labels != -100).sum(1)


def lm_loss_per_sequence(model: torch.nn.Module, seqs: Sequence[_SEQ], pad_id: int = 0,
                         device: Optional[torch.device] = None) -> tuple[Tensor, Tensor]:
    """Mean next-token cross-entropy of each sequence (right-padded batch), and its loss-token counts."""
    sums, counts = lm_token_loss_sums(model, seqs, pad_id, device)
    return sums / counts.clamp_min(1), counts


def _sequence_weights(seq_lists: Sequence[list[_SEQ]], counts: Tensor, averaging: str, total: int,
                      num_batches: int) -> Tensor:
    """Weight of each sequence's summed token loss in the reference loss.

    ``"example"``: 1 / (tokens of the sequence * sequences of its example * examples), so the
    loss is the mean over examples of each example's mean of per-sequence token-means.
    ``"batch"``: 1 / (loss tokens of the whole batch * batches), so the loss is the token-mean
    over the batch (a causal LM's ``outputs.loss``) divided by the number of batches.
    """
    counts = counts.to(torch.float32)
    if averaging == "batch":
        return torch.full_like(counts, 1.0 / num_batches) / counts.sum().clamp_min(1)
    per_example = torch.tensor([1.0 / (len(lst) * total) for lst in seq_lists for _ in lst],
                               dtype=torch.float32, device=counts.device)
    return per_example / counts.clamp_min(1)
