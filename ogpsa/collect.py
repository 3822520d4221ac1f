"""Reference-gradient collection: the mean loss gradient over a small reference set.

OGPSA's capability subspace is spanned by reference gradients: for every reference dataset,
the mean gradient of the loss over its first ``num_samples`` examples (the original work:
200 examples from each of two general-ability sets for SFT, one preference set for DPO).

:func:`collect_reference_gradients` computes them in micro-batches with float32
accumulation, with any attached :class:`~ogpsa.Projector` paused, and leaves the model's
existing ``.grad`` tensors exactly as they were (the same tensor objects, untouched), so it
can run in the middle of gradient accumulation. :func:`build_subspace` turns them into a
:class:`~ogpsa.Subspace`.

Datasets. Each reference dataset is a sequence (list, tuple, ``datasets.Dataset``, or any
iterable) of examples. With the default loss an example is one of:

* a string: tokenized with ``tokenizer``; loss on every token;
* a list / 1-D tensor of token ids; loss on every token;
* a dict (a ``datasets.Dataset`` row) with, by priority:

  - ``input_ids`` (and optionally ``labels``, -100 = ignored, or ``completion_mask``);
  - ``prompt`` + ``chosen`` + ``rejected`` (a preference pair, as for DPO): two sequences,
    prompt+chosen and prompt+rejected, loss on the chosen/rejected tokens; the example's
    loss is the mean of the two (the original DPO reference loss: plain LM loss on chosen
    and rejected together);
  - ``prompt`` + ``completion``: loss on the completion tokens only;
  - ``messages``: a conversation rendered with the tokenizer's chat template; loss on
    every token;
  - ``text``: as a string.

  Prompts/completions may be strings or, conversationally, lists of ``{"role", "content"}``
  messages (rendered with the chat template).

Averaging (``averaging=`` or ``OGPSAConfig.reference_averaging``):

* ``"example"`` (default): the loss of one sequence is its mean token cross-entropy
  (next-token prediction), an example's loss is the mean over its sequences, and the
  reference gradient is the gradient of the mean over examples. Examples are sorted by length
  and processed ``batch_size`` at a time (little padding), but the result does not depend on
  ``batch_size`` or the order (up to float32 rounding).
* ``"batch"`` (the original implementation's averaging): consecutive batches of
  ``batch_size`` examples, right-padded with labels -100 on the padding; a batch's loss is
  the token-mean cross-entropy over all loss tokens of all its sequences (a preference pair
  gives its chosen and rejected sequences), and every batch has the same weight
  ``1 / num_batches`` (the last batch may be smaller). The result depends on
  ``batch_size``; with ``batch_size=1`` it equals ``"example"``.

With ``loss_fn(model, examples) -> scalar`` you supply the mean loss of a list of raw
examples yourself (anything the function understands); ``"example"`` weights a batch by its
number of examples, ``"batch"`` weights every batch equally.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
from torch import Tensor

from .config import DEFAULT_REFERENCE_BATCH_SIZE, REFERENCE_AVERAGING, OGPSAConfig
from .sequences import (  # noqa: F401  (example_to_sequences, lm_loss_per_sequence: public here too)
    _SEQ,
    _check_datasets,
    _first,
    _sequence_weights,
    encode_reference_example,
    example_to_sequences,
    lm_loss_per_sequence,
    lm_token_loss_sums,
)
from .subspace import Subspace

LossFn = Callable[[torch.nn.Module, list], Tensor]


@dataclass
class DatasetInfo:
    """What was collected from one reference dataset."""

    num_examples: int
    num_sequences: int = 0
    num_loss_tokens: int = 0
    mean_loss: float = float("nan")
    seconds: float = 0.0


@dataclass
class CollectInfo:
    """Timing and sizes of one :func:`collect_reference_gradients` call."""

    seconds: float = 0.0
    num_tensors: int = 0
    num_elements: int = 0
    datasets: list[DatasetInfo] = field(default_factory=list)
    #: chunked mode (:mod:`ogpsa.pool`): chunks, examples, rebuild, backward_passes, fallback tensors
    chunked: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        if self.chunked:
            c = self.chunked
            fb = c.get("fallback") or []
            return (f"{c['chunks']} chunk directions from {c['examples']} reference examples (rebuild "
                    f"{c.get('rebuild', 0)}, {c['loss_tokens']} loss tokens, {c['backward_passes']} backward "
                    f"pass(es){f', {len(fb)} tensors by per-chunk backward' if fb else ''}) over {self.num_tensors} "
                    f"tensors ({self.num_elements:,} elements) in {self.seconds:.2f}s")
        parts = [f"{d.num_examples} ex / {d.num_loss_tokens} tok, loss {d.mean_loss:.4f}" for d in self.datasets]
        return (f"collected {len(self.datasets)} reference gradient(s) over {self.num_tensors} tensors "
                f"({self.num_elements:,} elements) in {self.seconds:.2f}s: " + "; ".join(parts))


# -- collection ---------------------------------------------------------------------------


def _params(model: torch.nn.Module, names: Optional[Iterable[str]]) -> list[tuple[str, torch.nn.Parameter]]:
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if names is None:
        return params
    wanted = list(names)
    have = {n for n, _ in params}
    missing = [n for n in wanted if n not in have]
    if missing:
        raise ValueError(f"names= lists parameters that are not trainable parameters of the model: {missing[:5]}"
                         + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""))
    keep = set(wanted)
    return [(n, p) for n, p in params if n in keep]


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency, but never fail a collection for a progress bar
        return None
    return tqdm(total=total, desc=desc, unit="ex", leave=False)


def collect_reference_gradients(
    model: torch.nn.Module,
    datasets: Sequence[Any],
    *,
    num_samples: int = 200,
    batch_size: Optional[int] = None,
    loss_fn: Optional[LossFn] = None,
    tokenizer: Any = None,
    max_length: Optional[int] = 1024,
    names: Optional[Iterable[str]] = None,
    projector: Any = None,
    eval_mode: bool = True,
    progress: bool = True,
    device: Union[str, torch.device, None] = None,
    grad_mode: str = "backward",
    averaging: Optional[str] = None,
    config: Optional[OGPSAConfig] = None,
) -> tuple[list[dict[str, Tensor]], CollectInfo]:
    """One mean-loss gradient per reference dataset, as ``{param_name: float32 tensor}`` dicts.

    Args:
        model: the model being trained (any ``nn.Module``; with the default loss, a causal
            LM whose forward takes ``input_ids``/``attention_mask`` and returns ``.logits``).
        datasets: a list of reference datasets (see the module docs for example formats).
            A single dataset must still be wrapped in a list.
        num_samples: the first this many examples of each dataset are averaged (fewer if
            the dataset is smaller).
        batch_size: examples per forward/backward batch (default:
            ``config.reference_batch_size``, else 8). With ``averaging="batch"`` also the
            averaging unit (the original used ``per_device_train_batch_size``).
        loss_fn: ``loss_fn(model, examples) -> scalar``: the *mean* loss over a list of raw
            examples. Default: next-token cross-entropy (see the module docs).
        tokenizer: turns text examples into ids (the default loss only); its
            ``pad_token_id`` pads batches (0 if it has none).
        max_length: truncate sequences to this many tokens (default loss; None: no limit).
        names: restrict to these parameter names (default: every parameter with
            ``requires_grad``). Parameters that receive no gradient are left out of the dicts.
        projector: a :class:`~ogpsa.Projector` to pause while collecting.
        eval_mode: run the model in ``eval()`` mode (no dropout), restoring its mode after.
        progress: show a tqdm progress bar (on by default; ``progress=False`` turns it off).
        device: where to put the input ids (default: the device of the first parameter).
        grad_mode: ``"backward"`` (default) accumulates through ``loss.backward()`` and
            ``.grad``; needed under FSDP2, where ``torch.autograd.grad`` returns None.
            ``"autograd"`` takes ``torch.autograd.grad(loss, params)`` and never touches
            ``.grad``, so hooks that fire when a gradient is accumulated into ``.grad`` stay
            silent: use it on a DeepSpeed ZeRO-1/2 engine's ``module``, whose post-accumulate
            hooks would otherwise reduce the reference gradients into the training partition.
        averaging: ``"example"`` (mean of per-example token-means; independent of
            ``batch_size``) or ``"batch"`` (token-mean per batch, equal batch weights: the
            original implementation's averaging); see the module docs. Default:
            ``config.reference_averaging`` ("example").
        config: an :class:`~ogpsa.OGPSAConfig` whose ``reference_averaging`` and
            ``reference_batch_size`` are used where ``averaging``/``batch_size`` are not given.

    Returns:
        ``(grads, info)``: ``grads[j]`` is dataset j's mean gradient (float32, detached,
        same device as the parameter); ``info`` a :class:`CollectInfo` (timing, tokens, loss).

    The model's ``.grad`` tensors are restored afterwards to the very same tensor objects,
    unmodified, including parameters outside ``names``.
    """
    _check_datasets(datasets)
    if config is not None and not isinstance(config, OGPSAConfig):
        raise TypeError(f"config must be an ogpsa.OGPSAConfig or None, got {type(config).__name__}")
    if batch_size is None:
        batch_size = getattr(config, "reference_batch_size", None) or DEFAULT_REFERENCE_BATCH_SIZE
    if averaging is None:
        averaging = config.reference_averaging if config is not None else OGPSAConfig.reference_averaging
    if averaging not in REFERENCE_AVERAGING:
        raise ValueError(f"averaging={averaging!r} must be one of {REFERENCE_AVERAGING}")
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples={num_samples!r} must be an integer >= 1")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be an integer >= 1")
    if grad_mode not in ("backward", "autograd"):
        raise ValueError(f"grad_mode={grad_mode!r} must be 'backward' or 'autograd'")
    if getattr(model, "is_deepspeed_enabled", False) or type(model).__name__ == "DeepSpeedEngine":
        raise TypeError("collect_reference_gradients got a DeepSpeed engine: pass its .module with "
                        "grad_mode='autograd' (ZeRO-1/2; the engine's gradient hooks must not see the reference "
                        "gradients)")
    params = _params(model, names)
    if not params:
        raise ValueError("the model has no trainable parameters (requires_grad=True) to collect gradients for")
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    pad_id = getattr(tokenizer, "pad_token_id", None)
    pad_id = 0 if pad_id is None else int(pad_id)

    # Validate and tokenize everything before any gradient is touched.
    examples: list[list] = []
    encoded: list[Optional[list[list[_SEQ]]]] = []
    for j, ds in enumerate(datasets):
        ex = _first(ds, num_samples)
        if not ex:
            raise ValueError(f"reference dataset {j} is empty")
        examples.append(ex)
        if loss_fn is None:
            encoded.append([encode_reference_example(e, tokenizer, max_length,
                                                     where=f"reference dataset {j}, example {i}")
                            for i, e in enumerate(ex)])
        else:
            encoded.append(None)

    all_params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.grad for p in all_params]
    wanted = {id(p) for _, p in params}
    was_training = model.training
    pause = projector.paused() if projector is not None else contextlib.nullcontext()
    info = CollectInfo()
    out: list[dict[str, Tensor]] = []
    bar = _progress(sum(len(e) for e in examples), progress, "ogpsa reference gradients")
    t_start = time.perf_counter()
    try:
        with pause:
            if eval_mode:
                model.eval()
            for j, ex in enumerate(examples):
                t0 = time.perf_counter()
                for p in (all_params if grad_mode == "backward" else ()):
                    p.grad = None
                acc: dict[int, Tensor] = {}
                total = len(ex)
                num_batches = -(-total // batch_size)
                dinfo = DatasetInfo(num_examples=total)
                loss_sum = 0.0
                if loss_fn is None and averaging == "example":
                    # sorted by length before batching: far less padding (real text: 44 % -> 6 % of the
                    # tokens), and exact, since example averaging does not depend on the batches.
                    # "batch" averaging keeps the original order: its result depends on the batches.
                    order = sorted(range(total), key=lambda i: max(len(ids) for ids, _ in encoded[j][i]))
                    ex = [ex[i] for i in order]
                    encoded[j] = [encoded[j][i] for i in order]
                for start in range(0, total, batch_size):
                    chunk = ex[start:start + batch_size]
                    if loss_fn is None:
                        seq_lists = encoded[j][start:start + batch_size]
                        flat = [s for lst in seq_lists for s in lst]
                        sums, counts = lm_token_loss_sums(model, flat, pad_id, dev)
                        weights = _sequence_weights(seq_lists, counts, averaging, total, num_batches)
                        loss = (sums * weights.to(sums.device)).sum()
                        dinfo.num_sequences += len(flat)
                        dinfo.num_loss_tokens += int(counts.sum())
                    else:
                        mean = loss_fn(model, list(chunk))
                        if not isinstance(mean, Tensor) or mean.numel() != 1:
                            raise TypeError("loss_fn(model, examples) must return a scalar tensor (the mean loss)")
                        weight = 1.0 / num_batches if averaging == "batch" else len(chunk) / total
                        loss = mean.reshape(()) * weight
                    loss_sum += float(loss.detach())
                    if grad_mode == "autograd":
                        # No AccumulateGrad node runs, so no post-accumulate hook (DeepSpeed's
                        # reduce-into-partition) fires and .grad is never written.
                        got = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
                        for (_, p), g in zip(params, got):
                            if g is None:
                                continue
                            if id(p) in acc:
                                acc[id(p)].add_(g.float())
                            else:  # a private copy: g may be an expanded or shared view
                                acc[id(p)] = g.detach().to(torch.float32, copy=True)
                        if bar is not None:
                            bar.update(len(chunk))
                        continue
                    loss.backward()
                    for _, p in params:
                        g = p.grad
                        if g is None:
                            continue
                        if g.dtype == torch.float32:
                            # fp32 .grad already holds the running sum (autograd accumulates into it)
                            acc[id(p)] = g
                        else:
                            if id(p) in acc:
                                acc[id(p)].add_(g.float())
                            else:
                                acc[id(p)] = g.float()
                            p.grad = None
                    for p in all_params:  # parameters outside `names` must not accumulate
                        if id(p) not in wanted:
                            p.grad = None
                    if bar is not None:
                        bar.update(len(chunk))
                grads = {n: acc[id(p)].detach() for n, p in params if id(p) in acc}
                for p in (all_params if grad_mode == "backward" else ()):
                    p.grad = None
                dinfo.mean_loss = loss_sum
                dinfo.seconds = time.perf_counter() - t0
                if not math.isfinite(loss_sum):
                    warnings.warn(f"reference dataset {j} has a non-finite loss ({loss_sum}); its gradient "
                                  "gives no subspace direction", stacklevel=2)
                info.datasets.append(dinfo)
                out.append(grads)
    finally:
        if grad_mode == "backward":
            for p, g in zip(all_params, saved):
                p.grad = g
        if eval_mode:
            model.train(was_training)
        if bar is not None:
            bar.close()
    info.seconds = time.perf_counter() - t_start
    seen = {n for d in out for n in d}
    info.num_tensors = len(seen)
    info.num_elements = sum(p.numel() for n, p in params if n in seen)
    return out, info


def build_subspace(
    model: torch.nn.Module,
    datasets: Sequence[Any],
    config: Optional[OGPSAConfig] = None,
    *,
    num_samples: Optional[int] = None,
    return_info: bool = False,
    **kwargs: Any,
) -> Union[Subspace, tuple[Subspace, CollectInfo]]:
    """Collect reference gradients (:func:`collect_reference_gradients`) and build a :class:`Subspace`.

    ``num_samples`` defaults to ``config.num_reference_samples``, ``batch_size`` to
    ``config.reference_batch_size`` and ``averaging`` to ``config.reference_averaging``;
    other keyword arguments go to :func:`collect_reference_gradients`. ``datasets`` is a
    list of reference datasets: one list of texts is passed as ``[texts]``. Parameters whose
    reference gradients are all zero (e.g. LoRA ``A`` while ``B`` is still zero) get an
    empty basis: no direction, no projection. With ``return_info`` returns ``(subspace, info)``.
    """
    config = config or OGPSAConfig()
    n = config.num_reference_samples if num_samples is None else num_samples
    kwargs.setdefault("config", config)
    grads, info = collect_reference_gradients(model, datasets, num_samples=n, **kwargs)
    if not any(grads):
        raise ValueError("no trainable parameter received a reference gradient; check the loss and requires_grad")
    # Subspace.from_gradients keeps a parameter only if some reference dict has it.
    sub = Subspace.from_gradients(grads, config)
    return (sub, info) if return_info else sub
