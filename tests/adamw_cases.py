"""Shared by the projected AdamW kernel tests (test_adamw_cuda.py, test_adamw_passes.py): seeded
problems (odd sizes, random moments, per-tensor steps, optional misaligned storage), a float64
oracle written from the math (not from the kernels), comparison helpers, and the CPU emulation of
the CUDA kernels (tests/adamw_emu.cpp, built once per source version and cached)."""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from typing import Optional

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HP = {"lr": 0.1, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.1}
PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BASIS_DTYPES = (torch.float32, torch.bfloat16)
MANTISSA = {torch.bfloat16: 7, torch.float16: 10}
#: (amsgrad, maximize, project_weight_decay, weight_decay)
OPTIONS = [(False, False, False, 0.1), (True, False, True, 0.1), (False, True, False, 0.0), (True, True, True, 0.3)]
OPTION_IDS = ["decoupled", "amsgrad-projected", "maximize-nodecay", "all"]


# ----------------------------------------------------------------------------------------
# problems and the float64 oracle (written from the math, not from the kernels)
# ----------------------------------------------------------------------------------------


class Problem:
    """Parameters, moments, bases and M^-1 (float32, from the stored basis) of one call, and
    per-tensor step counts; ``grads(step)`` draws that step's gradients (seeded)."""

    def __init__(self, sizes, ks, pdt, udt, *, amsgrad: bool, seed: int, device="cpu", misalign=(),
                 pdts: Optional[list] = None):
        gen = torch.Generator().manual_seed(seed)
        self.seed, self.device, self.amsgrad = seed, device, amsgrad
        pdts = pdts or [pdt] * len(sizes)
        self.pdts = pdts
        self.params = [self._place(torch.randn(n, generator=gen).to(dt), i in misalign) for i, (n, dt) in
                       enumerate(zip(sizes, pdts))]
        self.ms = [self._place(0.1 * torch.randn(n, generator=gen), i in misalign) for i, n in enumerate(sizes)]
        self.vs = [self._place(0.01 * torch.rand(n, generator=gen) + 1e-4, i in misalign) for i, n in enumerate(sizes)]
        self.vmax = ([self._place(v.cpu() * (1 + torch.rand(v.numel(), generator=gen)), i in misalign)
                      for i, v in enumerate(self.vs)] if amsgrad else [])
        self.bases, self.minvs = [], []
        for i, (n, k) in enumerate(zip(sizes, ks)):
            k = min(k, n)
            if k == 0:
                u = torch.empty(0, n, dtype=udt)
            else:
                u = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))[0].T.contiguous().to(udt)
            self.bases.append(self._place(u, i in misalign))
            m = u.double() @ u.double().T
            self.minvs.append(torch.linalg.inv(m).float().contiguous().to(device) if k
                              else torch.empty(0, 0, device=device))
        self.steps = [1 + (i % 4) for i in range(len(sizes))]

    def _place(self, t: torch.Tensor, misalign: bool) -> torch.Tensor:
        """On the device; with ``misalign``, a contiguous view 4 bytes past a 16-byte boundary."""
        if not misalign:
            return t.to(self.device).contiguous()
        buf = torch.empty(t.numel() + 8, dtype=t.dtype, device=self.device)
        off = max(1, 4 // t.element_size())
        view = buf[off:off + t.numel()].view(t.shape)
        view.copy_(t.to(self.device))
        assert t.numel() == 0 or view.data_ptr() % 16 != 0
        return view

    def grads(self, step: int) -> list:
        gen = torch.Generator().manual_seed(self.seed * 1000 + step)
        return [torch.randn(p.numel(), generator=gen).to(p.dtype).to(self.device) for p in self.params]

    def pass1(self, grads, maximize: bool, project_wd: bool, weight_decay: float, k_max: int) -> torch.Tensor:
        """projected_adamw_pass1_ in place on the moments; returns [T, k_max + 1] (c, ||d||^2)."""
        return torch.ops.ogpsa.projected_adamw_pass1_(
            self.params, [g.to(self.device) for g in grads], self.ms, self.vs, self.vmax, self.bases, self.steps,
            k_max, HP["beta1"], HP["beta2"], HP["eps"], weight_decay, maximize, project_wd)

    def pass2(self, weights: torch.Tensor, kappa: float, project_wd: bool, weight_decay: float) -> torch.Tensor:
        """projected_adamw_pass2_ in place on the parameters; returns [T] removed norms."""
        return torch.ops.ogpsa.projected_adamw_pass2_(
            self.params, self.ms, self.vs, self.vmax, self.bases, weights.to(self.device), self.steps, HP["lr"],
            HP["beta1"], HP["beta2"], HP["eps"], weight_decay, kappa, project_wd)

    def weights(self, rows: torch.Tensor, k_max: int) -> torch.Tensor:
        """w_i = M_i^-1 c_i (float64, rounded to float32) from pass-1 rows: [T, k_max] on the CPU."""
        w = torch.zeros(len(self.params), k_max)
        for i, u in enumerate(self.bases):
            k = u.shape[0]
            if k:
                w[i, :k] = (self.minvs[i].double().cpu() @ rows[i, :k].double().cpu()).float()
        return w

    def clone(self, device=None) -> Problem:
        new = object.__new__(Problem)
        new.__dict__.update(self.__dict__)
        device = device or self.device
        new.device = device
        for name in ("params", "ms", "vs", "vmax", "bases", "minvs"):
            setattr(new, name, [t.to(device, copy=True) for t in getattr(self, name)])
        return new

    def shards(self, frac: float = 0.5) -> tuple:
        """Two problems whose tensors are the first ``frac`` and the rest of each of this problem's
        (1-D views of params and moments: writing a shard writes this problem; basis columns
        copied), as dim-0 sharding splits a flattened parameter. M^-1 stays the full tensor's."""
        out = []
        for lo in (True, False):
            sh = object.__new__(Problem)
            sh.__dict__.update(self.__dict__)
            cuts = [int(p.numel() * frac) for p in self.params]

            def part(t, c, lo=lo):
                return t.view(-1)[:c] if lo else t.view(-1)[c:]

            sh.params = [part(p, c) for p, c in zip(self.params, cuts)]
            sh.ms = [part(t, c) for t, c in zip(self.ms, cuts)]
            sh.vs = [part(t, c) for t, c in zip(self.vs, cuts)]
            sh.vmax = [part(t, c) for t, c in zip(self.vmax, cuts)]
            sh.bases = [(u[:, :c] if lo else u[:, c:]).contiguous() for u, c in zip(self.bases, cuts)]
            out.append(sh)
        return tuple(out)

    def call(self, grads, maximize: bool, project_wd: bool, weight_decay: float) -> torch.Tensor:
        """The op, in place on this problem's tensors; returns its [T, 2] statistics."""
        return torch.ops.ogpsa.projected_adamw_(
            self.params, [g.to(self.device) for g in grads], self.ms, self.vs, self.vmax, self.bases, self.minvs,
            self.steps, HP["lr"], HP["beta1"], HP["beta2"], HP["eps"], weight_decay, maximize, project_wd)


def oracle(pb: Problem, grads, maximize: bool, project_wd: bool, weight_decay: float) -> dict:
    """One step in float64 from the problem's current values (nothing modified)."""
    b1, b2, lr, eps = HP["beta1"], HP["beta2"], HP["lr"], HP["eps"]
    out = {"p": [], "m": [], "v": [], "x": [], "sq": [], "removed": []}
    for i, p in enumerate(pb.params):
        p0, g = p.double().reshape(-1), grads[i].double().to(p.device)
        g = -g if maximize else g
        m = pb.ms[i].double() + (1 - b1) * (g - pb.ms[i].double())
        v = b2 * pb.vs[i].double() + (1 - b2) * g * g
        vv = v
        if pb.amsgrad:
            vv = torch.maximum(pb.vmax[i].double(), v)
            out["x"].append(vv)
        t = pb.steps[i]
        d = (m / (1 - b1 ** t)) / (vv.sqrt() / (1 - b2 ** t) ** 0.5 + eps)
        if project_wd:
            d = d + weight_decay * p0
        u = pb.bases[i].double()
        sub = torch.zeros_like(d)
        if u.shape[0]:
            sub = u.T @ torch.linalg.solve(u @ u.T, u @ d)
        shrink = 1.0 if project_wd else 1 - lr * weight_decay
        out["p"].append(p0 * shrink - lr * (d - sub))
        out["m"].append(m)
        out["v"].append(v)
        out["sq"].append(float(d @ d))
        out["removed"].append(float(sub @ sub))
    return out


def oracle_pass2(pb: Problem, weights: torch.Tensor, kappa: float, project_wd: bool, weight_decay: float) -> dict:
    """Pass 2 in float64 from the stored moments (after pass 1) and the given float32 weights."""
    b1, b2, lr, eps = HP["beta1"], HP["beta2"], HP["lr"], HP["eps"]
    out = {"p": [], "removed": []}
    for i, p in enumerate(pb.params):
        p0 = p.double().reshape(-1)
        vv = (pb.vmax[i] if pb.amsgrad else pb.vs[i]).double()
        t = pb.steps[i]
        d = (pb.ms[i].double() / (1 - b1 ** t)) / (vv.sqrt() / (1 - b2 ** t) ** 0.5 + eps)
        if project_wd:
            d = d + weight_decay * p0
        u = pb.bases[i].double()
        sub = u.T @ weights[i, :u.shape[0]].double().to(u.device)
        new = kappa * d - sub
        shrink = 1.0 if project_wd else 1 - lr * weight_decay
        out["p"].append(p0 * shrink - lr * new)
        out["removed"].append(float((d - new) @ (d - new)))
    return out


def ulp(x: torch.Tensor, dtype) -> torch.Tensor:
    """Spacing of ``dtype`` values at |x| (float64 in, float64 out)."""
    _, e = torch.frexp(x.abs().clamp_min(2.0 ** -14))
    return torch.ldexp(torch.ones_like(x), e - 1 - MANTISSA[dtype])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


def check_step(pb: Problem, exp: dict, stats: torch.Tensor, p0: list, *, orth: bool) -> None:
    """The problem after one op call against the float64 oracle computed before it."""
    st = stats.double().cpu()
    for i, p in enumerate(pb.params):
        name = f"tensor {i} (n={p.numel()}, k={pb.bases[i].shape[0]})"
        assert rel(pb.ms[i], exp["m"][i]) <= 1e-6, name
        assert rel(pb.vs[i], exp["v"][i]) <= 1e-6, name
        if pb.amsgrad:
            assert rel(pb.vmax[i], exp["x"][i]) <= 1e-6, name
        got, want = p.double().reshape(-1), exp["p"][i]
        if p.dtype == torch.float32:
            # relative to the applied update (lr 0.1: fp32 rounding of p is ~4e-7 of it), or to
            # lr ||d|| when the projection removed (nearly) all of d
            scale = max(float((want - p0[i]).norm()), HP["lr"] * exp["sq"][i] ** 0.5)
            assert float((got - want).norm()) <= 1e-5 * scale, name
        else:  # rounded once from a float32 value: within an ulp of the float64 result
            slack = ulp(want, p.dtype) + 4e-7 * (p0[i].abs() + (want - p0[i]).abs())
            assert bool(((got - want).abs() <= slack).all()), name
        assert st[i, 0] == pytest.approx(exp["sq"][i], rel=1e-5, abs=1e-30), name
        assert st[i, 1] == pytest.approx(exp["removed"][i], rel=1e-4, abs=1e-7 * exp["sq"][i]), name
        u = pb.bases[i].double()
        if orth and p.dtype == torch.float32 and u.shape[0]:
            q = torch.linalg.qr(u.T)[0].T  # exact row space of the stored basis
            upd = got - p0[i]  # relative to the update, or to lr ||d|| when all of d was removed
            scale = max(float(upd.norm()), HP["lr"] * exp["sq"][i] ** 0.5)
            assert float((q @ upd).norm()) <= 1e-5 * scale, name


def run_and_check(pb: Problem, opts, steps: int = 2) -> None:
    amsgrad, maximize, project_wd, wd = opts
    for s in range(steps):
        grads = pb.grads(s)
        exp = oracle(pb, grads, maximize, project_wd, wd)
        p0 = [p.double().reshape(-1).clone() for p in pb.params]
        stats = pb.call(grads, maximize, project_wd, wd)
        check_step(pb, exp, stats, p0, orth=project_wd or wd == 0)
        pb.steps = [t + 1 for t in pb.steps]


def assert_same(a: Problem, b: Problem) -> None:
    for name in ("params", "ms", "vs", "vmax"):
        for i, (x, y) in enumerate(zip(getattr(a, name), getattr(b, name))):
            assert torch.equal(x.cpu(), y.cpu()), f"{name}[{i}]"


def tool(name: str) -> Optional[str]:
    """``name`` from PATH, CUDA_HOME/bin, /usr/local/cuda/bin or Triton's bundled NVIDIA tools."""
    found = shutil.which(name)
    if found:
        return found
    dirs = [os.path.join(os.environ.get("CUDA_HOME", ""), "bin"), "/usr/local/cuda/bin"]
    try:
        import triton

        dirs.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin"))
    except ImportError:
        pass
    return next((os.path.join(d, name) for d in dirs if d and os.path.exists(os.path.join(d, name))), None)


# ----------------------------------------------------------------------------------------
# the CPU emulation of the CUDA kernels
# ----------------------------------------------------------------------------------------

_EMU_SOURCES = ("tests/adamw_emu.cpp", "csrc/cuda/adamw_launch.cuh", "csrc/cuda/adamw_kernels.cuh",
                "csrc/cuda/kernels.cuh")


def build_emu() -> ctypes.CDLL:
    """tests/adamw_emu.cpp built with g++ (skips without it); cached in the temp directory by a hash
    of its sources, flags and torch version, so each test module and run reuses one build."""
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("needs g++")
    inc = os.path.join(os.path.dirname(torch.__file__), "include")
    cmd = [gxx, "-O1", "-U_FORTIFY_SOURCE", "-std=c++20", "-fPIC", "-shared", "-ffp-contract=off",
           "-I", os.path.join(ROOT, "csrc", "cuda"), "-I", inc, os.path.join(ROOT, _EMU_SOURCES[0])]
    key = hashlib.sha256(" ".join(cmd[:-4] + [torch.__version__]).encode())
    for path in _EMU_SOURCES:
        with open(os.path.join(ROOT, path), "rb") as f:
            key.update(f.read())
    lib = os.path.join(tempfile.gettempdir(), f"ogpsa_adamw_emu_{key.hexdigest()[:16]}.so")
    if not os.path.exists(lib):
        tmp = f"{lib}.{os.getpid()}.tmp"
        build = subprocess.run(cmd + ["-o", tmp], capture_output=True, text=True, timeout=600)
        assert build.returncode == 0, build.stderr[-3000:]
        os.replace(tmp, lib)
    return ctypes.CDLL(lib)


def emu_call(lib, pb: Problem, grads: Optional[list], maximize: bool, project_wd: bool, weight_decay: float, *,
             mode: int = 0, weights: Optional[torch.Tensor] = None, kappa: float = 1.0, k_max: int = 0,
             lr: Optional[float] = None) -> torch.Tensor:
    """The emulated CUDA op on pb's CPU tensors (one parameter and one basis dtype): mode 0
    projected_adamw_ ([T, 2]), 1 projected_adamw_pass1_ ([T, k_max + 1]), 2 projected_adamw_pass2_
    with ``weights`` and ``kappa`` ([T])."""
    T = len(pb.params)

    def ptrs(ts):
        return (ctypes.c_void_p * max(1, T))(*[t.data_ptr() for t in ts])

    width = (2, k_max + 1, 1)[mode]
    out = torch.zeros(T, width, dtype=torch.float64)
    hp = (ctypes.c_double * 5)(HP["lr"] if lr is None else lr, HP["beta1"], HP["beta2"], HP["eps"], weight_decay)
    w = weights.contiguous() if weights is not None else torch.zeros(1)
    lib.emu_adamw(
        ctypes.c_int(mode), ctypes.c_int(T), ptrs(pb.params), ptrs(grads) if grads is not None else None,
        ptrs(pb.ms), ptrs(pb.vs), ptrs(pb.vmax) if pb.amsgrad else None, ptrs(pb.bases), ptrs(pb.minvs),
        (ctypes.c_int64 * T)(*[p.numel() for p in pb.params]), (ctypes.c_int32 * T)(*[u.shape[0] for u in pb.bases]),
        (ctypes.c_int64 * T)(*pb.steps), ctypes.c_int(PARAM_DTYPES.index(pb.params[0].dtype)),
        ctypes.c_int(BASIS_DTYPES.index(pb.bases[0].dtype)), hp, ctypes.c_int(int(maximize)),
        ctypes.c_int(int(project_wd)), ctypes.c_void_p(w.data_ptr()), ctypes.c_int(w.shape[-1] if w.dim() == 2 else 0),
        ctypes.c_double(kappa), ctypes.c_int(k_max), ctypes.c_void_p(out.data_ptr()))
    return out if mode != 2 else out[:, 0]
