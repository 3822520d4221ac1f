"""``ogpsa bench``: time every way of projecting (and clipping) gradients, side by side.

One run times, on the same tensors and in the same process:

* ``reference``: :func:`ogpsa.reference.project_`, the per-tensor pure-PyTorch loop;
* ``torch-foreach``: :class:`ForeachProjector`, the best pure-PyTorch version we could
  write (``torch._foreach_norm`` for the norms, one matrix-vector product per tensor,
  the tiny step batched on ``[T, k]`` tensors, one host sync for the clip factor, and a
  fused ``addmv_`` that subtracts and scales in a single pass);
* ``authors-hooks``: the original authors' scheme, one tensor hook per parameter run at
  every micro-batch of an accumulation of 8, basis kept on the CPU and copied to the
  device inside each hook. It lives in the repository's ``benchmarks/authors_scheme.py``
  only; from an installed package without ``benchmarks/`` it is skipped, saying so;
* ``ogpsa:<backend>`` for every backend :func:`ogpsa.ops.backends` reports available
  (Triton is skipped on the CPU: the interpreter is a test tool, not a performance path),
  timed as the Projector runs it every step: :func:`ogpsa.ops.execute` on a cached plan;
* ``clip_grad_norm_``: :func:`torch.nn.utils.clip_grad_norm_` alone (what clipping costs today);
* ``copy``: a device-to-device copy of every byte the projection must read (the measured
  bandwidth ceiling).

Every projection contender also clips to ``max_norm=1.0``: one optimizer step's worth of
work. The authors' scheme is 8 micro-batches of hooks plus one ``clip_grad_norm_``.

Byte accounting (stated in every result file): for gradients of ``B_g`` bytes in total
and basis rows of ``B_u`` bytes each (``sum_i N_i * sizeof(basis)``), the two-pass
projection moves ``3*B_g + 2*k*B_u`` bytes (pass 1 reads g and the k rows; pass 2 reads g
and the k rows again and writes g); that is the byte count behind "effective bandwidth".
A one-pass kernel could move ``2*B_g + k*B_u`` (reported as ``bytes_one_pass``). The copy
contender reads ``B_g + k*B_u`` and writes as much.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import importlib.util
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from . import ops, reference

MAX_NORM = 1.0
MICRO_BATCHES = 8  # the authors' scheme projects at every micro-batch of this accumulation
KS = (1, 2, 4, 8)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
REPO_ROOT = Path(__file__).resolve().parent.parent
README_START = "<!-- ogpsa-bench:start -->"
README_END = "<!-- ogpsa-bench:end -->"
#: every generated README block, default (CPU) or named (e.g. ``gpu``): group 1 is the name
README_BLOCK_RE = re.compile(r"<!-- ogpsa-bench(?::([a-z0-9-]+))?:start -->.*?<!-- ogpsa-bench(?::\1)?:end -->", re.S)


def readme_markers(name: Optional[str] = None) -> tuple[str, str]:
    """Start and end markers of the README block called ``name`` (None: the default block)."""
    if name is None:
        return README_START, README_END
    if not re.fullmatch(r"[a-z0-9-]+", name):
        raise ValueError(f"README block name {name!r} must be lowercase letters, digits or '-'")
    return f"<!-- ogpsa-bench:{name}:start -->", f"<!-- ogpsa-bench:{name}:end -->"


# ----------------------------------------------------------------------------------------
# Workloads
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Workload:
    """A list of parameter-tensor shapes. ``full_numel`` is the size of the model the list
    stands for when it was scaled down (results are then extrapolated per element)."""

    name: str
    description: str
    shapes: list[tuple[str, tuple[int, ...]]]
    full_numel: Optional[int] = None

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for _, s in self.shapes)

    @property
    def tensors(self) -> int:
        return len(self.shapes)


# Llama-3.1-8B: hidden 4096, 32 layers, 32 query / 8 key-value heads of 128, MLP 14336, vocab 128256
_LLAMA = dict(hidden=4096, kv=1024, mlp=14336, vocab=128256, layers=32)


def _llama_layer(i: int, hidden: int, kv: int, mlp: int) -> list[tuple[str, tuple[int, ...]]]:
    p = f"model.layers.{i}."
    return [
        (p + "self_attn.q_proj.weight", (hidden, hidden)),
        (p + "self_attn.k_proj.weight", (kv, hidden)),
        (p + "self_attn.v_proj.weight", (kv, hidden)),
        (p + "self_attn.o_proj.weight", (hidden, hidden)),
        (p + "mlp.gate_proj.weight", (mlp, hidden)),
        (p + "mlp.up_proj.weight", (mlp, hidden)),
        (p + "mlp.down_proj.weight", (hidden, mlp)),
        (p + "input_layernorm.weight", (hidden,)),
        (p + "post_attention_layernorm.weight", (hidden,)),
    ]


def llama8b_full_numel() -> int:
    h, L = _LLAMA["hidden"], _LLAMA["layers"]
    per_layer = sum(math.prod(s) for _, s in _llama_layer(0, h, _LLAMA["kv"], _LLAMA["mlp"]))
    return L * per_layer + 2 * _LLAMA["vocab"] * h + h  # + embed_tokens, lm_head, final norm


def llama8b_workload(layers: int) -> Workload:
    """``layers`` decoder layers of Llama-3.1-8B (no embedding / lm_head: the 2 x 525M-element
    tables would not fit next to a rank-8 basis; per element they cost the same as the
    big projections, so the per-element extrapolation to the full 8.03B covers them)."""
    h, kv, mlp = _LLAMA["hidden"], _LLAMA["kv"], _LLAMA["mlp"]
    shapes = [s for i in range(layers) for s in _llama_layer(i, h, kv, mlp)]
    return Workload("llama8b", f"Llama-3.1-8B shapes, {layers} of 32 decoder layers (extrapolated per element)",
                    shapes, full_numel=llama8b_full_numel())


def lora_workload(layers: int = 32, rank: int = 16) -> Workload:
    """LoRA r=16 on every linear of a 32-layer, 4096-wide Llama-3.1-8B: 14 tensors a layer."""
    h, kv, mlp = _LLAMA["hidden"], _LLAMA["kv"], _LLAMA["mlp"]
    linears = [("self_attn.q_proj", h, h), ("self_attn.k_proj", h, kv), ("self_attn.v_proj", h, kv),
               ("self_attn.o_proj", h, h), ("mlp.gate_proj", h, mlp), ("mlp.up_proj", h, mlp),
               ("mlp.down_proj", mlp, h)]
    shapes = []
    for i in range(layers):
        for name, fan_in, fan_out in linears:
            p = f"model.layers.{i}.{name}."
            shapes.append((p + "lora_A.weight", (rank, fan_in)))
            shapes.append((p + "lora_B.weight", (fan_out, rank)))
    return Workload("lora", f"LoRA r={rank} on every linear of a {layers}-layer 4096-wide Llama-3.1-8B", shapes)


def gpt2_125m_workload(layers: int = 12, hidden: int = 768, vocab: int = 50257, positions: int = 1024) -> Workload:
    """GPT-2-small shapes (124M parameters, 148 tensors, biases and norms included)."""
    shapes: list[tuple[str, tuple[int, ...]]] = [("wte", (vocab, hidden)), ("wpe", (positions, hidden))]
    for i in range(layers):
        p = f"h.{i}."
        shapes += [(p + "ln_1.weight", (hidden,)), (p + "ln_1.bias", (hidden,)),
                   (p + "attn.c_attn.weight", (hidden, 3 * hidden)), (p + "attn.c_attn.bias", (3 * hidden,)),
                   (p + "attn.c_proj.weight", (hidden, hidden)), (p + "attn.c_proj.bias", (hidden,)),
                   (p + "ln_2.weight", (hidden,)), (p + "ln_2.bias", (hidden,)),
                   (p + "mlp.c_fc.weight", (hidden, 4 * hidden)), (p + "mlp.c_fc.bias", (4 * hidden,)),
                   (p + "mlp.c_proj.weight", (4 * hidden, hidden)), (p + "mlp.c_proj.bias", (hidden,))]
    shapes += [("ln_f.weight", (hidden,)), ("ln_f.bias", (hidden,))]
    return Workload("125m", f"GPT-2-small shapes ({layers} layers, {hidden} wide)", shapes)


def tiny_workload() -> Workload:
    """A few odd-sized tensors, for smoke tests."""
    return Workload("tiny", "5 odd-sized tensors (smoke test)",
                    [("a", (33, 7)), ("b", (4097,)), ("c", (3, 5, 11)), ("d", (1000,)), ("e", (129, 65))])


def _fill_basis(u: Tensor, gen: torch.Generator, cpu_gen: torch.Generator) -> None:
    """Random rows, orthonormal exactly for small tensors and approximately for large ones.

    A float64 QR of a [N, k] matrix is cheap below ~65k elements; above, normalised Gaussian
    rows are used: their pairwise inner products are ~1/sqrt(N) (< 0.4% here). Every
    contender projects onto the row span through M = U U^T (or re-orthogonalises), so
    timing does not depend on exact orthonormality."""
    k, n = u.shape
    if n <= 65536:
        q, _ = torch.linalg.qr(torch.randn(n, k, generator=cpu_gen, dtype=torch.float64))
        u.copy_(q.T)
        return
    for j in range(k):  # one float32 row at a time: no k x N float32 temporary next to u
        row = torch.empty(n, dtype=torch.float32, device=u.device)
        row.normal_(generator=gen)
        row.div_(row.norm())
        u[j].copy_(row)


def make_tensors(workload: Workload, k: int, grad_dtype: torch.dtype, basis_dtype: torch.dtype,
                 device: torch.device, seed: int = 0) -> tuple[list[Tensor], list[Tensor]]:
    """Seeded random gradients (never zeros) and bases ``[min(k, N_i), N_i]`` for a workload,
    generated on the device (a CPU generator would take minutes for a GPU-sized list)."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    cpu_gen = gen if device.type == "cpu" else torch.Generator().manual_seed(seed)
    grads, bases = [], []
    for _, shape in workload.shapes:
        n = math.prod(shape)
        g = torch.empty(shape, dtype=torch.float32, device=device)
        g.normal_(generator=gen)
        grads.append(g.to(grad_dtype))
        del g
        u = torch.empty(min(k, n), n, dtype=basis_dtype, device=device)
        _fill_basis(u, gen, cpu_gen)
        bases.append(u)
    return grads, bases


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

    if wanted("clip_grad_norm_"):
        params = _clip_params(grads)
        out.append(Contender("clip_grad_norm_", "torch clip_grad_norm_ alone",
                             lambda: torch.nn.utils.clip_grad_norm_(params, MAX_NORM)))
    if wanted("copy"):
        dsts, srcs = _copy_lists(grads, bases)
        out.append(Contender("copy", "copy of the same bytes", lambda: torch._foreach_copy_(dsts, srcs),
                             note="reads every gradient and basis byte once, writes as many"))
    return out


