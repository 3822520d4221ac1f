"""space="update" in every integration (issue 13, item 3): TRL's SFTTrainer and DPOTrainer, the
plain-Trainer OGPSACallback (their torch AdamW) and `ogpsa train --space update`. Every applied
update is orthogonal to the subspace used for that step; resuming from a checkpoint continues
bit-identically (parameters and AdamW state)."""

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

import ogpsa  # noqa: E402
from ogpsa.integrations.transformers import OGPSACallback  # noqa: E402
from ogpsa.integrations.trl import OGPSADPOTrainer, OGPSASFTTrainer  # noqa: E402
from ogpsa.optim import UpdateSpaceProjector  # noqa: E402
from ogpsa.tiny import char_tokenizer, tiny_llama  # noqa: E402

pytestmark = pytest.mark.usefixtures("paper_preset")  # these tests mean the paper recipe (preset="paper")

TOL = 1e-5
EPS32 = float(torch.finfo(torch.float32).eps)
REFERENCE = [["the cat sat on the mat.", "2+3=5", "hello world", "abc def"],
             [{"prompt": "copy: xyz -> ", "completion": "xyz"}, {"prompt": "7*6=", "completion": "42"}]]


def sft_data(n=12):
    texts = [f"user: how to make thing {i:02d}? assistant: sorry, i cannot help." for i in range(n)]
    return datasets.Dataset.from_dict({"text": texts})


def args_for(out, cls=None, **kw):
    base = dict(output_dir=str(out), max_steps=4, per_device_train_batch_size=2, learning_rate=1e-2,
                optim="adamw_torch", weight_decay=0.0, lr_scheduler_type="linear", logging_steps=1, report_to="none",
                save_strategy="no", use_cpu=True, disable_tqdm=True, max_grad_norm=1.0, seed=0, data_seed=0,
                bf16=False, fp16=False)
    base.update(kw)
    return (cls or trl.SFTConfig)(**base)


class Recorder(TrainerCallback):
    def __init__(self, subspace_fn=None):
        self.trainer, self.before, self.worst = None, None, []
        self.subspace_fn = subspace_fn

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        self.before = {n: p.detach().double().clone() for n, p in model.named_parameters() if p.requires_grad}

    def on_optimizer_step(self, args, state, control, model=None, **kw):
        sub = self.subspace_fn() if self.subspace_fn else self.trainer.ogpsa.subspace
        params = dict(model.named_parameters())
        worst, moved = 0.0, 0.0
        for name, u in zip(sub.names, sub.bases):
            if u.shape[0] == 0:
                continue
            d = (params[name].detach().double() - self.before[name]).reshape(-1)
            moved += float(d.norm())
            # storing theta + d in fp32 rounds each element by <= eps/2 |theta|
            allowed = TOL * float(d.norm()) + EPS32 * float(self.before[name].norm())
            worst = max(worst, float((u.double() @ d).norm()) / allowed)
        assert moved > 0
        self.worst.append(worst)


def trainer_for(out, rec=None, **kw):
    tok = char_tokenizer()
    trainer = OGPSASFTTrainer(model=tiny_llama(tok, hidden=32, layers=2, seed=0), args=args_for(out, **kw),
                              train_dataset=sft_data(), processing_class=tok, reference_datasets=REFERENCE,
                              refresh_every=2, ogpsa_config=ogpsa.OGPSAConfig(space="update"),
                              callbacks=[rec] if rec else None)
    if rec:
        rec.trainer = trainer
    return trainer


def test_sft_trainer_update_space_orthogonal(tmp_path):
    rec = Recorder()
    trainer = trainer_for(tmp_path, rec)
    trainer.train()
    assert isinstance(trainer.ogpsa.projector, UpdateSpaceProjector)
    assert len(rec.worst) == 4 and max(rec.worst) <= 1.0, rec.worst


def test_sft_trainer_update_space_resume_bit_identical(tmp_path):
    full = trainer_for(tmp_path / "full", save_strategy="steps", save_steps=2)
    full.train()
    resumed = trainer_for(tmp_path / "resumed", save_strategy="no")
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    _assert_same_params_and_adamw_state(full, resumed)


