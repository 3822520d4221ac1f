"""Tiny, offline models and tokenizers for tests, demos and ``ogpsa train --model tiny``.

Nothing here downloads anything: the tokenizer is built locally with the ``tokenizers``
library (one token per character) and wrapped in
:class:`transformers.PreTrainedTokenizerFast`, and the model is a
:class:`transformers.LlamaForCausalLM` built from a config with seeded random weights.

Example::

    from ogpsa.tiny import char_tokenizer, tiny_llama

    tok = char_tokenizer()                     # printable ASCII + newline, with a chat template
    model = tiny_llama(tok, hidden=64, layers=2, seed=0)
    ids = tok("hello", return_tensors="pt").input_ids
    loss = model(input_ids=ids, labels=ids).loss

Both objects behave like any Hugging Face model/tokenizer pair: they save with
``save_pretrained`` and reload with ``AutoTokenizer``/``AutoModelForCausalLM``, and TRL's
``SFTTrainer`` and ``DPOTrainer`` accept them (plain-text, prompt/completion, preference and
conversational datasets; the chat template is :data:`CHAT_TEMPLATE`).
"""

from __future__ import annotations

import string
from typing import Any, Optional, Union

import torch

DEFAULT_CHARS = string.printable.replace("\x0b", "").replace("\x0c", "").replace("\r", "")
"""Printable ASCII plus space, tab and newline: the default character set of :func:`char_tokenizer`."""

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
"""Pad, BOS, EOS and unknown tokens: ids 0, 1, 2, 3 of every :func:`char_tokenizer`."""

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
"""A minimal chat template: ``<|role|>content</s>`` per message; the generation prompt is
``<|assistant|>``. The role markers are plain characters, so any role name tokenizes."""


def char_tokenizer(chars: str = DEFAULT_CHARS, *, model_max_length: int = 512,
                   chat_template: Optional[str] = CHAT_TEMPLATE, padding_side: str = "right"):
    """A character-level :class:`~transformers.PreTrainedTokenizerFast`, built offline.

    Every character of ``chars`` is one token (ids from 4 on, in sorted order); any other
    character maps to ``<unk>``. Ids 0..3 are ``<pad>``, ``<s>``, ``</s>``, ``<unk>``; the
    special token strings are recognised in text. No BOS/EOS is added automatically
    (``tok("ab").input_ids == [id('a'), id('b')]``), and ``decode`` joins characters without
    spaces, so ``tok.decode(tok(s).input_ids) == s`` for text over ``chars``.

    Args:
        chars: the alphabet (duplicates are ignored).
        model_max_length: the tokenizer's truncation length.
        chat_template: a Jinja chat template (default :data:`CHAT_TEMPLATE`; None: none).
        padding_side: ``"right"`` (default) or ``"left"``.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if not isinstance(chars, str) or not chars:
        raise ValueError("char_tokenizer(chars=...) needs a non-empty string of characters")
    if padding_side not in ("left", "right"):
        raise ValueError(f"char_tokenizer(padding_side={padding_side!r}): choose 'left' or 'right'")
    alphabet = sorted(set(chars))
    vocab = {tok: i for i, tok in enumerate(list(SPECIAL_TOKENS) + alphabet)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    # Isolate every single character (newlines included) so WordLevel sees one char per word.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>", model_max_length=model_max_length, padding_side=padding_side)
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


def tiny_llama(vocab: Union[int, Any], hidden: int = 64, layers: int = 2, *, heads: int = 4,
               kv_heads: Optional[int] = None, intermediate: Optional[int] = None, max_positions: int = 512,
               tie_embeddings: bool = False, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A small :class:`~transformers.LlamaForCausalLM` with seeded random weights.

    Args:
        vocab: vocabulary size, or a tokenizer (its ``len()`` and pad/bos/eos ids are used).
        hidden: hidden size (a multiple of ``heads``).
        layers: number of decoder layers.
        heads: attention heads; ``kv_heads`` key/value heads (default: ``heads``).
        intermediate: MLP width (default ``4 * hidden``).
        max_positions: maximum sequence length.
        tie_embeddings: share input and output embeddings.
        seed: weights are identical for the same arguments and seed (the global RNG is
            left untouched).
        dtype: parameter dtype.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    special: dict[str, int] = {}
    if isinstance(vocab, int):
        vocab_size = vocab
    else:
        vocab_size = len(vocab)
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(vocab, key, None)
            if value is not None:
                special[key] = int(value)
    if vocab_size < 1:
        raise ValueError(f"tiny_llama(vocab={vocab!r}): the vocabulary size must be >= 1")
    if hidden < 1 or hidden % heads:
        raise ValueError(f"tiny_llama(hidden={hidden}, heads={heads}): hidden must be a positive multiple of heads")
    kv_heads = heads if kv_heads is None else kv_heads
    if heads % kv_heads:
        raise ValueError(f"tiny_llama(heads={heads}, kv_heads={kv_heads}): heads must be a multiple of kv_heads")
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads,
                         intermediate_size=intermediate or 4 * hidden, max_position_embeddings=max_positions,
                         tie_word_embeddings=tie_embeddings, **special)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(dtype)


def tiny_model_and_tokenizer(chars: str = DEFAULT_CHARS, hidden: int = 64, layers: int = 2, *, seed: int = 0,
                             **kwargs: Any):
    """``(tiny_llama(tok, hidden, layers, seed=seed, **kwargs), tok)`` with ``tok = char_tokenizer(chars)``."""
    tok = char_tokenizer(chars)
    return tiny_llama(tok, hidden, layers, seed=seed, **kwargs), tok
