"""Multi-tensor addressing: int64 pointer tables and per-chunk metadata.

One kernel launch covers every tensor of a group. Chunk ``c`` is a run of consecutive
elements of one tensor: ``chunk_tensor[c]`` says which, ``chunk_start[c]`` where in it
(``chunk_len[t]`` elements: ``CHUNK``, longer in very large tensors). A program handles
``rows`` consecutive chunks (1 on a GPU). Tensor ``t`` owns chunks ``seg[t]..seg[t+1]``
(contiguous, in order), which is what the deterministic segment sum reduces over. Tables
are built on the host once and copied to the device; :class:`TableCache` keeps them keyed
by (data_ptr, shape, dtype) of every tensor, so a training loop whose gradient buffers
stay put never rebuilds them.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

#: at most this many chunks per tensor: bigger tensors get longer chunks, which bounds the
#: per-tensor partial rows the segment sum walks through (and its serial length)
MAX_CHUNKS_PER_TENSOR = 4096
#: chunk lengths are multiples of this (the largest block size any config uses)
CHUNK_ALIGN = 4096


@dataclass(frozen=True)
class ChunkTable:
    """Device-resident addressing for one list of tensors (and optional companions)."""

    ptrs: tuple  # int64 [T] tensors of data pointers, one per addressed list
    numels: Tensor  # int64 [T]
    ks: Tensor  # int32 [T]: rows of each tensor's companion matrix (basis rank / refs m)
    chunk_len: Tensor  # int64 [T]: elements per chunk of each tensor
    chunk_tensor: Tensor  # int32 [C]
    chunk_start: Tensor  # int64 [C]
    seg: Tensor  # int32 [T + 1]: tensor t owns partial rows seg[t]..seg[t+1]
    seg_max: Tensor  # int32 [ceil(T / seg_tb)]: most chunks of any tensor in each block of seg_tb tensors
    seg_tb: int
    prog_len: Tensor  # int32 [P]: longest chunk among each program's `rows` chunks
    rows: int  # chunks handled side by side by one program of the projection kernels
    num_programs: int
    num_tensors: int
    num_chunks: int
    chunk: int


def chunk_lengths(numels: Sequence[int], chunk: int) -> list[int]:
    """Per-tensor chunk length: ``chunk``, or longer (a multiple of :data:`CHUNK_ALIGN`) so
    that no tensor has more than :data:`MAX_CHUNKS_PER_TENSOR` chunks."""
    out = []
    for n in numels:
        need = -(-int(n) // MAX_CHUNKS_PER_TENSOR)
        out.append(chunk if need <= chunk else -(-need // CHUNK_ALIGN) * CHUNK_ALIGN)
    return out


def build_table(ptr_lists: Sequence[Sequence[int]], numels: Sequence[int], ks: Sequence[int], chunk: int,
                device: torch.device, seg_tb: int = 16, rows: int = 1) -> ChunkTable:
    """Build a :class:`ChunkTable` (one host-to-device copy per array).

    ``seg_tb``: tensors per program of the segment sum; ``rows``: chunks per program of
    kernels that process several chunks side by side (``num_programs = ceil(C / rows)``).
    """
    t = len(numels)
    n = torch.tensor([int(x) for x in numels], dtype=torch.int64)
    clen = torch.tensor(chunk_lengths(numels, chunk), dtype=torch.int64)
    per = (n + clen - 1) // clen
    seg = torch.zeros(t + 1, dtype=torch.int64)
    seg[1:] = torch.cumsum(per, 0)
    total = int(seg[-1])
    if total >= 2**31:
        raise ValueError(f"{total} chunks exceed the 2**31 grid limit")
    chunk_tensor = torch.repeat_interleave(torch.arange(t, dtype=torch.int32), per)
    chunk_start = (torch.arange(total, dtype=torch.int64) - seg[:-1].repeat_interleave(per)) * clen.repeat_interleave(per)
    blocks = -(-t // seg_tb)
    padded = torch.zeros(blocks * seg_tb, dtype=torch.int64)
    padded[:t] = per
    seg_max = padded.view(blocks, seg_tb).amax(1)
    progs = max(1, -(-total // rows))
    extent = torch.zeros(progs * rows, dtype=torch.int64)
    extent[:total] = torch.minimum(clen.repeat_interleave(per), n.repeat_interleave(per) - chunk_start)
    prog_len = extent.view(progs, rows).amax(1)

    def dev(x: Tensor) -> Tensor:
        return x.to(device) if device.type != "cpu" else x

    return ChunkTable(
        ptrs=tuple(dev(torch.tensor([int(p) for p in ps], dtype=torch.int64)) for ps in ptr_lists),
        numels=dev(n),
        ks=dev(torch.tensor([int(k) for k in ks], dtype=torch.int32)),
        chunk_len=dev(clen),
        chunk_tensor=dev(chunk_tensor),
        chunk_start=dev(chunk_start),
        seg=dev(seg.to(torch.int32)),
        seg_max=dev(seg_max.to(torch.int32)),
        seg_tb=seg_tb,
        prog_len=dev(prog_len.to(torch.int32)),
        rows=rows,
        num_programs=-(-total // rows),
        num_tensors=t,
        num_chunks=total,
        chunk=chunk,
    )


def tensor_key(tensors: Sequence[Tensor]) -> tuple:
    """Identity of a tensor list for caching: (address, shape, dtype, device) of each."""
    return tuple((t.data_ptr(), tuple(t.shape), t.dtype, t.device) for t in tensors)


class TableCache:
    """A small LRU of :class:`ChunkTable` keyed by :func:`tensor_key` of the inputs.

    ``builds`` counts how many tables were built (tests check reuse and invalidation).
    """

    def __init__(self, capacity: int = 32) -> None:
        self.capacity = capacity
        self.builds = 0
        self.hits = 0
        self._entries: OrderedDict = OrderedDict()

    def get(self, key: tuple) -> Optional[ChunkTable]:
        table = self._entries.get(key)
        if table is not None:
            self._entries.move_to_end(key)
            self.hits += 1
        return table

    def put(self, key: tuple, table: ChunkTable) -> ChunkTable:
        self.builds += 1
        self._entries[key] = table
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return table

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
