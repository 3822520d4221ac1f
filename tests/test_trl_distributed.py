"""OGPSA TRL trainers under DDP (accelerate, gloo) and DeepSpeed ZeRO-2, against one process.

Each case starts this file as a script twice (``python tests/test_trl_distributed.py OUT CASE
RANK PORT``), one process per rank on 127.0.0.1, with the environment variables ``accelerate
launch`` sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT): the Trainer's accelerate state
then runs multi-process (DDP over gloo on the CPU, or DeepSpeed's CPU accelerator). Every
rank trains :class:`OGPSASFTTrainer` for a few SGD steps on 2 examples per step and writes
its final trainable weights; the test compares them with a single-process run on the same
global batches (4 examples per step). Sequences all have the same length, so the token-mean
loss of 4 examples equals the mean of two 2-example means, and the sampler is sequential,
so rank r's step-s batch is examples [4s + 2r, 4s + 2r + 2) of the single run's batch s.
Clipping is active (max_grad_norm below the gradient norm) and the subspace is refreshed
mid-run, so projecting per-rank gradients or clipping per rank would show.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from oracle import deepspeed_importable

from ogpsa.ops import UnsupportedSetupError

pytestmark = pytest.mark.usefixtures("paper_preset")  # these tests mean the paper recipe (preset="paper")

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

HERE = os.path.dirname(os.path.abspath(__file__))
WORLD = 2
PER_RANK = 2
STEPS = 3
TOL = 1e-5
TIMEOUT = 85  # seconds for the 2-rank launch (the worker's whole session is killed after it)
REFERENCE = [["the cat sat on the mat.", "2+3=5", "hello world", "abc def"],
             [{"prompt": "copy: xyz -> ", "completion": "xyz"}, {"prompt": "7*6=", "completion": "42"}]]
DS_CONFIG = {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
             "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
             "zero_optimization": {"stage": 2, "reduce_bucket_size": 500, "allgather_bucket_size": 500},
             "zero_allow_untested_optimizer": True}


def sft_data(n: int = 16):
    # every text has the same length (two-digit i): equal token counts on every rank
    return datasets.Dataset.from_dict(
        {"text": [f"user: how to make thing {i:02d}? assistant: sorry, i cannot help." for i in range(n)]})


def make_trainer(out: str, batch: int, ogpsa: bool = True, **extra):
    """The trainer of every run: SGD (no momentum), clipping on, refresh at step 2, fp32."""
    from ogpsa.integrations.trl import OGPSASFTTrainer
    from ogpsa.tiny import char_tokenizer, tiny_llama

    class SequentialSFT(OGPSASFTTrainer):
        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    tok = char_tokenizer()
    args = trl.SFTConfig(output_dir=out, max_steps=STEPS, per_device_train_batch_size=batch, learning_rate=0.5,
                         optim="sgd", weight_decay=0.0, lr_scheduler_type="constant", logging_steps=1,
                         report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True, max_grad_norm=0.3,
                         seed=0, data_seed=0, bf16=False, fp16=False, dataloader_drop_last=True, **extra)
    kw = dict(reference_datasets=REFERENCE, refresh_every=2) if ogpsa else dict(reference_datasets=REFERENCE,
                                                                                 refresh_every=0)
    trainer = SequentialSFT(model=tiny_llama(tok, hidden=32, layers=2, seed=0), args=args, train_dataset=sft_data(),
                            processing_class=tok, **kw)
    if not ogpsa:  # the same trainer class, projection removed after setup: the "without OGPSA" run
        trainer._ogpsa_setup = lambda: None
    return trainer


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


# ----------------------------------------------------------------------------------------
# the 2-rank worker (runs when this file is executed as a script)
# ----------------------------------------------------------------------------------------


def _rank(rank: int, outdir: str, case: str) -> None:
    torch.set_num_threads(1)
    result: dict = {}
    try:
        extra = {}
        if case == "deepspeed":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            extra = dict(deepspeed=dict(DS_CONFIG))
        else:
            extra = dict(ddp_backend="gloo")
        logs: list = []
        trainer = make_trainer(os.path.join(outdir, f"run{rank}"), PER_RANK, **extra)
        trainer.add_callback(_LogCatcher(logs))
        trainer.train()
        proj = trainer.ogpsa_projector
        model = trainer.model_wrapped.module if case == "deepspeed" else trainer.model
        torch.save(trainable(model), os.path.join(outdir, f"{case}.rank{rank}.pt"))
        split = [n for n, p in model.named_parameters() if getattr(p, "_hp_mapping", None) is not None
                 and p._hp_mapping.lp_fragment_address.numel < p.numel()]
        result.update(world=torch.distributed.get_world_size(), projector=type(proj).__name__,
                      projections=proj.num_projections, refresh_steps=trainer.ogpsa.refresh_steps,
                      removed=[lg.get("ogpsa/removed_fraction") for lg in logs if "loss" in lg],
                      distributed_type=str(trainer.accelerator.distributed_type), split_params=split)
    except Exception:
        import traceback

        result["error"] = traceback.format_exc()
    with open(os.path.join(outdir, f"{case}.rank{rank}.json"), "w") as f:
        json.dump(result, f, default=str)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


try:
    from transformers import TrainerCallback

    class _LogCatcher(TrainerCallback):
        def __init__(self, logs: list):
            self.logs = logs

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append(dict(logs or {}))
except ImportError:  # pragma: no cover - transformers comes with trl
    pass


# ----------------------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------------------


def _launch(outdir: str, case: str, env: dict) -> list[dict]:
    port = str(_free_port())
    procs, logs = [], []
    for r in range(WORLD):
        rank_env = dict(env, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(r), WORLD_SIZE=str(WORLD),
                        LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(WORLD), OMP_NUM_THREADS="1")
        log = open(os.path.join(outdir, f"{case}.rank{r}.log"), "wb")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), outdir, case, str(r)],
                                      stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=rank_env,
                                      cwd=os.path.dirname(HERE)))
    deadline = time.monotonic() + TIMEOUT
    timed_out = False
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)  # each rank runs in its own session: only what we started
            p.wait()
    for log in logs:
        log.close()

    def tail(r: int) -> str:
        with open(os.path.join(outdir, f"{case}.rank{r}.log"), "rb") as f:
            return f.read().decode(errors="replace")[-3000:]

    if timed_out:
        pytest.fail(f"{case}: the ranks did not finish in {TIMEOUT}s:\n" + "\n".join(tail(r) for r in range(WORLD)))
    ranks = []
    for r in range(WORLD):
        path = os.path.join(outdir, f"{case}.rank{r}.json")
        if not os.path.exists(path):
            pytest.fail(f"no result from rank {r} (exit {procs[r].returncode}):\n{tail(r)}")
        with open(path) as f:
            out = json.load(f)
        assert "error" not in out, f"rank {r} failed:\n{out['error']}"
        out["weights"] = torch.load(os.path.join(outdir, f"{case}.rank{r}.pt"))
        ranks.append(out)
    return ranks


def _rel_update(a: dict, b: dict, start: dict) -> float:
    num = sum(float(((a[n] - b[n]).double()).norm()) ** 2 for n in b)
    den = sum(float(((b[n] - start[n]).double()).norm()) ** 2 for n in b)
    return (num / den) ** 0.5


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """Single-process runs on the global batch (4 per step): with and without OGPSA."""
    from ogpsa.tiny import char_tokenizer, tiny_llama

    start = trainable(tiny_llama(char_tokenizer(), hidden=32, layers=2, seed=0))
    out = {}
    for name, on in (("ogpsa", True), ("plain", False)):
        trainer = make_trainer(str(tmp_path_factory.mktemp(name)), PER_RANK * WORLD, ogpsa=on)
        trainer.train()
        out[name] = trainable(trainer.model)
        if on:
            out["refresh_steps"] = trainer.ogpsa.refresh_steps
            out["projections"] = trainer.ogpsa_projector.num_projections
    out["start"] = start
    # the projection matters on this run, or the comparisons below could not fail
    assert _rel_update(out["plain"], out["ogpsa"], start) > 0.05
    return out


def _check_ranks(ranks: list[dict], single: dict) -> None:
    w0, w1 = ranks[0]["weights"], ranks[1]["weights"]
    assert w0.keys() == single["ogpsa"].keys()
    assert all(torch.equal(w0[n], w1[n]) for n in w0), "the ranks' weights differ"
    for out in ranks:
        assert out["world"] == WORLD
        assert out["refresh_steps"] == single["refresh_steps"] == [0, 2]
        assert out["projections"] == STEPS == single["projections"]
        assert len(out["removed"]) == STEPS and all(r is not None and r > 0 for r in out["removed"])
        err = _rel_update(out["weights"], single["ogpsa"], single["start"])
        print(f"rank update vs single process: rel {err:.2e}")  # shown with pytest -s
        assert err <= TOL, f"update differs from the single-process run: rel {err:.2e}"


@pytest.mark.slow
def test_sft_trainer_ddp_two_ranks_equals_single_process(single, tmp_path):
    env = dict(os.environ)
    env.pop("DS_ACCELERATOR", None)
    ranks = _launch(str(tmp_path), "ddp", env)
    for out in ranks:
        assert out["distributed_type"] == "DistributedType.MULTI_CPU" and out["projector"] == "Projector"
    _check_ranks(ranks, single)


# ----------------------------------------------------------------------------------------
# fast single-process checks of the pieces the DeepSpeed path relies on
# ----------------------------------------------------------------------------------------


def test_autograd_collection_equals_backward_and_fires_no_accumulate_hooks():
    """grad_mode="autograd" (used under DeepSpeed) gives the same reference gradients as
    backward, never runs post-accumulate-grad hooks (DeepSpeed ZeRO-2's reduce-into-partition
    hooks) and never touches .grad."""
    from ogpsa.collect import collect_reference_gradients
    from ogpsa.tiny import char_tokenizer, tiny_llama

    tok = char_tokenizer()
    model = tiny_llama(tok, hidden=32, layers=2, seed=1)
    fired = []
    hooks = [p.register_post_accumulate_grad_hook(lambda p, n=n: fired.append(n))
             for n, p in model.named_parameters()]
    gen = torch.Generator().manual_seed(5)
    sentinel = {n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = sentinel[n].clone()
    kw = dict(num_samples=4, batch_size=3, tokenizer=tok, progress=False)
    auto, _ = collect_reference_gradients(model, REFERENCE, grad_mode="autograd", **kw)
    assert fired == []
    assert all(torch.equal(p.grad, sentinel[n]) for n, p in model.named_parameters())
    for h in hooks:
        h.remove()
    back, _ = collect_reference_gradients(model, REFERENCE, grad_mode="backward", **kw)
    assert all(torch.equal(p.grad, sentinel[n]) for n, p in model.named_parameters())
    for a, b in zip(auto, back):
        assert a.keys() == b.keys() and len(a) > 10
        num = sum(float((a[n].double() - b[n].double()).norm()) ** 2 for n in a)
        den = sum(float(b[n].double().norm()) ** 2 for n in a)
        assert den > 0 and (num / den) ** 0.5 <= 1e-6
    with pytest.raises(ValueError, match="grad_mode"):
        collect_reference_gradients(model, REFERENCE, grad_mode="hooks", **kw)


def test_collect_rejects_a_deepspeed_engine_with_a_pointer_to_its_module():
    from ogpsa.collect import collect_reference_gradients

    class DeepSpeedEngine(torch.nn.Module):  # the name is what the check looks at
        pass

    with pytest.raises(TypeError, match=r"\.module with grad_mode='autograd'"):
        collect_reference_gradients(DeepSpeedEngine(), [["x"]])


def _fake_trainer(deepspeed_stage=None, fsdp=False):
    from types import SimpleNamespace

    from ogpsa.config import OGPSAConfig
    from ogpsa.session import OGPSA

    plugin = SimpleNamespace(zero_stage=deepspeed_stage)
    return SimpleNamespace(
        is_deepspeed_enabled=deepspeed_stage is not None, is_fsdp_enabled=fsdp,
        accelerator=SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin)),
        _ogpsa_engine=OGPSA.deferred(REFERENCE, OGPSAConfig(), refresh_every=2), _ogpsa_deepspeed=False,
        _ogpsa_batch_size=2, args=SimpleNamespace(per_device_train_batch_size=2), processing_class=None,
        add_callback=lambda cb: None)


@pytest.mark.filterwarnings("ignore:this transformers version has no overridable")  # the stand-in has no Trainer
def test_trainer_setup_checks_for_deepspeed_and_fsdp():
    from ogpsa.integrations.trl import OGPSATrainerMixin

    with pytest.raises(UnsupportedSetupError, match="ZeRO stage 1 and 2, not stage 3"):
        OGPSATrainerMixin._ogpsa_finish(_fake_trainer(deepspeed_stage=3))
    with pytest.raises(UnsupportedSetupError, match="DDP or DeepSpeed ZeRO-2"):
        OGPSATrainerMixin._ogpsa_finish(_fake_trainer(fsdp=True))
    t = _fake_trainer(deepspeed_stage=2)
    OGPSATrainerMixin._ogpsa_finish(t)
    assert t._ogpsa_deepspeed and t._ogpsa_engine.grad_mode == "autograd"
    t = _fake_trainer()
    OGPSATrainerMixin._ogpsa_finish(t)
    assert not t._ogpsa_deepspeed and t._ogpsa_engine.grad_mode == "backward"


@pytest.mark.slow
@pytest.mark.skipif(not deepspeed_importable(), reason="deepspeed is not installed")
def test_sft_trainer_deepspeed_zero2_two_ranks_equals_single_process(single, tmp_path):
    """The real DeepSpeed ZeRO-2 engine on the CPU accelerator: projection inside the wrapped
    ZeRO step, DeepSpeed's own clipping after it, reference gradients via autograd.grad."""
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    ranks = _launch(str(tmp_path), "deepspeed", env)
    for out in ranks:
        assert out["distributed_type"] == "DistributedType.DEEPSPEED" and out["projector"] == "ZeroProjector"
        assert out["split_params"], "the ZeRO partition should cut a parameter"
    _check_ranks(ranks, single)


if __name__ == "__main__":
    import ogpsa.config

    ogpsa.config.DEFAULT_PRESET = "paper"  # the ranks check the paper recipe, as the tests above
    sys.path.insert(0, os.path.dirname(HERE))
    _rank(int(sys.argv[3]), sys.argv[1], sys.argv[2])
