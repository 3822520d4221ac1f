"""The contenders of the micro suite: every way of projecting (and clipping) one gradient
list, each as a zero-argument callable doing one optimizer step's work."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from .. import ops, reference
from .timing import _sync
from .workloads import REPO_ROOT

MAX_NORM = 1.0
MICRO_BATCHES = 8  # the authors' scheme projects at every micro-batch of this accumulation

# ----------------------------------------------------------------------------------------
# The best honest pure-PyTorch contender
# ----------------------------------------------------------------------------------------


def _norms_fp32(tensors: Sequence[Tensor]) -> list[Tensor]:
    try:
        return list(torch._foreach_norm(tensors, 2, dtype=torch.float32))
    except (TypeError, RuntimeError):  # older torch without the dtype argument
        return [torch.linalg.vector_norm(t, dtype=torch.float32) for t in tensors]


class ForeachProjector:
    """Orthogonal projection + clipping in pure PyTorch, written as fast as we could.

    Plan once per basis (like the Projector does): the k x k matrices M_i^{-1} (exact
    projection for bf16 or approximately orthonormal bases). Per step:

    1. ``torch._foreach_norm`` (float32 accumulation) for all squared norms, and one
       ``torch.mv`` per tensor for c_i = U_i g_i;
    2. the tiny step batched on [T, k]: w = M^{-1} c, post-projection norms from
       ||g||^2 - 2 w.c + w^T M w, the clip factor (one host sync, to pass it as a scalar);
    3. one ``addmv_`` per tensor: g <- coef * g - U^T (coef * w), subtract and scale in a
       single pass over g.

    Mixed dtypes (bf16 gradients, fp32 basis) need float32 temporaries, as plain PyTorch
    has no mixed-dtype matrix-vector product; same-dtype bf16 products return c rounded to
    bf16 (accumulated in float32 inside the kernel).
    """

    def __init__(self, grads: Sequence[Tensor], bases: Sequence[Tensor]):
        if len(grads) != len(bases) or not grads:
            raise ValueError(f"ForeachProjector needs equally long, non-empty lists, got {len(grads)} grads "
                             f"and {len(bases)} bases")
        for i, (g, u) in enumerate(zip(grads, bases)):
            if u.dim() != 2 or u.shape[1] != g.numel() or not g.is_contiguous() or not u.is_contiguous():
                raise ValueError(f"tensor {i}: basis {tuple(u.shape)} does not fit contiguous gradient "
                                 f"{tuple(g.shape)}; expected contiguous [k, {g.numel()}]")
        self.flat = [g.view(-1) for g in grads]
        self.bases = list(bases)
        self.ks = [int(u.shape[0]) for u in bases]
        self.k_max = max(1, max(self.ks))
        dev = grads[0].device
        m = torch.zeros(len(grads), self.k_max, self.k_max, dtype=torch.float32, device=dev)
        m_inv = torch.zeros_like(m)
        for i, u in enumerate(bases):
            k = self.ks[i]
            if k:
                mi = u.double() @ u.double().T
                m[i, :k, :k] = mi.float()
                m_inv[i, :k, :k] = torch.linalg.pinv(mi, hermitian=True).float()
        self.m, self.m_inv = m, m_inv
        self.mixed = [g.dtype != u.dtype for g, u in zip(self.flat, self.bases)]

    def step(self, max_norm: Optional[float] = MAX_NORM) -> float:
        """Project (and clip) in place; returns the post-projection, pre-clip total norm."""
        flat, bases = self.flat, self.bases
        sq = torch.stack(_norms_fp32(flat)).square()
        cs = []
        for g, u, k, mixed in zip(flat, bases, self.ks, self.mixed):
            if not k:
                cs.append(torch.zeros(self.k_max, device=g.device))
                continue
            c = torch.mv(u.float(), g.float()) if mixed else torch.mv(u, g).float()
            cs.append(c if k == self.k_max else torch.nn.functional.pad(c, (0, self.k_max - k)))
        c = torch.stack(cs)
        w = torch.bmm(self.m_inv, c.unsqueeze(-1)).squeeze(-1)
        wmw = (w * torch.bmm(self.m, w.unsqueeze(-1)).squeeze(-1)).sum(-1)
        sq_after = (sq - 2 * (w * c).sum(-1) + wmw).clamp_min(0)
        total = float(sq_after.sum().sqrt())  # the one host sync: addmv_ wants a Python scalar
        coef = 1.0 if max_norm is None else min(1.0, max_norm / (total + reference.CLIP_EPS))
        ws = (w * coef).unbind(0)
        for g, u, k, mixed, wi in zip(flat, bases, self.ks, self.mixed, ws):
            if not k:
                g.mul_(coef)
            elif mixed:
                g.copy_(torch.addmv(g.float(), u.float().T, wi[:k], beta=coef, alpha=-1.0))
            else:
                g.addmv_(u.T, wi[:k].to(g.dtype), beta=coef, alpha=-1.0)
        return total


# ----------------------------------------------------------------------------------------
# Contenders
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Contender:
    name: str
    label: str
    fn: Optional[Callable[[], object]] = None  # one optimizer step's work
    skip: Optional[str] = None  # reason it is not run
    note: str = ""
    plan_ms: Optional[float] = None
    setup: Optional[Callable[[], object]] = None  # untimed, before every call (fresh gradients)
    outputs: Optional[Callable[[], list]] = None  # the tensors fn wrote, when not the given grads


def load_authors_scheme():
    """The authors' per-hook scheme from the repository's benchmarks/ (None, reason if absent)."""
    path = Path(os.environ.get("OGPSA_BENCHMARKS_DIR", REPO_ROOT / "benchmarks")) / "authors_scheme.py"
    if not path.is_file():
        return None, (f"{path} not found: the authors' scheme lives in the repository's benchmarks/ only "
                      "(run from a source checkout)")
    name = "ogpsa_benchmarks_authors_scheme"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name], str(path)


def _clip_params(grads: Sequence[Tensor]) -> list[torch.nn.Parameter]:
    # parameters sharing storage with their own gradients: clip_grad_norm_ reads only .grad
    params = []
    for g in grads:
        p = torch.nn.Parameter(g.detach(), requires_grad=True)
        p.grad = g
        params.append(p)
    return params


def _copy_lists(grads: Sequence[Tensor], bases: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """Sources = every gradient and basis row; destinations = views of one scratch buffer as
    large as the largest of (gradients, one basis row) per tensor, so the copy touches
    memory (not cache) and moves B_g + k*B_u bytes each way."""
    sizes = [g.numel() * max(g.element_size(), u.element_size()) for g, u in zip(grads, bases)]
    scratch = torch.empty(sum(sizes), dtype=torch.uint8, device=grads[0].device)
    srcs, dsts, off = [], [], 0
    for g, u, size in zip(grads, bases, sizes):
        n = g.numel()
        srcs.append(g.view(-1))
        dsts.append(scratch[off:off + n * g.element_size()].view(g.dtype))
        for j in range(u.shape[0]):
            srcs.append(u[j])
            dsts.append(scratch[off:off + n * u.element_size()].view(u.dtype))
        off += size
    return dsts, srcs


def _authors_contender(grads: list[Tensor], bases: list[Tensor], names: Optional[Sequence[str]],
                       k_max: int) -> Contender:
    label = "authors' per-hook scheme"
    mod, where = load_authors_scheme()
    if mod is None:
        return Contender("authors-hooks", label, skip=where)
    if k_max > 2:
        return Contender("authors-hooks", label,
                         skip="the original code handles one or two reference gradients (k <= 2) only")
    scheme = mod.AuthorsHookScheme(names or [f"t{i}" for i in range(len(grads))], grads, bases,
                                   device=grads[0].device)
    params = _clip_params(grads)

    def authors_step():
        scheme.step(grads, micro_batches=MICRO_BATCHES)
        torch.nn.utils.clip_grad_norm_(params, MAX_NORM)

    return Contender("authors-hooks", label, authors_step,
                     note=f"{MICRO_BATCHES} micro-batches of hooks + clip_grad_norm_; basis on CPU")


class _ParamList(torch.nn.Module):
    """A module whose parameters ``p.0, p.1, ...`` share storage with the given tensors."""

    def __init__(self, tensors: Sequence[Tensor]):
        super().__init__()
        self.p = torch.nn.ParameterList([torch.nn.Parameter(t.detach(), requires_grad=True) for t in tensors])


def _projector_contender(cname: str, grads: list[Tensor], bases: list[Tensor], fresh: bool) -> Contender:
    """What a training loop runs: :meth:`ogpsa.Projector.project` (projection + clipping)
    with the gradients as a real loop leaves them. ``fresh``: new gradient tensors at new
    addresses every step, as after ``optimizer.zero_grad()`` (set_to_none=True, the PyTorch
    and HF Trainer default); otherwise the same buffers every step, rewritten in place
    (``zero_grad(set_to_none=False)``). Putting the gradients in place is untimed."""
    from ..projector import Projector
    from ..subspace import Subspace

    label = "ogpsa Projector.project, " + ("fresh gradient tensors each step" if fresh else "reused gradient buffers")
    try:
        module = _ParamList(grads)
        params = list(module.p)
        names = [n for n, _ in module.named_parameters()]
        sub = Subspace(names, [tuple(g.shape) for g in grads], list(bases))
        proj = Projector(module, None, sub)
    except Exception as exc:  # e.g. a basis dtype the Projector refuses: reported, not fatal
        return Contender(cname, label, skip=f"{type(exc).__name__}: {exc}")
    originals = list(grads)
    for p, g in zip(params, originals):
        p.grad = g

    def setup():
        if fresh:
            for p, g in zip(params, originals):
                p.grad = g.clone()  # the old tensor is dropped: one extra gradient set at most
        else:
            for p, g in zip(params, originals):
                p.grad.copy_(g)  # the values of a new step in the same buffers

    return Contender(cname, label, lambda: proj.project(MAX_NORM), setup=setup,
                     outputs=lambda: [p.grad for p in params], note="gradients put in place before each call, untimed")


def build_contenders(grads: list[Tensor], bases: list[Tensor], names: Optional[Sequence[str]] = None,
                     only: Optional[Sequence[str]] = None) -> list[Contender]:
    """Every contender for these tensors, in a fixed order; ``only`` filters by name prefix."""
    device = grads[0].device
    gdt, udt = grads[0].dtype, bases[0].dtype
    k_max = max(int(u.shape[0]) for u in bases)
    out: list[Contender] = []

    def wanted(name: str) -> bool:
        return not only or any(name.startswith(o) for o in only)

    if wanted("reference"):
        out.append(Contender("reference", "reference (per-tensor loop)",
                             lambda: reference.project_(grads, bases, max_norm=MAX_NORM)))
    if wanted("torch-foreach"):
        fp = ForeachProjector(grads, bases)
        out.append(Contender("torch-foreach", "best pure PyTorch (foreach + addmv_)", lambda: fp.step(MAX_NORM)))

    if wanted("authors-hooks"):
        out.append(_authors_contender(grads, bases, names, k_max))

    for name, (ok, why) in ops.backends().items():
        cname = f"ogpsa:{name}"
        if not wanted(cname):
            continue
        if not ok:
            out.append(Contender(cname, f"ogpsa {name} backend", skip=why))
            continue
        if name == "triton" and device.type == "cpu":
            out.append(Contender(cname, f"ogpsa {name} backend",
                                 skip="Triton on the CPU runs in the interpreter: a test tool, not a performance path"))
            continue
        try:
            be = ops.get_backend(name)
            if not be.supports(device, gdt, udt, True):
                out.append(Contender(cname, f"ogpsa {name} backend",
                                     skip=f"does not handle {device.type} {gdt}/{udt}"))
                continue
            t0 = time.perf_counter()
            plan = ops.plan_projection(grads, bases, backend=name, names=names)
            _sync(device)
            plan_ms = (time.perf_counter() - t0) * 1e3
        except Exception as exc:  # a backend that cannot plan this case is reported, not fatal
            out.append(Contender(cname, f"ogpsa {name} backend", skip=f"{type(exc).__name__}: {exc}"))
            continue
        out.append(Contender(cname, f"ogpsa {name} backend",
                             (lambda plan=plan: ops.execute(plan, grads, max_norm=MAX_NORM)),
                             note="execute() on a cached plan (as the Projector runs each step)", plan_ms=plan_ms))

    for fresh in (True, False):
        cname = "ogpsa:projector-" + ("fresh" if fresh else "reused")
        if wanted(cname):
            out.append(_projector_contender(cname, grads, bases, fresh))

    if wanted("clip_grad_norm_"):
        params = _clip_params(grads)
        out.append(Contender("clip_grad_norm_", "torch clip_grad_norm_ alone",
                             lambda: torch.nn.utils.clip_grad_norm_(params, MAX_NORM)))
    if wanted("copy"):
        dsts, srcs = _copy_lists(grads, bases)
        out.append(Contender("copy", "copy of the same bytes", lambda: torch._foreach_copy_(dsts, srcs),
                             note="reads every gradient and basis byte once, writes as many"))
    return out

