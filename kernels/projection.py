"""The bandwidth-bound passes of the projection, each one launch for all tensors.

Pass 1 (:func:`dots`): per tensor ``c = U g`` (k <= 16 rows) and ``||g||^2``. Each program
reduces one chunk in registers and writes a row of partials; a second small launch sums
each tensor's partials in a fixed order. No float atomics, and the launch configuration is
a fixed function of (padded k) (:func:`ogpsa.kernels.common.launch_config`), so results are
bitwise identical across runs, processes and ranks.

Pass 2 (:func:`update_`): ``g <- scale * (kappa * g - U^T w)`` in place, in float32,
rounded once to the gradient dtype.

Single pass (:func:`fused_small_`): one program per tensor of at most
:data:`SINGLE_PASS_MAX_NUMEL` elements loads g once (kept in registers), reads its k basis
rows for ``c = U g``, does the k x k step ``w = M^-1 c`` and the mode rule, and writes
``kappa g - U^T w`` once (the second read of the basis rows hits L1/L2: they were just
read by the same program).

Aligned fast path: when every gradient and basis row starts on 16 bytes (checked on the host
from ``data_ptr`` and the row length), the kernels are compiled with ``ALIGNED=True``:
alignment hints on the pointers and chunk starts, an unmasked main loop over whole blocks
and a masked tail, so the compiler issues 128-bit loads (``ld.global.v4``; checked on sm_90
PTX by tests/test_kernels_compiled.py). Otherwise every load is masked (any address works).

Everything arrives through int64 pointer tables (:mod:`ogpsa.kernels.tables`); the dtypes
are constexprs, so each (grad dtype, basis dtype, padded k, aligned) compiles once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import common
from .common import INTERPRETED, launch, launch_config
from .tables import ChunkTable

#: elements per chunk; very large tensors get longer chunks (see tables). Under the
#: interpreter chunks are short and ROWS of them are processed side by side, so one NumPy
#: op covers many small tensors (the interpreter's cost is per op, not per element).
CHUNK = 1024 if INTERPRETED else 16384
#: chunks per program (1 on a GPU: one chunk per program, its loop over BLOCK-sized steps)
ROWS = 32 if INTERPRETED else 1
#: tensors up to this many elements take the single-pass kernel (g stays in registers:
#: 8192 float32 over 8 warps is 32 registers per thread)
SINGLE_PASS_MAX_NUMEL = 8192
#: mode names -> the MODE constexpr of the single-pass kernel
MODE_CODE = {"orthogonal": 0, "conflict": 1, "plane": 2}


@triton.jit
def _chunk_items(chunk_tensor, chunk_start, chunk_len, numels, C, ROWS: tl.constexpr, ALIGNED: tl.constexpr,
                 U_VEC: tl.constexpr):
    """This program's ROWS chunks: (program id, chunk ids, valid, tensor ids, start, n, end).
    With ALIGNED: chunk starts are multiples of 16 elements and row lengths of U_VEC."""
    pid = tl.program_id(0)
    item = pid * ROWS + tl.arange(0, ROWS)
    item_ok = item < C
    t = tl.load(chunk_tensor + item, mask=item_ok, other=0)
    start = tl.load(chunk_start + item, mask=item_ok, other=0)
    n = tl.load(numels + t)
    if ALIGNED:
        # hints go on ops created in this function: Triton attaches them to the defining op,
        # and a value returned by a nested @jit call is defined by the call, dropped on inlining
        start = tl.multiple_of(start, 16)
        n = tl.multiple_of(n, U_VEC)
    end = tl.where(item_ok, tl.minimum(start + tl.load(chunk_len + t), n), 0)
    return pid, item, item_ok, t, start, n, end


@triton.jit
def _typed_rows(g_ptrs, u_ptrs, t, G_KIND: tl.constexpr, U_KIND: tl.constexpr, ALIGNED: tl.constexpr):
    """Typed gradient and basis pointers of tensors ``t``. The int64 -> pointer casts are
    inline (not :func:`typed_ptr`) so that the 16-byte hints of ALIGNED apply to the cast
    itself, which is what the alignment analysis follows."""
    g_addr = tl.load(g_ptrs + t)
    u_addr = tl.load(u_ptrs + t)
    if G_KIND == 0:
        g = g_addr.to(tl.pointer_type(tl.float32))
    elif G_KIND == 1:
        g = g_addr.to(tl.pointer_type(tl.bfloat16))
    else:
        g = g_addr.to(tl.pointer_type(tl.float16))
    if U_KIND == 0:
        u = u_addr.to(tl.pointer_type(tl.float32))
    else:
        u = u_addr.to(tl.pointer_type(tl.bfloat16))
    if ALIGNED:
        g = tl.multiple_of(g, 16)
        u = tl.multiple_of(u, 16)
    return g, u


@triton.jit
def _basis_rows(ks, t, n, K_PAD: tl.constexpr):
    """Row ids ``[K_PAD]``, which rows exist ``[ROWS, K_PAD]`` and their element offsets."""
    rows = tl.arange(0, K_PAD)
    row_ok = rows[None, :] < tl.load(ks + t)[:, None]
    u_row = rows[None, :, None] * n[:, None, None]
    return rows, row_ok, u_row


@triton.jit
def _full_blocks(start, end, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """Elements every chunk of this program has in whole blocks (the unmasked main loop);
    0 without ALIGNED, so everything runs through the masked loop."""
    if ALIGNED:
        return tl.min(end - start, axis=0) // BLOCK * BLOCK
    else:
        return 0


@triton.jit
def _load_block(g, u, u_row, row_ok, idx, end, MASKED: tl.constexpr):
    """One block of gradient values ``[ROWS, BLOCK]`` and basis values ``[ROWS, K_PAD, BLOCK]``
    (float32). Unmasked along the elements in the main loop, where the vector width is free."""
    if MASKED:
        m = idx < end[:, None]
        x = tl.load(g[:, None] + idx, mask=m, other=0.0).to(tl.float32)
        uu = tl.load(u[:, None, None] + (u_row + idx[:, None, :]), mask=row_ok[:, :, None] & m[:, None, :], other=0.0)
    else:
        x = tl.load(g[:, None] + idx).to(tl.float32)
        uu = tl.load(u[:, None, None] + (u_row + idx[:, None, :]), mask=row_ok[:, :, None], other=0.0)
    return x, uu.to(tl.float32)


# sizes and counts are not specialised (Triton would compile again for a value of 1 or a
# multiple of 16): one compile per constexpr set, which keeps a cold GPU run short
@triton.jit(do_not_specialize=["C", "W"])
def _dots_kernel(g_ptrs, u_ptrs, numels, ks, chunk_len, chunk_tensor, chunk_start, prog_len, partials, C, W,
                 ROWS: tl.constexpr, K_PAD: tl.constexpr, BLOCK: tl.constexpr, G_KIND: tl.constexpr,
                 U_KIND: tl.constexpr, ALIGNED: tl.constexpr, U_VEC: tl.constexpr):
    pid, item, item_ok, t, start, n, end = _chunk_items(chunk_tensor, chunk_start, chunk_len, numels, C, ROWS,
                                                        ALIGNED, U_VEC)
    g, u = _typed_rows(g_ptrs, u_ptrs, t, G_KIND, U_KIND, ALIGNED)
    rows, row_ok, u_row = _basis_rows(ks, t, n, K_PAD)
    cols = tl.arange(0, BLOCK)
    acc_c = tl.zeros([ROWS, K_PAD, BLOCK], dtype=tl.float32)
    acc_sq = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    full = _full_blocks(start, end, ALIGNED, BLOCK)
    for off in tl.range(0, full, BLOCK):
        x, uu = _load_block(g, u, u_row, row_ok, start[:, None] + off + cols[None, :], end, False)
        acc_sq += x * x
        acc_c += uu * x[:, None, :]
    for off in tl.range(full, tl.load(prog_len + pid), BLOCK):
        x, uu = _load_block(g, u, u_row, row_ok, start[:, None] + off + cols[None, :], end, True)
        acc_sq += x * x
        acc_c += uu * x[:, None, :]
    out = partials + item.to(tl.int64) * W
    tl.store(out[:, None] + rows[None, :], tl.sum(acc_c, axis=2), mask=item_ok[:, None] & (rows[None, :] < W - 1))
    tl.store(out + W - 1, tl.sum(acc_sq, axis=1), mask=item_ok)


@triton.jit(do_not_specialize=["kappa", "C", "KW"])
def _update_kernel(g_ptrs, u_ptrs, numels, ks, chunk_len, chunk_tensor, chunk_start, prog_len, weights, scale,
                   kappa, C, KW, ROWS: tl.constexpr, K_PAD: tl.constexpr, BLOCK: tl.constexpr,
                   G_KIND: tl.constexpr, U_KIND: tl.constexpr, ALIGNED: tl.constexpr, U_VEC: tl.constexpr):
    pid, item, item_ok, t, start, n, end = _chunk_items(chunk_tensor, chunk_start, chunk_len, numels, C, ROWS,
                                                        ALIGNED, U_VEC)
    g, u = _typed_rows(g_ptrs, u_ptrs, t, G_KIND, U_KIND, ALIGNED)
    rows, row_ok, u_row = _basis_rows(ks, t, n, K_PAD)
    cols = tl.arange(0, BLOCK)
    w = tl.load(weights + t.to(tl.int64)[:, None] * KW + rows[None, :], mask=row_ok, other=0.0).to(tl.float32)
    s = tl.load(scale + t).to(tl.float32)
    full = _full_blocks(start, end, ALIGNED, BLOCK)
    for off in tl.range(0, full, BLOCK):
        idx = start[:, None] + off + cols[None, :]
        x, uu = _load_block(g, u, u_row, row_ok, idx, end, False)
        y = (kappa * x - tl.sum(uu * w[:, :, None], axis=1)) * s[:, None]
        tl.store(g[:, None] + idx, y.to(g.dtype.element_ty))
    for off in tl.range(full, tl.load(prog_len + pid), BLOCK):
        idx = start[:, None] + off + cols[None, :]
        x, uu = _load_block(g, u, u_row, row_ok, idx, end, True)
        y = (kappa * x - tl.sum(uu * w[:, :, None], axis=1)) * s[:, None]
        tl.store(g[:, None] + idx, y.to(g.dtype.element_ty), mask=idx < end[:, None])


@triton.jit(do_not_specialize=["aligned_scale", "W", "KM", "MODE"])
def _fused_small_kernel(g_ptrs, u_ptrs, numels, ks, small_ids, gram_inv, out, aligned_scale, W, KM, MODE,
                        K_PAD: tl.constexpr, BLOCK_N: tl.constexpr, G_KIND: tl.constexpr,
                        U_KIND: tl.constexpr, ALIGNED: tl.constexpr, U_VEC: tl.constexpr):
    # one program per small tensor; g is read once into registers and written once
    t = tl.load(small_ids + tl.program_id(0))
    n = tl.load(numels + t)
    if ALIGNED:
        n = tl.multiple_of(n, U_VEC)
    k = tl.load(ks + t)
    g, u = _typed_rows(g_ptrs, u_ptrs, t, G_KIND, U_KIND, ALIGNED)
    cols = tl.arange(0, BLOCK_N)
    m = cols < n
    x = tl.load(g + cols, mask=m, other=0.0).to(tl.float32)
    sq = tl.sum(x * x, axis=0)
    rows = tl.arange(0, K_PAD)
    c = tl.zeros([K_PAD], dtype=tl.float32)
    for j in range(0, k):
        uj = tl.load(u + j * n + cols, mask=m, other=0.0).to(tl.float32)
        c = tl.where(rows == j, tl.sum(uj * x, axis=0), c)
    # the k x k step of ogpsa.ops: w = M^-1 c, then the mode rule (float32; M^-1 may be float64)
    gi_ok = (rows[:, None] < KM) & (rows[None, :] < KM)
    gi = tl.load(gram_inv + t.to(tl.int64) * KM * KM + rows[:, None] * KM + rows[None, :], mask=gi_ok, other=0.0)
    w = tl.sum(gi.to(tl.float32) * c[None, :], axis=1)
    # MODE is a runtime value (one compile for all three modes): 0 orthogonal, 1 conflict, 2 plane
    w = tl.where((MODE == 1) & (w >= 0), (1.0 - aligned_scale) * w, w)
    w = tl.where(MODE == 2, -w, w)
    y = tl.where(MODE == 2, 0.0, x)
    for j in range(0, k):
        uj = tl.load(u + j * n + cols, mask=m, other=0.0).to(tl.float32)
        y -= tl.sum(tl.where(rows == j, w, 0.0), axis=0) * uj
    tl.store(g + cols, y.to(g.dtype.element_ty), mask=m)
    row = out + t.to(tl.int64) * W
    tl.store(row + rows, c, mask=rows < W - 1)
    tl.store(row + W - 1, sq)


def _meta(table: ChunkTable, k_pad: int, g_dtype, u_dtype, aligned: bool) -> dict:
    return dict(ROWS=table.rows, K_PAD=k_pad, G_KIND=common.KIND[g_dtype], U_KIND=common.KIND[u_dtype],
                ALIGNED=bool(aligned), U_VEC=16 // (4 if u_dtype == torch.float32 else 2), **launch_config(k_pad))


def dots(table: ChunkTable, g_ptrs: Tensor, g_dtype, u_dtype, aligned: bool, k_max: int, out: Tensor,
         partials: Tensor) -> Tensor:
    """Pass 1 into ``out`` ``[T, k_max + 1]`` using scratch ``partials`` ``[C, k_max + 1]``.
    ``g_ptrs``: this step's gradient pointers; ``table``: the cached basis-side table."""
    w = k_max + 1
    args = (g_ptrs, table.ptrs[0], table.numels, table.ks, table.chunk_len, table.chunk_tensor,
            table.chunk_start, table.prog_len, partials, table.num_chunks, w)
    launch(_dots_kernel, (table.num_programs,), *args, **_meta(table, common.pow2(k_max), g_dtype, u_dtype, aligned))
    return common.segment_sum(partials, table, out)


