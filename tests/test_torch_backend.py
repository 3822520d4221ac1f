"""The ``torch`` backend: correct against float64 when it walks tensors in slices, and its
extra peak memory stays within 1x the gradient bytes (it used to be 2x for fp32, 6x for bf16).

Memory is measured as the process's resident-set high-water mark: writing ``5`` to
``/proc/self/clear_refs`` resets ``VmHWM`` to the current ``VmRSS`` (Linux >= 4.0), so
``VmHWM`` after the call minus ``VmRSS`` before it is the extra peak, whoever allocated it
(tracemalloc does not see PyTorch's CPU allocations, and the profiler's per-operator records
miss temporaries freed inside an operator). The tensors are large (2^24 + 3 elements) so every
whole-tensor temporary of the old code is above glibc's 32 MiB mmap threshold and shows up as
fresh pages, while the slices of the new code reuse a few MiB of heap.
"""

from __future__ import annotations

import os

import pytest
import torch
from oracle import float64_project, make_case, rel_err, tolerance

import ogpsa
from ogpsa.backends import torch_backend
from ogpsa.backends.torch_backend import TorchBackend

PAIRS = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
         (torch.float32, torch.bfloat16), (torch.float16, torch.float32)]


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _extra_peak_bytes(fn) -> int:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_bytes("VmRSS")
    fn()
    return _status_bytes("VmHWM") - base


def _can_reset_peak() -> bool:
    try:
        _extra_peak_bytes(lambda: None)
        return True
    except OSError:
        return False


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs") or not _can_reset_peak(),
                    reason="needs Linux /proc/self/clear_refs to reset the RSS high-water mark")
@pytest.mark.parametrize("gdt,udt", PAIRS[:3])
def test_extra_peak_memory_within_the_gradient_bytes(gdt, udt):
    n = (1 << 24) + 3
    gen = torch.Generator().manual_seed(1)
    g = torch.empty(n, dtype=gdt).normal_(generator=gen)
    u = torch.empty(2, n, dtype=udt).normal_(generator=gen)
    weights, scale = torch.randn(1, 2, generator=gen), torch.tensor([0.5])
    grad_bytes = g.numel() * g.element_size()
    be = TorchBackend()
    small_g, small_u = g[:4097].clone(), u[:, :4097].contiguous()
    be.dots([small_g], [small_u], 2)  # one-off library initialisation is not the backend's peak
    be.update_([small_g], [small_u], weights, 1.0, scale)
    dots = _extra_peak_bytes(lambda: be.dots([g], [u], 2))
    update = _extra_peak_bytes(lambda: be.update_([g], [u], weights, 1.0, scale))
    assert dots <= grad_bytes and update <= grad_bytes, (dots / grad_bytes, update / grad_bytes)
    # far below, in fact: a few slices of CHUNK float32 elements
    assert max(dots, update) <= 8 * torch_backend.CHUNK * 4 + (4 << 20)


@pytest.mark.parametrize("gdt,udt", PAIRS)
def test_sliced_passes_match_float64(monkeypatch, gdt, udt):
    """With slices of 1000 elements (odd sizes: slices end mid-tensor), both passes agree
    with a float64 computation of U g, ||g||^2 and scale * (kappa g - U^T w)."""
    monkeypatch.setattr(torch_backend, "CHUNK", 1000)
    grads, bases = make_case(5, [1, 7, 4097, 2999], 3, gdt, udt)
    be = TorchBackend()
    out = be.dots(grads, bases, 3)
    for i, (g, u) in enumerate(zip(grads, bases)):
        g64, u64 = g.double().reshape(-1), u.double()
        k = u.shape[0]
        want = torch.cat([u64 @ g64, torch.zeros(3 - k, dtype=torch.float64), (g64 @ g64).reshape(1)])
        assert float((out[i].double() - want).abs().max()) <= 1e-5 * float(want.abs().max()), i
    gen = torch.Generator().manual_seed(2)
    weights, scale = torch.randn(len(grads), 3, generator=gen), torch.rand(len(grads), generator=gen) + 0.5
    for kappa in (1.0, 0.0):
        gs = [g.clone() for g in grads]
        be.update_(gs, bases, weights, kappa, scale)
        want = [(kappa * g.double().reshape(-1) - u.double().T @ weights[i, :u.shape[0]].double()) * float(scale[i])
                for i, (g, u) in enumerate(zip(grads, bases))]
        assert rel_err(gs, [w.numpy() for w in want]) <= tolerance(gdt, udt)


@pytest.mark.parametrize("mode", ["orthogonal", "conflict", "plane"])
@pytest.mark.parametrize("gdt,udt", PAIRS[:3])
def test_projection_through_the_torch_backend_matches_float64(monkeypatch, mode, gdt, udt):
    monkeypatch.setattr(torch_backend, "CHUNK", 1000)
    grads, bases = make_case(7, [33, 4097, 1, 2999], 2, gdt, udt)
    want, total = float64_project(grads, bases, mode=mode, max_norm=1.0)
    stats = ogpsa.project_(grads, bases, mode=mode, max_norm=1.0, backend="torch")
    assert rel_err(grads, want) <= tolerance(gdt, udt)
    if mode != "plane":  # (plane: the oracle and every backend differ in how k_i = 0 tensors count)
        assert abs(float(stats.total_norm) / total - 1) <= 1e-5


def test_gram_and_combine_in_slices_match_float64(monkeypatch):
    monkeypatch.setattr(torch_backend, "CHUNK", 1000)
    gen = torch.Generator().manual_seed(3)
    refs = [torch.randn(3, n, generator=gen) for n in (5, 4099)]
    be = TorchBackend()
    grams = be.gram(refs)
    for r, m in zip(refs, grams):
        want = r.double() @ r.double().T
        assert float((m.double() - want).abs().max()) <= 1e-12 * float(want.abs().max())
    a = torch.randn(2, 2, 3, generator=gen)
    for out_dtype in (torch.float32, torch.bfloat16):
        us = be.combine(refs, a, [2, 1], out_dtype)
        for i, (r, u, k) in enumerate(zip(refs, us, [2, 1])):
            want = a[i, :k].double() @ r.double()
            assert u.dtype == out_dtype and u.shape == (k, r.shape[1]) and u.is_contiguous()
            assert float((u.double() - want).norm() / want.norm()) <= (1e-6 if out_dtype == torch.float32 else 4e-3)
