"""Issue 16 (4, 5): ogpsa/* metrics reach the Trainer's reporters; stage refresh defaults.

A reporting callback (TensorBoard, W&B...) sits *before* user callbacks in the Trainer's list;
``Reporter`` here is put before ``OGPSACallback`` the same way and records what ``on_log`` shows it.
"""

import copy

import pytest

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

import ogpsa  # noqa: E402
from ogpsa.integrations.transformers import OGPSACallback  # noqa: E402
from ogpsa.integrations.trl import OGPSADPOTrainer, OGPSASFTTrainer  # noqa: E402
from ogpsa.tiny import char_tokenizer, tiny_llama  # noqa: E402

REFERENCE = [["the cat sat on the mat.", "2+3=5", "hello world", "abc def"]]


class Reporter(TrainerCallback):
    """Stands in for a reporting callback: keeps a copy of every training log it is shown."""

    def __init__(self):
        self.seen = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.seen.append(dict(logs))


def _args(out, cls=TrainingArguments, **kw):
    base = dict(output_dir=str(out), max_steps=2, per_device_train_batch_size=2, learning_rate=0.1, optim="sgd",
                lr_scheduler_type="constant", logging_steps=1, report_to="none", save_strategy="no", use_cpu=True,
                disable_tqdm=True, seed=0, bf16=False, fp16=False)
    base.update(kw)
    return cls(**base)


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def _dpo_data(n=4):
    return datasets.Dataset.from_dict({"prompt": [f"q {i}? " for i in range(n)], "chosen": ["no."] * n,
                                       "rejected": [f"yes {i}" for i in range(n)]})


def test_callback_metrics_reach_a_reporter_listed_before_it(tok, tmp_path):
    ids = [tok(f"general text {i:02d}.").input_ids for i in range(4)]
    data = datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})
    rep = Reporter()
    cb = OGPSACallback(reference_datasets=REFERENCE, batch_size=2)
    trainer = Trainer(model=tiny_llama(tok, hidden=32, layers=1, seed=0), args=_args(tmp_path), train_dataset=data,
                      processing_class=tok, callbacks=[rep, cb])
    # The Trainer's own reporters are listed before user callbacks; so is `rep`.
    names = [type(c).__name__ for c in trainer.callback_handler.callbacks]
    assert names.index("Reporter") < names.index("OGPSACallback")
    trainer.train()
    assert len(rep.seen) == 2
    for logs in rep.seen:
        assert 0.0 <= logs["ogpsa/removed_fraction"] <= 1.0 and "ogpsa/cosine" in logs, logs
    assert trainer.callback_handler.callbacks[0] is cb


def test_trainer_metrics_reach_reporters(tok, tmp_path):
    rep = Reporter()
    data = datasets.Dataset.from_dict({"text": [f"sorry, i cannot help {i}." for i in range(4)]})
    trainer = OGPSASFTTrainer(model=tiny_llama(tok, hidden=32, layers=1, seed=0),
                              args=_args(tmp_path, trl.SFTConfig), train_dataset=data, processing_class=tok,
                              reference_datasets=REFERENCE, callbacks=[rep])
    assert "ogpsa" in (getattr(trainer.model, "model_tags", None) or [])  # model-card tag
    trainer.train()
    assert len(rep.seen) == 2 and all("ogpsa/removed_fraction" in e for e in rep.seen)