# ----------------------------------------------------------------------------------------
# Timing and memory
# ----------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclasses.dataclass
class Timing:
    times_ms: list[float]
    warm: bool  # False: the single sample is the first call (slow contender, no warm-up)

    @property
    def median(self) -> float:
        return statistics.median(self.times_ms)


def time_fn(fn: Callable[[], object], device: torch.device, *, budget_s: float = 2.0, min_reps: int = 3,
            max_reps: int = 20, slow_s: Optional[float] = None) -> Timing:
    """Median-ready samples of ``fn``. CPU: perf_counter around each call after one warm-up
    call. CUDA: events around each call, after a warm-up, with the L2 cache flushed before
    each sample (a 256 MB write) so that repeated calls do not measure the cache.

    A first call slower than ``slow_s`` (default: 4 s on CUDA, 2 s on the CPU, where the
    first call pays no compilation) is kept as the only sample (reported as such)."""
    if slow_s is None:
        slow_s = 4.0 if device.type == "cuda" else 2.0
    if device.type == "cuda":
        flush = torch.empty(256 << 20, dtype=torch.uint8, device=device)
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        first = time.perf_counter() - t0
        if first > slow_s:
            return Timing([first * 1e3], warm=False)
        reps = int(min(max_reps, max(min_reps, budget_s / max(first, 1e-6))))
        events = []
        for _ in range(reps):
            flush.zero_()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            events.append((s, e))
        torch.cuda.synchronize(device)
        return Timing([s.elapsed_time(e) for s, e in events], warm=True)
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    if first > slow_s:
        return Timing([first * 1e3], warm=False)
    reps = int(min(max_reps, max(min_reps, budget_s / max(first, 1e-6))))
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return Timing(out, warm=True)