def _assert_same_params_and_adamw_state(a, b):
    for (n, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(p, q), n
    s1, s2 = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    assert s1.keys() == s2.keys() and s1
    for i in s1:
        for key in s1[i]:
            assert torch.equal(s1[i][key], s2[i][key]), (i, key)


def test_dpo_trainer_update_space_orthogonal(tmp_path):
    import copy

    tok = char_tokenizer()
    model = tiny_llama(tok, hidden=32, layers=2, seed=1)
    data = datasets.Dataset.from_dict({"prompt": [f"how to make thing {i:02d}? " for i in range(8)],
                                       "chosen": ["sorry, i cannot help."] * 8,
                                       "rejected": [f"sure: thing {i:02d}" for i in range(8)]})
    rec = Recorder()
    dpo = OGPSADPOTrainer(model=model, ref_model=copy.deepcopy(model).eval(), args=args_for(tmp_path, trl.DPOConfig),
                          train_dataset=data, processing_class=tok,
                          reference_datasets=[[{"prompt": "q: 1+1=", "chosen": "2", "rejected": "3"},
                                               {"prompt": "q: name a color: ", "chosen": "red", "rejected": "7"}]],
                          refresh_every=2, ogpsa_config=ogpsa.OGPSAConfig(space="update"), callbacks=[rec])
    rec.trainer = dpo
    dpo.train()
    assert isinstance(dpo.ogpsa.projector, UpdateSpaceProjector) and dpo.ogpsa.refresh_steps == [0, 2]
    assert len(rec.worst) == 4 and max(rec.worst) <= 1.0, rec.worst
    logs = [e for e in dpo.state.log_history if "loss" in e]
    assert all(0.0 < e["ogpsa/removed_fraction"] < 1.0 for e in logs), logs  # update-space statistics logged


def callback_trainer_for(out, rec=None, **kw):
    tok = char_tokenizer()
    ids = [tok(f"user: how to make thing {i:02d}? assistant: sorry.").input_ids for i in range(12)]
    data = datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})
    cb = OGPSACallback(ogpsa.OGPSAConfig(space="update"), REFERENCE, refresh_every=2)
    callbacks = [cb]
    if rec is not None:
        rec.subspace_fn = lambda: cb.subspace
        callbacks.append(rec)
    trainer = Trainer(model=tiny_llama(tok, hidden=32, layers=2, seed=0), args=args_for(out, TrainingArguments, **kw),
                      train_dataset=data, processing_class=tok, callbacks=callbacks)
    return trainer, cb


def test_callback_update_space_orthogonal_and_resume_bit_identical(tmp_path):
    rec = Recorder()
    full, cb = callback_trainer_for(tmp_path / "full", rec, save_strategy="steps", save_steps=2)
    full.train()
    assert isinstance(cb.projector, UpdateSpaceProjector) and cb.ogpsa.refresh_steps == [0, 2]
    assert len(rec.worst) == 4 and max(rec.worst) <= 1.0, rec.worst
    resumed, cb2 = callback_trainer_for(tmp_path / "full")  # same output_dir: resumes checkpoint-2's basis
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    # checkpoint-2 holds the step-0 basis (written before the step-2 refresh); the resumed run rebuilds at 2
    assert cb2.ogpsa.refresh_steps == [0, 2] and cb2.ogpsa.timing()["refreshes"] == 1
    _assert_same_params_and_adamw_state(full, resumed)


def test_ogpsa_train_space_update(tmp_path, capsys):
    import json

    from ogpsa.cli import main

    def write(name, rows):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(tmp_path / name)

    safety = write("safety.jsonl", [{"prompt": f"how to make weapon {i}?", "completion": "sorry."} for i in range(4)])
    general = write("general.jsonl", [{"text": t} for t in REFERENCE[0]])
    argv = ["train", "--stage", "sft", "--model", "tiny", "--data", safety, "--reference", general, "--max-steps", "2",
            "--batch-size", "2", "--cpu", "--refresh-every", "1", "--space", "update"]
    assert main(argv + ["--output", str(tmp_path / "o")]) == 0
    summary = json.loads((tmp_path / "o" / "ogpsa_train_summary.json").read_text())
    assert summary["space"] == "update" and summary["refresh_steps"] == [0, 1]
    capsys.readouterr()
    assert main(argv + ["--output", str(tmp_path / "x"), "--optim", "sgd"]) == 2
    assert "--space update projects the AdamW direction" in capsys.readouterr().err
