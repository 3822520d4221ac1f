"""Multi-tensor addressing: int64 pointer tables and per-chunk metadata.

One kernel launch covers every tensor of a group. Chunk ``c`` is a run of consecutive
elements of one tensor: ``chunk_tensor[c]`` says which, ``chunk_start[c]`` where in it
(``chunk_len[t]`` elements: ``CHUNK``, longer in very large tensors). A program handles
``rows`` consecutive chunks (1 on a GPU). Tensor ``t`` owns chunks ``seg[t]..seg[t+1]``
(contiguous, in order), which is what the deterministic segment sum reduces over.

Two kinds of table, because gradients move every step (``zero_grad(set_to_none=True)``
gives new addresses) while bases and shapes do not:

* :class:`ChunkTable` (:func:`build_table`): shapes, chunking and the *stable* pointers
  (basis rows, reference rows), built once and cached by the caller under a key of those
  stable tensors (:class:`TableCache`), never under gradient addresses.
* :func:`pointer_array`: the per-step gradient pointers, ``T`` int64 values.

Either way all integers go into ONE int64 host buffer (pinned on CUDA) and reach the device
in ONE ``non_blocking`` copy; the device buffer is the table's only allocation, so
:func:`keep_for_stream` can mark it in use by another stream with one ``record_stream``.
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
    """Device-resident addressing for one list of tensors (and optional companions).

    Every tensor field is a view of ``buffer`` (int64), so the table is one allocation."""

    buffer: Tensor  # int64: every array below, back to back
    ptrs: tuple  # int64 [T] views, one per addressed (stable) list
    numels: Tensor  # int64 [T]
    ks: Tensor  # int64 [T]: rows of each tensor's companion matrix (basis rank / refs m)
    chunk_len: Tensor  # int64 [T]: elements per chunk of each tensor
    chunk_tensor: Tensor  # int64 [C]
    chunk_start: Tensor  # int64 [C]
    seg: Tensor  # int64 [T + 1]: tensor t owns partial rows seg[t]..seg[t+1]
    seg_max: Tensor  # int64 [ceil(T / seg_tb)]: most chunks of any tensor in each block of seg_tb tensors
    seg_tb: int
    prog_len: Tensor  # int64 [P]: longest chunk among each program's `rows` chunks
    rows: int  # chunks handled side by side by one program of the projection kernels
    num_programs: int
    num_tensors: int
    num_chunks: int
    chunk: int
    aligned: bool = False  # set by the caller: every companion row starts on 16 bytes
    stream: Optional[int] = None  # CUDA stream id the buffer was allocated on (None on CPU)


def chunk_lengths(numels: Sequence[int], chunk: int) -> list[int]:
    """Per-tensor chunk length: ``chunk``, or longer (a multiple of :data:`CHUNK_ALIGN`) so
    that no tensor has more than :data:`MAX_CHUNKS_PER_TENSOR` chunks."""
    out = []
    for n in numels:
        need = -(-int(n) // MAX_CHUNKS_PER_TENSOR)
        out.append(chunk if need <= chunk else -(-need // CHUNK_ALIGN) * CHUNK_ALIGN)
    return out


def to_device(host: Tensor, device: torch.device) -> Tensor:
    """``host`` (int64, 1-D) on ``device`` in one copy: from pinned memory and non_blocking on
    CUDA (the caching host allocator keeps the pinned block until the copy has run)."""
    if device.type == "cpu":
        return host
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


def pointer_array(ptrs: Sequence[int], device: torch.device) -> Tensor:
    """The per-step gradient pointer table: int64 ``[T]`` on ``device`` (one copy; holds
    addresses only, so no gradient tensor is kept alive by it)."""
    return to_device(torch.tensor([int(p) for p in ptrs], dtype=torch.int64), device)


def keep_for_stream(table: ChunkTable) -> None:
    """Mark ``table``'s buffer as used by the current CUDA stream when that is not the stream
    it was allocated on, so evicting the table from a cache cannot hand its memory to
    another allocation while a kernel on this stream still reads it."""
    if table.stream is not None:
        current = torch.cuda.current_stream(table.buffer.device)
        if current.stream_id != table.stream:
            table.buffer.record_stream(current)


def build_table(ptr_lists: Sequence[Sequence[int]], numels: Sequence[int], ks: Sequence[int], chunk: int,
                device: torch.device, seg_tb: int = 16, rows: int = 1, aligned: bool = False) -> ChunkTable:
    """Build a :class:`ChunkTable`: all arrays in one int64 buffer, one host-to-device copy.

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
    chunk_tensor = torch.repeat_interleave(torch.arange(t, dtype=torch.int64), per)
    chunk_start = (torch.arange(total, dtype=torch.int64) - seg[:-1].repeat_interleave(per)) * clen.repeat_interleave(per)
    blocks = -(-t // seg_tb)
    padded = torch.zeros(blocks * seg_tb, dtype=torch.int64)
    padded[:t] = per
    seg_max = padded.view(blocks, seg_tb).amax(1)
    progs = max(1, -(-total // rows))
    extent = torch.zeros(progs * rows, dtype=torch.int64)
    extent[:total] = torch.minimum(clen.repeat_interleave(per), n.repeat_interleave(per) - chunk_start)
    prog_len = extent.view(progs, rows).amax(1)
    parts = [torch.tensor([int(p) for p in ps], dtype=torch.int64) for ps in ptr_lists]
    parts += [n, torch.tensor([int(k) for k in ks], dtype=torch.int64), clen, chunk_tensor, chunk_start, seg, seg_max,
              prog_len]
    device = torch.device(device)
    buffer = to_device(torch.cat(parts), device)
    views, offset = [], 0
    for p in parts:
        views.append(buffer[offset:offset + p.numel()])
        offset += p.numel()
    np_ = len(ptr_lists)
    stream = torch.cuda.current_stream(device).stream_id if device.type == "cuda" else None
    return ChunkTable(
        buffer=buffer,
        ptrs=tuple(views[:np_]),
        numels=views[np_],
        ks=views[np_ + 1],
        chunk_len=views[np_ + 2],
        chunk_tensor=views[np_ + 3],
        chunk_start=views[np_ + 4],
        seg=views[np_ + 5],
        seg_max=views[np_ + 6],
        seg_tb=seg_tb,
        prog_len=views[np_ + 7],
        rows=rows,
        num_programs=progs,
        num_tensors=t,
        num_chunks=total,
        chunk=chunk,
        aligned=aligned,
        stream=stream,
    )


def tensor_key(tensors: Sequence[Tensor]) -> tuple:
    """Identity of a tensor list for caching: (address, shape, dtype, device) of each. Use it
    for stable tensors (bases, reference rows), not for gradients, which move every step."""
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
