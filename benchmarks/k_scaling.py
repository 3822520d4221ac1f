"""Cost of the gradient-projection CPU ops against k (issue 22 item 2: linear in k within 1.3x of
the byte model from k=1 to 16).

One step of the cpu backend with clipping is ``ogpsa::dots`` then ``ogpsa::update_`` (byte floor
3 B_g + 2 k B_u). For each k, the listed instruction sets (OGPSA_CPU_ISA, switched per call) are
timed interleaved (order reversed every other round, 2 calls per round); min and median printed,
with the time and the byte floor relative to the first k.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/k_scaling.py lora 1,2,4,8,16 4 avx512,avx2
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import ogpsa._C  # noqa: F401  (registers torch.ops.ogpsa)
import torch

from ogpsa.bench.workloads import gpt2_125m_workload, lora_workload, make_tensors


def step(grads, bases, k: int, w, scale, isa: str) -> float:
    """Seconds of dots + update_ under one ISA."""
    os.environ["OGPSA_CPU_ISA"] = isa
    t0 = time.perf_counter()
    torch.ops.ogpsa.dots(grads, bases, k)
    torch.ops.ogpsa.update_(grads, bases, w, 1.0, scale)
    return time.perf_counter() - t0


def main(argv: list[str]) -> None:
    wl = {"lora": lora_workload, "125m": gpt2_125m_workload}[argv[0]]()
    ks = [int(x) for x in argv[1].split(",")]
    rounds = int(argv[2])
    isas = argv[3].split(",")
    res = {}
    for k in ks:
        grads, bases = make_tensors(wl, k, torch.float32, torch.float32, torch.device("cpu"), seed=0)
        w = torch.randn(len(grads), k) * 1e-3
        scale = torch.ones(len(grads))
        floor = 3 * sum(g.numel() * 4 for g in grads) + 2 * sum(u.numel() * 4 for u in bases)
        for isa in isas:
            step(grads, bases, k, w, scale, isa)  # warm-up
        times: dict[str, list[float]] = {isa: [] for isa in isas}
        for r in range(rounds):
            for isa in isas if r % 2 == 0 else isas[::-1]:
                times[isa] += [step(grads, bases, k, w, scale, isa) for _ in range(2)]
        for isa in isas:
            res[(k, isa)] = (min(times[isa]), statistics.median(times[isa]), floor)
    print(f"load {os.getloadavg()[0]:.2f}")
    for isa in isas:
        first = res[(ks[0], isa)]
        for k in ks:
            mn, md, b = res[(k, isa)]
            print(f"{isa:8s} k={k:2d} min {mn * 1e3:7.2f} med {md * 1e3:7.2f} ms  {b / mn / 1e9:5.1f} GB/s(min)  "
                  f"time x{mn / first[0]:5.2f} (bytes x{b / first[2]:5.2f})")


if __name__ == "__main__":
    main(sys.argv[1:])
