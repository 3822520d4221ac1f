"""Triton kernels of the projected AdamW step (update-space OGPSA), all tensors of a group
(one device, parameter dtype, basis dtype, amsgrad) in one launch per pass.

The math is :func:`ogpsa.reference.projected_adamw_step_`; per tensor i, in float32:

* pass 1 (:func:`dots`): m, v (and max v with ``AMSGRAD``) updated from the raw gradient
  (negated with maximize) and written once; ``d = m_hat / (sqrt(v_hat) + eps)``
  (``+ wd p`` when the decay is projected); the k dots ``c = U d`` and ``||d||^2``. Each
  program writes one row of partials per chunk, summed per tensor in a fixed order
  (float64, :func:`ogpsa.kernels.common.segment_sum`): bitwise reproducible.
* tiny step (the caller, float64): ``w = M^-1 c`` and the mode rule, giving per tensor
  ``[w, kappa]``.
* pass 2 (:func:`apply_`): d recomputed from the stored moments (elementwise; moments are
  only read), ``p <- p * shrink - lr (kappa d - U^T w)`` (``shrink = 1 - lr wd`` for
  decoupled decay, else 1), rounded once to the parameter dtype.
* single pass (:func:`fused_small_`, per-tensor scope): a program owns whole tensors of at
  most :data:`SINGLE_PASS_MAX_NUMEL` elements: phase A as pass 1 (c, ||d||^2 reduced in
  registers), the k x k step ``w = M^-1 c`` and the mode rule in the program, a barrier, then
  phase B as pass 2; the moments it re-reads were just written by the same program (cache).
  Writes the same ``[c, ||d||^2]`` rows as pass 1.

Per-tensor hyperparameters arrive as a float32 ``[T, HW]`` table (columns ``H_*``), so param
groups with different lr / weight decay / step counts share a launch. Addresses come from
:class:`ogpsa.kernels.tables.ChunkTable` pointer lists in the order :data:`PTR_LISTS`; the
gradient pointers and the hyper table change every step and travel in one int64 buffer
(:func:`step_buffer`, one host-to-device copy). Launch configurations are fixed
(:func:`launch_config`), never timed. ``ALIGNED`` (every address on
16 bytes and every length a whole number of 16-byte basis vectors, checked by the caller):
alignment hints and an unmasked main loop, so the compiler can issue 128-bit loads.
Low-precision values are upcast to float32 right after loading (the interpreter needs it).
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import common
from .common import INTERPRETED, launch
from .projection import _chunk_items  # the chunk metadata walk, shared with the projection kernels
from .tables import ChunkTable

#: columns of the per-tensor hyperparameter table (float32)
H_OMB1, H_B2, H_OMB2, H_EPS, H_BC1, H_BC2S, H_LR, H_WDP, H_SHRINK, H_SIGN = range(10)
HW = 10
#: the table's pointer lists, in order: parameter, exp_avg, exp_avg_sq, the v pass 2 reads
#: (max_exp_avg_sq with amsgrad, else exp_avg_sq again), basis
PTR_LISTS = ("param", "exp_avg", "exp_avg_sq", "v_read", "basis")
#: elements per chunk of the two-pass kernels (as the projection kernels)
CHUNK = 1024 if INTERPRETED else 16384
#: chunks per program of the two-pass kernels (1 on a GPU)
ROWS = 32 if INTERPRETED else 1
#: tensors of at most this many elements take the single pass (per-tensor scope): a program's
#: tensor (parameter, gradient, moments, k basis rows) stays in L1/L2 between its phases
SINGLE_PASS_MAX_NUMEL = 16384
#: tensors per program of the single-pass kernel (1 on a GPU)
SMALL_ROWS = 16 if INTERPRETED else 1
#: mode names -> the MODE value of the single-pass kernel
MODE_CODE = {"orthogonal": 0, "conflict": 1, "plane": 2, "threshold": 3}
#: Triton's interpreter (3.8) converts float32 to bfloat16 by truncation, whatever rounding is
#: asked for; compiled code rounds to nearest even. Under the interpreter the parameter store
#: rounds by hand, so both give the same bits for the same float32 value.
_MANUAL_BF16_RNE = tl.constexpr(INTERPRETED)


@triton.jit
def _typed(table, t, KIND: tl.constexpr, ALIGNED: tl.constexpr):
    """Pointers of tensors ``t`` from an int64 address list, typed by KIND (0 float32,
    1 bfloat16, 2 float16); the cast and its 16-byte hint are made here, together."""
    addr = tl.load(table + t)
    if KIND == 0:
        q = addr.to(tl.pointer_type(tl.float32))
    elif KIND == 1:
        q = addr.to(tl.pointer_type(tl.bfloat16))
    else:
        q = addr.to(tl.pointer_type(tl.float16))
    if ALIGNED:
        q = tl.multiple_of(q, 16)
    return q


@triton.jit
def _hyper(hyper, t, col):
    return tl.load(hyper + t.to(tl.int64) * 10 + col)[:, None]


@triton.jit
def _direction(mv, vd, pv, bc1, bc2s, eps, wdp, DECAY_IN_D: tl.constexpr):
    """d = (m / bc1) / (sqrt(v) / sqrt(bc2) + eps) (+ wd p): torch AdamW's rounding steps."""
    d = tl.div_rn(tl.div_rn(mv, bc1), tl.div_rn(tl.sqrt_rn(vd), bc2s) + eps)
    if DECAY_IN_D:
        d += wdp * pv
    return d


