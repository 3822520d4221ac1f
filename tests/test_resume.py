"""Resume from every entry point (issue 23 item 3).

An interrupted run resumed from its checkpoint, *into another output directory*, must end with
bit-identical trainable weights to the uninterrupted run, the same refresh history, and the
restored basis in use for the first resumed step: for ``OGPSACallback`` on a plain
``transformers.Trainer`` and for ``OGPSASFTTrainer`` (and ``OGPSADPOTrainer``), in both projection spaces (gradient with
SGD, update with the Trainer's torch AdamW). A resume that finds no ogpsa state warns loudly.

Tiny Llama (hidden 32, 2 layers), character tokenizer, CPU, offline.
"""

import shutil
import warnings

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

import ogpsa  # noqa: E402
from ogpsa.integrations.common import STATE_FILE, SUBSPACE_FILE  # noqa: E402
from ogpsa.integrations.transformers import OGPSACallback  # noqa: E402
from ogpsa.integrations.trl import OGPSADPOTrainer, OGPSASFTTrainer  # noqa: E402
from ogpsa.tiny import char_tokenizer, tiny_llama  # noqa: E402

REFERENCE = [["the cat sat on the mat.", "2+3=5", "hello world", "abc def"],
             [{"prompt": "copy: xyz -> ", "completion": "xyz"}, {"prompt": "7*6=", "completion": "42"}]]
STEPS, SAVE_AT, REFRESH = 6, 4, 3


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


class SubspaceLog(TrainerCallback):
    """The basis in use at every optimizer step (read after the step)."""

    def __init__(self, get):
        self.get = get
        self.used = []

    def on_optimizer_step(self, args, state, control, **kw):
        self.used.append(self.get())


def _args(out, space, cls):
    optim = "sgd" if space == "gradient" else "adamw_torch"
    kw = dict(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=2, learning_rate=0.05, optim=optim,
              weight_decay=0.0, lr_scheduler_type="constant", logging_steps=1, report_to="none",
              save_strategy="steps", save_steps=SAVE_AT, use_cpu=True, disable_tqdm=True, max_grad_norm=1.0,
              seed=0, data_seed=0, bf16=False, fp16=False)
    return cls(**kw)


def _run(kind, space, tok, out, resume=None):
    """One run of the callback or the TRL trainer; returns (trainer, ogpsa object, subspace log)."""
    config = ogpsa.OGPSAConfig(space=space)
    model = tiny_llama(tok, hidden=32, layers=2, seed=7)
    if kind == "callback":
        texts = [f"general text number {i:02d}." for i in range(16)]
        ids = [tok(t).input_ids for t in texts]
        data = datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})
        cb = OGPSACallback(config, REFERENCE, refresh_every=REFRESH, batch_size=2)
        log = SubspaceLog(lambda: cb.subspace)
        trainer = Trainer(model=model, args=_args(out, space, TrainingArguments), train_dataset=data,
                          processing_class=tok, callbacks=[cb, log])
        og = cb.ogpsa
    elif kind == "dpo":
        data = datasets.Dataset.from_dict({"prompt": [f"how to make thing {i:02d}? " for i in range(16)],
                                           "chosen": ["sorry, i cannot help."] * 16,
                                           "rejected": [f"sure: thing {i:02d}" for i in range(16)]})
        ref_model = tiny_llama(tok, hidden=32, layers=2, seed=7).eval()
        trainer = OGPSADPOTrainer(model=model, ref_model=ref_model, args=_args(out, space, trl.DPOConfig),
                                  train_dataset=data, processing_class=tok, ogpsa_config=config,
                                  reference_datasets=REFERENCE, refresh_every=REFRESH, reference_batch_size=2)
        log = SubspaceLog(lambda: trainer.ogpsa.subspace)
        trainer.add_callback(log)
        og = trainer.ogpsa
    else:
        texts = [f"user: how to make thing {i:02d}? assistant: sorry, i cannot help." for i in range(16)]
        trainer = OGPSASFTTrainer(model=model, args=_args(out, space, trl.SFTConfig),
                                  train_dataset=datasets.Dataset.from_dict({"text": texts}), processing_class=tok,
                                  ogpsa_config=config, reference_datasets=REFERENCE, refresh_every=REFRESH,
                                  reference_batch_size=2)
        log = SubspaceLog(lambda: trainer.ogpsa.subspace)
        trainer.add_callback(log)
        og = trainer.ogpsa
    trainer.train(resume_from_checkpoint=resume)
    return trainer, og, log


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind, space", [("callback", "gradient"), ("callback", "update"), ("sft", "gradient"),
                                         ("sft", "update"), ("dpo", "gradient")])
def test_resume_from_another_output_dir_is_bit_identical(kind, space, tok, tmp_path):
    full, full_og, full_log = _run(kind, space, tok, tmp_path / "run1")
    assert full_og.refresh_steps == [0, 3]
    ckpt = tmp_path / "run1" / f"checkpoint-{SAVE_AT}"
    assert (ckpt / SUBSPACE_FILE).is_file() and (ckpt / STATE_FILE).is_file()
    saved = ogpsa.Subspace.load(str(ckpt / SUBSPACE_FILE))
    # Resume into a new output_dir ("ro") from run1's checkpoint: nothing of run1 is under ro.
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="ogpsa: training resumes")  # no "not restored" warning
        resumed, og, log = _run(kind, space, tok, tmp_path / "ro", resume=str(ckpt))
    assert og.refresh_steps == [0, 3] == full_og.refresh_steps  # restored history, no rebuild at step 4
    assert og.timing()["refreshes"] == 0  # nothing rebuilt in the resumed process (next refresh: step 6)
    assert log.used[0].equal(saved) and log.used[0].equal(full_log.used[SAVE_AT])
    assert all(torch.equal(a, b) for a, b in zip(log.used[0].bases, saved.bases))
    a, b = _weights(full.model), _weights(resumed.model)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name}: max diff {float((a[name] - b[name]).abs().max())}"


def test_callback_resume_without_ogpsa_state_warns_loudly(tok, tmp_path):
    _run("callback", "gradient", tok, tmp_path / "run1")
    ckpt = tmp_path / "run1" / f"checkpoint-{SAVE_AT}"
    (ckpt / SUBSPACE_FILE).unlink()
    (ckpt / STATE_FILE).unlink()
    with pytest.warns(UserWarning, match=r"resumes at step 4 .*NOT restored"):
        _, og, _ = _run("callback", "gradient", tok, tmp_path / "ro", resume=str(ckpt))
    assert og.refresh_steps[0] == 4  # rebuilt at the resumed step, as the warning says


def test_trainer_resume_from_a_checkpoint_without_ogpsa_files_warns(tok, tmp_path):
    _run("sft", "gradient", tok, tmp_path / "run1")
    ckpt = tmp_path / "run1" / f"checkpoint-{SAVE_AT}"
    shutil.rmtree(tmp_path / "copy", ignore_errors=True)
    shutil.copytree(ckpt, tmp_path / "copy")
    (tmp_path / "copy" / SUBSPACE_FILE).unlink()
    with pytest.warns(UserWarning, match=r"holds no ogpsa_subspace.safetensors.*NOT restored"):
        _run("sft", "gradient", tok, tmp_path / "ro", resume=str(tmp_path / "copy"))
