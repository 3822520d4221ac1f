"""How ``ogpsa bench`` sets up its own process: OpenMP wait policy, thread count, quiet logs.

Timings on a shared CPU are worthless with OpenMP's default spin-waiting: every idle thread of
a parallel region burns a core for a while after the region, so the other contenders (and the
other users of the machine) are slowed by a bench that is not even running (measured on a busy
2-core machine: ``clip_grad_norm_`` 3152 ms instead of a few ms). The policy must be in the
environment before the OpenMP runtime starts, i.e. before torch is imported; ``ogpsa bench``
run from a shell therefore re-executes itself once with ``OMP_WAIT_POLICY=PASSIVE`` (unless the
caller set a policy) and, with ``--threads``, ``OMP_NUM_THREADS``. Called in-process (tests,
notebooks) it cannot re-execute: it says the policy is not in effect.

The torch profiler (used to measure CPU peak memory) prints kineto ``USDT`` lines and, on a
machine without a GPU, ``gpuGetDeviceCount failed``; ``KINETO_LOG_LEVEL`` and
``TORCH_CPP_LOG_LEVEL`` silence them (kineto reads them when the profiler first starts).
"""

from __future__ import annotations

import os
import sys
from typing import Optional

#: set (unless the caller set them) before the first profiler use
QUIET_ENV = {"KINETO_LOG_LEVEL": "6", "TORCH_CPP_LOG_LEVEL": "ERROR"}
#: marks the re-executed process, so it never re-executes again
REEXEC_MARK = "OGPSA_BENCH_REEXEC"
_CHILD = "import sys; from ogpsa.cli import main; sys.exit(main())"

#: what prepare() set up; timing.environment() writes it into every result file
POLICY: dict = {}


def launched_as_command(argv: Optional[list] = None) -> bool:
    """True when this process is the ``ogpsa bench ...`` command (not a test or a notebook)."""
    argv = sys.argv if argv is None else argv
    if not argv:
        return False
    head = os.path.basename(argv[0])
    return (head == "ogpsa" or argv[0].endswith(os.path.join("ogpsa", "cli.py"))) and "bench" in argv[1:]


def command_line() -> str:
    """The command as the user typed it (also in the re-executed process)."""
    if sys.argv and (sys.argv[0].endswith("ogpsa") or (sys.argv[0] == "-c" and os.environ.get(REEXEC_MARK))):
        return " ".join(["ogpsa"] + sys.argv[1:])
    return " ".join(sys.argv)


def prepare(threads: Optional[int] = None, *, reexec: bool = True) -> dict:
    """Set the wait policy, thread count and quiet logs for this run; may re-execute the process
    (never returns then). Returns (and keeps in :data:`POLICY`) what is in effect."""
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    if "OMP_WAIT_POLICY" in os.environ:
        wait = os.environ["OMP_WAIT_POLICY"]
        source = ("set by ogpsa bench before torch started" if os.environ.get(REEXEC_MARK)
                  else "from the caller's environment")
        in_effect = True
    elif reexec and launched_as_command():
        env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", **{REEXEC_MARK: "1"})
        if threads is not None:
            env["OMP_NUM_THREADS"] = str(threads)
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, "-c", _CHILD] + sys.argv[1:], env)
    else:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # child processes get it; this one's OpenMP has started
        wait = "PASSIVE"
        source = "requested after torch started (in-process call): not in effect, run `ogpsa bench` from a shell"
        in_effect = False
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    isa = None
    try:
        from ..backends import cext

        isa = cext.build_info().get("cpu_isa")
    except Exception:  # no extension: nothing to report
        pass
    POLICY.clear()
    POLICY.update({"threads": torch.get_num_threads(),
                   "threads_source": "--threads" if threads is not None else "torch default",
                   "omp_wait_policy": wait, "omp_wait_policy_source": source, "omp_wait_policy_in_effect": in_effect,
                   "cpu_isa": isa})
    return dict(POLICY)


def policy_text(policy: Optional[dict]) -> str:
    """One line for headers: threads, wait policy (and where it came from), CPU kernel ISA."""
    if not policy:
        return "process policy not recorded (an older result file)"
    text = (f"{policy['threads']} threads ({policy['threads_source']}), OMP_WAIT_POLICY={policy['omp_wait_policy']} "
            f"({policy['omp_wait_policy_source']})")
    if policy.get("cpu_isa"):
        text += f", CPU kernels {policy['cpu_isa']}"
    return text


def header(policy: dict) -> str:
    """What ``ogpsa bench`` prints first."""
    load = ""
    if hasattr(os, "getloadavg"):
        load = ", load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"ogpsa bench: {policy_text(policy)}{load}"


__all__ = ["POLICY", "QUIET_ENV", "REEXEC_MARK", "command_line", "header", "launched_as_command", "policy_text",
           "prepare"]
