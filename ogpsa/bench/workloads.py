"""Benchmark workloads: parameter-tensor shape lists (Llama-3.1-8B layers, LoRA, GPT-2-small,
a tiny smoke list) and seeded random gradients and bases for them."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

KS = (1, 2, 4, 8)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: the source checkout (benchmarks/, README.md) when ogpsa runs from one
REPO_ROOT = Path(__file__).resolve().parent.parent.parent



@dataclasses.dataclass
class Workload:
    """A list of parameter-tensor shapes. ``full_numel`` is the size of the model the list
    stands for when it was scaled down (results are then extrapolated per element)."""

    name: str
    description: str
    shapes: list[tuple[str, tuple[int, ...]]]
    full_numel: Optional[int] = None

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for _, s in self.shapes)

    @property
    def tensors(self) -> int:
        return len(self.shapes)


# Llama-3.1-8B: hidden 4096, 32 layers, 32 query / 8 key-value heads of 128, MLP 14336, vocab 128256
_LLAMA = dict(hidden=4096, kv=1024, mlp=14336, vocab=128256, layers=32)


def _llama_layer(i: int, hidden: int, kv: int, mlp: int) -> list[tuple[str, tuple[int, ...]]]:
    p = f"model.layers.{i}."
    return [
        (p + "self_attn.q_proj.weight", (hidden, hidden)),
        (p + "self_attn.k_proj.weight", (kv, hidden)),
        (p + "self_attn.v_proj.weight", (kv, hidden)),
        (p + "self_attn.o_proj.weight", (hidden, hidden)),
        (p + "mlp.gate_proj.weight", (mlp, hidden)),
        (p + "mlp.up_proj.weight", (mlp, hidden)),
        (p + "mlp.down_proj.weight", (hidden, mlp)),
        (p + "input_layernorm.weight", (hidden,)),
        (p + "post_attention_layernorm.weight", (hidden,)),
    ]


def llama8b_full_numel() -> int:
    h, L = _LLAMA["hidden"], _LLAMA["layers"]
    per_layer = sum(math.prod(s) for _, s in _llama_layer(0, h, _LLAMA["kv"], _LLAMA["mlp"]))
    return L * per_layer + 2 * _LLAMA["vocab"] * h + h  # + embed_tokens, lm_head, final norm


def llama8b_workload(layers: int) -> Workload:
    """``layers`` decoder layers of Llama-3.1-8B (no embedding / lm_head: the 2 x 525M-element
    tables would not fit next to a rank-8 basis; per element they cost the same as the
    big projections, so the per-element extrapolation to the full 8.03B covers them)."""
    h, kv, mlp = _LLAMA["hidden"], _LLAMA["kv"], _LLAMA["mlp"]
    shapes = [s for i in range(layers) for s in _llama_layer(i, h, kv, mlp)]
    return Workload("llama8b", f"Llama-3.1-8B shapes, {layers} of 32 decoder layers (extrapolated per element)",
                    shapes, full_numel=llama8b_full_numel())


def lora_workload(layers: int = 32, rank: int = 16) -> Workload:
    """LoRA r=16 on every linear of a 32-layer, 4096-wide Llama-3.1-8B: 14 tensors a layer."""
    h, kv, mlp = _LLAMA["hidden"], _LLAMA["kv"], _LLAMA["mlp"]
    linears = [("self_attn.q_proj", h, h), ("self_attn.k_proj", h, kv), ("self_attn.v_proj", h, kv),
               ("self_attn.o_proj", h, h), ("mlp.gate_proj", h, mlp), ("mlp.up_proj", h, mlp),
               ("mlp.down_proj", mlp, h)]
    shapes = []
    for i in range(layers):
        for name, fan_in, fan_out in linears:
            p = f"model.layers.{i}.{name}."
            shapes.append((p + "lora_A.weight", (rank, fan_in)))
            shapes.append((p + "lora_B.weight", (fan_out, rank)))
    return Workload("lora", f"LoRA r={rank} on every linear of a {layers}-layer 4096-wide Llama-3.1-8B", shapes)


def gpt2_125m_workload(layers: int = 12, hidden: int = 768, vocab: int = 50257, positions: int = 1024) -> Workload:
    """GPT-2-small shapes (124M parameters, 148 tensors, biases and norms included)."""
    shapes: list[tuple[str, tuple[int, ...]]] = [("wte", (vocab, hidden)), ("wpe", (positions, hidden))]
    for i in range(layers):
        p = f"h.{i}."
        shapes += [(p + "ln_1.weight", (hidden,)), (p + "ln_1.bias", (hidden,)),
                   (p + "attn.c_attn.weight", (hidden, 3 * hidden)), (p + "attn.c_attn.bias", (3 * hidden,)),
                   (p + "attn.c_proj.weight", (hidden, hidden)), (p + "attn.c_proj.bias", (hidden,)),
                   (p + "ln_2.weight", (hidden,)), (p + "ln_2.bias", (hidden,)),
                   (p + "mlp.c_fc.weight", (hidden, 4 * hidden)), (p + "mlp.c_fc.bias", (4 * hidden,)),
                   (p + "mlp.c_proj.weight", (4 * hidden, hidden)), (p + "mlp.c_proj.bias", (hidden,))]
    shapes += [("ln_f.weight", (hidden,)), ("ln_f.bias", (hidden,))]
    return Workload("125m", f"GPT-2-small shapes ({layers} layers, {hidden} wide)", shapes)


def tiny_workload() -> Workload:
    """A few odd-sized tensors, for smoke tests."""
    return Workload("tiny", "5 odd-sized tensors (smoke test)",
                    [("a", (33, 7)), ("b", (4097,)), ("c", (3, 5, 11)), ("d", (1000,)), ("e", (129, 65))])


def _fill_basis(u: Tensor, gen: torch.Generator, cpu_gen: torch.Generator) -> None:
    """Random rows, orthonormal exactly for small tensors and approximately for large ones.

    A float64 QR of a [N, k] matrix is cheap below ~65k elements; above, normalised Gaussian
    rows are used: their pairwise inner products are ~1/sqrt(N) (< 0.4% here). Every
    contender projects onto the row span through M = U U^T (or re-orthogonalises), so
    timing does not depend on exact orthonormality."""
    k, n = u.shape
    if n <= 65536:
        q, _ = torch.linalg.qr(torch.randn(n, k, generator=cpu_gen, dtype=torch.float64))
        u.copy_(q.T)
        return
    for j in range(k):  # one float32 row at a time: no k x N float32 temporary next to u
        row = torch.empty(n, dtype=torch.float32, device=u.device)
        row.normal_(generator=gen)
        row.div_(row.norm())
        u[j].copy_(row)


def make_tensors(workload: Workload, k: int, grad_dtype: torch.dtype, basis_dtype: torch.dtype,
                 device: torch.device, seed: int = 0) -> tuple[list[Tensor], list[Tensor]]:
    """Seeded random gradients (never zeros) and bases ``[min(k, N_i), N_i]`` for a workload,
    generated on the device (a CPU generator would take minutes for a GPU-sized list)."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    cpu_gen = gen if device.type == "cpu" else torch.Generator().manual_seed(seed)
    grads, bases = [], []
    for _, shape in workload.shapes:
        n = math.prod(shape)
        g = torch.empty(shape, dtype=torch.float32, device=device)
        g.normal_(generator=gen)
        grads.append(g.to(grad_dtype))
        del g
        u = torch.empty(min(k, n), n, dtype=basis_dtype, device=device)
        _fill_basis(u, gen, cpu_gen)
        bases.append(u)
    return grads, bases

