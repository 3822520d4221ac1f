"""The two bandwidth-bound passes of the projection, each one launch for all tensors.

Pass 1 (:func:`dots`): per tensor ``c = U g`` (k <= 16 rows) and ``||g||^2``. Each program
reduces one chunk in registers and writes a row of partials; a second small launch sums
each tensor's partials in a fixed order. No float atomics, so results are bitwise
reproducible for a given chunk size and block configuration.

Pass 2 (:func:`update_`): ``g <- scale * (kappa * g - U^T w)`` in place, in float32,
rounded once to the gradient dtype.

Everything arrives through int64 pointer tables (:mod:`ogpsa.kernels.tables`); the
gradient and basis dtypes are constexprs, so each (grad dtype, basis dtype, padded k)
compiles once.
"""

from __future__ import annotations

from typing import Sequence

import triton
import triton.language as tl
from torch import Tensor

from . import common
from .common import INTERPRETED, KIND, launch, typed_ptr
from .tables import ChunkTable

#: elements per chunk; very large tensors get longer chunks (see tables). Under the
#: interpreter chunks are short and ROWS of them are processed side by side, so one NumPy
#: op covers many small tensors (the interpreter's cost is per op, not per element).
CHUNK = 1024 if INTERPRETED else 16384
#: chunks per program (1 on a GPU: one chunk per program, its loop over BLOCK-sized steps)
ROWS = 32 if INTERPRETED else 1
#: fixed inner block under the interpreter
INTERPRET_BLOCK = 1024


@triton.jit
def _chunks(g_ptrs, u_ptrs, numels, ks, chunk_len, chunk_tensor, chunk_start, C, ROWS: tl.constexpr,
            K_PAD: tl.constexpr, BLOCK: tl.constexpr, G_KIND: tl.constexpr, U_KIND: tl.constexpr):
    """What both passes need about the ROWS chunks of this program: the tensor id, the
    element range, the typed gradient/basis pointers (dtypes are constexpr kinds, so each
    combination compiles once) and the row offsets of the k_i basis rows."""
    pid = tl.program_id(0)
    item = pid * ROWS + tl.arange(0, ROWS)
    item_ok = item < C
    t = tl.load(chunk_tensor + item, mask=item_ok, other=0)
    start = tl.load(chunk_start + item, mask=item_ok, other=0)
    n = tl.load(numels + t)
    k = tl.load(ks + t)
    end = tl.where(item_ok, tl.minimum(start + tl.load(chunk_len + t), n), 0)
    g_addr = tl.load(g_ptrs + t)
    u_addr = tl.load(u_ptrs + t)
    g = typed_ptr(g_addr, G_KIND)
    u = typed_ptr(u_addr, U_KIND)
    rows = tl.arange(0, K_PAD)
    cols = tl.arange(0, BLOCK)
    row_ok = rows[None, :] < k[:, None]
    u_row = rows[None, :, None] * n[:, None, None]
    return pid, item, item_ok, t, start, end, g, u, rows, cols, row_ok, u_row


@triton.jit
def _dots_kernel(g_ptrs, u_ptrs, numels, ks, chunk_len, chunk_tensor, chunk_start, prog_len, partials, C, W,
                 ROWS: tl.constexpr, K_PAD: tl.constexpr, BLOCK: tl.constexpr,
                 G_KIND: tl.constexpr, U_KIND: tl.constexpr):
    pid, item, item_ok, t, start, end, g, u, rows, cols, row_ok, u_row = _chunks(
        g_ptrs, u_ptrs, numels, ks, chunk_len, chunk_tensor, chunk_start, C, ROWS, K_PAD, BLOCK, G_KIND, U_KIND)
    acc_c = tl.zeros([ROWS, K_PAD, BLOCK], dtype=tl.float32)
    acc_sq = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    for off in range(0, tl.load(prog_len + pid), BLOCK):
        idx = start[:, None] + off + cols[None, :]
        m = idx < end[:, None]
        x = tl.load(g[:, None] + idx, mask=m, other=0.0).to(tl.float32)
        acc_sq += x * x
        uu = tl.load(u[:, None, None] + (u_row + idx[:, None, :]), mask=row_ok[:, :, None] & m[:, None, :], other=0.0)
        acc_c += uu.to(tl.float32) * x[:, None, :]
    out = partials + item.to(tl.int64) * W
    tl.store(out[:, None] + rows[None, :], tl.sum(acc_c, axis=2), mask=item_ok[:, None] & (rows[None, :] < W - 1))
    tl.store(out + W - 1, tl.sum(acc_sq, axis=1), mask=item_ok)


@triton.jit
def _update_kernel(g_ptrs, u_ptrs, numels, ks, chunk_len, chunk_tensor, chunk_start, prog_len, weights, scale,
                   kappa, C, KW, ROWS: tl.constexpr, K_PAD: tl.constexpr, BLOCK: tl.constexpr,
                   G_KIND: tl.constexpr, U_KIND: tl.constexpr):
    pid, item, item_ok, t, start, end, g, u, rows, cols, row_ok, u_row = _chunks(
        g_ptrs, u_ptrs, numels, ks, chunk_len, chunk_tensor, chunk_start, C, ROWS, K_PAD, BLOCK, G_KIND, U_KIND)
    w = tl.load(weights + t.to(tl.int64)[:, None] * KW + rows[None, :], mask=row_ok, other=0.0).to(tl.float32)
    s = tl.load(scale + t).to(tl.float32)
    for off in range(0, tl.load(prog_len + pid), BLOCK):
        idx = start[:, None] + off + cols[None, :]
        m = idx < end[:, None]
        x = tl.load(g[:, None] + idx, mask=m, other=0.0).to(tl.float32)
        uu = tl.load(u[:, None, None] + (u_row + idx[:, None, :]), mask=row_ok[:, :, None] & m[:, None, :], other=0.0)
        y = (kappa * x - tl.sum(uu.to(tl.float32) * w[:, :, None], axis=1)) * s[:, None]
        tl.store(g[:, None] + idx, y.to(g.dtype.element_ty), mask=m)


