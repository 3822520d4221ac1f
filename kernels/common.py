"""Shared pieces of the Triton kernels: dtype codes, the interpreter switch, the fixed
launch configurations, an optional launch observer for tests and the deterministic segment sum.

Launch configurations are a pure function of (op, padded k, dtypes), never timed: BLOCK and
num_warps set the summation order inside a chunk, so a timing-based autotuner could pick
different winners in different processes (or DDP ranks) and give different bits for the
same gradients. :func:`launch_config` is the single place that decides them.

Kernels turn int64 table entries into typed pointers inline (``addr.to(tl.pointer_type(..))``
under a constexpr ``if`` on the dtype code) rather than through a shared ``@triton.jit``
helper: the interpreter re-patches the language on every nested JIT call, which made a
300-tensor launch several times slower."""

from __future__ import annotations

import os
from typing import Any

import torch
import triton
import triton.language as tl

try:  # triton >= 2.2; the class the @triton.jit decorator returns under TRITON_INTERPRET=1
    from triton.runtime.interpreter import InterpretedFunction as _InterpretedFunction
except ImportError:  # pragma: no cover - very old triton
    _InterpretedFunction = ()  # type: ignore[assignment]

#: dtype -> integer code passed to the kernels as a constexpr (selects the pointer type)
KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

@triton.jit
def typed_ptr(addr, KIND: tl.constexpr):
    """An int64 address from a pointer table as a pointer of the element type named by
    KIND (the values of :data:`KIND`); KIND is constexpr, so the branch costs nothing."""
    if KIND == 0:
        return addr.to(tl.pointer_type(tl.float32))
    elif KIND == 1:
        return addr.to(tl.pointer_type(tl.bfloat16))
    else:
        return addr.to(tl.pointer_type(tl.float16))


@triton.jit
def _segment_sum_kernel(partials, seg, seg_max, out, T, W, TB: tl.constexpr, CB: tl.constexpr, WB: tl.constexpr):
    # out[t] = sum of partial rows seg[t]..seg[t+1], for TB tensors per program. Each tensor's
    # rows are added CB at a time in chunk order (float64), then one tree over CB whose shape
    # is fixed: bitwise reproducible, independent of how tensors are grouped into programs.
    blk = tl.program_id(0)
    ts = blk * TB + tl.arange(0, TB)
    t_ok = ts < T
    cols = tl.program_id(1) * WB + tl.arange(0, WB)
    col_ok = cols < W
    lo = tl.load(seg + ts, mask=t_ok, other=0).to(tl.int64)
    hi = tl.load(seg + ts + 1, mask=t_ok, other=0).to(tl.int64)
    longest = tl.load(seg_max + blk)
    lane = tl.arange(0, CB)
    acc = tl.zeros([TB, CB, WB], dtype=tl.float64)
    for c0 in range(0, longest, CB):
        r = lo[:, None] + c0 + lane[None, :]
        ok = r < hi[:, None]
        x = tl.load(partials + r[:, :, None] * W + cols[None, None, :], mask=ok[:, :, None] & col_ok[None, None, :],
                    other=0.0)
        acc += x.to(tl.float64)
    total = tl.sum(acc, axis=1)
    tl.store(out + ts[:, None].to(tl.int64) * W + cols[None, :], total.to(out.dtype.element_ty),
             mask=t_ok[:, None] & col_ok[None, :])


def _decorated_in_interpreter(fn: Any) -> bool:
    return bool(_InterpretedFunction) and isinstance(fn, _InterpretedFunction)


#: True when these kernels were decorated under TRITON_INTERPRET=1 (they then run on the
#: CPU through NumPy and only accept CPU tensors). Fixed at import time, like Triton itself.
INTERPRETED: bool = _decorated_in_interpreter(_segment_sum_kernel)
#: What the environment says now (differs from INTERPRETED if it changed after import).
INTERPRET_ENV: bool = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def launch(kernel: Any, grid: tuple, *args: Any, **kwargs: Any) -> None:
    """Launch ``kernel[grid](*args, **kwargs)``. Every kernel of this package goes through here.
    Nothing test-only runs on this path: the kernel object is looked up by the caller at call
    time (module globals), which lets tests substitute counting proxies."""
    kernel[grid](*args, **kwargs)


#: tensors per program of the segment sum (a table is built for this grouping)
SEG_TB = 64 if INTERPRETED else 4


def segment_sum(partials: torch.Tensor, table: Any, out: torch.Tensor) -> torch.Tensor:
    """``out[t] = partials[seg[t]:seg[t+1]].sum(0)`` for every tensor t of ``table``, in one
    launch, in a fixed order (float64 accumulation). ``partials``: float32 ``[C, W]``;
    ``out``: ``[T, W]`` (float32 or float64)."""
    w = partials.shape[1]
    wb = min(triton.next_power_of_2(w), 64 if INTERPRETED else 32)
    cb = 8 if INTERPRETED else 16
    grid = (triton.cdiv(table.num_tensors, table.seg_tb), triton.cdiv(w, wb))
    launch(_segment_sum_kernel, grid, partials, table.seg, table.seg_max, out, table.num_tensors, w,
           TB=table.seg_tb, CB=cb, WB=wb)
    return out


def pow2(n: int) -> int:
    return max(1, triton.next_power_of_2(int(n)))


#: inner block under the interpreter (its cost is per NumPy op, so wide blocks are cheap)
INTERPRET_BLOCK = 1024
#: float32 values of a [rows, BLOCK] register tile a config may hold (8 warps: 32 per thread)
_TILE_BUDGET = 8192


def launch_config(k_pad: int) -> dict:
    """``{"BLOCK": ..., "num_warps": ...}`` for a kernel whose program holds a ``[k_pad, BLOCK]``
    float32 tile: the widest power-of-two BLOCK in [256, 2048] within the register budget
    (k_pad 1-4: 2048, 8: 1024, 16: 512), 8 warps. A pure function of its argument (the
    dtypes change the load width, not the tile), identical in every process and on every
    rank; the interpreter uses :data:`INTERPRET_BLOCK` (its results are not compared with
    the GPU's bit for bit: a different BLOCK is a different summation order)."""
    if INTERPRETED:
        return {"BLOCK": INTERPRET_BLOCK}
    block = max(256, min(2048, _TILE_BUDGET // max(1, int(k_pad))))
    return {"BLOCK": block, "num_warps": 8}