@triton.jit
def _phase1(g, p, m, v, x, u, u_row, row_ok, idx, end, omb1, b2, omb2, eps, bc1, bc2s, wdp, sign,
            MASKED: tl.constexpr, AMSGRAD: tl.constexpr, DECAY_IN_D: tl.constexpr):
    """One block of pass 1: moments updated and stored; returns d ``[R, BLOCK]`` (0 outside
    the tensor) and the basis values ``[R, K_PAD, BLOCK]`` (float32)."""
    if MASKED:
        ok = idx < end[:, None]
        gv = tl.load(g[:, None] + idx, mask=ok, other=0.0).to(tl.float32) * sign
        mv = tl.load(m[:, None] + idx, mask=ok, other=0.0)
        vv = tl.load(v[:, None] + idx, mask=ok, other=0.0)
    else:
        gv = tl.load(g[:, None] + idx).to(tl.float32) * sign
        mv = tl.load(m[:, None] + idx)
        vv = tl.load(v[:, None] + idx)
    mv = mv + omb1 * (gv - mv)  # lerp(m, g, 1 - beta1), as torch's AdamW
    vv = vv * b2 + omb2 * gv * gv
    if MASKED:
        tl.store(m[:, None] + idx, mv, mask=ok)
        tl.store(v[:, None] + idx, vv, mask=ok)
    else:
        tl.store(m[:, None] + idx, mv)
        tl.store(v[:, None] + idx, vv)
    vd = vv
    if AMSGRAD:
        if MASKED:
            vd = tl.maximum(tl.load(x[:, None] + idx, mask=ok, other=0.0), vv)
            tl.store(x[:, None] + idx, vd, mask=ok)
        else:
            vd = tl.maximum(tl.load(x[:, None] + idx), vv)
            tl.store(x[:, None] + idx, vd)
    pv = 0.0
    if DECAY_IN_D:
        if MASKED:
            pv = tl.load(p[:, None] + idx, mask=ok, other=0.0).to(tl.float32)
        else:
            pv = tl.load(p[:, None] + idx).to(tl.float32)
    d = _direction(mv, vd, pv, bc1, bc2s, eps, wdp, DECAY_IN_D)
    if MASKED:
        d = tl.where(ok, d, 0.0)  # eps = 0 would give 0/0 in the padding
        uu = tl.load(u[:, None, None] + (u_row + idx[:, None, :]), mask=row_ok[:, :, None] & ok[:, None, :],
                     other=0.0)
    else:
        uu = tl.load(u[:, None, None] + (u_row + idx[:, None, :]), mask=row_ok[:, :, None], other=0.0)
    return d, uu.to(tl.float32)


