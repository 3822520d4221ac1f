"""Compile every kernel for a GPU architecture without a GPU (``python -m ogpsa.kernels.aot``).

The interpreter accepts some programs the compiler rejects, so CI (which has no GPU) also
compiles each kernel in its real configurations down to a cubin with ``triton.compile`` and
reports register use and spills. Must run in a process where Triton was imported without
``TRITON_INTERPRET``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

_TABLE = {"g_ptrs": "*i64", "u_ptrs": "*i64", "numels": "*i64", "ks": "*i64", "chunk_len": "*i64",
          "chunk_tensor": "*i64", "chunk_start": "*i64", "prog_len": "*i64"}
_REF_TABLE = {"numels": "*i64", "chunk_len": "*i64", "chunk_tensor": "*i64", "chunk_start": "*i64"}


def projection_variants(aligned=(False, True), kinds=((0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1)),
                        k_pads=(1, 16)):
    """(kernel, signature, constexprs, num_warps) of the projection kernels, with the launch
    configuration :func:`ogpsa.kernels.common.launch_config` gives on a GPU."""
    from . import projection

    dots_sig = {**_TABLE, "partials": "*fp32", "C": "i32", "W": "i32"}
    upd_sig = {**_TABLE, "weights": "*fp32", "scale": "*fp32", "kappa": "fp32", "C": "i32", "KW": "i32"}
    fused_sig = {"g_ptrs": "*i64", "u_ptrs": "*i64", "numels": "*i64", "ks": "*i64", "small_ids": "*i64",
                 "gram_inv": "*fp64", "out": "*fp32", "aligned_scale": "fp32", "W": "i32", "KM": "i32",
                 "MODE": "i32"}
    for gk, uk in kinds:
        u_vec = 4 if uk == 0 else 8
        for al in aligned:
            for k_pad in k_pads:
                block = max(256, min(2048, 8192 // k_pad))  # launch_config on a GPU
                meta = dict(ROWS=1, K_PAD=k_pad, BLOCK=block, G_KIND=gk, U_KIND=uk, ALIGNED=al, U_VEC=u_vec)
                yield projection._dots_kernel, dots_sig, meta, 8
                yield projection._update_kernel, upd_sig, meta, 8
            meta = dict(K_PAD=4, BLOCK_N=8192, G_KIND=gk, U_KIND=uk, ALIGNED=al, U_VEC=u_vec)
            yield projection._fused_small_kernel, fused_sig, meta, 8


def _variants():
    from . import basis, common

    # every dtype pair on the aligned (vectorised) path, three on the masked path
    yield from projection_variants(aligned=(True,))
    yield from projection_variants(aligned=(False,), kinds=((0, 0), (1, 1), (2, 0)))
    for out in ("*fp32", "*fp64"):
        yield (common._segment_sum_kernel, {"partials": "*fp32", "seg": "*i64", "seg_max": "*i64", "out": out,
                                            "T": "i32", "W": "i32"}, dict(TB=4, CB=16, WB=32), 4)
    for rk in (0, 1):
        yield (basis._gram_kernel, {"r_ptrs": "*i64", **_REF_TABLE, "partials": "*fp32", "m": "i32"},
               dict(BLOCK=512, TM=16, R_KIND=rk), 8)
        for ok in (0, 1):
            yield (basis._combine_kernel, {"r_ptrs": "*i64", "o_ptrs": "*i64", "numels": "*i64", "ks": "*i64",
                                           "chunk_len": "*i64", "chunk_tensor": "*i64", "chunk_start": "*i64",
                                           "coef": "*fp32", "m": "i32", "KM": "i32"},
                   dict(K_PAD=16, BLOCK=512, R_KIND=rk, O_KIND=ok), 8)


def _resources(cubin: bytes) -> dict:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    for line in out.splitlines():
        if "REG:" in line:
            fields = dict(item.split(":", 1) for item in line.split() if ":" in item)
            return {"registers": int(fields.get("REG", -1)), "local_bytes": int(fields.get("LOCAL", -1))}
    return {}


def compile_variant(fn, sig: dict, meta: dict, warps: int, arch: int = 90):
    """``triton.compile`` one kernel variant for ``sm_<arch>`` (no GPU needed); the result's
    ``asm`` dict holds "ptx" and "cubin"."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import common

    if common.INTERPRETED:
        raise RuntimeError("Triton was imported with TRITON_INTERPRET set: run this in a fresh process without it")
    src = ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in meta}}, constexprs=meta)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})


def vector_loads(ptx: str) -> dict:
    """Counts of global loads in PTX by width: ``{"v4": .., "v2": .., "scalar": ..}``."""
    import re

    loads = re.findall(r"ld\.global(?:\.\w+)*", ptx)
    return {"v4": sum(".v4" in x for x in loads), "v2": sum(".v2" in x for x in loads),
            "scalar": sum(".v4" not in x and ".v2" not in x for x in loads)}


def compile_all(arch: int = 90) -> list[dict]:
    """Compile every kernel variant for ``sm_<arch>``; one dict per variant (raises on error)."""
    report = []
    for fn, sig, meta, warps in _variants():
        kernel = compile_variant(fn, sig, meta, warps, arch)
        report.append({"kernel": fn.__name__, "meta": meta, "num_warps": warps, "loads": vector_loads(kernel.asm["ptx"]),
                       **_resources(kernel.asm["cubin"])})
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability as an integer, e.g. 80 or 90")
    args = parser.parse_args(argv)
    print(json.dumps(compile_all(args.arch), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
