"""OGPSA trainers for TRL, the plain-Trainer callback, LoRA, resume, SFT->DPO and the README example.

Tiny Llama (hidden 32, 2 layers) with a character tokenizer, CPU, offline. Orthogonality is
checked on the *actual parameter update* of every optimizer step: with SGD (no momentum, no
weight decay) the update is -lr * P(g), so in float64 ||U d|| / ||d|| must be ~0 (<= 1e-5).
"""

import copy
import os
import re

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

import ogpsa  # noqa: E402
from ogpsa.collect import build_subspace  # noqa: E402
from ogpsa.integrations.common import STATE_FILE, SUBSPACE_FILE  # noqa: E402
from ogpsa.integrations.transformers import OGPSACallback  # noqa: E402
from ogpsa.integrations.trl import OGPSADPOTrainer, OGPSASFTTrainer  # noqa: E402
from ogpsa.tiny import char_tokenizer, tiny_llama  # noqa: E402

pytestmark = pytest.mark.usefixtures("paper_preset")  # these tests mean the paper recipe (preset="paper")

TOL = 1e-5
EPS32 = float(torch.finfo(torch.float32).eps)
REFERENCE = [["the cat sat on the mat.", "2+3=5", "hello world", "abc def"],
             [{"prompt": "copy: xyz -> ", "completion": "xyz"}, {"prompt": "7*6=", "completion": "42"}]]
PREFERENCE_REF = [[{"prompt": "q: 1+1=", "chosen": "2", "rejected": "3"},
                   {"prompt": "q: name a color: ", "chosen": "red", "rejected": "7"}]]


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def model_for(tok, seed=0):
    return tiny_llama(tok, hidden=32, layers=2, seed=seed)


def sft_data(n=16, width=None):
    texts = [f"user: how to make thing {i:02d}? assistant: sorry, i cannot help." for i in range(n)]
    return datasets.Dataset.from_dict({"text": texts})


def dpo_data(n=12):
    return datasets.Dataset.from_dict({
        "prompt": [f"how to make thing {i:02d}? " for i in range(n)],
        "chosen": ["sorry, i cannot help."] * n,
        "rejected": [f"sure: thing {i:02d}" for i in range(n)],
    })


def common_args(out, **kw):
    base = dict(output_dir=str(out), max_steps=4, per_device_train_batch_size=2, learning_rate=0.5, optim="sgd",
                weight_decay=0.0, lr_scheduler_type="constant", logging_steps=1, report_to="none",
                save_strategy="no", use_cpu=True, disable_tqdm=True, max_grad_norm=1.0, seed=0, data_seed=0,
                bf16=False, fp16=False)  # TRL defaults to bf16 autocast, even on CPU
    base.update(kw)
    return base


class UpdateRecorder(TrainerCallback):
    """Records every optimizer step's update and its component in the subspace used for it."""

    def __init__(self, subspace_fn=None):
        self.subspace_fn = subspace_fn
        self.trainer = None
        self.before = None
        self.ratios = []          # aggregate ||U d|| / ||d|| per step
        self.worst_tensor = []    # max over tensors of ||U_i d_i|| / (TOL ||d_i|| + eps ||theta_i||)
        self.subspaces = []       # the subspace object of each step
        self.deltas = []

    def _sub(self):
        return self.subspace_fn() if self.subspace_fn else self.trainer.ogpsa.subspace

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        self.before = {n: p.detach().double().clone() for n, p in model.named_parameters() if p.requires_grad}

    def on_optimizer_step(self, args, state, control, model=None, **kw):
        sub = self._sub()
        params = dict(model.named_parameters())
        delta = {n: params[n].detach().double() - b for n, b in self.before.items()}
        num = den = 0.0
        worst = 0.0
        for name, u in zip(sub.names, sub.bases):
            if u.shape[0] == 0:
                continue
            d = delta[name].reshape(-1)
            inside = (u.double() @ d).norm()
            num += float(inside) ** 2
            den += float(d.norm()) ** 2
            # Storing theta + d in fp32 rounds each element by <= eps/2 |theta|: allow that on top of TOL.
            allowed = TOL * float(d.norm()) + EPS32 * float(self.before[name].norm())
            worst = max(worst, float(inside) / allowed)
        self.ratios.append((num / den) ** 0.5 if den > 0 else 0.0)
        self.worst_tensor.append(worst)
        self.subspaces.append(sub)
        self.deltas.append({n: d.float() for n, d in delta.items()})


