"""A small projection on every GPU backend, checked against float64: the case that
``benchmarks/gpu_check.sh`` runs under compute-sanitizer (memcheck, racecheck, initcheck).

Odd sizes (1, 7, 33, 4097 and one larger than a block), mixed ranks (k = 0..3), fp32 and
bf16 gradients, fp32 and bf16 bases; with clipping (two passes) and without (the single-pass
``fused_project_`` path for the small tensors, two passes for the large one); the same
gradients also at an address one element past 16 bytes (the unaligned, scalar-load path). Exits non-zero when a backend is
missing on a GPU machine or a result is off; prints one line per case.
"""

from __future__ import annotations

import itertools
import sys

import torch

import ogpsa
from ogpsa import ops

SIZES = (1, 7, 33, 4097, 70_001)


def case(seed: int, gdt: torch.dtype, udt: torch.dtype):
    gen = torch.Generator().manual_seed(seed)
    grads, bases = [], []
    for i, n in enumerate(SIZES):
        k = min(n, (3, 2, 0, 3, 1)[i])
        grads.append(torch.randn(n, generator=gen, dtype=torch.float64))
        q = torch.linalg.qr(torch.randn(n, max(k, 1), generator=gen, dtype=torch.float64))[0].T[:k]
        bases.append(q.contiguous())
    return [g.to(gdt) for g in grads], [u.to(udt) for u in bases]


def expected(grads, bases, max_norm):
    outs = []
    for g, u in zip(grads, bases):
        g64, u64 = g.double(), u.double()
        if u64.shape[0]:
            g64 = g64 - u64.T @ torch.linalg.solve(u64 @ u64.T, u64 @ g64)
        outs.append(g64)
    total = torch.sqrt(sum((o * o).sum() for o in outs))
    coef = 1.0 if max_norm is None else min(1.0, max_norm / (float(total) + 1e-6))
    return [o * coef for o in outs]


def _at_offset(t: torch.Tensor, shift: int) -> torch.Tensor:
    """``t``'s values ``shift`` elements into a fresh buffer (shift 1: not 16-byte aligned)."""
    if not shift:
        return t
    buf = torch.empty(t.numel() + shift, dtype=t.dtype, device=t.device)
    out = buf[shift:].view(t.shape)
    out.copy_(t)
    return out


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    avail = {n: ok for n, (ok, _) in ops.backends().items()}
    wanted = [b for b in ("cuda", "triton") if avail.get(b)]
    failures = [f"backend {b} unavailable: {ops.backends()[b][1]}" for b in ("cuda", "triton") if not avail.get(b)]
    for b in wanted:
        pairs = ((torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32))
        for (gdt, udt), max_norm, shift in itertools.product(pairs, (1.0, None), (0, 1)):
            grads, bases = case(7, gdt, udt)
            want = expected(grads, bases, max_norm)
            dev_g = [_at_offset(g.cuda(), shift) for g in grads]
            dev_u = [u.cuda() for u in bases]
            ogpsa.project_(dev_g, dev_u, max_norm=max_norm, backend=b)
            torch.cuda.synchronize()
            num = sum(float(((g.double().cpu() - w) ** 2).sum()) for g, w in zip(dev_g, want))
            den = sum(float((w ** 2).sum()) for w in want)
            err = (num / den) ** 0.5
            tol = 1e-5 if gdt == torch.float32 else 1e-2
            ok = err <= tol and all(bool(torch.isfinite(g).all()) for g in dev_g)
            print(f"{b:<7} grads {str(gdt):<15} basis {str(udt):<15} max_norm {max_norm} offset {shift} "
                  f"rel err {err:.2e} (tol {tol:.0e}) {'ok' if ok else 'FAIL'}")
            if not ok:
                failures.append(f"{b} {gdt}/{udt} max_norm {max_norm} offset {shift}: rel err {err:.2e}")
    for f in failures:
        print("FAIL", f, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
