"""Reference pools and chunked reference directions (``OGPSAConfig.chunks``).

The pool is the first ``num_reference_samples`` examples of every reference dataset,
interleaved (example 0 of set 0, example 0 of set 1, example 1 of set 0, ...), so a slice of it
mixes the sets. A rebuild takes ``chunks * chunk_samples`` consecutive examples of the pool
(rebuild r takes slice r with ``pool_walk="fresh"``, wrapping around; always slice 0 with
``"fixed"``), splits them into ``chunks`` chunks of ``chunk_samples`` consecutive examples,
and returns each chunk's mean-loss gradient: K directions from ONE forward and ONE backward
over all chunks (:mod:`ogpsa.chunkgrad`; ``batch_size`` examples per forward, sorted by
length so that little of each batch is padding).

A chunk's loss is the mean over its examples of each example's loss (the mean over its
sequences of their token-mean cross-entropy; the formats of :mod:`ogpsa.collect`). With
``loss_fn(model, examples)``: if it returns one loss per example (a vector whose entry i is
example i and whose forward has example i on row i of every activation), chunks share one
forward; if it returns the mean loss (a scalar), every chunk gets its own forward and backward.

Multi-process (``torch.distributed`` initialised, world size W > 1: DDP, DeepSpeed ZeRO-1/2):
every rank takes its own slice (slice ``r * W + rank``), computes its K chunk gradients, and
the K directions are averaged over ranks (one all_reduce per tensor), so every rank holds the
same basis and chunk g holds ``W * chunk_samples`` examples. FSDP2 (DTensor parameters) is not
supported in chunked mode and raises :class:`~ogpsa.errors.UnsupportedSetupError` (use
``preset="paper"`` / ``chunks=0`` there).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from .chunkgrad import ChunkGradients
from .config import DEFAULT_REFERENCE_BATCH_SIZE, OGPSAConfig
from .errors import UnsupportedSetupError
from .sequences import _SEQ, _check_datasets, _first, encode_reference_example, lm_token_loss_sums

logger = logging.getLogger("ogpsa")


class _ScalarLoss(Exception):
    """loss_fn returned a mean over a batch, not one loss per example."""


def reference_pool(datasets: Sequence[Any], per_dataset: int) -> list:
    """The first ``per_dataset`` examples of each dataset, interleaved round-robin."""
    _check_datasets(datasets)
    if not isinstance(per_dataset, int) or per_dataset < 1:
        raise ValueError(f"per_dataset={per_dataset!r} must be an integer >= 1")
    sets = [_first(ds, per_dataset) for ds in datasets]
    for j, s in enumerate(sets):
        if not s:
            raise ValueError(f"reference dataset {j} is empty")
    pool = []
    for i in range(max(len(s) for s in sets)):
        pool += [s[i] for s in sets if i < len(s)]
    return pool


def pool_slice(pool: Sequence[Any], index: int, count: int) -> list:
    """Slice ``index`` of ``count`` consecutive pool examples, wrapping around the pool."""
    if not pool:
        raise ValueError("the reference pool is empty")
    start = (index * count) % len(pool)
    return [pool[(start + i) % len(pool)] for i in range(count)]


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def chunk_plan(pool_size: int, config: OGPSAConfig) -> tuple[int, int]:
    """``(chunks, chunk_samples)`` of one rebuild: the config's, or fewer chunks when the pool
    holds fewer examples than one rebuild takes (no example twice in one rebuild: duplicated
    chunks would give exactly dependent directions)."""
    k, cs = config.chunks, config.chunk_samples
    if pool_size >= k * cs:
        return k, cs
    if pool_size >= cs:
        return pool_size // cs, cs
    return 1, max(1, pool_size)


def rebuild_examples(pool: Sequence[Any], rebuild: int, config: OGPSAConfig) -> list:
    """This rank's examples for rebuild number ``rebuild`` (0 = the one before step 1):
    ``chunks * chunk_samples`` of them (fewer for a small pool, see :func:`chunk_plan`)."""
    k, cs = chunk_plan(len(pool), config)
    rank, world = _world()
    index = rebuild if config.pool_walk == "fresh" else 0
    return pool_slice(pool, index * world + rank, k * cs)


def collect_chunk_gradients(
    model: torch.nn.Module,
    examples: Sequence[Any],
    num_chunks: int,
    *,
    loss_fn: Optional[Callable[[torch.nn.Module, list], Tensor]] = None,
    tokenizer: Any = None,
    batch_size: Optional[int] = None,
    max_length: Optional[int] = 1024,
    names: Optional[Sequence[str]] = None,
    projector: Any = None,
    eval_mode: bool = True,
    device: Union[str, torch.device, None] = None,
    sync: bool = True,
) -> tuple[list[dict[str, Tensor]], dict[str, Any]]:
    """K = ``num_chunks`` chunk-mean gradients of ``examples`` (split into K chunks of
    consecutive examples; ``len(examples)`` must be a multiple of K) as ``{name: float32
    tensor}`` dicts, and an info dict (examples, loss tokens, seconds, backward passes).

    The model's ``.grad`` tensors are neither read nor written; an attached projector is
    paused. ``sync``: average over ranks when ``torch.distributed`` runs (see the module docs).
    Memory: the K gradients are K x the trainable parameters in float32 (``info["rows"]`` holds
    them as ``(name, shape, [K, N] rows)``, the same storage as the dicts).
    """
    if not isinstance(num_chunks, int) or num_chunks < 1:
        raise ValueError(f"num_chunks={num_chunks!r} must be an integer >= 1")
    examples = list(examples)
    if not examples or len(examples) % num_chunks:
        raise ValueError(f"{len(examples)} reference examples do not split into {num_chunks} equal chunks")
    batch_size = batch_size or DEFAULT_REFERENCE_BATCH_SIZE
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be an integer >= 1")
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if names is not None:
        keep = set(names)
        params = [(n, p) for n, p in params if n in keep]
    if not params:
        raise ValueError("the model has no trainable parameters (requires_grad=True) to collect gradients for")
    from .distributed import is_dtensor

    if any(is_dtensor(p) for _, p in params):
        raise UnsupportedSetupError("chunked reference directions (OGPSAConfig.chunks >= 1) do not support FSDP2 "
                                    "(DTensor parameters) yet; use OGPSAConfig(preset='paper') or chunks=0")
    per_chunk = len(examples) // num_chunks
    chunk_of = [i // per_chunk for i in range(len(examples))]
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    pad_id = getattr(tokenizer, "pad_token_id", None)
    pad_id = 0 if pad_id is None else int(pad_id)
    seqs: Optional[list[list[_SEQ]]] = None
    if loss_fn is None:  # validate and tokenize everything before the model is touched
        seqs = []
        for i, e in enumerate(examples):
            seqs.append(encode_reference_example(e, tokenizer, max_length, where=f"reference example {i}"))
        # sorted by length: batches hold similar lengths (little padding); exact, chunks are index sets
        order = sorted(range(len(examples)), key=lambda i: max(len(ids) for ids, _ in seqs[i]))
    else:
        order = list(range(len(examples)))
    eng = ChunkGradients(model, params, num_chunks)
    info: dict[str, Any] = {"examples": len(examples), "chunks": num_chunks, "loss_tokens": 0, "mean_loss": 0.0}
    was_training = model.training
    pause = projector.paused() if projector is not None else contextlib.nullcontext()
    t0 = time.perf_counter()
    per_example_loss = True
    try:
        with pause:
            if eval_mode:
                model.eval()
            batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
            for batch in batches:
                if seqs is not None:
                    flat = [(s, i) for i in batch for s in seqs[i]]
                    rows = torch.tensor([chunk_of[i] for _, i in flat], dtype=torch.long)

                    def loss_text(flat=flat, rows=rows) -> Tensor:
                        sums, counts = lm_token_loss_sums(model, [s for s, _ in flat], pad_id, dev)
                        w = torch.tensor([1.0 / (len(seqs[i]) * per_chunk) for _, i in flat], device=sums.device)
                        info["loss_tokens"] += int(counts.sum())
                        per = sums.float() * w / counts.clamp_min(1).float()
                        return torch.zeros(num_chunks, device=sums.device).index_add(0, rows.to(sums.device), per)

                    losses = eng.accumulate(loss_text, rows=rows)
                    info["mean_loss"] += float(losses.sum()) / num_chunks
                    continue
                if per_example_loss:
                    rows = torch.tensor([chunk_of[i] for i in batch], dtype=torch.long)

                    def loss_rows(batch=batch, rows=rows) -> Tensor:
                        out = loss_fn(model, [examples[i] for i in batch])
                        if not isinstance(out, Tensor):
                            raise TypeError("loss_fn(model, examples) must return a tensor")
                        if out.numel() != len(batch):  # the mean over the batch (one example: the same)
                            raise _ScalarLoss()
                        per = out.reshape(-1).float() / per_chunk
                        return torch.zeros(num_chunks, device=per.device).index_add(0, rows.to(per.device), per)

                    try:
                        losses = eng.accumulate(loss_rows, rows=rows)
                        info["mean_loss"] += float(losses.sum()) / num_chunks
                        continue
                    except _ScalarLoss:
                        if batch is not batches[0]:
                            raise TypeError("loss_fn returned one loss per example, then a scalar") from None
                        per_example_loss = False
                        break
            if not per_example_loss:  # a mean loss: one forward and backward per chunk
                for g in range(num_chunks):
                    chunk = examples[g * per_chunk:(g + 1) * per_chunk]
                    loss = eng.accumulate(lambda chunk=chunk: loss_fn(model, list(chunk)).reshape(()), chunk=g)
                    info["mean_loss"] += float(loss) / num_chunks
    finally:
        if eval_mode:
            model.train(was_training)
    grads = eng.gradients()
    rank, world = _world()
    if sync and world > 1:
        for buf in eng.buffers.values():
            torch.distributed.all_reduce(buf)
            buf.div_(world)
    info.update(seconds=time.perf_counter() - t0, backward_passes=eng.num_backward,
                fallback=[n for n, _ in eng.fallback], world_size=world)
    if not math.isfinite(info["mean_loss"]):
        info["nonfinite"] = True
    # the same K gradients as stacked rows [K, N] per tensor (views of the buffers, no copy), for
    # Subspace.from_reference_rows: a full fine-tune holds K x its parameters once, not twice
    info["rows"] = [(n, tuple(p.shape), eng.buffers[id(p)].view(num_chunks, -1)) for n, p in params
                    if id(p) in eng.buffers]
    return grads, info





def build_chunked(og: Any, step: int) -> tuple[Any, dict[str, Any]]:
    """The subspace of one rebuild of an :class:`ogpsa.OGPSA` in chunked mode: the next slice of
    its reference pool (rebuild number = builds so far, so a resumed run continues the walk),
    K chunk directions, and with ``stream_window`` the updated streaming window."""
    from .streaming import StreamingBasis
    from .subspace import Subspace

    config: OGPSAConfig = og.config
    per_dataset = og.num_samples if og.num_samples is not None else config.num_reference_samples
    key = (id(og.reference_datasets), per_dataset)
    if getattr(og, "_pool_key", None) != key:
        og._pool = reference_pool(og.reference_datasets, per_dataset)
        og._pool_key = key
    rebuild = len(og.refresh_steps)
    examples = rebuild_examples(og._pool, rebuild, config)
    chunks, chunk_samples = chunk_plan(len(og._pool), config)
    if chunks * chunk_samples < config.chunks * config.chunk_samples and rebuild == 0:
        logger.warning("ogpsa: the reference pool holds %d examples, fewer than one rebuild takes (%d chunks x %d): "
                       "%d chunk direction(s) of %d example(s) each, every pool example once per rebuild",
                       len(og._pool), config.chunks, config.chunk_samples, chunks, chunk_samples)
    grads, info = collect_chunk_gradients(
        og.model, examples, chunks, loss_fn=og.loss_fn, tokenizer=og.tokenizer,
        batch_size=og.batch_size or config.reference_batch_size, projector=og.projector)
    if not any(grads):
        raise ValueError("no trainable parameter received a reference gradient; check the reference data")
    info["rebuild"] = rebuild
    rows = info.pop("rows")
    info = _collect_info(grads, info, og.model)
    if config.stream_window:
        stream = getattr(og, "_stream", None)
        if stream is None or stream.config is not config:
            stream = og._stream = StreamingBasis(config)
            current = og.subspace
            if current is not None:  # resumed (or given a subspace): the window starts from its rows
                seed_window(stream, current)
        stream.add(grads)
        return stream.subspace(), info
    if config.basis_device is None:  # build from the stacked buffers themselves (no K x parameters copy)
        names, shapes, refs = zip(*rows) if rows else ((), (), ())
        return Subspace.from_reference_rows(list(names), list(shapes), list(refs), config), info
    return Subspace.from_gradients(grads, config), info


def seed_window(stream: Any, subspace: Any) -> None:
    """Fill an empty streaming window with the rows of ``subspace`` (oldest first, at most the
    window): the window is not saved with a checkpoint, and its basis rows span the same space,
    so a resumed run keeps its rank until fresh chunk gradients push them out."""
    rows = max((int(u.shape[0]) for u in subspace.bases), default=0)
    seed = [{n: u[j].float().view(shape) for n, shape, u in zip(subspace.names, subspace.shapes, subspace.bases)
             if j < u.shape[0]} for j in range(rows)]
    seed = [d for d in seed if d][-stream.window:]
    if seed:
        stream.add(seed)


def _collect_info(grads: list[dict[str, Tensor]], info: dict[str, Any], model: torch.nn.Module) -> Any:
    from .collect import CollectInfo, DatasetInfo

    seen = {n for d in grads for n in d}
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    return CollectInfo(seconds=info["seconds"], num_tensors=len(seen), num_elements=sum(sizes.get(n, 0) for n in seen),
                       datasets=[DatasetInfo(num_examples=info["examples"], num_loss_tokens=info["loss_tokens"],
                                             mean_loss=info["mean_loss"], seconds=info["seconds"])],
                       chunked=info)


__all__ = ["reference_pool", "pool_slice", "rebuild_examples", "collect_chunk_gradients", "build_chunked"]
