"""Issue 16 (4, 5, 9), 17 (1), 13 (4) in the integrations: ogpsa/* metrics (projection statistics
and refresh timing) reach the Trainer's reporters; stage refresh defaults; the trainers' reference
collection follows the config's averaging and batch size, with a progress bar on by default.

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

pytestmark = pytest.mark.usefixtures("paper_preset")  # these tests mean the paper recipe (preset="paper")

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


def _check_timing(seen):
    """ogpsa/refresh_seconds is cumulative (never decreases, > 0 after the step-0 build) and
    ogpsa/refresh_share is refresh time / train time so far, in (0, 1]."""
    secs = [e["ogpsa/refresh_seconds"] for e in seen]
    assert secs[0] > 0 and secs == sorted(secs), secs
    assert all(0.0 < e["ogpsa/refresh_share"] <= 1.0 for e in seen), seen


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
    _check_timing(rep.seen)
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
    _check_timing(rep.seen)
    t = trainer.ogpsa.timing()
    assert t["refreshes"] == 1 and t["refresh_seconds"] == rep.seen[-1]["ogpsa/refresh_seconds"]
    assert 0 < t["refresh_seconds"] <= t["train_seconds"]
    assert t["refresh_share"] == pytest.approx(t["refresh_seconds"] / t["train_seconds"])


@pytest.mark.parametrize("config, refresh, expected", [
    (None, None, 5),
    (ogpsa.OGPSAConfig(preset="paper", mode="conflict"), None, 5),   # a config without refresh_every keeps the DPO default
    (ogpsa.OGPSAConfig(preset="paper", refresh_every=7), None, 7),   # set explicitly in the config
    (ogpsa.OGPSAConfig(preset="paper", refresh_every=7), 3, 3),      # the trainer argument wins
])
def test_dpo_refresh_default_is_not_overridden_by_a_config(tok, tmp_path, config, refresh, expected):
    model = tiny_llama(tok, hidden=32, layers=1, seed=0)
    dpo = OGPSADPOTrainer(model=model, ref_model=copy.deepcopy(model).eval(), args=_args(tmp_path, trl.DPOConfig),
                          train_dataset=_dpo_data(), processing_class=tok, reference_datasets=REFERENCE,
                          ogpsa_config=config, refresh_every=refresh)
    assert dpo.ogpsa.refresh_every == expected
    assert dpo.ogpsa.config.refresh_every == expected


@pytest.mark.parametrize("config, expected", [(ogpsa.OGPSAConfig(preset="paper", mode="conflict"), 30),
                                              (ogpsa.OGPSAConfig(preset="paper", refresh_every=4), 4)])
def test_sft_and_callback_refresh_defaults(tok, tmp_path, config, expected):
    data = datasets.Dataset.from_dict({"text": ["a b c", "d e f"]})
    sft = OGPSASFTTrainer(model=tiny_llama(tok, hidden=32, layers=1, seed=0), args=_args(tmp_path, trl.SFTConfig),
                          train_dataset=data, processing_class=tok, reference_datasets=REFERENCE, ogpsa_config=config)
    assert sft.ogpsa.refresh_every == expected
    assert OGPSACallback(config, REFERENCE).ogpsa.refresh_every == expected


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


VARIED = [["a", "the cat sat on the mat.", "2+3=5 and 4+4=8, so", "hello world"]]  # unequal lengths


def _direct_subspace(model, tok, config, **kw):
    """The subspace collect_reference_gradients + Subspace.from_gradients give outside a trainer."""
    from ogpsa.collect import collect_reference_gradients

    grads, _ = collect_reference_gradients(model, VARIED, tokenizer=tok, progress=False, **kw)
    return ogpsa.Subspace.from_gradients(grads, config)


def _max_rel_diff(a, b):
    return max(float((x - y).norm() / y.norm().clamp_min(1e-30)) for x, y in zip(a.bases, b.bases) if y.numel())


@pytest.mark.parametrize("where", ["config", "trainer_argument"])
def test_trainer_collects_with_the_configs_averaging_and_batch_size(tok, tmp_path, where):
    """reference_averaging="batch", batch size 4 (train batch size 2): the trainer's step-0 subspace is
    the one collect_reference_gradients gives with those settings, not the example-averaged one, nor
    the one batched by the train batch size."""
    model = tiny_llama(tok, hidden=32, layers=1, seed=3)
    initial = copy.deepcopy(model)
    if where == "config":
        config, kw = ogpsa.OGPSAConfig(reference_averaging="batch", reference_batch_size=4), {}
    else:
        config, kw = ogpsa.OGPSAConfig(reference_averaging="batch"), {"reference_batch_size": 4}
    data = datasets.Dataset.from_dict({"text": [f"sorry, i cannot help {i}." for i in range(4)]})
    sft = OGPSASFTTrainer(model=model, args=_args(tmp_path, trl.SFTConfig, max_steps=1), train_dataset=data,
                          processing_class=tok, reference_datasets=VARIED, ogpsa_config=config, refresh_every=0, **kw)
    sft.train()
    got = sft.ogpsa.subspace
    want = _direct_subspace(initial, tok, config, averaging="batch", batch_size=4)
    assert got.names == want.names and _max_rel_diff(got, want) <= 1e-6
    for other in (dict(averaging="example", batch_size=4), dict(averaging="batch", batch_size=2)):
        assert _max_rel_diff(got, _direct_subspace(initial, tok, config, **other)) > 1e-3, other


def test_trainer_collection_progress_bar_on_by_default(tok, tmp_path, capfd):
    data = datasets.Dataset.from_dict({"text": [f"sorry, i cannot help {i}." for i in range(4)]})
    bar = "ogpsa reference gradients"
    for disable, shown in ((None, True), (True, False)):
        args = _args(tmp_path / str(disable), trl.SFTConfig, max_steps=1, disable_tqdm=disable)
        assert args.disable_tqdm is bool(disable)
        capfd.readouterr()
        OGPSASFTTrainer(model=tiny_llama(tok, hidden=32, layers=1, seed=0), args=args, train_dataset=data,
                        processing_class=tok, reference_datasets=REFERENCE).train()
        assert (bar in capfd.readouterr().err) is shown, disable
    # the callback follows the same switch
    ids = [tok(f"general text {i:02d}.").input_ids for i in range(4)]
    capfd.readouterr()
    Trainer(model=tiny_llama(tok, hidden=32, layers=1, seed=0),
            args=_args(tmp_path / "cb", max_steps=1, disable_tqdm=None),
            train_dataset=datasets.Dataset.from_dict({"input_ids": ids, "labels": ids}), processing_class=tok,
            callbacks=[OGPSACallback(reference_datasets=REFERENCE)]).train()
    assert bar in capfd.readouterr().err