def update_(table: ChunkTable, g_ptrs: Tensor, g_dtype, u_dtype, aligned: bool, weights: Tensor, kappa: float,
            scale: Tensor) -> None:
    """Pass 2 in place. ``weights``: float32 ``[T, k_max]``; ``scale``: float32 ``[T]``."""
    kw = weights.shape[1]
    args = (g_ptrs, table.ptrs[0], table.numels, table.ks, table.chunk_len, table.chunk_tensor,
            table.chunk_start, table.prog_len, weights, scale, float(kappa), table.num_chunks, kw)
    launch(_update_kernel, (table.num_programs,), *args, **_meta(table, common.pow2(kw), g_dtype, u_dtype, aligned))


def fused_small_(table: ChunkTable, g_ptrs: Tensor, small_ids: Tensor, block_n: int, g_dtype, u_dtype,
                 aligned: bool, gram_inv: Tensor, mode: str, aligned_scale: float, out: Tensor) -> None:
    """Single pass over the tensors ``small_ids`` (int64, each of at most ``block_n`` elements):
    projects them in place and writes their rows ``[c, ||g||^2]`` of ``out`` (pre-update values)."""
    km = gram_inv.shape[1]
    k_pad = common.pow2(km)
    meta = dict(K_PAD=k_pad, BLOCK_N=block_n, G_KIND=common.KIND[g_dtype],
                U_KIND=common.KIND[u_dtype], ALIGNED=bool(aligned),
                U_VEC=16 // (4 if u_dtype == torch.float32 else 2))
    if not INTERPRETED:
        meta["num_warps"] = 8 if block_n >= 2048 else 4
    launch(_fused_small_kernel, (small_ids.numel(),), g_ptrs, table.ptrs[0], table.numels, table.ks, small_ids,
           gram_inv, out, float(aligned_scale), out.shape[1], km, MODE_CODE[mode], **meta)