def extra_peak_bytes(fn: Callable[[], object], device: torch.device) -> tuple[Optional[int], str]:
    """Memory ``fn`` allocates beyond what exists before the call, at its peak.

    CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation before the call. CPU:
    the PyTorch profiler's allocation records (``profile_memory=True``), summed in time
    order at operator granularity (a peak inside one operator is not seen)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base), "cuda max_memory_allocated"
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage)
    cur = peak = 0
    for _, delta in events:
        cur += delta
        peak = max(peak, cur)
    return int(peak), "torch profiler (CPU allocations, operator granularity)"


# ----------------------------------------------------------------------------------------
# Suites and the run
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Config:
    workload: str
    k: int
    grad_dtype: str
    basis_dtype: str
    skip: dict = dataclasses.field(default_factory=dict)  # contender -> why it is not run here


def byte_counts(grads: Sequence[Tensor], bases: Sequence[Tensor]) -> dict:
    """Byte accounting for one case (see the module docstring)."""
    b_g = sum(g.numel() * g.element_size() for g in grads)
    kb_u = sum(u.numel() * u.element_size() for u in bases)  # = sum_i k_i * N_i * sizeof(basis)
    return {"bytes_g": b_g, "bytes_kU": kb_u, "bytes_floor": 3 * b_g + 2 * kb_u,
            "bytes_one_pass": 2 * b_g + kb_u, "bytes_copy": 2 * (b_g + kb_u)}


def suite(name: str, device: torch.device, memory_budget: Optional[int] = None) -> tuple[dict, list[Config]]:
    """Workloads and the ordered list of configurations for a named suite.

    ``cpu`` (the default on a CPU): LoRA and 125M lists for k in {1,2,4,8} with fp32
    gradients and basis and one Llama-3.1-8B layer at k=2 (fp32), then k=2 with bf16/bf16
    and bf16/fp32 (LoRA) and bf16/bf16 (125M), most important first; ``max_minutes`` stops it from starting new cases
    (on a busy machine the tail is listed as not run).
    ``gpu``: all three workloads x k in {1,2,4,8} x (fp32/fp32, bf16/bf16, bf16/fp32), the
    Llama list scaled to as many layers as fit ``memory_budget`` bytes at k=8.
    ``smoke``: one tiny case per contender.
    """
    if name == "smoke":
        return {"tiny": tiny_workload()}, [Config("tiny", 2, "fp32", "fp32")]
    pairs = [("fp32", "fp32"), ("bf16", "bf16"), ("bf16", "fp32")]
    if name == "cpu":
        wl = {"lora": lora_workload(), "125m": gpt2_125m_workload(), "llama8b": llama8b_workload(1)}
        # the README's k=2 cases first, so that a run cut short by --max-minutes still has them
        cfgs = [Config(w, 2, "fp32", "fp32") for w in ("lora", "125m")]
        cfgs.append(Config("llama8b", 2, "fp32", "fp32", skip={
            "authors-hooks": "not run on the CPU Llama layer: one step would take minutes on 2 cores "
                             "(its per-element cost is measured on the 125m list)"}))
        cfgs += [Config(w, k, "fp32", "fp32") for w in ("lora", "125m") for k in (1, 4, 8)]
        # all three dtype pairs on the LoRA list, bf16/bf16 on the 125m list (time)
        cfgs += [Config("lora", 2, g, u) for g, u in pairs[1:]] + [Config("125m", 2, "bf16", "bf16")]
        return wl, cfgs
    if name == "gpu":
        if memory_budget is None:
            memory_budget = int(torch.cuda.get_device_properties(device).total_memory * 0.45) \
                if device.type == "cuda" else 4 << 30
        one = llama8b_workload(1).numel
        # per layer at the worst case (fp32 grads, 8 fp32 basis rows, the copy scratch, temporaries)
        layers = max(1, min(32, memory_budget // (one * 4 * (1 + 8 + 1 + 2))))
        wl = {"llama8b": llama8b_workload(int(layers)), "lora": lora_workload(), "125m": gpt2_125m_workload()}
        # k=2 of every workload and dtype pair first: a run cut short still has the headline cases
        cfgs = [Config(w, k, g, u) for ks_ in ((2,), (1, 4, 8)) for g, u in pairs for w in ("llama8b", "lora", "125m")
                for k in ks_]
        return wl, cfgs
    raise ValueError(f"suite {name!r} is not one of ('cpu', 'gpu', 'smoke')")


def _git_commit() -> str:
    if os.environ.get("OGPSA_GIT_COMMIT"):
        return os.environ["OGPSA_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        if out.returncode == 0:
            dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return out.stdout.strip() + ("+dirty" if dirty else "")
    except Exception:
        pass
    return "unknown"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    """Hardware, versions, commit: written into every result file."""
    env = {
        "date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S"),
        "device": str(device),
        "hardware": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "git_commit": _git_commit(),
        "command": " ".join(["ogpsa"] + sys.argv[1:]) if sys.argv and sys.argv[0].endswith("ogpsa") else " ".join(sys.argv),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception as exc:
        env["triton"] = f"not importable ({type(exc).__name__})"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu_memory_bytes"] = props.total_memory
        env["gpu_capability"] = f"{props.major}.{props.minor}"
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip()
        except Exception:
            env["driver"] = "unknown"
    env["env_vars"] = {v: os.environ[v] for v in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                                  "OGPSA_BACKEND", "TRITON_INTERPRET") if v in os.environ}
    if hasattr(os, "getloadavg"):
        env["loadavg_start"] = [round(x, 2) for x in os.getloadavg()]
    env["backends"] = {n: {"available": ok, "detail": why} for n, (ok, why) in ops.backends().items()}
    return env


def machine_slug(env: dict) -> str:
    base = env["hardware"] if env["device"].startswith("cuda") else f"cpu-{env['cpu']}-{env['torch_threads']}t"
    return re.sub(r"[^a-z0-9]+", "-", base.lower()).strip("-")


def peak_copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """GB/s (bytes read + written) of one large contiguous copy: the device's plain ceiling."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, budget_s=1.0, min_reps=5)
    return 2 * src.numel() * 4 / (t.median * 1e-3) / 1e9


