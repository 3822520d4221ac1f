"""pytest-benchmark suite: every contender of ``ogpsa bench`` on the same tensors.

Not part of ``make test`` (testpaths = tests). Run with ``make bench-pytest`` or
``.venv/bin/python -m pytest benchmarks -q``. Environment knobs:

* ``OGPSA_BENCH_WORKLOADS``: comma-separated workloads (default ``lora,125m``; also ``llama8b``, ``tiny``)
* ``OGPSA_BENCH_K``: basis rank (default 2), ``OGPSA_BENCH_DTYPES``: ``grad/basis`` (default ``fp32/fp32``)
* ``OGPSA_BENCH_ROUNDS``: timed rounds per contender (default 5; the authors' scheme gets 1)
* ``OGPSA_BENCH_LLAMA_LAYERS``: layers of the scaled Llama-3.1-8B list (default 1)

Each result carries the byte counts and the effective bandwidth by the byte floor
(``3*B_g + 2*k*B_u``) in ``extra_info``; compare runs with ``pytest-benchmark compare``.
"""

from __future__ import annotations

import os

import pytest
import torch

from ogpsa import bench

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
WORKLOADS = [w for w in os.environ.get("OGPSA_BENCH_WORKLOADS", "lora,125m").split(",") if w]
K = int(os.environ.get("OGPSA_BENCH_K", "2"))
GRAD_DTYPE, BASIS_DTYPE = os.environ.get("OGPSA_BENCH_DTYPES", "fp32/fp32").split("/")
ROUNDS = int(os.environ.get("OGPSA_BENCH_ROUNDS", "5"))
CONTENDERS = ["reference", "torch-foreach", "authors-hooks", "ogpsa:cuda", "ogpsa:triton", "ogpsa:cpu", "ogpsa:torch",
              "ogpsa:projector-fresh", "ogpsa:projector-reused", "clip_grad_norm_", "copy"]


def _workload(name: str) -> bench.Workload:
    if name == "llama8b":
        return bench.llama8b_workload(int(os.environ.get("OGPSA_BENCH_LLAMA_LAYERS", "1")))
    return {"lora": bench.lora_workload, "125m": bench.gpt2_125m_workload, "tiny": bench.tiny_workload}[name]()


@pytest.fixture(scope="module", params=WORKLOADS)
def case(request):
    wl = _workload(request.param)
    grads, bases = bench.make_tensors(wl, K, bench.DTYPES[GRAD_DTYPE], bench.DTYPES[BASIS_DTYPE], DEVICE)
    yield wl, grads, bases
    del grads, bases


@pytest.mark.parametrize("name", CONTENDERS)
def test_projection_step(benchmark, case, name):
    wl, grads, bases = case
    found = [c for c in bench.build_contenders(grads, bases, [n for n, _ in wl.shapes], only=[name]) if c.name == name]
    if not found:
        pytest.skip(f"{name} is not part of this build")
    c = found[0]
    if c.skip:
        pytest.skip(c.skip)
    fn = c.fn
    if DEVICE.type == "cuda":
        def fn():  # noqa: F811 - time the device work, not the launch
            c.fn()
            torch.cuda.synchronize()

    counts = bench.byte_counts(grads, bases)
    benchmark.group = f"{wl.name} k={K} {GRAD_DTYPE}/{BASIS_DTYPE} on {DEVICE.type}"
    benchmark.extra_info.update(workload=wl.name, k=K, grad_dtype=GRAD_DTYPE, basis_dtype=BASIS_DTYPE,
                                tensors=wl.tensors, numel=wl.numel, **counts)
    rounds = 1 if name == "authors-hooks" else ROUNDS
    # setup (untimed): fresh gradient tensors, or the same buffers rewritten, before every round
    benchmark.pedantic(fn, setup=c.setup, rounds=rounds, warmup_rounds=0 if name == "authors-hooks" else 1,
                       iterations=1)
    median = benchmark.stats.stats.median
    moved = counts["bytes_copy"] if name == "copy" else 3 * counts["bytes_g"] if name == "clip_grad_norm_" \
        else counts["bytes_floor"]
    benchmark.extra_info["eff_gbps"] = moved / median / 1e9
