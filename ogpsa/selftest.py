"""First-contact self-test of the compiled projection backends.

No CUDA or compiled-Triton kernel is exercised on hardware by the test suite (the development
machines have no GPU), and automatic routing sends CUDA tensors to them first. So the first
time a compiled backend is about to serve a (device, gradient dtype, basis dtype, space), it
runs its ops on a small seeded random problem (a few tensors of odd sizes, a few ms) and
compares every output with the pure-PyTorch ``torch`` backend on the same device. On a
mismatch (or an exception) :func:`passes` warns once, naming the backend and the worst error,
and returns False: :func:`ogpsa.ops.select_backend` then takes the next backend. A backend
the user forced by name is never replaced silently: it raises instead (see ``ops``).

Spaces: ``gradient`` (the projection ops: dots, update_, fused_project_, gram, combine,
against the torch backend) and ``update`` (the fused projected AdamW op of the ``cpu`` and
``cuda`` backends, against :func:`ogpsa.reference.projected_adamw_step_`; the Triton AdamW
kernels have no single op to call and are covered by their own tests). The first-contact
hook sits in :func:`ogpsa.ops.select_backend`, which routes the gradient space, and in the
update space's routing (:func:`ogpsa.optim.backends.route`, ``space="update"``, same rule:
skip and warn under auto, raise when named); ``ogpsa info --selftest`` checks both.

The result is cached per key, so the hot path pays one dict lookup per plan build and nothing
per step. ``OGPSA_SELFTEST=0`` (or ``false``/``off``/``no``) turns the check off;
``OGPSA_SELFTEST=all`` adds the ``cpu`` backend.
``ogpsa info --selftest`` runs :func:`run_all` over every available backend and dtype and
prints :func:`format_table`.

Which backends are checked at first contact: ``cuda`` and ``triton`` (compiled, i.e. on CUDA
devices; the CPU interpreter is a test tool, checked only by ``--selftest``): the kernels no
test suite here runs on hardware. The ``cpu`` extension runs in every test run of the
package; checking it at first contact (``OGPSA_SELFTEST=all``) costs about 15 ms and 2 MB of
temporaries once per key, which is why it is not the default. ``torch`` is the reference.
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Optional, Sequence

import torch
from torch import Tensor

from . import reference
from .backends.base import Backend
from .backends.torch_backend import TorchBackend

#: environment switch: "0", "false", "off" or "no" turns the first-contact check off
ENV = "OGPSA_SELFTEST"
#: backends checked the first time they serve a key (``torch`` is the reference itself)
CHECKED = ("cuda", "triton")
#: added by OGPSA_SELFTEST=all
CHECKED_ALL = CHECKED + ("cpu",)
#: tensor sizes of the problem: odd, one above the CUDA single-pass limit (8192) and one
#: spanning several chunks of every backend, so both kernel paths run
NUMELS = (37, 1000, 4099, 70001)
#: basis ranks per tensor (0: a tensor without basis, which still gets its norm and scale)
RANKS = (3, 0, 4, 2)
#: reference gradients for the basis-building ops
REFS = 3
SEED = 20261208
#: largest norm-wise relative difference from the torch backend, by the dtype of the output:
#: float32 outputs hold float32 sums (the product's 1e-5 against float64); a bf16/fp16 output
#: may differ by one rounding in many elements of a 37-element tensor (measured up to 5e-3
#: between two correct backends), so two results each within 1e-2 of float64 may differ by
#: 2e-2. A wrong kernel (lost update, wrong weights, garbage) differs by O(0.1-1).
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}
GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BASIS_DTYPES = (torch.float32, torch.bfloat16)


@dataclass(frozen=True)
class CheckResult:
    """One backend on one (device, grad dtype, basis dtype, space)."""

    backend: str
    device: str
    grad_dtype: torch.dtype
    basis_dtype: torch.dtype
    space: str
    ok: bool
    worst: float  # largest error / tolerance over the outputs (< 1 passes); inf on an exception
    detail: str  # the worst output and its error, or the exception
    seconds: float


_results: dict[tuple, CheckResult] = {}
_lock = threading.Lock()


def enabled() -> bool:
    """False when ``$OGPSA_SELFTEST`` turns the first-contact check off."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "off", "no")


def checked_backends() -> tuple[str, ...]:
    """The backends checked at first contact under the current ``$OGPSA_SELFTEST``."""
    if not enabled():
        return ()
    return CHECKED_ALL if os.environ.get(ENV, "").strip().lower() == "all" else CHECKED


def reset() -> None:
    """Forget every cached result (tests; a process that swapped a backend)."""
    with _lock:
        _results.clear()


def results() -> dict[tuple, CheckResult]:
    """The cached first-contact results, by (backend, device, grad dtype, basis dtype, space)."""
    return dict(_results)


