"""The ``triton`` backend: fused multi-tensor Triton kernels (:mod:`ogpsa.kernels`).

Each op is a constant number of kernel launches for a whole group of tensors, however
many tensors it holds: pass 1 (``dots``) and the Gram pass are two launches (the pass and
a fixed-order reduction of its per-chunk partials), pass 2 (``update_``) and ``combine``
one; ``fused_project_`` one for all small tensors plus the two passes for the large ones.

Tables: the basis side (shapes, chunking, basis pointers) is built once and cached under the
basis tensors' (data_ptr, shape, dtype), which stay put between refreshes; the gradient
pointers are gathered every call (``zero_grad(set_to_none=True)`` moves gradients every
step) into one int64 array, one pinned non_blocking copy on CUDA. No gradient is
referenced after a call returns, and the hot path never synchronises with the device.

Launch configurations are fixed per (padded k) (no timing-based autotuning), so results are
bitwise identical in every process and on every rank.

Where it runs: CUDA tensors when Triton and a GPU are present. CPU tensors only under
``TRITON_INTERPRET=1`` (set before Triton is first imported) and only when the backend is
asked for by name (``backend="triton"`` or ``OGPSA_BACKEND=triton``): the interpreter is
for testing, far slower than the ``cpu``/``torch`` backends.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch
import triton
from torch import Tensor

from ogpsa.kernels import basis as _basis
from ogpsa.kernels import common as _common
from ogpsa.kernels import projection as _projection
from ogpsa.kernels import tables as _tables
from ogpsa.kernels.tables import ChunkTable, TableCache, build_table, keep_for_stream, pointer_array, tensor_key

from .base import Backend

_GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_BASIS_DTYPES = (torch.float32, torch.bfloat16)

def _on_device(device: torch.device):
    # Triton launches on the *current* CUDA device, not the one the tables point into
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _aligned(tensors: Sequence[Tensor]) -> bool:
    """Every tensor starts on 16 bytes (so 128-bit loads are legal from its first element)."""
    return all(t.data_ptr() % 16 == 0 for t in tensors)


def _rows_aligned(bases: Sequence[Tensor]) -> bool:
    """Every basis row starts on 16 bytes (base address and row length in bytes), and every row
    length is a whole number of 16-byte vectors even for tensors without basis rows: the
    ALIGNED kernels tell the compiler so about the length, which also bounds the masked tail of
    the gradient (a false hint there could widen a tail load past the tensor's end)."""
    return all((u.shape[1] * u.element_size()) % 16 == 0 and (u.shape[0] == 0 or u.data_ptr() % 16 == 0)
               for u in bases)


def _new(shape: tuple, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Every buffer this backend allocates (looked up at call time, so a test can substitute an
    allocator that fills with NaN to prove each output element is written by a kernel)."""
    return torch.empty(shape, dtype=dtype, device=device)


class TritonBackend(Backend):
    """Multi-tensor Triton kernels; see the module docstring for where they run."""

    name = "triton"
    #: tensors of at most this many elements take the single-pass kernel in ``fused_project_``
    single_pass_max_numel: int = _projection.SINGLE_PASS_MAX_NUMEL

    def __init__(self) -> None:
        self.tables = TableCache()
        # one zeroed word per device: the (never dereferenced, masked) basis address of a
        # tensor without basis rows; 16-byte aligned like every allocation
        self._nowhere: dict = {}

    # -- capability -------------------------------------------------------------------

    def availability(self) -> tuple[bool, str]:
        version = f"triton {triton.__version__}"
        if _common.INTERPRETED:
            return True, (f"{version}, interpreter mode (CPU tensors, used only when forced with backend='triton' "
                          f"or OGPSA_BACKEND=triton; for testing, not speed)")
        if not torch.cuda.is_available():
            hint = (" (TRITON_INTERPRET=1 was set after Triton was imported, so it has no effect)"
                    if _common.INTERPRET_ENV or _interpret_env_now() else
                    " (set TRITON_INTERPRET=1 before Triton is imported to run the kernels on the CPU for testing)")
            return False, f"{version} is installed but no CUDA GPU is visible{hint}"
        return True, f"{version} on {torch.cuda.get_device_name()}"

    def supports(self, device: torch.device, grad_dtype: torch.dtype, basis_dtype: torch.dtype, forced: bool) -> bool:
        if grad_dtype not in _GRAD_DTYPES or basis_dtype not in _BASIS_DTYPES:
            return False
        device = torch.device(device)
        if device.type == "cuda":
            # interpreted kernels dereference table addresses on the host: device pointers would fault
            return not _common.INTERPRETED and torch.cuda.is_available()
        if device.type == "cpu":
            return bool(forced) and _common.INTERPRETED
        return False

    # -- tables ---------------------------------------------------------------------

    def _basis_table(self, grads: Sequence[Tensor], bases: Sequence[Tensor]) -> ChunkTable:
        """The cached basis side: keyed by the bases (stable between refreshes) and the
        gradient dtype, never by gradient addresses. Shapes come from the bases."""
        key = ("project", _projection.CHUNK, _projection.ROWS, grads[0].dtype, tensor_key(bases))
        table = self.tables.get(key)
        if table is None:
            device = grads[0].device
            if device not in self._nowhere:
                self._nowhere[device] = torch.zeros(4, dtype=torch.float32, device=device)
            nowhere = self._nowhere[device].data_ptr()
            u_ptrs = [u.data_ptr() if u.shape[0] else nowhere for u in bases]
            table = self.tables.put(key, build_table([u_ptrs], [u.shape[1] for u in bases], [u.shape[0] for u in bases],
                                                     _projection.CHUNK, device, seg_tb=_common.SEG_TB,
                                                     rows=_projection.ROWS, aligned=_rows_aligned(bases)))
        keep_for_stream(table)
        return table

    def _step(self, grads: Sequence[Tensor], bases: Sequence[Tensor]) -> tuple:
        """(basis table, this call's gradient pointer array, aligned) for one call."""
        table = self._basis_table(grads, bases)
        g_ptrs = pointer_array([g.data_ptr() for g in grads], grads[0].device)
        return table, g_ptrs, table.aligned and _aligned(grads)

    # -- projection passes ------------------------------------------------------------

    def dots(self, grads: Sequence[Tensor], bases: Sequence[Tensor], k_max: int) -> Tensor:
        table, g_ptrs, aligned = self._step(grads, bases)
        device = grads[0].device
        partials = _new((table.num_chunks, k_max + 1), torch.float32, device)
        out = _new((len(grads), k_max + 1), torch.float32, device)
        with _on_device(device):
            return _projection.dots(table, g_ptrs, grads[0].dtype, bases[0].dtype, aligned, k_max, out, partials)

    def update_(self, grads: Sequence[Tensor], bases: Sequence[Tensor], weights: Tensor, kappa: float,
                scale: Tensor) -> None:
        table, g_ptrs, aligned = self._step(grads, bases)
        weights = weights if weights.is_contiguous() else weights.contiguous()
        scale = scale if scale.is_contiguous() else scale.contiguous()
        with _on_device(grads[0].device):
            _projection.update_(table, g_ptrs, grads[0].dtype, bases[0].dtype, aligned, weights, kappa, scale)

    def fused_project_(self, grads: Sequence[Tensor], bases: Sequence[Tensor], gram_inv: Tensor, mode: str,
                       aligned_scale: float) -> Tensor:
        """Project a group for ``scope="tensor"`` without clipping; tensors of at most
        :attr:`single_pass_max_numel` elements in one pass (one launch for all of them), the
        rest with the two passes and the same k x k step. ``gram_inv``: ``[T, k_max, k_max]``
        (float32 or float64, ``M_i^{-1}`` zero padded). Returns ``[c, ||g||^2]`` per tensor
        (``[T, k_max + 1]`` float32) of the gradients before the update, like :meth:`dots`."""
        if mode not in _projection.MODE_CODE:
            raise ValueError(f"mode={mode!r} is not one of {tuple(_projection.MODE_CODE)}")
        if gram_inv.dtype not in (torch.float32, torch.float64) or gram_inv.dim() != 3 or \
                gram_inv.shape[0] != len(grads) or gram_inv.shape[1] != gram_inv.shape[2]:
            raise ValueError(f"gram_inv must be a float32/float64 [T={len(grads)}, k_max, k_max] tensor, got "
                             f"{gram_inv.dtype} {tuple(gram_inv.shape)}")
        k_max = max(1, int(gram_inv.shape[1]))
        device = grads[0].device
        gram_inv = gram_inv.to(device).contiguous()
        small, large = self._split(bases)
        out = _new((len(grads), k_max + 1), torch.float32, device)
        if small is not None:
            table, g_ptrs, aligned = self._step(grads, bases)
            ids, block_n = small
            with _on_device(device):
                _projection.fused_small_(table, g_ptrs, ids, block_n, grads[0].dtype, bases[0].dtype, aligned,
                                         gram_inv, mode, aligned_scale, out)
        if large:
            pos = large[0]
            gs, us = [grads[i] for i in pos], [bases[i] for i in pos]
            part = self.dots(gs, us, k_max)
            inv = gram_inv[large[1]].double()
            w = torch.bmm(inv, part[:, :-1].double().unsqueeze(-1)).squeeze(-1).float()
            kappa = 1.0
            if mode == "conflict":
                w = torch.where(w < 0, w, (1.0 - aligned_scale) * w)
            elif mode == "plane":
                w, kappa = -w, 0.0
            self.update_(gs, us, w.contiguous(), kappa, torch.ones(len(pos), dtype=torch.float32, device=device))
            out[large[1]] = part
        return out

    def _split(self, bases: Sequence[Tensor]) -> tuple:
        """((small tensor ids on the device, BLOCK_N) or None, (large positions, their ids) or
        ()), cached with the bases: the split depends on shapes only."""
        key = ("split", self.single_pass_max_numel, tensor_key(bases))
        hit = self.tables.get(key)
        if hit is not None:
            return hit
        device = bases[0].device
        limit = int(self.single_pass_max_numel)
        small = [i for i, u in enumerate(bases) if u.shape[1] <= limit]
        large = [i for i, u in enumerate(bases) if u.shape[1] > limit]
        small_part = None
        if small:
            ids = _tables.to_device(torch.tensor(small, dtype=torch.int64), device)  # pinned, non_blocking
            # BLOCK_N in two size classes (1024, single_pass_max_numel rounded up): few compiles
            largest = max(bases[i].shape[1] for i in small)
            small_part = (ids, 1024 if largest <= 1024 else _common.pow2(limit))
        large_part = (large, _tables.to_device(torch.tensor(large, dtype=torch.int64), device)) if large else ()
        return self.tables.put(key, (small_part, large_part))

    # -- basis building ---------------------------------------------------------------

    def gram(self, refs: Sequence[Tensor]) -> Tensor:
        m = int(refs[0].shape[0])
        device = refs[0].device
        if m == 0:
            return torch.zeros(len(refs), 0, 0, dtype=torch.float64, device=device)
        key = ("gram", _basis.CHUNK, tensor_key(refs))
        table = self.tables.get(key)
        if table is None:
            table = self.tables.put(key, build_table([[r.data_ptr() for r in refs]], [r.shape[1] for r in refs],
                                                     [m] * len(refs), _basis.CHUNK, device,
                                                     seg_tb=_common.SEG_TB))
        keep_for_stream(table)
        partials = _new((table.num_chunks, m * m), torch.float32, device)
        out = _new((len(refs), m, m), torch.float64, device)
        with _on_device(device):
            return _basis.gram(table, refs, m, partials, out)

    def combine(self, refs: Sequence[Tensor], coefficients: Tensor, ks: Sequence[int],
                out_dtype: torch.dtype) -> list[Tensor]:
        if out_dtype not in _common.KIND:
            raise ValueError(f"out_dtype={out_dtype} is not one of {tuple(_common.KIND)} for the triton backend")
        device = refs[0].device
        outs = [_new((int(k), r.shape[1]), out_dtype, device) for r, k in zip(refs, ks)]
        if not any(ks) or refs[0].shape[0] == 0:
            for o in outs:
                o.zero_()
            return outs
        # outputs are new every call, so this table is never cached
        table = build_table([[r.data_ptr() for r in refs],
                             [o.data_ptr() if k else r.data_ptr() for o, r, k in zip(outs, refs, ks)]],
                            [r.shape[1] for r in refs], ks, _basis.CHUNK, device, seg_tb=_common.SEG_TB)
        coefficients = coefficients.to(device=device, dtype=torch.float32).contiguous()
        with _on_device(device):
            _basis.combine(table, refs, coefficients, outs)
        return outs


def _interpret_env_now() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