def trainable_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def sft_run(tok, tmp_path_factory):
    """One OGPSA SFT run (5 steps, refresh every 2) shared by several tests."""
    out = tmp_path_factory.mktemp("sft")
    rec = UpdateRecorder()
    trainer = OGPSASFTTrainer(model=model_for(tok), args=trl.SFTConfig(**common_args(out, max_steps=5)),
                              train_dataset=sft_data(), processing_class=tok, reference_datasets=REFERENCE,
                              refresh_every=2, callbacks=[rec])
    rec.trainer = trainer
    trainer.train()
    trainer.save_model(str(out / "final"))
    return trainer, rec, out


def test_sft_updates_are_orthogonal_to_the_subspace(sft_run):
    trainer, rec, _ = sft_run
    assert len(rec.ratios) == 5
    assert max(rec.ratios) <= TOL, rec.ratios
    assert max(rec.worst_tensor) <= 1.0, rec.worst_tensor
    sub = rec.subspaces[0]
    assert max(sub.ranks().values()) == 2 and sub.num_references == 2
    assert all(float(torch.cat([d.reshape(-1) for d in delta.values()]).norm()) > 0 for delta in rec.deltas)


def test_refresh_happens_at_the_configured_steps(sft_run):
    trainer, rec, _ = sft_run
    assert trainer.ogpsa.refresh_every == 2
    assert trainer.ogpsa.refresh_steps == [0, 2, 4]
    # steps 1-2 use the step-0 basis, 3-4 the step-2 basis, 5 the step-4 one; each refresh is new
    s = rec.subspaces
    assert s[0] is s[1] and s[2] is s[3] and s[1] is not s[2] and s[3] is not s[4]
    assert not s[1].equal(s[2]) and not s[3].equal(s[4])
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 5
    assert [entry["ogpsa/refreshes"] for entry in logs] == [1.0, 0.0, 1.0, 0.0, 1.0]
    for entry in logs:
        assert 0.0 < entry["ogpsa/removed_fraction"] < 1.0
        assert 0.0 < entry["ogpsa/cosine"] <= 1.0
        assert entry["ogpsa/refresh_seconds"] >= 0.0
    assert logs[0]["ogpsa/refresh_seconds"] > 0


def test_without_ogpsa_the_update_differs(sft_run, tok, tmp_path):
    ogpsa_trainer, ogpsa_rec, _ = sft_run
    model = model_for(tok)
    step0 = ogpsa_rec.subspaces[0]  # built from this same initial model
    # Sanity: building it here, outside the trainer, gives the same directions.
    again = build_subspace(copy.deepcopy(model), REFERENCE, ogpsa.OGPSAConfig(), tokenizer=tok, batch_size=2,
                           progress=False)
    for a, b in zip(again.bases, step0.bases):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
    rec = UpdateRecorder(subspace_fn=lambda: step0)
    trainer = trl.SFTTrainer(model=model, args=trl.SFTConfig(**common_args(tmp_path, max_steps=1)),
                             train_dataset=sft_data(), processing_class=tok, callbacks=[rec])
    trainer.train()
    assert rec.ratios[0] > 1e-2, "the plain update should have a component in the capability subspace"
    diff = sum(float((rec.deltas[0][n] - ogpsa_rec.deltas[0][n]).norm()) for n in rec.deltas[0])
    assert diff > 1e-3


def test_checkpoint_files_and_sft_to_dpo_handoff(sft_run, tok, tmp_path):
    sft_trainer, _, out = sft_run
    final = out / "final"
    assert (final / SUBSPACE_FILE).is_file() and (final / STATE_FILE).is_file()
    saved = ogpsa.Subspace.load(str(final / SUBSPACE_FILE))
    assert saved.equal(sft_trainer.ogpsa.subspace)
    # DPO starts from the SFT stage's model and basis and keeps refreshing (every 2 steps here).
    policy = sft_trainer.model
    ref_model = copy.deepcopy(policy).eval()
    rec = UpdateRecorder()
    dpo = OGPSADPOTrainer(model=policy, ref_model=ref_model,
                          args=trl.DPOConfig(**common_args(tmp_path, max_steps=3)), train_dataset=dpo_data(),
                          processing_class=tok, reference_datasets=PREFERENCE_REF, subspace=str(final),
                          refresh_every=2, callbacks=[rec])
    rec.trainer = dpo
    dpo.train()
    assert rec.subspaces[0].equal(saved) and rec.subspaces[1].equal(saved)
    assert dpo.ogpsa.refresh_steps == [2]
    assert max(rec.subspaces[2].ranks().values()) == 1  # one preference set: rank 1
    assert max(rec.ratios) <= TOL, rec.ratios


