"""The runnable files in examples/ run (tiny model, few steps) and do what they say.

- the data files are exactly what examples/make_data.py writes;
- the hand-written loop (LoRA + AdamW + accumulation, ogpsa.OGPSA) projects every step and
  refreshes on schedule, and its saved state resumes;
- the plain Trainer + OGPSACallback run puts ogpsa/* metrics into the Trainer's logs;
- FSDP2 runs under torchrun with 2 CPU ranks (gloo);
- DeepSpeed ZeRO-2 runs under torchrun with 2 CPU ranks where deepspeed is importable (~10 s;
  tried with `pip install --no-deps --target DIR deepspeed hjson einops msgpack pydantic` and PYTHONPATH=DIR).
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


@pytest.fixture
def examples_path(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    yield
    for name in ("_common", "train_loop", "train_trainer_callback", "make_data"):
        sys.modules.pop(name, None)


def test_example_data_files_are_the_generators_output(examples_path, tmp_path):
    import make_data

    for path in make_data.write(tmp_path):
        assert path.read_text() == (EXAMPLES / "data" / path.name).read_text(), path.name


def test_hand_written_loop_lora_adamw_accumulation(examples_path, tmp_path):
    pytest.importorskip("peft")
    import train_loop

    import ogpsa

    out = train_loop.main(["--steps", "4", "--accum", "2", "--refresh-every", "2", "--output", str(tmp_path)])
    assert len(out["removed"]) == 4 and all(0 < r < 1 for r in out["removed"])
    assert out["refresh_steps"] == [0, 2, 4]
    assert (tmp_path / "adapter_model.safetensors").is_file()
    # the saved basis + schedule resume with the same subspace
    model = out["model"]
    import torch

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    resumed = ogpsa.OGPSA.from_pretrained(str(tmp_path), model, opt, refresh_every=0)
    assert resumed.step == 4 and resumed.subspace.names == out["og"].subspace.names


def test_plain_trainer_with_callback_logs_ogpsa_metrics(examples_path):
    pytest.importorskip("transformers")
    import train_trainer_callback

    logs = train_trainer_callback.main(["--steps", "3"])
    assert len(logs) == 3
    assert all(0 < entry["ogpsa/removed_fraction"] < 1 for entry in logs)


def _torchrun(script: str, *args: str, env_extra: dict | None = None) -> str:
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    out = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", str(EXAMPLES / script), *args],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def test_fsdp2_example_two_cpu_ranks(tmp_path):
    stdout = _torchrun("train_fsdp2.py", "--steps", "2", "--output", str(tmp_path))
    assert "step 2:" in stdout and "removed" in stdout
    import ogpsa

    basis = ogpsa.Subspace.load(str(tmp_path / "basis.safetensors"))
    assert len(basis.names) > 0


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_deepspeed_example_two_cpu_ranks():
    stdout = _torchrun("train_deepspeed.py", "--steps", "2", env_extra={"DS_ACCELERATOR": "cpu"})
    assert "step 2:" in stdout and "projections 2" in stdout
