"""attach(space="update") inside TRL's SFTTrainer (its torch AdamW): every applied update is
orthogonal to the subspace used for that step; resuming from a checkpoint continues bit-identically."""

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
from transformers import TrainerCallback  # noqa: E402

import ogpsa  # noqa: E402
from ogpsa.integrations.trl import OGPSASFTTrainer  # noqa: E402
from ogpsa.optim import UpdateSpaceProjector  # noqa: E402
from ogpsa.tiny import char_tokenizer, tiny_llama  # noqa: E402

TOL = 1e-5
EPS32 = float(torch.finfo(torch.float32).eps)
REFERENCE = [["the cat sat on the mat.", "2+3=5", "hello world", "abc def"],
             [{"prompt": "copy: xyz -> ", "completion": "xyz"}, {"prompt": "7*6=", "completion": "42"}]]


def sft_data(n=12):
    texts = [f"user: how to make thing {i:02d}? assistant: sorry, i cannot help." for i in range(n)]
    return datasets.Dataset.from_dict({"text": texts})


def args_for(out, **kw):
    base = dict(output_dir=str(out), max_steps=4, per_device_train_batch_size=2, learning_rate=1e-2,
                optim="adamw_torch", weight_decay=0.0, lr_scheduler_type="linear", logging_steps=1, report_to="none",
                save_strategy="no", use_cpu=True, disable_tqdm=True, max_grad_norm=1.0, seed=0, data_seed=0,
                bf16=False, fp16=False)
    base.update(kw)
    return trl.SFTConfig(**base)


class Recorder(TrainerCallback):
    def __init__(self):
        self.trainer, self.before, self.worst = None, None, []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        self.before = {n: p.detach().double().clone() for n, p in model.named_parameters() if p.requires_grad}

    def on_optimizer_step(self, args, state, control, model=None, **kw):
        sub = self.trainer.ogpsa.subspace
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
    for (n, p), q in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), n
    s1, s2 = full.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert s1.keys() == s2.keys()
    for i in s1:
        for key in s1[i]:
            assert torch.equal(s1[i][key], s2[i][key]), (i, key)