def test_dpo_defaults_and_orthogonality(tok, tmp_path):
    model = model_for(tok, seed=1)
    rec = UpdateRecorder()
    dpo = OGPSADPOTrainer(model=model, ref_model=copy.deepcopy(model).eval(),
                          args=trl.DPOConfig(**common_args(tmp_path, max_steps=3, max_grad_norm=0.0)),
                          train_dataset=dpo_data(), processing_class=tok, reference_datasets=PREFERENCE_REF,
                          callbacks=[rec])
    rec.trainer = dpo
    assert dpo.ogpsa.refresh_every == 5  # the original work's DPO default
    dpo.train()
    assert dpo.ogpsa.refresh_steps == [0]
    assert len(rec.ratios) == 3 and max(rec.ratios) <= TOL, rec.ratios
    assert all("ogpsa/removed_fraction" in e for e in dpo.state.log_history if "loss" in e)


def test_gradient_accumulation_equals_one_large_batch(tok, tmp_path):
    data = sft_data(8)  # equal-length texts: no padding differences between the two runs
    deltas = []
    for bs, ga in ((4, 1), (1, 4)):
        rec = UpdateRecorder()
        args = trl.SFTConfig(**common_args(tmp_path / f"{bs}x{ga}", max_steps=1, per_device_train_batch_size=bs,
                                           gradient_accumulation_steps=ga))
        trainer = OGPSASFTTrainer(model=model_for(tok), args=args, train_dataset=data, processing_class=tok,
                                  reference_datasets=REFERENCE, reference_batch_size=2, callbacks=[rec])
        rec.trainer = trainer
        trainer.train()
        assert rec.ratios[0] <= TOL
        deltas.append(rec.deltas[0])
    num = sum(float((deltas[0][n] - deltas[1][n]).double().pow(2).sum()) for n in deltas[0])
    den = sum(float(deltas[0][n].double().pow(2).sum()) for n in deltas[0])
    assert den > 0 and (num / den) ** 0.5 <= 1e-4, (num / den) ** 0.5


def test_lora_sft(tok, tmp_path):
    peft = pytest.importorskip("peft")
    rec = UpdateRecorder()
    trainer = OGPSASFTTrainer(model=model_for(tok, seed=2), args=trl.SFTConfig(**common_args(tmp_path, max_steps=3)),
                              train_dataset=sft_data(), processing_class=tok, reference_datasets=REFERENCE,
                              refresh_every=2, callbacks=[rec],
                              peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                          lora_dropout=0.0))
    rec.trainer = trainer
    trainer.train()
    first, refreshed = rec.subspaces[0], rec.subspaces[2]
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert set(first.names) <= trainable and all("lora_" in n for n in first.names)
    a_names = [n for n in first.names if "lora_A" in n]
    b_names = [n for n in first.names if "lora_B" in n]
    assert a_names and b_names
    # B starts at zero, so A's reference gradients are exactly zero: no direction, no NaN.
    assert all(first.ranks()[n] == 0 for n in a_names) and all(first.ranks()[n] == 2 for n in b_names)
    # After B has moved, the refreshed basis has directions for A too.
    assert all(refreshed.ranks()[n] == 2 for n in a_names)
    assert all(torch.isfinite(u).all() for s in (first, refreshed) for u in s.bases)
    assert max(rec.ratios) <= TOL, rec.ratios
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_resume_restores_the_basis_bit_identically_and_continues(tok, tmp_path):
    def run(out, resume=None, rec=None):
        args = trl.SFTConfig(**common_args(out, max_steps=4, save_strategy="steps", save_steps=2))
        trainer = OGPSASFTTrainer(model=model_for(tok, seed=4), args=args, train_dataset=sft_data(),
                                  processing_class=tok, reference_datasets=REFERENCE, refresh_every=3,
                                  callbacks=[rec] if rec else None)
        if rec:
            rec.trainer = trainer
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full_rec = UpdateRecorder()
    full = run(tmp_path / "a", rec=full_rec)
    assert full.ogpsa.refresh_steps == [0, 3]
    ckpt = tmp_path / "a" / "checkpoint-2"
    saved = ogpsa.Subspace.load(str(ckpt / SUBSPACE_FILE))
    assert saved.equal(full_rec.subspaces[1])  # the basis in use when checkpoint-2 was written
    # One object: a trainer checkpoint is what OGPSA.save_pretrained writes, so a hand-written loop resumes it.
    loop_model = model_for(tok, seed=4)
    og = ogpsa.OGPSA.from_pretrained(ckpt, loop_model, torch.optim.SGD(loop_model.parameters(), lr=0.1),
                                     reference=REFERENCE, tokenizer=tok, progress=False)
    assert og.subspace.equal(saved) and (og.step, og.built_at, og.refresh_every) == (2, 0, 3)
    assert og.refresh_steps == [0]
    og.remove()
    # Resume into a copy of the run directory and continue to step 4.
    import shutil

    shutil.copytree(tmp_path / "a" / "checkpoint-2", tmp_path / "b" / "checkpoint-2")
    rec = UpdateRecorder()
    resumed = run(tmp_path / "b", resume=True, rec=rec)
    assert len(rec.subspaces) == 2  # steps 3 and 4
    assert rec.subspaces[0].equal(saved)  # step 3 uses the restored basis, bit for bit
    assert all(torch.equal(a, b) for a, b in zip(rec.subspaces[0].bases, saved.bases))
    assert resumed.ogpsa.refresh_steps == [0, 3] == full.ogpsa.refresh_steps  # history restored + step 3
    assert resumed.ogpsa.timing()["refreshes"] == 1  # built once in this process
    assert rec.subspaces[1].equal(full_rec.subspaces[3])
    assert max(rec.ratios) <= TOL
    for name, p in trainable_state(full.model).items():
        torch.testing.assert_close(trainable_state(resumed.model)[name], p, rtol=1e-5, atol=1e-6)