def _first_contact(be: Backend, device: torch.device) -> bool:
    if be.name not in checked_backends():
        return False
    return not (be.name == "triton" and device.type == "cpu")  # the interpreter: a test tool, not compiled


def passes(be: Backend, device: torch.device, grad_dtype: torch.dtype, basis_dtype: torch.dtype,
           space: str = "gradient") -> bool:
    """The hook in :func:`ogpsa.ops.select_backend`: whether ``be`` may serve this key.

    True at once for the reference backend, for a switched-off check and for keys already
    checked. Otherwise runs :func:`check` once for the key; a failure warns once
    (RuntimeWarning naming the backend) and is remembered, so the caller moves on to the next
    backend every time without re-testing."""
    device = torch.device(device)
    if not _first_contact(be, device):
        return True
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return True  # no test kernels inside a CUDA graph capture; the next plan build outside checks
    key = (be.name, str(torch.device(device)), grad_dtype, basis_dtype, space)
    hit = _results.get(key)
    if hit is not None:
        return hit.ok
    with _lock:
        hit = _results.get(key)
        if hit is None:
            try:
                hit = check(be, device, grad_dtype, basis_dtype, space)
            except NotApplicable:  # nothing of this backend runs in this space: nothing to distrust
                hit = CheckResult(be.name, key[1], grad_dtype, basis_dtype, space, True, 0.0, "not applicable", 0.0)
            _results[key] = hit
            if not hit.ok:
                warnings.warn(f"OGPSA backend {be.name!r} failed its first-contact self-test on {hit.device} "
                              f"(grad {_short(grad_dtype)}, basis {_short(basis_dtype)}, {space} space): "
                              f"{hit.detail}. Falling back to the next backend; `ogpsa info --selftest` shows "
                              f"every backend, {ENV}=0 turns the check off.", RuntimeWarning, stacklevel=3)
    return hit.ok


def failure(be: Backend, device: torch.device, grad_dtype: torch.dtype, basis_dtype: torch.dtype,
            space: str = "gradient") -> Optional[str]:
    """For a backend the user named: None when it may run, else why not (the self-test's
    message). Same cache and switch as :func:`passes`, no warning (the caller raises)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        if passes(be, device, grad_dtype, basis_dtype, space):
            return None
    r = _results[(be.name, str(torch.device(device)), grad_dtype, basis_dtype, space)]
    return (f"OGPSA backend {be.name!r} failed its first-contact self-test on {r.device} (grad "
            f"{_short(grad_dtype)}, basis {_short(basis_dtype)}): {r.detail} ({ENV}=0 skips the check)")


# ----------------------------------------------------------------------------------------
# The check
# ----------------------------------------------------------------------------------------


def _short(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def _problem(device: torch.device, grad_dtype: torch.dtype, basis_dtype: torch.dtype):
    """Seeded gradients, bases, weights, scales and references (never zeros). Each gradient
    has half its norm inside its basis' span, so every dot is large against its rounding."""
    gen = torch.Generator().manual_seed(SEED)
    grads, bases = [], []
    for n, k in zip(NUMELS, RANKS):
        q, _ = torch.linalg.qr(torch.randn(n, max(k, 1), generator=gen, dtype=torch.float64))
        u = q.T[:k].contiguous()
        g = torch.randn(n, generator=gen, dtype=torch.float64)
        if k:
            g = g + u.T @ (torch.randn(k, generator=gen, dtype=torch.float64) * g.norm() / k ** 0.5)
        grads.append(g.to(device, grad_dtype))
        bases.append(u.to(device, basis_dtype))
    k_max = max(RANKS)
    weights = torch.randn(len(NUMELS), k_max, generator=gen)
    for i, k in enumerate(RANKS):
        weights[i, k:] = 0.0
    scale = 0.5 + torch.rand(len(NUMELS), generator=gen)
    refs = [torch.randn(REFS, n, generator=gen).to(device) for n in NUMELS]
    coefficients = torch.randn(len(NUMELS), k_max, REFS, generator=gen)
    m_inv = torch.zeros(len(NUMELS), k_max, k_max)
    for i, u in enumerate(bases):
        k = u.shape[0]
        if k:
            u64 = u.double().cpu()
            m_inv[i, :k, :k] = torch.linalg.inv(u64 @ u64.T).float()
    return grads, bases, k_max, weights.to(device), scale.to(device), refs, coefficients.to(device), m_inv.to(device)


def _rel(x: Tensor, ref: Tensor) -> float:
    x64, r64 = x.detach().double().cpu(), ref.detach().double().cpu()
    if x64.shape != r64.shape:
        return float("inf")
    return float((x64 - r64).norm() / r64.norm().clamp_min(1e-300))


