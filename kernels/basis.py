"""Basis building, one launch each for all tensors: Gram matrices ``R_i R_i^T`` of the m
reference gradients of every tensor, then ``U_i = A_i R_i``.

The Gram pass tiles the m rows into ``TM``-row tiles (``TM = min(16, next_pow2(m))``), so
for m <= 16 one launch reads each reference row exactly once; larger m launches one
program per (chunk, tile pair), still one launch. Partials per chunk are summed in a
fixed order (float64) by :func:`ogpsa.kernels.common.segment_sum`.
"""

from __future__ import annotations

from typing import Sequence

import triton
import triton.language as tl
from torch import Tensor

from . import common
from .common import INTERPRETED, KIND, launch, launch_config, typed_ptr
from .tables import ChunkTable

#: elements (per reference row) per chunk; very large tensors get longer chunks
CHUNK = 32768 if INTERPRETED else 16384


@triton.jit
def _gram_kernel(r_ptrs, numels, chunk_len, chunk_tensor, chunk_start, partials, m,
                 BLOCK: tl.constexpr, TM: tl.constexpr, R_KIND: tl.constexpr):
    pid = tl.program_id(0)
    ti = tl.program_id(1)
    tj = tl.program_id(2)
    t = tl.load(chunk_tensor + pid)
    start = tl.load(chunk_start + pid)
    n = tl.load(numels + t)
    r_addr = tl.load(r_ptrs + t)
    r = typed_ptr(r_addr, R_KIND)
    lane = tl.arange(0, TM)
    a_rows = ti * TM + lane
    a_ok = a_rows < m
    cols = tl.arange(0, BLOCK)
    acc = tl.zeros([TM, TM], dtype=tl.float32)
    end = tl.minimum(start + tl.load(chunk_len + t), n)
    for off in range(start, end, BLOCK):
        idx = off + cols
        msk = idx < end
        a = tl.load(r + a_rows[:, None].to(tl.int64) * n + idx[None, :], mask=a_ok[:, None] & msk[None, :],
                    other=0.0).to(tl.float32)
        for b in tl.static_range(TM):
            # row b of the j tile is re-read from cache (the i tile holds it when ti == tj)
            row_b = tj * TM + b
            rb = tl.load(r + row_b.to(tl.int64) * n + idx, mask=msk & (row_b < m), other=0.0).to(tl.float32)
            s = tl.sum(a * rb[None, :], axis=1)
            acc = tl.where(lane[None, :] == b, acc + s[:, None], acc)
    b_cols = tj * TM + lane
    out = partials + pid.to(tl.int64) * m * m + a_rows[:, None] * m + b_cols[None, :]
    tl.store(out, acc, mask=a_ok[:, None] & (b_cols < m)[None, :])


@triton.jit
def _combine_kernel(r_ptrs, o_ptrs, numels, ks, chunk_len, chunk_tensor, chunk_start, coef, m, KM,
                    K_PAD: tl.constexpr, BLOCK: tl.constexpr, R_KIND: tl.constexpr, O_KIND: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(chunk_tensor + pid)
    start = tl.load(chunk_start + pid)
    n = tl.load(numels + t)
    k = tl.load(ks + t)
    r_addr = tl.load(r_ptrs + t)
    o_addr = tl.load(o_ptrs + t)
    r = typed_ptr(r_addr, R_KIND)
    o = typed_ptr(o_addr, O_KIND)
    rows = tl.arange(0, K_PAD)
    row_ok = rows < k
    cols = tl.arange(0, BLOCK)
    a_base = coef + t.to(tl.int64) * KM + rows * m
    end = tl.minimum(start + tl.load(chunk_len + t), n)
    for off in range(start, end, BLOCK):
        idx = off + cols
        msk = idx < end
        acc = tl.zeros([K_PAD, BLOCK], dtype=tl.float32)
        for j in range(0, m):
            rj = tl.load(r + j * n + idx, mask=msk, other=0.0).to(tl.float32)
            aj = tl.load(a_base + j, mask=row_ok, other=0.0)
            acc += aj[:, None] * rj[None, :]
        tl.store(o + rows[:, None] * n + idx[None, :], acc.to(o.dtype.element_ty),
                 mask=row_ok[:, None] & msk[None, :])


def gram_tile(m: int) -> int:
    return min(16, common.pow2(m))


def gram(table: ChunkTable, refs: Sequence[Tensor], m: int, partials: Tensor, out: Tensor) -> Tensor:
    """``out[i] = R_i R_i^T`` (``out``: float64 ``[T, m, m]``; ``partials``: float32 ``[C, m*m]``)."""
    tm = gram_tile(m)
    tiles = triton.cdiv(m, tm)
    grid = (table.num_chunks, tiles, tiles)
    meta = dict(TM=tm, R_KIND=KIND[refs[0].dtype])
    args = (table.ptrs[0], table.numels, table.chunk_len, table.chunk_tensor, table.chunk_start, partials, m)
    launch(_gram_kernel, grid, *args, **meta, **launch_config(tm))
    common.segment_sum(partials, table, out.view(table.num_tensors, m * m))
    # each off-diagonal entry was reduced twice (tiles (i, j) and (j, i)); make it exactly symmetric
    return (out + out.transpose(1, 2)) * 0.5


def combine(table: ChunkTable, refs: Sequence[Tensor], coefficients: Tensor, outs: Sequence[Tensor]) -> None:
    """``outs[i][:k_i] = coefficients[i, :k_i] @ refs[i]`` (``coefficients``: float32 ``[T, k_max, m]``)."""
    k_max, m = coefficients.shape[1], coefficients.shape[2]
    meta = dict(K_PAD=common.pow2(k_max), R_KIND=KIND[refs[0].dtype], O_KIND=KIND[outs[0].dtype])
    args = (table.ptrs[0], table.ptrs[1], table.numels, table.ks, table.chunk_len, table.chunk_tensor,
            table.chunk_start, coefficients, m, k_max * m)
    launch(_combine_kernel, (table.num_chunks,), *args, **meta, **launch_config(meta["K_PAD"]))


__all__ = ["CHUNK", "combine", "gram", "gram_tile"]