def run_config(cfg: Config, wl: Workload, grads: list[Tensor], bases: list[Tensor], device: torch.device, *,
               budget_s: float, measure_memory: bool, only: Optional[Sequence[str]] = None,
               deadline: Optional[float] = None, peak_copy_gbps: Optional[float] = None,
               log=print) -> list[dict]:
    """Time every contender on one case; returns one row per contender."""
    names = [n for n, _ in wl.shapes]
    counts = byte_counts(grads, bases)
    rows = []
    for c in build_contenders(grads, bases, names, only):
        row = {"workload": cfg.workload, "k": cfg.k, "grad_dtype": cfg.grad_dtype, "basis_dtype": cfg.basis_dtype,
               "contender": c.name, "label": c.label, "note": c.note, "numel": wl.numel, "tensors": wl.tensors,
               **counts}
        if c.skip is None and c.name in cfg.skip:
            c.skip = cfg.skip[c.name]
        if c.skip is None and deadline is not None and time.perf_counter() > deadline:
            c.skip = "time budget of the run spent before this contender"
        if c.skip:
            row.update(status="skipped", reason=c.skip)
            rows.append(row)
            continue
        try:
            t = time_fn(c.fn, device, budget_s=budget_s)
            row.update(status="ok", median_ms=t.median, min_ms=min(t.times_ms), max_ms=max(t.times_ms),
                       reps=len(t.times_ms), warm=t.warm, plan_ms=c.plan_ms)
            if measure_memory and t.median < 3000:
                peak, how = extra_peak_bytes(c.fn, device)
                row.update(extra_peak_bytes=peak, memory_method=how)
            else:
                row.update(extra_peak_bytes=None,
                           memory_method="not measured" + (" (contender too slow on this device)" if measure_memory else ""))
        except Exception as exc:  # report and go on: one broken contender must not lose the run
            row.update(status="error", reason=f"{type(exc).__name__}: {exc}")
        rows.append(row)
        log(f"  {c.name:<16} " + (f"{row['median_ms']:10.3f} ms" if row.get("status") == "ok" else row["status"] + ": "
                                  + row.get("reason", "")))
    _derive(rows, wl, peak_copy_gbps)
    return rows