@triton.jit
def _phase2(p, m, vr, u, u_row, row_ok, idx, end, w, kappa, eps, bc1, bc2s, wdp, lr, shrink,
            MASKED: tl.constexpr, DECAY_IN_D: tl.constexpr):
    """One block of pass 2: d from the stored moments, ``p <- p shrink - lr (kappa d - U^T w)``."""
    if MASKED:
        ok = idx < end[:, None]
        mv = tl.load(m[:, None] + idx, mask=ok, other=0.0)
        vd = tl.load(vr[:, None] + idx, mask=ok, other=0.0)
        pv = tl.load(p[:, None] + idx, mask=ok, other=0.0).to(tl.float32)
        uu = tl.load(u[:, None, None] + (u_row + idx[:, None, :]), mask=row_ok[:, :, None] & ok[:, None, :],
                     other=0.0)
    else:
        mv = tl.load(m[:, None] + idx)
        vd = tl.load(vr[:, None] + idx)
        pv = tl.load(p[:, None] + idx).to(tl.float32)
        uu = tl.load(u[:, None, None] + (u_row + idx[:, None, :]), mask=row_ok[:, :, None], other=0.0)
    d = _direction(mv, vd, pv, bc1, bc2s, eps, wdp, DECAY_IN_D)
    y = kappa * d - tl.sum(uu.to(tl.float32) * w[:, :, None], axis=1)
    new = pv * shrink - lr * y
    if _MANUAL_BF16_RNE and p.dtype.element_ty == tl.bfloat16:
        bits = new.to(tl.uint32, bitcast=True)
        bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
        new = tl.where(new != new, new, bits.to(tl.float32, bitcast=True))
    out = new.to(p.dtype.element_ty)
    if MASKED:
        tl.store(p[:, None] + idx, out, mask=ok)
    else:
        tl.store(p[:, None] + idx, out)