def test_plain_trainer_callback(tok, tmp_path):
    texts = [f"general text number {i:02d}." for i in range(8)]
    ids = [tok(t).input_ids for t in texts]
    data = datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})
    model = model_for(tok, seed=5)
    cb = OGPSACallback(ogpsa.OGPSAConfig(), REFERENCE, refresh_every=2, batch_size=2)
    rec = UpdateRecorder(subspace_fn=lambda: cb.subspace)
    args = TrainingArguments(**common_args(tmp_path, max_steps=3, save_strategy="steps", save_steps=3,
                                           max_grad_norm=0.0))
    trainer = Trainer(model=model, args=args, train_dataset=data, processing_class=tok, callbacks=[cb, rec])
    trainer.train()
    assert cb.ogpsa.refresh_steps == [0, 2]
    assert max(rec.ratios) <= TOL, rec.ratios
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert all("ogpsa/removed_fraction" in e and "ogpsa/cosine" in e for e in logs)
    assert ogpsa.Subspace.load(str(tmp_path / "checkpoint-3" / SUBSPACE_FILE)).equal(cb.subspace)


def test_bad_arguments_fail_early(tok, tmp_path):
    args = trl.SFTConfig(**common_args(tmp_path))
    with pytest.raises(ValueError, match="reference_datasets"):
        OGPSASFTTrainer(model=model_for(tok), args=args, train_dataset=sft_data(), processing_class=tok)
    with pytest.raises(ValueError, match="max_grad_norm"):
        OGPSASFTTrainer(model=model_for(tok), args=args, train_dataset=sft_data(), processing_class=tok,
                        reference_datasets=REFERENCE, ogpsa_config=ogpsa.OGPSAConfig(max_norm=1.0))
    with pytest.raises(TypeError, match="list of datasets"):
        OGPSACallback(reference_datasets="general.jsonl")
    with pytest.raises(FileNotFoundError, match="no OGPSA subspace"):
        OGPSACallback(reference_datasets=REFERENCE, subspace=str(tmp_path / "missing"))


def _readme_block(heading: str) -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "README.md")) as f:
        text = f.read()
    m = re.search(r"^##+ " + re.escape(heading) + r"\s*$(.*?)(?=^## )", text + "\n## ", re.S | re.M)
    assert m, f"README has no '{heading}' section"
    blocks = re.findall(r"```python\n(.*?)```", m.group(1), re.S)
    assert blocks, f"README section '{heading}' has no python code block"
    return blocks[0]


def test_readme_train_with_trl_runs_as_written(tmp_path, monkeypatch):
    code = _readme_block("Train with TRL")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(code, "README.md:Train with TRL", "exec"), namespace)
    assert (tmp_path / "ogpsa-sft" / SUBSPACE_FILE).is_file()
    assert (tmp_path / "ogpsa-dpo" / SUBSPACE_FILE).is_file()


