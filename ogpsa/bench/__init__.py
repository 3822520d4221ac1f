"""``ogpsa bench``: time every way of projecting (and clipping) gradients, side by side
(the micro suite), OGPSA inside a real training loop (``--suite loop``), and the projected
AdamW step against torch's AdamW (``--suite adamw``).

Modules: :mod:`.workloads` (shape lists, random tensors), :mod:`.contenders` (what is timed),
:mod:`.timing` (timers, memory, machine description), :mod:`.micro` (the micro suites),
:mod:`.loop` (the training-loop suite), :mod:`.adamw` (the projected-AdamW suite),
:mod:`.report` (JSON, markdown, plots, README blocks),
:mod:`.cli` (the command).

The micro suite times, on the same tensors and in the same process:


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


from .. import ops, reference  # re-exported: tests reach bench.ops
from .cli import add_arguments, run
from .contenders import (
    MAX_NORM,
    MICRO_BATCHES,
    Contender,
    ForeachProjector,
    _copy_lists,
    build_contenders,
    load_authors_scheme,
)
from .micro import FORMULA, Config, _derive, byte_counts, run_bench, run_config, suite
from .report import (
    README_BLOCK_RE,
    README_END,
    README_START,
    markdown,
    plot_results,
    readme_block,
    readme_markers,
    targets,
    update_readme,
    write_results,
)
from .timing import Timing, environment, extra_peak_bytes, machine_slug, time_fn
from .workloads import (
    DTYPES,
    KS,
    REPO_ROOT,
    Workload,
    gpt2_125m_workload,
    llama8b_full_numel,
    llama8b_workload,
    lora_workload,
    make_tensors,
    tiny_workload,
)

__all__ = ["add_arguments", "run", "MAX_NORM", "MICRO_BATCHES", "Contender", "ForeachProjector", "build_contenders",
           "load_authors_scheme", "FORMULA", "Config", "byte_counts", "run_bench", "run_config", "suite",
           "README_BLOCK_RE", "README_END", "README_START", "markdown", "plot_results", "readme_block",
           "readme_markers", "targets", "update_readme", "write_results", "Timing", "environment",
           "extra_peak_bytes", "machine_slug", "time_fn", "DTYPES", "KS", "REPO_ROOT", "Workload",
           "gpt2_125m_workload", "llama8b_full_numel", "llama8b_workload", "lora_workload", "make_tensors",
           "tiny_workload", "ops", "reference", "_copy_lists", "_derive"]