@triton.jit
def _full(start, end, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """Elements every chunk of the program has in whole blocks (the unmasked main loop)."""
    if ALIGNED:
        return tl.min(end - start, axis=0) // BLOCK * BLOCK
    else:
        return 0


# sizes and counts are not specialised: one compile per constexpr set
@triton.jit(do_not_specialize=["C", "W"])
def _adamw_dots_kernel(g_ptrs, p_ptrs, m_ptrs, v_ptrs, x_ptrs, u_ptrs, numels, ks, chunk_len, chunk_tensor,
                       chunk_start, prog_len, hyper, partials, C, W, ROWS: tl.constexpr, K_PAD: tl.constexpr,
                       BLOCK: tl.constexpr, P_KIND: tl.constexpr, U_KIND: tl.constexpr, AMSGRAD: tl.constexpr,
                       DECAY_IN_D: tl.constexpr, ALIGNED: tl.constexpr, U_VEC: tl.constexpr):
    pid, item, item_ok, t, start, n, end = _chunk_items(chunk_tensor, chunk_start, chunk_len, numels, C, ROWS, ALIGNED,
                                                  U_VEC)
    g = _typed(g_ptrs, t, P_KIND, ALIGNED)
    p = _typed(p_ptrs, t, P_KIND, ALIGNED)
    m = _typed(m_ptrs, t, 0, ALIGNED)
    v = _typed(v_ptrs, t, 0, ALIGNED)
    x = _typed(x_ptrs, t, 0, ALIGNED)
    u = _typed(u_ptrs, t, U_KIND, ALIGNED)
    rows = tl.arange(0, K_PAD)
    row_ok = rows[None, :] < tl.load(ks + t)[:, None]
    u_row = rows[None, :, None] * n[:, None, None]
    omb1, b2, omb2 = _hyper(hyper, t, 0), _hyper(hyper, t, 1), _hyper(hyper, t, 2)
    eps, bc1, bc2s = _hyper(hyper, t, 3), _hyper(hyper, t, 4), _hyper(hyper, t, 5)
    wdp, sign = _hyper(hyper, t, 7), _hyper(hyper, t, 9)
    cols = tl.arange(0, BLOCK)
    acc_c = tl.zeros([ROWS, K_PAD, BLOCK], dtype=tl.float32)
    acc_sq = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    full = _full(start, end, ALIGNED, BLOCK)
    for off in tl.range(0, full, BLOCK):
        d, uu = _phase1(g, p, m, v, x, u, u_row, row_ok, start[:, None] + off + cols[None, :], end, omb1, b2, omb2,
                        eps, bc1, bc2s, wdp, sign, False, AMSGRAD, DECAY_IN_D)
        acc_sq += d * d
        acc_c += uu * d[:, None, :]
    for off in tl.range(full, tl.load(prog_len + pid), BLOCK):
        d, uu = _phase1(g, p, m, v, x, u, u_row, row_ok, start[:, None] + off + cols[None, :], end, omb1, b2, omb2,
                        eps, bc1, bc2s, wdp, sign, True, AMSGRAD, DECAY_IN_D)
        acc_sq += d * d
        acc_c += uu * d[:, None, :]
    out = partials + item.to(tl.int64) * W
    tl.store(out[:, None] + rows[None, :], tl.sum(acc_c, axis=2), mask=item_ok[:, None] & (rows[None, :] < W - 1))
    tl.store(out + W - 1, tl.sum(acc_sq, axis=1), mask=item_ok)


@triton.jit(do_not_specialize=["C", "KW"])
def _adamw_apply_kernel(p_ptrs, m_ptrs, vr_ptrs, u_ptrs, numels, ks, chunk_len, chunk_tensor, chunk_start,
                        prog_len, hyper, wk, C, KW, ROWS: tl.constexpr, K_PAD: tl.constexpr, BLOCK: tl.constexpr,
                        P_KIND: tl.constexpr, U_KIND: tl.constexpr, DECAY_IN_D: tl.constexpr,
                        ALIGNED: tl.constexpr, U_VEC: tl.constexpr):
    pid, item, item_ok, t, start, n, end = _chunk_items(chunk_tensor, chunk_start, chunk_len, numels, C, ROWS, ALIGNED,
                                                  U_VEC)
    p = _typed(p_ptrs, t, P_KIND, ALIGNED)
    m = _typed(m_ptrs, t, 0, ALIGNED)
    vr = _typed(vr_ptrs, t, 0, ALIGNED)
    u = _typed(u_ptrs, t, U_KIND, ALIGNED)
    rows = tl.arange(0, K_PAD)
    row_ok = rows[None, :] < tl.load(ks + t)[:, None]
    u_row = rows[None, :, None] * n[:, None, None]
    wrow = wk + t.to(tl.int64)[:, None] * (KW + 1)
    w = tl.load(wrow + rows[None, :], mask=row_ok, other=0.0)
    kappa = tl.load(wrow + KW)
    eps, bc1, bc2s = _hyper(hyper, t, 3), _hyper(hyper, t, 4), _hyper(hyper, t, 5)
    lr, wdp, shrink = _hyper(hyper, t, 6), _hyper(hyper, t, 7), _hyper(hyper, t, 8)
    cols = tl.arange(0, BLOCK)
    full = _full(start, end, ALIGNED, BLOCK)
    for off in tl.range(0, full, BLOCK):
        _phase2(p, m, vr, u, u_row, row_ok, start[:, None] + off + cols[None, :], end, w, kappa, eps, bc1, bc2s, wdp,
                lr, shrink, False, DECAY_IN_D)
    for off in tl.range(full, tl.load(prog_len + pid), BLOCK):
        _phase2(p, m, vr, u, u_row, row_ok, start[:, None] + off + cols[None, :], end, w, kappa, eps, bc1, bc2s, wdp,
                lr, shrink, True, DECAY_IN_D)


@triton.jit(do_not_specialize=["C", "W", "KM", "MODE", "aligned_scale"])
def _adamw_fused_small_kernel(g_ptrs, p_ptrs, m_ptrs, v_ptrs, x_ptrs, vr_ptrs, u_ptrs, numels, ks, chunk_len,
                              chunk_tensor, chunk_start, prog_len, hyper, minv, out, aligned_scale, C, W, KM, MODE,
                              ROWS: tl.constexpr, K_PAD: tl.constexpr, BLOCK: tl.constexpr, P_KIND: tl.constexpr,
                              U_KIND: tl.constexpr, AMSGRAD: tl.constexpr, DECAY_IN_D: tl.constexpr,
                              ALIGNED: tl.constexpr, U_VEC: tl.constexpr):
    # every tensor is one chunk (start 0), so a program owns ROWS whole tensors
    pid, item, item_ok, t, start, n, end = _chunk_items(chunk_tensor, chunk_start, chunk_len, numels, C, ROWS, ALIGNED,
                                                  U_VEC)
    g = _typed(g_ptrs, t, P_KIND, ALIGNED)
    p = _typed(p_ptrs, t, P_KIND, ALIGNED)
    m = _typed(m_ptrs, t, 0, ALIGNED)
    v = _typed(v_ptrs, t, 0, ALIGNED)
    x = _typed(x_ptrs, t, 0, ALIGNED)
    vr = _typed(vr_ptrs, t, 0, ALIGNED)
    u = _typed(u_ptrs, t, U_KIND, ALIGNED)
    k = tl.load(ks + t)
    rows = tl.arange(0, K_PAD)
    row_ok = rows[None, :] < k[:, None]
    u_row = rows[None, :, None] * n[:, None, None]
    omb1, b2, omb2 = _hyper(hyper, t, 0), _hyper(hyper, t, 1), _hyper(hyper, t, 2)
    eps, bc1, bc2s = _hyper(hyper, t, 3), _hyper(hyper, t, 4), _hyper(hyper, t, 5)
    lr, wdp, shrink, sign = _hyper(hyper, t, 6), _hyper(hyper, t, 7), _hyper(hyper, t, 8), _hyper(hyper, t, 9)
    cols = tl.arange(0, BLOCK)
    acc_c = tl.zeros([ROWS, K_PAD, BLOCK], dtype=tl.float32)
    acc_sq = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    full = _full(start, end, ALIGNED, BLOCK)
    last = tl.load(prog_len + pid)
    for off in tl.range(0, full, BLOCK):
        d, uu = _phase1(g, p, m, v, x, u, u_row, row_ok, off + cols[None, :] + start[:, None], end, omb1, b2, omb2,
                        eps, bc1, bc2s, wdp, sign, False, AMSGRAD, DECAY_IN_D)
        acc_sq += d * d
        acc_c += uu * d[:, None, :]
    for off in tl.range(full, last, BLOCK):
        d, uu = _phase1(g, p, m, v, x, u, u_row, row_ok, off + cols[None, :] + start[:, None], end, omb1, b2, omb2,
                        eps, bc1, bc2s, wdp, sign, True, AMSGRAD, DECAY_IN_D)
        acc_sq += d * d
        acc_c += uu * d[:, None, :]
    c = tl.sum(acc_c, axis=2)  # [ROWS, K_PAD]
    sq = tl.sum(acc_sq, axis=1)
    # the k x k step (float32): w = M^-1 c, then the mode rule of ogpsa.reference.mode_weights
    gi_ok = (rows[:, None] < KM) & (rows[None, :] < KM)
    gi = tl.load(minv + t.to(tl.int64)[:, None, None] * KM * KM + (rows[:, None] * KM + rows[None, :])[None, :, :],
                 mask=item_ok[:, None, None] & gi_ok[None, :, :], other=0.0)
    w = tl.sum(gi * c[:, None, :], axis=2)
    c0 = tl.sum(tl.where(rows[None, :] == 0, c, 0.0), axis=1)
    aligned = (MODE == 3) & (k == 1) & (c0 > 0)  # threshold, k = 1, aligned: scale d instead
    kappa = tl.where(aligned, aligned_scale, 1.0)
    w = tl.where((MODE == 1) & (w >= 0), (1.0 - aligned_scale) * w, w)
    w = tl.where(MODE == 2, -w, w)
    w = tl.where(aligned[:, None], 0.0, w)
    kappa = tl.where((MODE == 2) & (k > 0), 0.0, kappa)[:, None]
    row = out + item.to(tl.int64) * W
    tl.store(row[:, None] + rows[None, :], c, mask=item_ok[:, None] & (rows[None, :] < W - 1))
    tl.store(row + W - 1, sq, mask=item_ok)
    tl.debug_barrier()  # phase B re-reads moments other threads of this program wrote
    for off in tl.range(0, full, BLOCK):
        _phase2(p, m, vr, u, u_row, row_ok, off + cols[None, :] + start[:, None], end, w, kappa, eps, bc1, bc2s, wdp,
                lr, shrink, False, DECAY_IN_D)
    for off in tl.range(full, last, BLOCK):
        _phase2(p, m, vr, u, u_row, row_ok, off + cols[None, :] + start[:, None], end, w, kappa, eps, bc1, bc2s, wdp,
                lr, shrink, True, DECAY_IN_D)


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------


def step_buffer(grad_ptrs: Sequence[int], hyper: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
    """This step's gradient pointers (int64 ``[T]``) and hyper table (float32 ``[T, HW]``) in ONE
    int64 buffer on ``device`` (one copy, pinned and non_blocking on CUDA); returns the two views."""
    from .tables import to_device

    t = len(grad_ptrs)
    host = torch.empty(t + t * HW // 2, dtype=torch.int64)
    host[:t] = torch.tensor([int(a) for a in grad_ptrs], dtype=torch.int64)
    host[t:] = hyper.to(torch.float32).contiguous().view(torch.int64).reshape(-1)
    buf = to_device(host, torch.device(device))
    return buf[:t], buf[t:].view(torch.float32).view(t, HW)


def launch_config(k_pad: int) -> dict:
    """``{"BLOCK", "num_warps"}`` of every kernel here: a pure function of the padded rank (never
    timed, identical in every process and on every rank). Four float32 elements per thread
    (128-bit accesses) up to k_pad 8, two at 16, where the ``[k_pad, BLOCK]`` basis tile and the
    five element streams already take ~160-250 registers on sm_90 (compile-only, no spills:
    tests/test_adamw_triton.py). The interpreter uses :data:`common.INTERPRET_BLOCK`."""
    if INTERPRETED:
        return {"BLOCK": common.INTERPRET_BLOCK}
    return {"BLOCK": 1024 if k_pad <= 8 else 512, "num_warps": 8}


def _meta(table: ChunkTable, k_pad: int, p_dtype: torch.dtype, u_dtype: torch.dtype, aligned: bool,
          decay_in_d: bool) -> dict:
    return dict(ROWS=table.rows, K_PAD=k_pad, P_KIND=common.KIND[p_dtype], U_KIND=common.KIND[u_dtype],
                DECAY_IN_D=bool(decay_in_d), ALIGNED=bool(aligned), U_VEC=u_vec(u_dtype), **launch_config(k_pad))


def u_vec(u_dtype: torch.dtype) -> int:
    """Basis elements per 16 bytes: the multiple every length must be for the ALIGNED variant."""
    return 16 // (4 if u_dtype == torch.float32 else 2)


def dots(table: ChunkTable, g_ptrs: Tensor, hyper: Tensor, p_dtype, u_dtype, amsgrad: bool, decay_in_d: bool,
         aligned: bool, k_max: int, partials: Tensor, out: Tensor) -> Tensor:
    """Pass 1 over every tensor of ``table``: moments written, ``out`` (float64 ``[T, k_max + 1]``)
    gets ``[c, ||d||^2]`` per tensor; ``partials``: float32 scratch ``[chunks, k_max + 1]``."""
    w = k_max + 1
    k_pad = common.pow2(k_max)
    meta = _meta(table, k_pad, p_dtype, u_dtype, aligned, decay_in_d)
    pp, mp, vp, xp, up = table.ptrs
    launch(_adamw_dots_kernel, (table.num_programs,), g_ptrs, pp, mp, vp, xp, up, table.numels, table.ks,
           table.chunk_len, table.chunk_tensor, table.chunk_start, table.prog_len, hyper, partials, table.num_chunks,
           w, AMSGRAD=bool(amsgrad), **meta)
    return common.segment_sum(partials, table, out)


def apply_(table: ChunkTable, hyper: Tensor, p_dtype, u_dtype, decay_in_d: bool, aligned: bool, wk: Tensor) -> None:
    """Pass 2 in place on the parameters. ``wk``: float32 ``[T, KW + 1]``, per tensor the
    weights w (zero padded) and kappa in the last column."""
    kw = wk.shape[1] - 1
    k_pad = common.pow2(kw)
    meta = _meta(table, k_pad, p_dtype, u_dtype, aligned, decay_in_d)
    pp, mp, _, vr, up = table.ptrs
    launch(_adamw_apply_kernel, (table.num_programs,), pp, mp, vr, up, table.numels, table.ks, table.chunk_len,
           table.chunk_tensor, table.chunk_start, table.prog_len, hyper, wk, table.num_chunks, kw, **meta)


def fused_small_(table: ChunkTable, g_ptrs: Tensor, hyper: Tensor, p_dtype, u_dtype, amsgrad: bool,
                 decay_in_d: bool, aligned: bool, minv: Tensor, mode: str, aligned_scale: float, out: Tensor) -> None:
    """The single pass over every tensor of ``table`` (each one chunk): moments and parameters
    written; ``out`` (float32 ``[T, KM + 1]``) gets ``[c, ||d||^2]``. ``minv``: float32
    ``[T, KM, KM]`` (M_i^-1 zero padded; zero rows for tensors without a basis)."""
    if mode not in MODE_CODE:
        raise ValueError(f"mode={mode!r} is not one of {tuple(MODE_CODE)}")
    km = minv.shape[1]
    k_pad = common.pow2(km)
    meta = _meta(table, k_pad, p_dtype, u_dtype, aligned, decay_in_d)
    pp, mp, vp, vr, up = table.ptrs
    xp = vr  # max_exp_avg_sq when amsgrad (unused otherwise)
    launch(_adamw_fused_small_kernel, (table.num_programs,), g_ptrs, pp, mp, vp, xp, vr, up, table.numels, table.ks,
           table.chunk_len, table.chunk_tensor, table.chunk_start, table.prog_len, hyper, minv, out,
           float(aligned_scale), table.num_chunks, out.shape[1], km, MODE_CODE[mode], AMSGRAD=bool(amsgrad), **meta)


def aot_variants(kinds=((0, 0), (1, 1), (2, 0)), aligned=(True, False), k_pads=(1, 16)):
    """(kernel, signature, constexprs, num_warps) of this module's kernels in their GPU launch
    configurations, for compile-only checks (:func:`ogpsa.kernels.aot.compile_variant`)."""
    tab = {name: "*i64" for name in ("numels", "ks", "chunk_len", "chunk_tensor", "chunk_start", "prog_len")}
    ptrs = {name: "*i64" for name in ("g_ptrs", "p_ptrs", "m_ptrs", "v_ptrs", "x_ptrs", "u_ptrs")}
    dots_sig = {**ptrs, **tab, "hyper": "*fp32", "partials": "*fp32", "C": "i32", "W": "i32"}
    apply_sig = {"p_ptrs": "*i64", "m_ptrs": "*i64", "vr_ptrs": "*i64", "u_ptrs": "*i64", **tab, "hyper": "*fp32",
                 "wk": "*fp32", "C": "i32", "KW": "i32"}
    small_sig = {**ptrs, "vr_ptrs": "*i64", **tab, "hyper": "*fp32", "minv": "*fp32", "out": "*fp32",
                 "aligned_scale": "fp32", "C": "i32", "W": "i32", "KM": "i32", "MODE": "i32"}
    small_sig = {k: small_sig[k] for k in ("g_ptrs", "p_ptrs", "m_ptrs", "v_ptrs", "x_ptrs", "vr_ptrs", "u_ptrs",
                                           *tab, "hyper", "minv", "out", "aligned_scale", "C", "W", "KM", "MODE")}
    for pk, uk in kinds:
        vec = 4 if uk == 0 else 8
        for al in aligned:
            for k_pad in k_pads:
                block = 1024 if k_pad <= 8 else 512  # launch_config on a GPU
                base = dict(ROWS=1, K_PAD=k_pad, BLOCK=block, P_KIND=pk, U_KIND=uk, DECAY_IN_D=True, ALIGNED=al,
                            U_VEC=vec)
                yield _adamw_dots_kernel, dots_sig, {**base, "AMSGRAD": True}, 8
                yield _adamw_apply_kernel, apply_sig, base, 8
                yield _adamw_fused_small_kernel, small_sig, {**base, "AMSGRAD": True}, 8
