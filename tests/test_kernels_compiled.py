"""Compiled-code checks that need no GPU: every Triton kernel compiled to an sm_90 cubin
(no spills; the aligned projection variants issue 128-bit ``ld.global.v4`` loads), and the
CUDA kernels' device code (csrc/cuda/kernels.cuh, free of torch headers, so it compiles in
seconds) compiled with nvcc for sm_90 and disassembled: the aligned paths issue ``LDG.E.128``.
Each check skips with the reason when its tools are missing.
"""

import glob
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_triton_kernels_compile_for_sm90_and_vectorise():
    """The interpreter is lenient: compile every kernel variant to an sm_90 cubin in a process
    where Triton is imported without TRITON_INTERPRET, and read the loads off the PTX."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "ogpsa.kernels.aot", "--arch", "90"], env=env, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout)
    assert {r["kernel"] for r in report} == {"_dots_kernel", "_update_kernel", "_fused_small_kernel",
                                             "_segment_sum_kernel", "_gram_kernel", "_combine_kernel"}
    assert all(r.get("local_bytes", 0) == 0 for r in report), [r for r in report if r.get("local_bytes")]
    projection = [r for r in report if "ALIGNED" in r["meta"]]
    aligned = [r for r in projection if r["meta"]["ALIGNED"]]
    assert aligned and all(r["loads"]["v4"] > 0 for r in aligned), [r for r in aligned if not r["loads"]["v4"]]
    # the unaligned variants cannot assume 16-byte addresses: scalar loads only
    assert all(r["loads"]["v4"] == 0 for r in projection if not r["meta"]["ALIGNED"])


def _tool(name: str):
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
    for d in dirs:
        path = os.path.join(d, name)
        if d and os.path.exists(path):
            return path
    return None


_PROBE = """
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include "kernels.cuh"
namespace ogpsa {
namespace cuda {
#define OGPSA_INST(...) template __global__ void multi_tensor_kernel<__VA_ARGS__>(Meta, __VA_ARGS__);
OGPSA_INST(DotsOp<float, float, 4>)
OGPSA_INST(DotsOp<__nv_bfloat16, __nv_bfloat16, 16>)
OGPSA_INST(DotsOp<__half, float, 2>)
OGPSA_INST(UpdateOp<float, float>)
OGPSA_INST(UpdateOp<__nv_bfloat16, float>)
OGPSA_INST(FusedSmallOp<float, float, double, 4>)
OGPSA_INST(FusedSmallOp<__nv_bfloat16, __nv_bfloat16, float, 16>)
OGPSA_INST(GramOp<float, 16>)
OGPSA_INST(GramOp<__half, 8>)
template __global__ void tree_reduce_kernel<RowsOut>(ReduceMeta, const float*, int, RowsOut);
}  // namespace cuda
}  // namespace ogpsa
"""


def test_cuda_kernels_issue_128bit_loads(tmp_path):
    nvcc = _tool("nvcc")
    disasm = _tool("nvdisasm")
    if nvcc is None or disasm is None:
        pytest.skip(f"needs nvcc and nvdisasm (found nvcc={nvcc}, nvdisasm={disasm})")
    src = tmp_path / "probe.cu"
    src.write_text(_PROBE)
    cubin = tmp_path / "probe.cubin"
    build = subprocess.run([nvcc, "-cubin", "-arch=sm_90", "-O3", "-std=c++17", "-Xptxas", "-v",
                            "-I", os.path.join(ROOT, "csrc", "cuda"), str(src), "-o", str(cubin)],
                           capture_output=True, text=True, timeout=300)
    if build.returncode != 0 and "sm_90" in build.stderr and "not defined" in build.stderr:
        pytest.skip(f"this nvcc cannot target sm_90: {build.stderr[-300:]}")
    assert build.returncode == 0, build.stderr[-3000:]
    assert not re.search(r"[1-9]\d* bytes spill", build.stderr), build.stderr  # no register spills
    sass = subprocess.run([disasm, str(cubin)], capture_output=True, text=True, timeout=120)
    assert sass.returncode == 0, sass.stderr[-2000:]
    loads: dict = {}
    current = None
    for line in sass.stdout.splitlines():
        header = re.match(r"\s*\.text\.(\S+):", line)
        if header:
            current = header.group(1)
        for op in re.findall(r"\bLDG(?:\.[A-Z0-9_]+)*", line):
            loads.setdefault(current, []).append(op)
    vector = {name: ops for name, ops in loads.items() if "Op" in name and "Gram" not in name}
    assert len(vector) == 7, sorted(loads)
    missing = [name for name, ops in vector.items() if not any(".128" in op for op in ops)]
    assert not missing, missing


def test_cuda_sources_are_the_ones_checked():
    """The probe covers the header the extension includes (a second copy would go unchecked)."""
    sources = glob.glob(os.path.join(ROOT, "csrc", "cuda", "ops_cuda.cu"))
    assert sources and '#include "kernels.cuh"' in open(sources[0]).read()


def test_built_extension_sass_has_128bit_loads():
    """The same check on the extension actually built here (every dtype and rank instantiation
    of the streaming ops in the sm_90 cubin of ogpsa._C)."""
    import torch  # noqa: F401  (ogpsa._C needs torch loaded)

    from ogpsa.backends import cext

    if cext._C is None or not cext.build_info().get("cuda"):
        pytest.skip("ogpsa._C was built without CUDA kernels")
    if "9.0" not in cext.build_info()["cuda_archs"]:
        pytest.skip(f"no sm_90 cubin in this build ({cext.build_info()['cuda_archs']})")
    tool = _tool("cuobjdump")
    if tool is None:
        pytest.skip("needs cuobjdump")
    run = subprocess.run([tool, "-sass", "-arch", "sm_90", cext._C.__file__], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    loads: dict = {}
    current = None
    for line in run.stdout.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            current = m.group(1)
            loads.setdefault(current, [])
        elif current is not None:
            loads[current] += re.findall(r"\bLDG(?:\.[A-Z0-9_]+)*", line)
    streaming = {f: ops for f, ops in loads.items() if any(s in f for s in ("DotsOp", "UpdateOp", "FusedSmallOp"))}
    # 3 gradient x 2 basis dtypes: dots and single pass in 4 rank buckets (x2 M^-1 dtypes), update once
    assert len(streaming) >= 6 * (4 + 1 + 8), len(streaming)
    missing = [f for f, ops in streaming.items() if not any(".128" in op for op in ops)]
    assert not missing, missing
