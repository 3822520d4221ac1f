"""The ``triton`` backend: fused multi-tensor Triton kernels (:mod:`ogpsa.kernels`).

Each op is a constant number of kernel launches for a whole group of tensors, however
many tensors it holds: pass 1 (``dots``) and the Gram pass are two launches (the pass and
a fixed-order reduction of its per-chunk partials), pass 2 (``update_``) and ``combine``
one. Tensors are addressed through int64 pointer tables cached by (data_ptr, shape,
dtype), so the hot path does no host work beyond hashing that key, and never
synchronises with the device.

Where it runs: CUDA tensors when Triton and a GPU are present (block sizes autotuned per
(k, dtypes); the in-place update is tuned on scratch copies). CPU tensors only under
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
from ogpsa.kernels.tables import ChunkTable, TableCache, build_table, tensor_key

from .base import Backend

_GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_BASIS_DTYPES = (torch.float32, torch.bfloat16)

#: Fill every buffer this backend allocates with NaN first (tests use it to prove each
#: output element is written by a kernel, not inherited from the allocator).
POISON_NEW_BUFFERS = False


def _on_device(device: torch.device):
    # Triton launches on the *current* CUDA device, not the one the tables point into
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _new(shape: tuple, dtype: torch.dtype, device: torch.device) -> Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    if POISON_NEW_BUFFERS and out.is_floating_point():
        out.fill_(float("nan"))
    return out


class TritonBackend(Backend):
    """Multi-tensor Triton kernels; see the module docstring for where they run."""

    name = "triton"

    def __init__(self) -> None:
        self.tables = TableCache()

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

    # -- tables -----------------------------------------------------------------------

    def _projection_table(self, grads: Sequence[Tensor], bases: Sequence[Tensor]) -> ChunkTable:
        key = ("project", _projection.CHUNK, _projection.ROWS, tensor_key(grads), tensor_key(bases))
        table = self.tables.get(key)
        if table is None:
            table = self.tables.put(key, _make_projection_table(grads, bases, _projection.CHUNK))
        return table

    # -- projection passes ------------------------------------------------------------

    def dots(self, grads: Sequence[Tensor], bases: Sequence[Tensor], k_max: int) -> Tensor:
        table = self._projection_table(grads, bases)
        device = grads[0].device
        partials = _new((table.num_chunks, k_max + 1), torch.float32, device)
        out = _new((len(grads), k_max + 1), torch.float32, device)
        with _on_device(device):
            return _projection.dots(table, grads, bases, k_max, out, partials)

    def update_(self, grads: Sequence[Tensor], bases: Sequence[Tensor], weights: Tensor, kappa: float,
                scale: Tensor) -> None:
        table = self._projection_table(grads, bases)
        weights = weights if weights.is_contiguous() else weights.contiguous()
        scale = scale if scale.is_contiguous() else scale.contiguous()
        with _on_device(grads[0].device):
            _projection.update_(table, grads, bases, weights, kappa, scale,
                                make_table=lambda g, u: _make_projection_table(g, u, _projection.CHUNK))

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


def _make_projection_table(grads: Sequence[Tensor], bases: Sequence[Tensor], chunk: int) -> ChunkTable:
    # a tensor without basis rows still needs a valid address: its (masked, never read) rows point at g
    u_ptrs = [u.data_ptr() if u.shape[0] else g.data_ptr() for g, u in zip(grads, bases)]
    return build_table([[g.data_ptr() for g in grads], u_ptrs], [g.numel() for g in grads],
                       [u.shape[0] for u in bases], chunk, grads[0].device, seg_tb=_common.SEG_TB,
                       rows=_projection.ROWS)