def _derive(rows: list[dict], wl: Workload, peak_copy_gbps: Optional[float] = None) -> None:
    """Bandwidth, % of copy, speed-ups and extrapolation for the rows of one case."""
    by = {r["contender"]: r for r in rows if r.get("status") == "ok"}
    copy = by.get("copy")
    copy_gbps = copy["bytes_copy"] / (copy["median_ms"] * 1e-3) / 1e9 if copy else None
    # the ceiling is the better of this list's copy and one large copy, so that a copy slowed
    # by many small tensors (or by a noisy neighbour) cannot inflate the percentages
    ceiling = max(x for x in (copy_gbps, peak_copy_gbps) if x) if (copy_gbps or peak_copy_gbps) else None
    for r in rows:
        if r.get("status") != "ok":
            continue
        t = r["median_ms"] * 1e-3
        moved = r["bytes_copy"] if r["contender"] == "copy" else r["bytes_floor"]
        if r["contender"] == "clip_grad_norm_":
            moved = 3 * r["bytes_g"]  # clipping alone: read for the norm, read + write to scale
        r["eff_gbps"] = moved / t / 1e9
        r["copy_gbps"] = copy_gbps
        r["ceiling_gbps"] = ceiling
        r["pct_copy"] = 100 * r["eff_gbps"] / ceiling if ceiling else None
        r["ns_per_elem"] = r["median_ms"] * 1e6 / r["numel"]
        if wl.full_numel:
            r["full_numel"] = wl.full_numel
            r["extrapolated_full_ms"] = r["ns_per_elem"] * wl.full_numel * 1e-6
        for ref, key in (("reference", "x_reference"), ("authors-hooks", "x_authors"), ("clip_grad_norm_", "x_clip")):
            r[key] = by[ref]["median_ms"] / r["median_ms"] if ref in by else None
        # x_clip above is "clip is N times faster"; the target wants our time over clip's
        r["over_clip"] = r["median_ms"] / by["clip_grad_norm_"]["median_ms"] if "clip_grad_norm_" in by else None