def _compare(found: Iterable[tuple[str, Tensor, Tensor, torch.dtype]]) -> tuple[float, str]:
    worst, detail = 0.0, "all outputs agree"
    for what, x, ref, dt in found:
        err = _rel(x, ref)
        ratio = err / TOLERANCE[dt] if err == err else float("inf")  # NaN fails
        if ratio > worst or ratio == float("inf"):
            worst, detail = ratio, f"{what}: relative difference {err:.3g} from the torch backend " \
                                   f"(tolerance {TOLERANCE[dt]:g})"
    return worst, detail


def _gradient_space(be: Backend, ref: Backend, device: torch.device, grad_dtype: torch.dtype,
                    basis_dtype: torch.dtype) -> list[tuple[str, Tensor, Tensor, torch.dtype]]:
    """Every gradient-space op of ``be`` next to the torch backend's result on the same inputs."""
    grads, bases, k_max, weights, scale, refs, coefficients, m_inv = _problem(device, grad_dtype, basis_dtype)
    out = [("dots", be.dots(grads, bases, k_max), ref.dots(grads, bases, k_max), torch.float32)]
    mine, theirs = [g.clone() for g in grads], [g.clone() for g in grads]
    be.update_(mine, bases, weights, 1.0, scale)
    ref.update_(theirs, bases, weights, 1.0, scale)
    out += [(f"update_ (tensor of {g.numel()})", a, b, grad_dtype) for g, a, b in zip(grads, mine, theirs)]
    fused = getattr(be, "fused_project_", None)
    if fused is not None:
        mine = [g.clone() for g in grads]
        table = fused(mine, bases, m_inv, "orthogonal", 1.0)
        theirs = [g.clone() for g in grads]
        c = ref.dots(theirs, bases, k_max)
        w = torch.bmm(m_inv.double(), c[:, :k_max].double().unsqueeze(-1)).squeeze(-1).float()
        ref.update_(theirs, bases, w, 1.0, torch.ones(len(grads), device=device))
        out.append(("fused_project_ (pass-1 table)", table, c, torch.float32))
        out += [(f"fused_project_ (tensor of {g.numel()})", a, b, grad_dtype) for g, a, b in zip(grads, mine, theirs)]
    if grad_dtype == torch.float32:  # the basis build runs on float32 reference rows
        out.append(("gram", be.gram(refs), ref.gram(refs), torch.float32))
        ks = list(RANKS)
        mine_u = be.combine(refs, coefficients, ks, basis_dtype)
        theirs_u = ref.combine(refs, coefficients, ks, basis_dtype)
        out += [(f"combine (tensor of {r.shape[1]})", a, b, basis_dtype)
                for r, a, b, k in zip(refs, mine_u, theirs_u, ks) if k]
    return out


class NotApplicable(Exception):
    """The backend has no kernel for this space (e.g. Triton's update-space kernels, which are
    checked through their own tests only)."""


def _adamw_op_on(device: torch.device) -> bool:
    """Whether the compiled projected AdamW op is registered for ``device``'s dispatch key."""
    key = "CUDA" if device.type == "cuda" else "CPU"
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key("ogpsa::projected_adamw_", key))
    except RuntimeError:  # the schema is not registered (no extension)
        return False


#: update-space problem: every tensor projected (rank >= 1), a few Adam steps in
UPDATE_RANKS = (3, 1, 4, 2)
UPDATE_HYPER = dict(lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.01)