@pytest.mark.parametrize("config, refresh, expected", [
    (None, None, 5),
    (ogpsa.OGPSAConfig(mode="conflict"), None, 5),   # a config without refresh_every keeps the DPO default
    (ogpsa.OGPSAConfig(refresh_every=7), None, 7),   # set explicitly in the config
    (ogpsa.OGPSAConfig(refresh_every=7), 3, 3),      # the trainer argument wins
])
def test_dpo_refresh_default_is_not_overridden_by_a_config(tok, tmp_path, config, refresh, expected):
    model = tiny_llama(tok, hidden=32, layers=1, seed=0)
    dpo = OGPSADPOTrainer(model=model, ref_model=copy.deepcopy(model).eval(), args=_args(tmp_path, trl.DPOConfig),
                          train_dataset=_dpo_data(), processing_class=tok, reference_datasets=REFERENCE,
                          ogpsa_config=config, refresh_every=refresh)
    assert dpo.ogpsa.refresh_every == expected
    assert dpo.ogpsa.config.refresh_every == expected


@pytest.mark.parametrize("config, expected", [(ogpsa.OGPSAConfig(mode="conflict"), 30),
                                              (ogpsa.OGPSAConfig(refresh_every=4), 4)])
def test_sft_and_callback_refresh_defaults(tok, tmp_path, config, expected):
    data = datasets.Dataset.from_dict({"text": ["a b c", "d e f"]})
    sft = OGPSASFTTrainer(model=tiny_llama(tok, hidden=32, layers=1, seed=0), args=_args(tmp_path, trl.SFTConfig),
                          train_dataset=data, processing_class=tok, reference_datasets=REFERENCE, ogpsa_config=config)
    assert sft.ogpsa.refresh_every == expected
    assert OGPSACallback(config, REFERENCE).engine.refresh_every == expected


def test_config_refresh_every_validation():
    assert ogpsa.OGPSAConfig().refresh_every is None
    for bad in (-1, 1.5, True, "5"):
        with pytest.raises(ValueError, match="refresh_every"):
            ogpsa.OGPSAConfig(refresh_every=bad)


def test_trl_native_config_fields_drive_the_trainer(tok, tmp_path):
    import json

    from trl import TrlParser

    from ogpsa.integrations.trl_config import OGPSADPOConfig, OGPSASFTConfig

    ref = tmp_path / "general.jsonl"
    ref.write_text("".join(json.dumps({"text": t}) + "\n" for t in REFERENCE[0]))
    yaml = tmp_path / "cfg.yaml"
    yaml.write_text(f"output_dir: {tmp_path / 'o'}\nuse_cpu: true\nbf16: false\nmax_steps: 1\nreport_to: none\n"
                    f"ogpsa_mode: conflict\nogpsa_reference: [{ref}]\n")
    (args,) = TrlParser((OGPSADPOConfig,)).parse_args_and_config(
        ["--config", str(yaml), "--ogpsa_num_reference_samples", "3", "--per_device_train_batch_size", "2"])
    model = tiny_llama(tok, hidden=32, layers=1, seed=0)
    dpo = OGPSADPOTrainer(model=model, ref_model=copy.deepcopy(model).eval(), args=args, train_dataset=_dpo_data(),
                          processing_class=tok)
    cfg = dpo.ogpsa.config
    assert cfg.mode == "conflict" and cfg.num_reference_samples == 3
    assert dpo.ogpsa.refresh_every == 5  # ogpsa_refresh_every unset: the DPO default
    assert len(dpo.ogpsa.reference_datasets) == 1 and dpo.ogpsa.reference_datasets[0][0]["text"] == REFERENCE[0][0]
    assert "ogpsa" in (getattr(dpo.model, "model_tags", None) or [])
    dpo.train()
    assert dpo.ogpsa.refresh_steps == [0]
    # An explicit trainer argument still wins over the config's fields; SFT config too.
    sargs = OGPSASFTConfig(**{**_args(tmp_path).to_dict(), "ogpsa_refresh_every": 2, "ogpsa_reference": [str(ref)]})
    data = datasets.Dataset.from_dict({"text": ["a b c", "d e f"]})
    sft = OGPSASFTTrainer(model=tiny_llama(tok, hidden=32, layers=1, seed=0), args=sargs, train_dataset=data,
                          processing_class=tok, refresh_every=7)
    assert sft.ogpsa.refresh_every == 7