def run_bench(suite_name: str, device: torch.device, out_dir: Path, *, only: Optional[Sequence[str]] = None,
              workloads: Optional[Sequence[str]] = None, ks: Optional[Sequence[int]] = None,
              max_minutes: float = 9.0, budget_s: Optional[float] = None, plot: bool = True,
              memory_budget: Optional[int] = None, log=print) -> dict:
    """Run a suite and write results.json, results.md and bench.png into ``out_dir``."""
    start = time.perf_counter()
    wls, cfgs = suite(suite_name, device, memory_budget)
    if workloads:
        cfgs = [c for c in cfgs if c.workload in workloads]
    if ks:
        cfgs = [c for c in cfgs if c.k in ks]
    env = environment(device)
    budget_s = budget_s if budget_s is not None else (0.3 if suite_name == "smoke" else 1.5 if device.type == "cpu" else 0.5)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = {"schema": 1, "suite": suite_name, "env": env, "formula": FORMULA, "max_norm": MAX_NORM,
            "micro_batches": MICRO_BATCHES,
            "workloads": {n: {"description": w.description, "tensors": w.tensors, "numel": w.numel,
                              "full_numel": w.full_numel} for n, w in wls.items()},
            "results": [], "skipped_configs": []}
    if suite_name != "smoke":
        data["peak_copy_gbps"] = peak_copy_bandwidth(device, (1 << 30) if device.type == "cuda" else (256 << 20))
        log(f"peak copy bandwidth: {data['peak_copy_gbps']:.1f} GB/s (read + write)")
    cache: dict = {}
    for cfg in cfgs:
        elapsed = (time.perf_counter() - start) / 60
        if elapsed > max_minutes:
            data["skipped_configs"].append({"workload": cfg.workload, "k": cfg.k, "grad_dtype": cfg.grad_dtype,
                                            "basis_dtype": cfg.basis_dtype,
                                            "reason": f"time budget ({max_minutes} min) spent"})
            continue
        key = (cfg.workload, cfg.grad_dtype, cfg.basis_dtype)
        if cache.get("key") != key:
            grads = bases = None  # drop the previous case's tensors before making the next ones
            cache.clear()
            _free(device)
            k_max = max(c.k for c in cfgs if (c.workload, c.grad_dtype, c.basis_dtype) == key)
            g, u = make_tensors(wls[cfg.workload], k_max, DTYPES[cfg.grad_dtype], DTYPES[cfg.basis_dtype], device)
            cache.update(key=key, grads=g, bases=u)
        grads = cache["grads"]
        # the first k rows of a contiguous [k_max, N] basis are a contiguous [k, N] view
        bases = [u[:min(cfg.k, u.shape[0])] for u in cache["bases"]]
        log(f"{cfg.workload} k={cfg.k} grads {cfg.grad_dtype} basis {cfg.basis_dtype} "
            f"({wls[cfg.workload].tensors} tensors, {wls[cfg.workload].numel / 1e6:.1f}M elements)")
        measure = device.type == "cuda" or cfg.k == 2
        data["results"] += run_config(cfg, wls[cfg.workload], grads, bases, device, budget_s=budget_s,
                                      measure_memory=measure, only=only, deadline=start + 60 * max_minutes,
                                      peak_copy_gbps=data.get("peak_copy_gbps"), log=log)
        write_results(data, out_dir, plot=False)
    cache.clear()
    if hasattr(os, "getloadavg"):
        env["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    env["wall_s"] = time.perf_counter() - start
    data["targets"] = targets(data)
    write_results(data, out_dir, plot=plot)
    return data


def _free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


FORMULA = {
    "bytes_floor": "3*B_g + 2*k*B_u: two-pass projection (pass 1 reads g and k basis rows, pass 2 reads them again "
                   "and writes g); B_g = gradient bytes, B_u = bytes of one basis row set (sum_i N_i * sizeof(basis))",
    "bytes_one_pass": "2*B_g + k*B_u: each input read once, g written once (what a one-pass kernel moves)",
    "bytes_copy": "2*(B_g + k*B_u): the copy contender reads every gradient and basis byte once and writes as many",
    "eff_gbps": "bytes_floor / median time (copy: bytes_copy / time; clip_grad_norm_: 3*B_g / time)",
    "pct_copy": "eff_gbps / ceiling_gbps, the higher of the same case's copy and one large contiguous copy",
    "time": "median over repetitions; CPU: perf_counter after one warm-up call; CUDA: events after a warm-up, "
            "L2 flushed before each sample",
    "per_step": "every projection contender also clips to max_norm=1.0; authors-hooks = 8 micro-batches of hooks "
                "+ one clip_grad_norm_",
}


# ----------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------


def _fmt(x, spec: str, none: str = "n/a") -> str:
    return none if x is None else format(x, spec)


def _mem(b: Optional[int]) -> str:
    if b is None:
        return "n/a"
    return f"{b / 2**20:.1f} MiB" if b >= 2**20 else f"{b / 2**10:.0f} KiB"


def _table(rows: Sequence[dict]) -> list[str]:
    lines = ["| contender | ms / step | GB/s (byte floor) | % of copy | × reference | × authors | time / clip alone | extra peak memory |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"| {r['contender']} | {r['status']}: {r.get('reason', '')[:90]} | | | | | | |")
            continue
        lines.append(
            f"| {r['contender']} | {r['median_ms']:.2f} | {r['eff_gbps']:.1f} | {_fmt(r['pct_copy'], '.0f')} | "
            f"{_fmt(r['x_reference'], '.2f')} | {_fmt(r['x_authors'], '.1f')} | {_fmt(r['over_clip'], '.2f')} | "
            f"{_mem(r.get('extra_peak_bytes'))} |")
    return lines


def _cases(data: dict) -> list[tuple]:
    seen = []
    for r in data["results"]:
        key = (r["workload"], r["k"], r["grad_dtype"], r["basis_dtype"])
        if key not in seen:
            seen.append(key)
    return seen


def markdown(data: dict) -> str:
    env = data["env"]
    out = [f"# ogpsa bench: {env['hardware']} ({data['suite']} suite)", "",
           f"- date {env['date']}, git {env['git_commit']}, torch {env['torch']}, triton {env['triton']}, "
           f"python {env['python']}, {env['torch_threads']} torch threads on {env['cpu_count']} CPUs",
           f"- device {env['device']}" + (f", driver {env.get('driver')}" if env.get("driver") else "")
           + f", environment {env.get('env_vars') or '{}'}",
           f"- load average at start/end: {env.get('loadavg_start')} / {env.get('loadavg_end')} "
           "(the CPU may be shared: timings include that noise)",
           f"- peak copy bandwidth (one large copy, read + write): {_fmt(data.get('peak_copy_gbps'), '.1f')} GB/s",
           f"- byte floor: {data['formula']['bytes_floor']}",
           f"- per step: {data['formula']['per_step']}", ""]
    for name, w in data["workloads"].items():
        extra = f"; stands for {w['full_numel'] / 1e9:.2f}B elements" if w.get("full_numel") else ""
        out.append(f"- workload `{name}`: {w['description']}: {w['tensors']} tensors, {w['numel'] / 1e6:.1f}M elements{extra}")
    out.append("")
    for key in _cases(data):
        rows = [r for r in data["results"] if (r["workload"], r["k"], r["grad_dtype"], r["basis_dtype"]) == key]
        out += [f"## {key[0]}, k={key[1]}, grads {key[2]}, basis {key[3]}", ""] + _table(rows)
        ext = [r for r in rows if r.get("extrapolated_full_ms") is not None]
        if ext:
            out += ["", "Extrapolated to the full model per element: " + ", ".join(
                f"{r['contender']} {r['extrapolated_full_ms']:.0f} ms" for r in ext)]
        out.append("")
    if data.get("skipped_configs"):
        out += ["## Not run", ""] + [f"- {c['workload']} k={c['k']} {c['grad_dtype']}/{c['basis_dtype']}: {c['reason']}"
                                     for c in data["skipped_configs"]] + [""]
    if data.get("targets"):
        out += ["## Targets (measured ratios, not asserts)", ""] + [f"- {t}" for t in data["targets"]] + [""]
    return "\n".join(out)


def _best_ours(data: dict) -> list[dict]:
    """Per case, the fastest ``ogpsa:*`` row (what a user with the auto backend would get)."""
    best: dict = {}
    for r in data["results"]:
        if r.get("status") == "ok" and r["contender"].startswith("ogpsa:"):
            key = (r["workload"], r["k"], r["grad_dtype"], r["basis_dtype"])
            if key not in best or r["median_ms"] < best[key]["median_ms"]:
                best[key] = r
    return list(best.values())


def targets(data: dict) -> list[str]:
    """The issue's targets, each stated as the measured range over cases of the fastest
    ogpsa backend per case (or why it cannot be measured here)."""
    ours = _best_ours(data)
    device = data["env"]["device"]
    out = []

    def case(r):
        return f"{r['contender']}, {r['workload']} k={r['k']} {r['grad_dtype']}/{r['basis_dtype']}"

    def span(rows, key, unit="x", spec=".2f"):
        rows = [r for r in rows if r.get(key) is not None]
        if not rows:
            return None
        lo, hi = min(rows, key=lambda r: r[key]), max(rows, key=lambda r: r[key])
        if lo is hi:
            return f"{format(lo[key], spec)}{unit} ({case(lo)})"
        return f"{format(lo[key], spec)}{unit} ({case(lo)}) to {format(hi[key], spec)}{unit} ({case(hi)})"

    checks = [("fused projection, % of copy bandwidth (target >= 90% on H100)", ours, "pct_copy", "%", ".0f")]
    for wl, goal in (("llama8b", 5), ("125m", 5), ("lora", 20)):
        checks.append((f"{wl}: vs the reference (target >= {goal}x)", [r for r in ours if r["workload"] == wl],
                       "x_reference", "x", ".2f"))
    checks += [("vs the authors' scheme per optimizer step (target >= 100x)", ours, "x_authors", "x", ".1f"),
               ("projection + clipping over clipping alone (target <= 1.15x)", ours, "over_clip", "x", ".2f"),
               ("CPU extension vs the reference (target >= 1.5x on 2 cores)",
                [r for r in data["results"] if r.get("status") == "ok" and r["contender"] == "ogpsa:cpu"],
                "x_reference", "x", ".2f")]
    for text, rows, key, unit, spec in checks:
        got = span(rows, key, unit, spec)
        if got:
            out.append(f"{text}: {got}")
    if device == "cpu":
        out.append("GPU targets (H100 bandwidth, CUDA/Triton kernels) await a GPU run of benchmarks/gpu_check.sh")
    return out


def plot_results(data: dict, path: Path) -> Optional[Path]:
    """bench.png: time per step (top) and % of copy bandwidth (bottom) against k, one panel
    per workload, for the first dtype pair of the suite (fp32 gradients and basis)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    ok = [r for r in data["results"] if r.get("status") == "ok"]
    if not ok:
        return None
    pair = (ok[0]["grad_dtype"], ok[0]["basis_dtype"])
    wls = list(dict.fromkeys(r["workload"] for r in ok))
    fig, axes = plt.subplots(2, len(wls), figsize=(4.6 * len(wls), 7.5), squeeze=False)
    for j, wl in enumerate(wls):
        rows = [r for r in ok if r["workload"] == wl and (r["grad_dtype"], r["basis_dtype"]) == pair]
        for name in dict.fromkeys(r["contender"] for r in rows):
            pts = sorted((r["k"], r["median_ms"], r["pct_copy"]) for r in rows if r["contender"] == name)
            ks_ = [p[0] for p in pts]
            axes[0][j].plot(ks_, [p[1] for p in pts], marker="o", label=name)
            if name != "copy" and all(p[2] is not None for p in pts):
                axes[1][j].plot(ks_, [p[2] for p in pts], marker="o", label=name)
        axes[0][j].set_yscale("log")
        axes[0][j].set_title(f"{wl} ({pair[0]} grads, {pair[1]} basis)")
        axes[0][j].set_ylabel("ms per optimizer step (log)")
        axes[1][j].set_ylabel("% of copy bandwidth (byte floor)")
        for ax in (axes[0][j], axes[1][j]):
            ax.set_xlabel("k (basis rank)")
            ax.set_xticks(KS)
            ax.grid(True, alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="best")
    env = data["env"]
    fig.suptitle(f"ogpsa bench on {env['hardware']} ({env['torch_threads']} threads), torch {env['torch']}, "
                 f"git {env['git_commit'][:12]}, {env['date'][:10]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_results(data: dict, out_dir: Path, plot: bool = True) -> None:
    (out_dir / "results.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    (out_dir / "results.md").write_text(markdown(data) + "\n")
    if plot:
        plot_results(data, out_dir / "bench.png")


# ----------------------------------------------------------------------------------------
# README block (generated from a committed result file, checked by a test)
# ----------------------------------------------------------------------------------------


def readme_block(results_json: Path, repo_root: Path = REPO_ROOT, name: Optional[str] = None) -> str:
    """The README's benchmark block for a result file: provenance, the k=2 table per
    workload for the suite's first dtype pair, and the plot. Deterministic in the file."""
    data = json.loads(Path(results_json).read_text())
    rel = Path(os.path.relpath(Path(results_json).resolve(), repo_root.resolve())).as_posix()
    folder = rel.rsplit("/", 1)[0]
    env = data["env"]
    ok = [r for r in data["results"] if r.get("status") == "ok"]
    pair = (ok[0]["grad_dtype"], ok[0]["basis_dtype"]) if ok else ("fp32", "fp32")
    start, end = readme_markers(name)
    out = [start, f"Source: [`{rel}`]({rel}) (full tables: [`{folder}/results.md`]({folder}/results.md)), "
           f"written by `{env['command']}` on {env['date'][:10]}, git `{env['git_commit'][:12]}`: "
           f"{env['hardware']}, {env['torch_threads']} torch threads, torch {env['torch']}, "
           f"environment {env.get('env_vars') or '{}'}, "
           f"load average {env.get('loadavg_start')} at the start (a shared machine: expect noise). "
           f"Peak copy bandwidth {_fmt(data.get('peak_copy_gbps'), '.1f')} GB/s. One optimizer step's work each "
           f"(projection + clipping to 1.0; the authors' scheme: {data['micro_batches']} micro-batches of hooks "
           "+ clip_grad_norm_); GB/s by the byte floor 3·B_g + 2·k·B_u; % of copy: of the higher of the list's copy "
           "and one large copy.", ""]
    for wl in dict.fromkeys(r["workload"] for r in ok):
        rows = [r for r in data["results"] if r["workload"] == wl and r["k"] == 2
                and (r["grad_dtype"], r["basis_dtype"]) == pair]
        if not rows:
            continue
        w = data["workloads"][wl]
        out += [f"**{wl}** ({w['description']}; {w['tensors']} tensors, {w['numel'] / 1e6:.1f}M elements), "
                f"k=2, {pair[0]} gradients, {pair[1]} basis:", ""] + _table(rows) + [""]
    if data.get("targets"):
        out += ["Targets, as measured:", ""] + [f"- {t}" for t in data["targets"]] + [""]
    out += [f"![benchmark plot]({folder}/bench.png)", "", end]
    return "\n".join(out)


def update_readme(readme: Path, block: str, name: Optional[str] = None) -> None:
    """Replace the README block called ``name`` (between its markers) with ``block``."""
    start, end = readme_markers(name)
    text = readme.read_text()
    if start not in text or end not in text:
        raise ValueError(f"{readme} has no {start} ... {end} markers to replace")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(head + block + tail)


# ----------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--suite", choices=("auto", "cpu", "gpu", "smoke"), default="auto",
                        help="auto: gpu when CUDA is available, else cpu")
    parser.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if available)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: benchmarks/results/<machine>/<date>/ in the source tree, "
                             "else ./ogpsa-bench/<machine>/<date>/)")
    parser.add_argument("--contenders", nargs="*", default=None, help="only contenders whose names start with these")
    parser.add_argument("--workloads", nargs="*", default=None, help="only these workloads (lora, 125m, llama8b, tiny)")
    parser.add_argument("--ks", nargs="*", type=int, default=None, help="only these ranks")
    parser.add_argument("--max-minutes", type=float, default=9.0, help="stop starting new cases after this long")
    parser.add_argument("--budget-s", type=float, default=None, help="timing budget per contender and case")
    parser.add_argument("--memory-budget-gb", type=float, default=None, help="gpu suite: bytes for the Llama list")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--readme", type=Path, default=None, metavar="RESULTS_JSON",
                        help="print the README benchmark block for a result file and exit")
    parser.add_argument("--readme-name", default=None, metavar="NAME",
                        help="with --readme: a named block (<!-- ogpsa-bench:NAME:start -->), e.g. gpu")
    parser.add_argument("--update-readme", type=Path, default=None, metavar="README",
                        help="with --readme: replace the block between the markers in this README")


