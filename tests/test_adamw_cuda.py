"""The CUDA projected AdamW step (``ogpsa::projected_adamw_`` on CUDA: csrc/cuda/adamw_cuda.cu and
csrc/cuda/adamw_kernels.cuh).

Without a GPU (``make test``):

* the built extension registers a CUDA kernel for the op, and its sm_90 cubin issues 128-bit
  loads and stores in every AdamW kernel (skips: extension built without CUDA, no cuobjdump);
* the device code alone compiles for sm_90 without spills, with 128-bit loads and stores;
* the real device functors and launch driver, compiled as C++ and run in a CPU emulation of the
  CUDA threads (tests/adamw_emu.cpp), match the CPU op and a float64 oracle.

With a GPU (marker ``gpu``; skipped without one): the op against a float64 oracle and
:func:`ogpsa.reference.projected_adamw_step_`, odd sizes up to 2**20 + 3, every k in 1..16,
fp32/bf16/fp16 parameters, fp32/bf16 bases, amsgrad, maximize, both decay modes, bitwise
determinism, alignment independence, many tensors and mixed dtypes in one call, equality with the
CPU op, and bad input rejected before anything is written.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess

import pytest
import torch
from adamw_cases import (
    BASIS_DTYPES,
    HP,
    OPTION_IDS,
    OPTIONS,
    PARAM_DTYPES,
    ROOT,
    Problem,
    assert_same,
    build_emu,
    check_step,
    emu_call,
    oracle,
    rel,
    run_and_check,
    tool,
    ulp,
)

import ogpsa  # noqa: F401  (loads ogpsa._C, which registers torch.ops.ogpsa.*)
from ogpsa import reference
from ogpsa.backends import cext

OP = "ogpsa::projected_adamw_"
HAS_OP = cext._C is not None and hasattr(torch.ops.ogpsa, "projected_adamw_")
BUILT_CUDA = bool(cext.build_info().get("cuda"))
HAS_GPU = HAS_OP and BUILT_CUDA and torch.cuda.is_available()
needs_op = pytest.mark.skipif(not HAS_OP, reason=f"ogpsa._C without projected_adamw_: {cext._IMPORT_ERROR}")
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device and ogpsa._C built with CUDA")

def _memory_ops(sass: str, header: str) -> dict:
    """{kernel: [LDG/STG opcodes]} from a SASS listing (``header``: regex naming a function)."""
    ops: dict = {}
    current = None
    for line in sass.splitlines():
        m = re.search(header, line)
        if m:
            current = m.group(1)
            ops.setdefault(current, [])
        elif current is not None:
            ops[current] += re.findall(r"\b(?:LDG|STG)(?:\.[A-Z0-9_]+)*", line)
    return ops


def _vectorised(ops: dict) -> dict:
    """AdamW streaming kernels that lack a 128-bit load or a 128-bit store."""
    adam = {f: o for f, o in ops.items() if any(s in f for s in ("AdamPass1Op", "AdamPass2Op", "AdamSmallOp"))}
    return adam, {f: o for f, o in adam.items()
                  if not any(x.startswith("LDG") and ".128" in x for x in o)
                  or not any(x.startswith("STG") and ".128" in x for x in o)}


# ----------------------------------------------------------------------------------------
# (a) compiled code, no GPU needed
# ----------------------------------------------------------------------------------------


@needs_op
def test_cuda_kernel_registered():
    if not BUILT_CUDA:
        pytest.skip("ogpsa._C was built without CUDA kernels")
    for op in (OP, OP + "pass1_", OP + "pass2_"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), op
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU"), op


@needs_op
def test_built_extension_adamw_sass_is_vectorised():
    if not BUILT_CUDA:
        pytest.skip("ogpsa._C was built without CUDA kernels")
    if "9.0" not in cext.build_info()["cuda_archs"]:
        pytest.skip(f"no sm_90 cubin in this build ({cext.build_info()['cuda_archs']})")
    cuobjdump = tool("cuobjdump")
    if cuobjdump is None:
        pytest.skip("needs cuobjdump")
    run = subprocess.run([cuobjdump, "-sass", "-arch", "sm_90", cext._C.__file__], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    adam, missing = _vectorised(_memory_ops(run.stdout, r"Function : (\S+)"))
    # 3 parameter x 2 basis dtypes: pass 1 and the single pass in 4 rank buckets each, pass 2 once
    assert len(adam) == 6 * (4 + 4 + 1), sorted(adam)
    assert not missing, sorted(missing)


def test_adamw_device_code_compiles_for_sm90(tmp_path):
    """adamw_kernels.cuh alone (no torch headers) for sm_90: no spills, 128-bit loads and stores."""
    nvcc, disasm = tool("nvcc"), tool("nvdisasm")
    if nvcc is None or disasm is None:
        pytest.skip(f"needs nvcc and nvdisasm (found nvcc={nvcc}, nvdisasm={disasm})")
    ops = ["AdamPass1Op<float, float, 16>", "AdamPass1Op<__nv_bfloat16, __nv_bfloat16, 2>",
           "AdamPass1Op<__half, float, 8>", "AdamPass2Op<float, __nv_bfloat16>", "AdamPass2Op<__half, float>",
           "AdamSmallOp<float, float, 4>", "AdamSmallOp<__nv_bfloat16, float, 16>"]
    src = tmp_path / "probe.cu"
    src.write_text('#include <cuda_bf16.h>\n#include <cuda_fp16.h>\n#include "adamw_kernels.cuh"\n'
                   "namespace ogpsa {\nnamespace cuda {\n"
                   + "".join(f"template __global__ void adam_kernel<{o}>(AdamMeta, {o});\n" for o in ops)
                   + "template __global__ void adam_step_kernel<16>(AdamReduceMeta, const float*, float*, double*);\n"
                   "}\n}\n")
    cubin = tmp_path / "probe.cubin"
    build = subprocess.run([nvcc, "-cubin", "-arch=sm_90", "-O3", "-std=c++17", "-Xptxas", "-v",
                            "-I", os.path.join(ROOT, "csrc", "cuda"), str(src), "-o", str(cubin)],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    assert not re.search(r"[1-9]\d* bytes spill", build.stderr), build.stderr
    sass = subprocess.run([disasm, str(cubin)], capture_output=True, text=True, timeout=120)
    assert sass.returncode == 0, sass.stderr[-2000:]
    adam, missing = _vectorised(_memory_ops(sass.stdout, r"^\s*\.text\.(\S+):"))
    assert len(adam) == len(ops), sorted(adam)
    assert not missing, sorted(missing)


# ----------------------------------------------------------------------------------------
# (a') the device code in a CPU emulation of the CUDA threads (tests/adamw_emu.cpp)
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def emu():
    return build_emu()


#: sizes around the single-pass limit (8192) and the chunk (16384); ranks incl. 0 and 16
EMU_SIZES = (1, 7, 4097, 8192, 8193, 3 * 16384 + 5)
EMU_KS = (1, 3, 16, 0, 5, 16)


@needs_op
@pytest.mark.parametrize("pdt,udt,opts", [
    (torch.float32, torch.float32, OPTIONS[0]),
    (torch.bfloat16, torch.bfloat16, OPTIONS[1]),
    (torch.float16, torch.float32, OPTIONS[2]),
    (torch.float32, torch.bfloat16, OPTIONS[3]),
], ids=["fp32", "bf16-amsgrad-projected", "fp16-maximize", "fp32-bf16basis-all"])
def test_emulated_cuda_kernels_match_cpu_op_and_float64(emu, pdt, udt, opts):
    amsgrad, maximize, project_wd, wd = opts
    pb = Problem(EMU_SIZES, EMU_KS, pdt, udt, amsgrad=amsgrad, seed=11)
    cpu = pb.clone()
    for s in range(2):
        grads = pb.grads(s)
        exp = oracle(pb, grads, maximize, project_wd, wd)
        p0 = [p.double().reshape(-1).clone() for p in pb.params]
        st = emu_call(emu, pb, grads, maximize, project_wd, wd)
        check_step(pb, exp, st, p0, orth=project_wd or wd == 0)
        st_cpu = cpu.call(grads, maximize, project_wd, wd)
        assert torch.allclose(st, st_cpu, rtol=1e-5, atol=1e-12)
        # element-wise arithmetic is the CPU kernel's, rounding step by step: moments bit for bit
        for name in ("ms", "vs", "vmax"):
            for i, (a, b) in enumerate(zip(getattr(pb, name), getattr(cpu, name))):
                assert torch.equal(a, b), f"{name}[{i}]"
        for i, (a, b) in enumerate(zip(pb.params, cpu.params)):
            assert rel(a.double() - p0[i], b.double() - p0[i]) <= (1e-6 if pdt == torch.float32 else 1e-2), i
        pb.steps = cpu.steps = [t + 1 for t in pb.steps]


@needs_op
def test_emulated_tables_split_and_alignment(emu):
    """More tensors than one launch table (32) and one step table (96) holds; misaligned
    tensors take the scalar path with the same results as aligned ones."""
    sizes = [5 + 3 * i for i in range(40)] + [8193 + 8 * i for i in range(100)]
    ks = [i % 17 for i in range(len(sizes))]
    opts = (True, False, True, 0.1)
    pb = Problem(sizes, ks, torch.float32, torch.float32, amsgrad=True, seed=5)
    run_and_check_emu(emu, pb, opts)
    sizes = (4097, 16384 + 4, 8192)
    aligned = Problem(sizes, (3, 16, 2), torch.bfloat16, torch.float32, amsgrad=True, seed=6)
    shifted = Problem(sizes, (3, 16, 2), torch.bfloat16, torch.float32, amsgrad=True, seed=6, misalign=(0, 1, 2))
    for pb in (aligned, shifted):
        emu_call(emu, pb, pb.grads(0), False, False, 0.1)
    assert_same(aligned, shifted)


def run_and_check_emu(emu, pb: Problem, opts) -> None:
    amsgrad, maximize, project_wd, wd = opts
    grads = pb.grads(0)
    exp = oracle(pb, grads, maximize, project_wd, wd)
    p0 = [p.double().reshape(-1).clone() for p in pb.params]
    st = emu_call(emu, pb, grads, maximize, project_wd, wd)
    check_step(pb, exp, st, p0, orth=project_wd or wd == 0)


# ----------------------------------------------------------------------------------------
# (b) on a GPU
# ----------------------------------------------------------------------------------------

GPU_SIZES = (1, 7, 4097, 8192, 8193, 2**20 + 3)
GPU_KS = (1, 3, 16, 5, 0, 8)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("opts", OPTIONS, ids=OPTION_IDS)
@pytest.mark.parametrize("udt", BASIS_DTYPES, ids=str)
@pytest.mark.parametrize("pdt", PARAM_DTYPES, ids=str)
def test_cuda_matches_float64(pdt, udt, opts):
    pb = Problem(GPU_SIZES, GPU_KS, pdt, udt, amsgrad=opts[0], seed=21, device="cuda")
    run_and_check(pb, opts)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("k", range(1, 17))
def test_cuda_every_rank(k):
    pb = Problem((33, 8193, 70001), (k, k, k), torch.float32, torch.float32, amsgrad=False, seed=100 + k,
                 device="cuda")
    run_and_check(pb, (False, False, True, 0.1))


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("opts", OPTIONS, ids=OPTION_IDS)
def test_cuda_matches_reference(opts):
    """Against the readable specification (ogpsa.reference.projected_adamw_step_), fp32."""
    amsgrad, maximize, project_wd, wd = opts
    pb = Problem((7, 4097, 8193, 2**20 + 3), (2, 16, 1, 4), torch.float32, torch.float32, amsgrad=amsgrad, seed=31,
                 device="cuda")
    ref = pb.clone()
    for s in range(3):
        grads = pb.grads(s)
        p0 = [p.double().clone() for p in pb.params]
        st = pb.call(grads, maximize, project_wd, wd).cpu()
        out = reference.projected_adamw_step_(
            ref.params, grads, ref.ms, ref.vs, ref.vmax if amsgrad else [None] * len(grads), ref.steps, ref.bases,
            lr=HP["lr"], beta1=HP["beta1"], beta2=HP["beta2"], eps=HP["eps"], weight_decay=wd, maximize=maximize,
            project_weight_decay=project_wd)
        for i in range(len(grads)):
            assert rel(pb.params[i].double() - p0[i], ref.params[i].double() - p0[i]) <= 1e-5, i
            for name in ("ms", "vs") + (("vmax",) if amsgrad else ()):
                assert rel(getattr(pb, name)[i], getattr(ref, name)[i]) <= 1e-6, (name, i)
        assert torch.allclose(st[:, 0], out["sq_before"].double().cpu(), rtol=1e-4)
        assert torch.allclose(st[:, 1], out["removed_sq"].double().cpu(), rtol=1e-3,
                              atol=1e-6 * float(st[:, 0].max()))
        pb.steps = ref.steps = [t + 1 for t in pb.steps]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("udt", BASIS_DTYPES, ids=str)
@pytest.mark.parametrize("pdt", PARAM_DTYPES, ids=str)
def test_cuda_equals_cpu_op(pdt, udt):
    amsgrad, maximize, project_wd, wd = OPTIONS[3]
    cpu = Problem((3, 4097, 8193, 70001), (1, 16, 4, 7), pdt, udt, amsgrad=amsgrad, seed=41)
    dev = cpu.clone("cuda")
    p0 = [p.double().clone() for p in cpu.params]
    grads = cpu.grads(0)
    st_cpu = cpu.call(grads, maximize, project_wd, wd)
    st_dev = dev.call(grads, maximize, project_wd, wd)
    assert st_dev.device.type == "cuda" and st_dev.dtype == torch.float64 and st_dev.shape == (4, 2)
    assert torch.allclose(st_dev.cpu(), st_cpu, rtol=1e-5, atol=1e-12)
    for name in ("ms", "vs", "vmax"):
        for i, (a, b) in enumerate(zip(getattr(dev, name), getattr(cpu, name))):
            if platform.machine() == "x86_64":  # both IEEE, rounded step by step in the same order
                assert torch.equal(a.cpu(), b), f"{name}[{i}]"
            else:  # the CPU compiler may contract to FMA there
                assert rel(a, b) <= 1e-6, f"{name}[{i}]"
    for i, (a, b) in enumerate(zip(dev.params, cpu.params)):
        if pdt == torch.float32:
            assert rel(a.double().cpu() - p0[i], b.double() - p0[i]) <= 1e-6, i
        else:
            assert bool(((a.double().cpu() - b.double()).abs() <= ulp(b.double(), pdt)).all()), i


@pytest.mark.gpu
@needs_gpu
def test_cuda_deterministic_and_alignment_independent():
    sizes, ks = (7, 8193, 2**20 + 3, 5000), (16, 3, 8, 0)
    runs = []
    for misalign in ((), (), (0, 1, 2, 3)):
        pb = Problem(sizes, ks, torch.bfloat16, torch.float32, amsgrad=True, seed=51, device="cuda",
                     misalign=misalign)
        stats = [pb.call(pb.grads(s), False, True, 0.1) for s in range(2)]
        runs.append((pb, torch.cat(stats)))
    for pb, st in runs[1:]:
        assert_same(runs[0][0], pb)
        assert torch.equal(runs[0][1], st)


@pytest.mark.gpu
@needs_gpu
def test_cuda_many_tensors_mixed_dtypes():
    """One call with more tensors than the launch (32) and step (96) tables hold, three parameter
    dtypes (grouped by dtype inside the op) and empty tensors."""
    sizes = [0, 3] + [9 + 13 * i for i in range(100)] + [8193 + 17 * i for i in range(130)]
    # fp32 for most: 70 single-pass and 100 two-pass fp32 tensors, beyond one table of each kind
    pdts = [PARAM_DTYPES[0 if i < 72 or 102 <= i < 202 else i % 3] for i in range(len(sizes))]
    ks = [i % 17 for i in range(len(sizes))]
    pb = Problem(sizes, ks, None, torch.float32, amsgrad=False, seed=61, device="cuda", pdts=pdts)
    run_and_check(pb, OPTIONS[0], steps=1)


@pytest.mark.gpu
@needs_gpu
def test_cuda_rejects_bad_input_before_writing():

    def fresh():
        return Problem((9, 8193), (2, 3), torch.float32, torch.float32, amsgrad=True, seed=71, device="cuda")

    cases = {
        "grads\\[1\\]": lambda pb, g: (pb, [g[0], g[1].double()]),
        "bases\\[1\\]": lambda pb, g: (_set(pb, "bases", 1, pb.bases[1][:, :-1].contiguous()), g),
        "k <= 16|bases\\[0\\]": lambda pb, g: (_set(pb, "bases", 0, torch.zeros(17, 9, device="cuda")), g),
        "m_invs\\[1\\]": lambda pb, g: (_set(pb, "minvs", 1, torch.eye(2, device="cuda")), g),
        "tensor 1 is not contiguous": lambda pb, g: (_set(pb, "ms", 1, torch.zeros(2 * 8193, device="cuda")[::2]), g),
        "moments of tensor 0": lambda pb, g: (_set(pb, "vs", 0, torch.zeros(9, device="cuda", dtype=torch.float16)), g),
        "max_exp_avg_sqs\\[1\\]": lambda pb, g: (_set(pb, "vmax", 1, torch.zeros(8192, device="cuda")), g),
        "tensor 1 must all be on": lambda pb, g: (pb, [g[0], g[1].cpu()]),
        "steps\\[0\\]": lambda pb, g: (_set_steps(pb, [0, 1]), g),
    }
    for pattern, make in cases.items():
        pb = fresh()
        pb, grads = make(pb, pb.grads(0))
        before = [t.clone() for t in pb.params + pb.ms + pb.vs + pb.vmax]
        with pytest.raises(RuntimeError, match=pattern):
            torch.ops.ogpsa.projected_adamw_(pb.params, grads, pb.ms, pb.vs, pb.vmax, pb.bases, pb.minvs, pb.steps,
                                             0.1, 0.9, 0.999, 1e-8, 0.1, False, False)
        after = pb.params + pb.ms + pb.vs + pb.vmax
        assert all(torch.equal(a, b) for a, b in zip(before, after)), pattern


def _set(pb: Problem, name: str, i: int, value: torch.Tensor) -> Problem:
    getattr(pb, name)[i] = value
    return pb


def _set_steps(pb: Problem, steps: list) -> Problem:
    pb.steps = steps
    return pb