def _configs() -> list:
    return [triton.Config({"BLOCK": b}, num_warps=w) for b in (256, 512, 1024, 2048) for w in (2, 4, 8)]


def _prune(configs, named_args, **kwargs):
    # a [K_PAD, BLOCK] float32 tile per program: keep it within a sane register budget
    k_pad = kwargs.get("K_PAD", named_args.get("K_PAD", 16)) * kwargs.get("ROWS", named_args.get("ROWS", 1))
    kept = [c for c in configs if k_pad * c.kwargs["BLOCK"] <= 8192]
    return kept or configs[:1]


_KEY = ["ROWS", "K_PAD", "G_KIND", "U_KIND"]
_dots_tuned = None if INTERPRETED else common.make_autotuned(_dots_kernel, _configs(), _KEY, _prune)
_update_tuned = None if INTERPRETED else common.make_autotuned(_update_kernel, _configs(), _KEY, _prune)
_update_tuned_keys: set = set()

#: element budget of the scratch copy used to autotune the in-place update on a GPU
TUNE_SCRATCH_ELEMENTS = 1 << 26


def dots(table: ChunkTable, grads: Sequence[Tensor], bases: Sequence[Tensor], k_max: int, out: Tensor,
         partials: Tensor) -> Tensor:
    """Pass 1 into ``out`` ``[T, k_max + 1]`` using scratch ``partials`` ``[C, k_max + 1]``."""
    w = k_max + 1
    meta = dict(ROWS=table.rows, K_PAD=common.pow2(k_max), G_KIND=KIND[grads[0].dtype], U_KIND=KIND[bases[0].dtype])
    args = (table.ptrs[0], table.ptrs[1], table.numels, table.ks, table.chunk_len, table.chunk_tensor,
            table.chunk_start, table.prog_len, partials, table.num_chunks, w)
    if INTERPRETED:
        launch(_dots_kernel, (table.num_programs,), *args, BLOCK=INTERPRET_BLOCK, **meta)
    else:
        launch(_dots_tuned, (table.num_programs,), *args, **meta)
    return common.segment_sum(partials, table, out)


def update_(table: ChunkTable, grads: Sequence[Tensor], bases: Sequence[Tensor], weights: Tensor, kappa: float,
            scale: Tensor, make_table=None) -> None:
    """Pass 2 in place. ``weights``: float32 ``[T, k_max]``; ``scale``: float32 ``[T]``.

    On a GPU the first call per (k, dtypes) autotunes the block size on *scratch copies*
    (of at most :data:`TUNE_SCRATCH_ELEMENTS` gradient elements), never on the real
    gradients: every benchmarked config would otherwise apply the update again.
    ``make_table(grads, bases)`` builds a table for the scratch list.
    """
    kw = weights.shape[1]
    meta = dict(ROWS=table.rows, K_PAD=common.pow2(kw), G_KIND=KIND[grads[0].dtype], U_KIND=KIND[bases[0].dtype])
    if INTERPRETED:
        launch(_update_kernel, (table.num_programs,), *_update_args(table, weights, scale, kappa, kw),
               BLOCK=INTERPRET_BLOCK, **meta)
        return
    key = (meta["ROWS"], meta["K_PAD"], meta["G_KIND"], meta["U_KIND"])
    if key not in _update_tuned_keys and make_table is not None:
        _tune_update_on_scratch(grads, bases, weights, kappa, scale, meta, make_table)
    _update_tuned_keys.add(key)
    launch(_update_tuned, (table.num_programs,), *_update_args(table, weights, scale, kappa, kw), **meta)


def _update_args(table: ChunkTable, weights: Tensor, scale: Tensor, kappa: float, kw: int) -> tuple:
    return (table.ptrs[0], table.ptrs[1], table.numels, table.ks, table.chunk_len, table.chunk_tensor,
            table.chunk_start, table.prog_len, weights, scale, float(kappa), table.num_chunks, kw)


def _tune_update_on_scratch(grads, bases, weights, kappa, scale, meta, make_table) -> None:
    count, total = 0, 0
    for g in grads:  # a prefix of the group, bounded in memory
        if count and total + g.numel() > TUNE_SCRATCH_ELEMENTS:
            break
        count += 1
        total += g.numel()
    scratch = [g.detach().clone() for g in grads[:count]]
    table = make_table(scratch, list(bases[:count]))
    # the autotuner caches the winner under the same key (K_PAD, kinds, arg dtypes) the real call uses
    launch(_update_tuned, (table.num_programs,), *_update_args(table, weights, scale, kappa, weights.shape[1]), **meta)
    del scratch  # the caching allocator orders the free after the tuning launches on this stream