def run(args: argparse.Namespace) -> int:
    if args.readme is not None:
        block = readme_block(args.readme, name=args.readme_name)
        if args.update_readme is not None:
            update_readme(args.update_readme, block, args.readme_name)
        else:
            print(block)
        return 0
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("ogpsa bench: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    name = args.suite if args.suite != "auto" else ("gpu" if device.type == "cuda" else "cpu")
    out = args.out
    if out is None:
        env = {"device": str(device), "hardware": torch.cuda.get_device_name(device) if device.type == "cuda" else "",
               "cpu": _cpu_name(), "torch_threads": torch.get_num_threads()}
        root = REPO_ROOT / "benchmarks" / "results" if (REPO_ROOT / "benchmarks").is_dir() else Path("ogpsa-bench")
        out = root / machine_slug(env) / _dt.date.today().isoformat()
    mem = int(args.memory_budget_gb * 2**30) if args.memory_budget_gb else None
    data = run_bench(name, device, out, only=args.contenders, workloads=args.workloads, ks=args.ks,
                     max_minutes=args.max_minutes, budget_s=args.budget_s, plot=not args.no_plot, memory_budget=mem)
    errors = [r for r in data["results"] if r.get("status") == "error"]
    print(f"wrote {out}/results.json, results.md" + ("" if args.no_plot else ", bench.png")
          + f" in {data['env']['wall_s']:.0f} s")
    for t in data.get("targets", []):
        print("  " + t)
    for r in errors:
        print(f"ERROR {r['workload']} k={r['k']} {r['contender']}: {r['reason']}", file=sys.stderr)
    return 1 if errors else 0