def _update_space(be: Backend, ref: Backend, device: torch.device, grad_dtype: torch.dtype,
                  basis_dtype: torch.dtype) -> list[tuple[str, Tensor, Tensor, torch.dtype]]:
    """The compiled projected AdamW op (``cpu``, ``cuda``: one fused step, per-tensor scope,
    orthogonal rule) next to :func:`ogpsa.reference.projected_adamw_step_` on the same tensors:
    parameters (in their dtype) and moments (float32) after one step. ``grad_dtype`` is the
    parameter and gradient dtype. ``ref`` is unused: the reference step is the specification."""
    if be.name not in ("cpu", "cuda") or be.name != ("cuda" if device.type == "cuda" else "cpu") \
            or not _adamw_op_on(device):
        raise NotApplicable
    gen = torch.Generator().manual_seed(SEED + 1)
    params, grads, ms, vs, us, minvs = [], [], [], [], [], []
    for n, k in zip(NUMELS, UPDATE_RANKS):
        q, _ = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))
        u = q.T.contiguous().to(basis_dtype)
        u64 = u.double()
        params.append(torch.randn(n, generator=gen).to(device, grad_dtype))
        grads.append(torch.randn(n, generator=gen).to(device, grad_dtype))
        ms.append((0.1 * torch.randn(n, generator=gen)).to(device))
        vs.append((0.5 + torch.rand(n, generator=gen)).to(device))
        us.append(u.to(device))
        minvs.append(torch.linalg.inv(u64 @ u64.T).float().contiguous().to(device))
    steps = [3] * len(NUMELS)
    mine = ([p.clone() for p in params], [m.clone() for m in ms], [v.clone() for v in vs])
    torch.ops.ogpsa.projected_adamw_(mine[0], grads, mine[1], mine[2], [], us, minvs, steps,
                                     *UPDATE_HYPER.values(), False, False)
    theirs = ([p.clone() for p in params], [m.clone() for m in ms], [v.clone() for v in vs])
    reference.projected_adamw_step_(theirs[0], grads, theirs[1], theirs[2], [None] * len(params), steps, us,
                                    **UPDATE_HYPER)
    out = []
    for what, a_list, b_list, dt in (("parameter", mine[0], theirs[0], grad_dtype),
                                     ("exp_avg", mine[1], theirs[1], torch.float32),
                                     ("exp_avg_sq", mine[2], theirs[2], torch.float32)):
        out += [(f"projected_adamw_ {what} (tensor of {a.numel()})", a, b, dt) for a, b in zip(a_list, b_list)]
    return out


#: space -> function returning (name, backend output, reference output, output dtype) tuples
SPACES: dict[str, Callable[..., list]] = {"gradient": _gradient_space, "update": _update_space}


def check(be: Backend, device: torch.device, grad_dtype: torch.dtype, basis_dtype: torch.dtype,
          space: str = "gradient", reference: Optional[Backend] = None) -> CheckResult:
    """Run ``be`` on the small problem and compare with ``reference`` (default: the torch
    backend; the update space compares with the reference AdamW step). Never raises for a
    backend fault: an exception is a failed result. Raises :class:`NotApplicable` when ``be``
    has no kernel for ``space`` on ``device``."""
    if space not in SPACES:
        raise ValueError(f"space={space!r} is not one of {tuple(SPACES)}")
    device = torch.device(device)
    ref = reference if reference is not None else TorchBackend()
    start = time.perf_counter()
    try:
        # whatever region the first contact happens in: no autograd, no autocast (it would run the
        # torch reference's matmuls in half precision and fail a correct backend)
        with torch.no_grad(), torch.autocast(device_type=device.type, enabled=False):
            worst, detail = _compare(SPACES[space](be, ref, device, grad_dtype, basis_dtype))
    except NotApplicable:
        raise
    except Exception as exc:  # a kernel that cannot run here fails its check, it does not crash training
        # (outputs are compared on the host, so an asynchronous CUDA fault surfaces here too)
        worst, detail = float("inf"), f"raised {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return CheckResult(be.name, str(device), grad_dtype, basis_dtype, space, worst < 1.0, worst, detail,
                       time.perf_counter() - start)


def run_all(backends: Mapping[str, Optional[Backend]], devices: Optional[Sequence[torch.device]] = None,
            spaces: Sequence[str] = tuple(SPACES)) -> list[CheckResult]:
    """Check every given backend on every device it supports (default: the CPU and, when
    present, the current CUDA device) and every grad x basis dtype. ``backends``: name ->
    instance (None or unavailable ones are skipped). The torch backend is the reference and
    is not listed."""
    if devices is None:
        devices = [torch.device("cpu")] + ([torch.device("cuda", torch.cuda.current_device())]
                                           if torch.cuda.is_available() else [])
    out = []
    for name, be in backends.items():
        if be is None or name == "torch" or not be.availability()[0]:
            continue
        for device in devices:
            for gdt in GRAD_DTYPES:
                for udt in BASIS_DTYPES:
                    if not be.supports(device, gdt, udt, True):
                        continue
                    for space in spaces:
                        try:
                            out.append(check(be, device, gdt, udt, space))
                        except NotApplicable:
                            continue
    return out


def format_table(rows: Sequence[CheckResult]) -> str:
    """A plain-text table of :func:`run_all` results."""
    head = f"{'backend':<8} {'device':<8} {'grad':<9} {'basis':<9} {'space':<9} {'result':<6} {'err/tol':>8} {'ms':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.backend:<8} {r.device:<8} {_short(r.grad_dtype):<9} {_short(r.basis_dtype):<9} "
                     f"{r.space:<9} {'ok' if r.ok else 'FAIL':<6} {r.worst:>8.3g} {1e3 * r.seconds:>7.1f}")
        if not r.ok:
            lines.append(f"    {r.detail}")
    if not rows:
        lines.append("(no compiled backend available to check; torch is the reference)")
    return "\n".join(lines)