def test_ogpsa_train_cli_sft_then_dpo(tmp_path, capsys):
    import json

    from ogpsa.cli import main

    def write(name, rows):
        path = tmp_path / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(path)

    safety = write("safety.jsonl", [{"prompt": f"how to make weapon {i}?", "completion": "sorry."} for i in range(4)])
    prefs = write("prefs.jsonl", [{"prompt": f"weapon {i}?", "chosen": "sorry.", "rejected": "sure."} for i in range(4)])
    general = write("general.jsonl", [{"text": t} for t in REFERENCE[0]])
    pairs = write("pairs.jsonl", REFERENCE[1])
    sft_out = str(tmp_path / "sft")
    rc = main(["train", "--stage", "sft", "--model", "tiny", "--data", safety, "--reference", general,
               "--reference", pairs, "--output", sft_out, "--max-steps", "2", "--batch-size", "2",
               "--optim", "sgd", "--cpu", "--refresh-every", "1", "--num-reference-samples", "3"])
    assert rc == 0
    summary = json.loads((tmp_path / "sft" / "ogpsa_train_summary.json").read_text())
    assert summary["steps"] == 2 and summary["refresh_steps"] == [0, 1]
    # refresh cost: in the summary file and as the last printed line
    timing = summary["refresh"]
    assert timing["refreshes"] == 2 and 0 < timing["refresh_seconds"] <= timing["train_seconds"]
    assert timing["refresh_share"] == pytest.approx(timing["refresh_seconds"] / timing["train_seconds"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"ogpsa: 2 subspace refresh\(es\) took \d+\.\d\ds of \d+\.\d\ds training "
                        r"\(\d+\.\d%\)(; one-off warm-up before the first build \d+\.\d\ds, not counted)?", last), last
    assert "rank 2..2" in summary["subspace"]
    sft_sub = ogpsa.Subspace.load(os.path.join(sft_out, SUBSPACE_FILE))
    # DPO from the SFT checkpoint (model + tokenizer reloaded offline) and its basis, no refresh.
    dpo_out = str(tmp_path / "dpo")
    rc = main(["train", "--stage", "dpo", "--model", sft_out, "--data", prefs, "--subspace", sft_out,
               "--refresh-every", "0", "--output", dpo_out, "--max-steps", "1", "--batch-size", "2", "--cpu"])
    assert rc == 0
    assert ogpsa.Subspace.load(os.path.join(dpo_out, SUBSPACE_FILE)).equal(sft_sub)
    assert json.loads((tmp_path / "dpo" / "ogpsa_train_summary.json").read_text())["refresh_steps"] == []
    capsys.readouterr()
    assert main(["train", "--stage", "sft", "--model", "tiny", "--data", safety, "--output", str(tmp_path / "x")]) == 2
    assert "--reference" in capsys.readouterr().err
    assert main(["train", "--stage", "sft", "--model", str(tmp_path / "nope"), "--data", safety,
                 "--reference", general, "--output", str(tmp_path / "x")]) == 2
    assert "neither 'tiny'" in capsys.readouterr().err


def test_mixin_projects_before_clipping_and_callback_after(tok, tmp_path):
    """With a tiny max_grad_norm the mixin's update has norm exactly lr * max_norm (clip after
    projection); the callback clips first, so its projected update is shorter."""
    from ogpsa.integrations.trl import OGPSATrainerMixin

    class MixedTrainer(OGPSATrainerMixin, Trainer):
        pass

    texts = [f"general text number {i:02d}." for i in range(4)]
    ids = [tok(t).input_ids for t in texts]
    data = datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})
    lr, max_norm = 100.0, 1e-3  # a large lr keeps the update far above fp32 rounding of the weights
    norms = {}
    for kind in ("mixin", "callback"):
        kw = common_args(tmp_path / kind, max_steps=1, max_grad_norm=max_norm, learning_rate=lr)
        args = TrainingArguments(**kw)
        if kind == "mixin":
            rec = UpdateRecorder()
            trainer = MixedTrainer(model=model_for(tok, seed=6), args=args, train_dataset=data, processing_class=tok,
                                   reference_datasets=REFERENCE, callbacks=[rec])
            rec.trainer = trainer
            assert trainer.ogpsa.refresh_every == 30
        else:
            cb = OGPSACallback(reference_datasets=REFERENCE, batch_size=2)
            rec = UpdateRecorder(subspace_fn=lambda cb=cb: cb.subspace)
            trainer = Trainer(model=model_for(tok, seed=6), args=args, train_dataset=data, processing_class=tok,
                              callbacks=[cb, rec])
        trainer.train()
        assert rec.ratios[0] <= TOL and rec.worst_tensor[0] <= 1.0
        norms[kind] = float(torch.cat([d.double().reshape(-1) for d in rec.deltas[0].values()]).norm())
    assert norms["mixin"] == pytest.approx(lr * max_norm, rel=1e-4)
    assert norms["callback"] < 0.999 * lr * max_norm
