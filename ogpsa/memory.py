"""Basis memory per rank: the dry run behind ``ogpsa info --model`` and the trainers' start line.

A subspace stores, for every trainable tensor i with N_i elements, a basis of k_i = min(k, N_i)
rows (``scope="tensor"``): k_i * N_i elements of ``basis_dtype`` (float32: 4 B, bfloat16: 2 B),
plus a replicated k_i x k_i float32 matrix M_i = U_i U_i^T. Where the basis lives:

* ``replicated`` (single process, DDP): every rank holds every basis.
* ``fsdp2``: bases are sharded with their parameters, ``Shard(0)`` as ``fully_shard`` does:
  rank r holds rows [r c, min((r + 1) c, d0)) of a parameter with d0 rows, c = ceil(d0 / W)
  (``torch.chunk``; the last ranks may hold fewer rows, or none), times the row's elements.
* ``zero``: ZeRO-1/2 partitions: the trainable parameters flattened in order and cut into W
  equal parts of ceil(total / W) elements (DeepSpeed's alignment padding is not modelled); a
  rank holds the basis columns of the elements in its part.

"B per parameter per rank" = the basis bytes on a rank / the trainable parameters (of the whole
model, not of the rank): k * b_U for replicated bases, k * b_U / W when sharded evenly. The
report covers the largest rank (or ``rank=``) and all ranks' total. Nothing here allocates
parameter-sized memory: :func:`meta_model` builds a transformers model on the meta device
from its config (optionally with PEFT LoRA adapters), so a 7B model costs nothing.
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Optional, Sequence, Union

import torch

BYTES = {"float32": 4, "bfloat16": 2}
SHARDINGS = ("replicated", "fsdp2", "zero")
#: k when none is given: the largest rank the kernels handle (an upper bound for any preset)
DEFAULT_K = 16
logger = logging.getLogger("ogpsa")


@dataclass
class MemoryReport:
    """Basis memory of one subspace layout; bytes are exact integers."""

    model: str
    trainable: str  # "full fine-tune", "LoRA r=16 (q_proj, v_proj)", ...
    tensors: int
    params_model: int  # every parameter of the model
    params_trainable: int
    k: Union[int, str]  # the k asked for, or "per tensor" when taken from a subspace
    basis_dtype: str
    world_size: int
    sharding: str
    rank: int  # the rank reported (the largest one unless asked)
    rank_bytes: list[int] = field(default_factory=list)  # basis bytes held by each rank
    gram_bytes: int = 0  # the k x k float32 matrices, on every rank
    basis_elements: int = 0  # sum_i k_i N_i (unsharded)

    @property
    def total_bytes(self) -> int:
        return sum(self.rank_bytes)

    @property
    def bytes_on_rank(self) -> int:
        return self.rank_bytes[self.rank]

    @property
    def per_param_per_rank(self) -> float:
        """Basis bytes on the reported rank per trainable parameter of the model."""
        return self.bytes_on_rank / self.params_trainable if self.params_trainable else 0.0

    @property
    def per_param_unsharded(self) -> float:
        return self.basis_elements * BYTES[self.basis_dtype] / self.params_trainable if self.params_trainable else 0.0

    def line(self) -> str:
        """The one line the trainers log at start."""
        return (f"ogpsa basis memory: {self.bytes_on_rank:,} B ({_human(self.bytes_on_rank)}) on rank {self.rank} of "
                f"{self.world_size} "
                f"({self.sharding}) = {self.per_param_per_rank:.3f} B per trainable parameter per rank "
                f"({self.params_trainable:,} trainable in {self.tensors} tensors, k={self.k}, {self.basis_dtype}; "
                f"unsharded {self.per_param_unsharded:.2f} B per parameter, {_human(self.total_bytes)})")

    def text(self) -> str:
        """The multi-line report of ``ogpsa info --model``."""
        others = ""
        if self.world_size > 1:
            lo = min(self.rank_bytes)
            others = (f"\n  ranks: largest {max(self.rank_bytes) / 1e9:.3f} GB (rank "
                      f"{self.rank_bytes.index(max(self.rank_bytes))}), smallest {lo / 1e9:.3f} GB")
        return (f"basis memory (dry run, no weights loaded): {self.model}\n"
                f"  parameters: {self.params_model:,} in the model; trainable: {self.trainable}, "
                f"{self.params_trainable:,} in {self.tensors} tensors\n"
                f"  basis: k={self.k} rows per tensor (at most its size), {self.basis_dtype} "
                f"({BYTES[self.basis_dtype]} B per element); {self.sharding} over {self.world_size} rank(s)\n"
                f"  rank {self.rank}: {self.bytes_on_rank:,} B = {self.bytes_on_rank / 1e9:.3f} GB basis "
                f"(+ {self.gram_bytes:,} B of k x k matrices) = {self.per_param_per_rank:.3f} B per trainable "
                f"parameter per rank{others}\n"
                f"  all ranks: {self.total_bytes / 1e9:.3f} GB = {self.per_param_unsharded:.3f} B per trainable "
                f"parameter unsharded")

    def as_dict(self) -> dict:
        out = asdict(self)
        out.update(total_bytes=self.total_bytes, bytes_on_rank=self.bytes_on_rank,
                   per_param_per_rank=self.per_param_per_rank, per_param_unsharded=self.per_param_unsharded)
        return out


def _human(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3f} {unit}"
    return f"{n} B"


def _shape_numel(shape: Sequence[int]) -> int:
    return int(math.prod(int(s) for s in shape))


def basis_memory(shapes: Sequence[tuple[str, Sequence[int]]], *, k: Union[int, Mapping[str, int]] = DEFAULT_K,
                 basis_dtype: str = "float32", world_size: int = 1, rank: Optional[int] = None,
                 sharding: Optional[str] = None, model: str = "", trainable: str = "",
                 params_model: Optional[int] = None) -> MemoryReport:
    """Exact basis bytes per rank for trainable tensors ``shapes`` (``[(name, shape)]``, in
    parameter order). ``k``: rows per tensor (capped at each tensor's size), or a mapping
    name -> rows (an existing subspace's ranks). ``sharding`` defaults to ``fsdp2`` when
    ``world_size > 1``, else ``replicated``. ``rank``: the rank to report (default: the one
    holding the most)."""
    if basis_dtype not in BYTES:
        raise ValueError(f"basis_dtype={basis_dtype!r} is not one of {tuple(BYTES)} (the storage formats ogpsa has)")
    if int(world_size) < 1:
        raise ValueError(f"world_size={world_size!r} must be >= 1")
    world_size = int(world_size)
    sharding = sharding or ("fsdp2" if world_size > 1 else "replicated")
    if sharding not in SHARDINGS:
        raise ValueError(f"sharding={sharding!r} is not one of {SHARDINGS}")
    if rank is not None and not 0 <= int(rank) < world_size:
        raise ValueError(f"rank={rank!r} must be in [0, {world_size}) for world_size={world_size}")
    if not isinstance(k, Mapping) and not 1 <= int(k):
        raise ValueError(f"k={k!r} must be >= 1")
    b = BYTES[basis_dtype]
    per_rank = [0] * world_size
    grams = elements = total = 0
    flat_offset = 0
    flat_total = sum(_shape_numel(s) for _, s in shapes)
    part = -(-flat_total // world_size) if flat_total else 0
    for name, shape in shapes:
        n = _shape_numel(shape)
        ki = min(int(k.get(name, 0)) if isinstance(k, Mapping) else int(k), n)
        total += n
        elements += ki * n
        grams += 4 * ki * ki
        if sharding == "replicated" or world_size == 1:
            for r in range(world_size):
                per_rank[r] += ki * n * b
        elif sharding == "fsdp2":
            if len(shape) == 0:  # a 0-dim parameter is not sharded
                for r in range(world_size):
                    per_rank[r] += ki * n * b
                continue
            d0 = int(shape[0])
            row = n // d0 if d0 else 0
            chunk = -(-d0 // world_size) if d0 else 0
            for r in range(world_size):
                rows = max(0, min(chunk, d0 - r * chunk))
                per_rank[r] += ki * rows * row * b
        else:  # zero: flat equal partitions
            start, end = flat_offset, flat_offset + n
            for r in range(world_size):
                lo, hi = max(start, r * part), min(end, (r + 1) * part)
                if hi > lo:
                    per_rank[r] += ki * (hi - lo) * b
            flat_offset = end
    shown = int(rank) if rank is not None else per_rank.index(max(per_rank))
    return MemoryReport(model=model, trainable=trainable or "given tensors", tensors=len(shapes),
                        params_model=int(params_model if params_model is not None else total),
                        params_trainable=total, k="per tensor" if isinstance(k, Mapping) else int(k),
                        basis_dtype=basis_dtype, world_size=world_size, sharding=sharding, rank=shown,
                        rank_bytes=per_rank, gram_bytes=grams, basis_elements=elements)


def trainable_shapes(model: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """``[(name, global shape)]`` of the trainable parameters (shared ones once; DTensor
    parameters by their global shape)."""
    return [(n, tuple(p.shape)) for n, p in model.named_parameters() if p.requires_grad]


# ----------------------------------------------------------------------------------------
# The dry run: a transformers config on the meta device
# ----------------------------------------------------------------------------------------


def _config_path(path_or_config: Union[str, os.PathLike]) -> str:
    path = os.fspath(path_or_config)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--model {os.fspath(path_or_config)!r}: no such config (give a model directory "
                                f"holding config.json, or the path of a config.json)")
    return path


def meta_model(path_or_config: Union[str, os.PathLike]) -> torch.nn.Module:
    """A transformers causal LM built from a config on the meta device: shapes, no weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = _config_path(path_or_config)
    try:
        with open(path) as f:
            json.load(f)
    except ValueError as exc:
        raise ValueError(f"--model {path}: not a JSON config ({exc})") from exc
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _peft_config(lora_r: Optional[int], lora_targets: Optional[Sequence[str]], peft_config: Optional[str]):
    from peft import LoraConfig

    if peft_config is not None:
        path = os.fspath(peft_config)
        if os.path.isdir(path):
            path = os.path.join(path, "adapter_config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--peft-config {peft_config!r}: no adapter_config.json there")
        with open(path) as f:
            data = json.load(f)
        if str(data.get("peft_type", "LORA")).upper() != "LORA":
            raise ValueError(f"--peft-config {path}: peft_type {data.get('peft_type')!r}; only LoRA is supported")
        data = {k: v for k, v in data.items() if k not in ("peft_type", "base_model_name_or_path", "auto_mapping",
                                                                "revision", "task_type", "peft_version")}
        return LoraConfig(**data)
    targets = list(lora_targets) if lora_targets else None
    if targets == ["all-linear"]:
        targets = "all-linear"
    return LoraConfig(r=int(lora_r), target_modules=targets)


def dry_run(path_or_config: Union[str, os.PathLike], *, k: int = DEFAULT_K, basis_dtype: str = "float32",
            world_size: int = 1, rank: Optional[int] = None, sharding: Optional[str] = None,
            lora_r: Optional[int] = None, lora_targets: Optional[Sequence[str]] = None,
            peft_config: Optional[str] = None) -> MemoryReport:
    """The report of ``ogpsa info --model``: build the model on the meta device, add LoRA
    adapters (``lora_r`` / ``peft_config``) when asked, and count the trainable tensors'
    basis bytes per rank. Nothing parameter-sized is allocated."""
    if lora_r is not None and peft_config is not None:
        raise ValueError("give --lora-r or --peft-config, not both")
    if lora_r is not None and int(lora_r) < 1:
        raise ValueError(f"--lora-r {lora_r!r} must be >= 1")
    model = meta_model(path_or_config)
    params_model = sum(p.numel() for p in model.parameters())
    name = f"{_config_path(path_or_config)} ({type(model).__name__})"
    trainable = "full fine-tune"
    if lora_r is not None or peft_config is not None:
        from peft import get_peft_model

        cfg = _peft_config(lora_r, lora_targets, peft_config)
        with warnings.catch_warnings():  # transformers' deprecation notes from inside PEFT: not the user's business
            warnings.simplefilter("ignore", FutureWarning)
            model = get_peft_model(model, cfg)
        targets = cfg.target_modules
        shown = targets if isinstance(targets, str) else ", ".join(sorted(targets or []))
        trainable = f"LoRA r={cfg.r} ({shown})"
    return basis_memory(trainable_shapes(model), k=k, basis_dtype=basis_dtype, world_size=world_size, rank=rank,
                        sharding=sharding, model=name, trainable=trainable, params_model=params_model)


# ----------------------------------------------------------------------------------------
# The trainers' start line
# ----------------------------------------------------------------------------------------


def _layout(model: torch.nn.Module) -> tuple[int, int, str]:
    """(world size, rank, sharding) of a live model: FSDP2 when its parameters are DTensors,
    else replicated over the default process group (DDP) or a single process."""
    world, rank = 1, 0
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            world, rank = dist.get_world_size(), dist.get_rank()
    except Exception:  # a build without distributed support
        pass
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # older torch or no distributed support: nothing can be a DTensor
        DTensor = ()
    sharded = bool(DTensor) and any(isinstance(p, DTensor) for p in model.parameters())
    return world, rank, ("fsdp2" if sharded and world > 1 else "replicated")


def log_basis_memory(model: torch.nn.Module, subspace: Any, *, sharding: Optional[str] = None,
                     log: Optional[logging.Logger] = None) -> Optional[MemoryReport]:
    """Log :meth:`MemoryReport.line` for ``subspace`` (its ranks and basis dtype) on ``model``
    as it is laid out now (the same numbers as the dry run for the same k); returns the report.
    Never raises: a memory line must not stop a training run (a failure is logged instead)."""
    try:
        world, rank, detected = _layout(model)
        ranks = subspace.ranks()
        shapes = [(n, s) for n, s in trainable_shapes(model) if n in ranks]
        shapes += [(n, tuple(s)) for n, s in zip(subspace.names, subspace.shapes) if n not in dict(shapes)]
        report = basis_memory(shapes, k=ranks, basis_dtype=subspace.config.basis_dtype, world_size=world, rank=rank,
                              sharding=sharding or detected, model=type(model).__name__, trainable="tensors with a basis",
                              params_model=sum(p.numel() for p in model.parameters()))
    except Exception as exc:
        (log or logger).warning("ogpsa basis memory: not computed (%s: %s)", type(exc).__name__, exc)
        return None
    (log or logger).info(report.line())
    return report
