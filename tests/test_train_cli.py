"""``ogpsa train``: user errors give usage + one line (exit 2); new flags; SFT -> DPO with LoRA on a
saved local checkpoint continues training the SFT adapter, projected, with the DPO refresh default."""

import json
import os

import pytest

pytest.importorskip("trl")
peft = pytest.importorskip("peft")
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from ogpsa.cli import main  # noqa: E402
from ogpsa.tiny import char_tokenizer, tiny_llama  # noqa: E402

pytestmark = pytest.mark.usefixtures("paper_preset")  # these tests mean the paper recipe (preset="paper")


def _write(tmp_path, name, rows):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture()
def files(tmp_path):
    return dict(
        safety=_write(tmp_path, "safety.jsonl", [{"prompt": f"how to make weapon {i}?", "completion": "sorry."}
                                                  for i in range(4)]),
        prefs=_write(tmp_path, "prefs.jsonl", [{"prompt": f"weapon {i}?", "chosen": "sorry.", "rejected": "sure."}
                                                for i in range(4)]),
        general=_write(tmp_path, "general.jsonl", [{"text": t} for t in ("the cat sat.", "2+3=5", "hello world")]),
    )


@pytest.mark.parametrize("extra, needle", [
    (["--data", "MISSING.jsonl"], "does not exist"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--ref-model", "x"], "--ref-model is for --stage dpo"),
    (["--subspace", "nowhere"], "--subspace 'nowhere' does not exist"),
])
def test_user_errors_print_usage_and_one_line(files, tmp_path, capsys, extra, needle):
    argv = ["train", "--stage", "sft", "--model", "tiny", "--data", files["safety"], "--reference", files["general"],
            "--output", str(tmp_path / "o")]
    rc = main(argv + extra)
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("usage: ogpsa train") and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("ogpsa train: error:") and needle in last, err


def test_new_flags_are_parsed():
    import argparse

    import ogpsa
    from ogpsa.train_cli import _config_kwargs, add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    for mode in ogpsa.config.MODES:
        args = parser.parse_args(["--stage", "sft", "--model", "tiny", "--data", "d", "--output", "o",
                                  "--mode", mode, "--reference-averaging", "batch", "--reference-batch-size", "3"])
        kw = _config_kwargs(args)
        assert kw["mode"] == mode
        ogpsa.OGPSAConfig(**kw)  # accepted by the config of this checkout


def test_sft_then_dpo_with_lora_continues_the_sft_adapter(files, tmp_path):
    base_dir = str(tmp_path / "base")
    tok = char_tokenizer()
    tiny_llama(tok, hidden=32, layers=1, seed=0).save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    common = ["--batch-size", "2", "--optim", "sgd", "--cpu", "--num-reference-samples", "3", "--lr", "0.05",
              "--max-grad-norm", "0", "--logging-steps", "1"]
    sft_out = str(tmp_path / "sft")
    assert main(["train", "--stage", "sft", "--model", base_dir, "--data", files["safety"], "--reference",
                 files["general"], "--output", sft_out, "--max-steps", "2", "--lora-r", "4",
                 "--lora-targets", "q_proj,v_proj"] + common) == 0
    sft_adapter = load_file(os.path.join(sft_out, "adapter_model.safetensors"))
    dpo_out = str(tmp_path / "dpo")
    assert main(["train", "--stage", "dpo", "--model", sft_out, "--data", files["prefs"], "--reference",
                 files["general"], "--output", dpo_out, "--max-steps", "2"] + common) == 0
    summary = json.loads((tmp_path / "dpo" / "ogpsa_train_summary.json").read_text())
    assert summary["refresh_steps"] == []  # starts from the SFT output's basis; refresh default 5 > 2 steps
    dpo_adapter = load_file(os.path.join(dpo_out, "adapter_model.safetensors"))
    assert set(dpo_adapter) == set(sft_adapter)  # the same adapter, no second one stacked
    changed = [k for k in sft_adapter if not torch.equal(sft_adapter[k], dpo_adapter[k])]
    assert changed, "DPO did not train the SFT adapter"
    # The subspace the DPO stage projected with has bases for exactly the adapter's tensors.
    from ogpsa import Subspace

    sub = Subspace.load(os.path.join(dpo_out, "ogpsa_subspace.safetensors"))
    names = set(sub.ranks())
    assert names and all("lora_" in n for n in names)
    short = {n.split("lora_")[0].rsplit(".", 1)[0].split("layers.")[-1] for n in names}
    assert short == {k.split("lora_")[0].rsplit(".", 1)[0].split("layers.")[-1] for k in sft_adapter}

    # The SFT basis, matched to the continued adapter by parameter names, is the DPO stage's starting basis.
    sft_sub = Subspace.load(sft_out)
    reuse_out = str(tmp_path / "dpo_reuse")
    assert main(["train", "--stage", "dpo", "--model", sft_out, "--data", files["prefs"], "--subspace", sft_out,
                 "--refresh-every", "0", "--output", reuse_out, "--max-steps", "1"] + common) == 0
    assert Subspace.load(reuse_out).equal(sft_sub) and set(sft_sub.ranks()) == names
    # --fresh-subspace builds it from --reference at the DPO stage's step 0 instead.
    fresh_out = str(tmp_path / "dpo_fresh")
    assert main(["train", "--stage", "dpo", "--model", sft_out, "--data", files["prefs"], "--reference",
                 files["general"], "--fresh-subspace", "--output", fresh_out, "--max-steps", "1"] + common) == 0
    assert json.loads((tmp_path / "dpo_fresh" / "ogpsa_train_summary.json").read_text())["refresh_steps"] == [0]


def _readme_train_commands():
    """The `ogpsa train` commands of the README's "Train with TRL" bash block, as argv lists."""
    import re
    import shlex

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "README.md")) as f:
        text = f.read()
    section = re.search(r"^## Train with TRL\s*$(.*?)(?=^## )", text, re.S | re.M).group(1)
    block = next(b for b in re.findall(r"```bash\n(.*?)```", section, re.S) if "ogpsa train" in b)
    commands = [shlex.split(c) for c in block.replace("\\\n", " ").splitlines() if c.strip()]
    assert commands and all(c[:2] == ["ogpsa", "train"] for c in commands), commands
    return root, [c[1:] for c in commands]


def test_readme_command_line_runs_on_the_example_files(tmp_path, monkeypatch, capsys):
    """The README's SFT -> DPO commands on examples/data/*.jsonl (out/ redirected to tmp_path)."""
    root, commands = _readme_train_commands()
    monkeypatch.chdir(root)
    for argv in commands:
        for path in [a for a in argv if a.endswith(".jsonl")]:
            assert os.path.isfile(path), path  # the example files the README names exist
        argv = [str(tmp_path / a) if a.startswith("out/") else a for a in argv]
        assert main(argv) == 0, argv
        out = argv[argv.index("--output") + 1]
        summary = json.load(open(os.path.join(out, "ogpsa_train_summary.json")))
        timing = summary["refresh"]
        # DPO starts from the SFT output's basis (no build at its step 0; refresh every 5 > its steps)
        assert timing["refreshes"] == len(summary["refresh_steps"]) >= (1 if summary["stage"] == "sft" else 0)
        assert 0 <= timing["refresh_share"] <= 1
        assert capsys.readouterr().out.strip().splitlines()[-1].startswith(
            f"ogpsa: {timing['refreshes']} subspace refresh(es) took ")
    assert summary["stage"] == "dpo" and summary["space"] == "update"


@pytest.mark.parametrize("space", ["gradient", "update"])
def test_resume_from_checkpoint_of_another_output_is_bit_identical(files, tmp_path, space):
    common = ["train", "--stage", "sft", "--model", "tiny", "--data", files["safety"], "--reference", files["general"],
              "--max-steps", "4", "--batch-size", "2", "--cpu", "--save-steps", "2", "--refresh-every", "3",
              "--num-reference-samples", "3", "--lr", "0.01", "--space", space, "--logging-steps", "1"]
    run1, run2 = str(tmp_path / "run1"), str(tmp_path / "run2")
    assert main(common + ["--output", run1]) == 0
    assert main(common + ["--output", run2, "--resume-from-checkpoint", os.path.join(run1, "checkpoint-2")]) == 0
    full, resumed = (load_file(os.path.join(d, "model.safetensors")) for d in (run1, run2))
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)
    summary = json.loads((tmp_path / "run2" / "ogpsa_train_summary.json").read_text())
    assert summary["steps"] == 4 and summary["refresh_steps"] == [0, 3]  # history restored, refresh at 3
    assert summary["refresh"]["refreshes"] == 1


def test_resume_flag_errors(files, tmp_path, capsys):
    argv = ["train", "--stage", "sft", "--model", "tiny", "--data", files["safety"], "--reference", files["general"],
            "--output", str(tmp_path / "o")]
    assert main(argv + ["--resume-from-checkpoint", "last"]) == 2
    assert "no checkpoint-N directory in --output" in capsys.readouterr().err
    assert main(argv + ["--resume-from-checkpoint", str(tmp_path)]) == 2
    assert "holds no trainer_state.json" in capsys.readouterr().err


def _no_model_load(monkeypatch):
    import ogpsa.train_cli as train_cli

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the mistake was reported")

    monkeypatch.setattr(train_cli, "load_model_and_tokenizer", refuse)


def _assert_usage_error(rc, err, needle):
    assert rc == 2, err
    assert err.startswith("usage: ogpsa train") and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("ogpsa train: error:") and needle in last, err


@pytest.mark.parametrize("stage, name, rows, needle", [
    ("sft", "safety.jsonl", [{"prompt": "a?", "completion": "no."}, {"prompt": "b?"}],
     "safety.jsonl:2: missing field 'completion'"),
    ("sft", "safety.jsonl", [{"question": "a?", "answer": "no."}], "safety.jsonl:1: missing field"),
    ("dpo", "prefs.jsonl", [{"prompt": "a?", "chosen": "no."}], "prefs.jsonl:1: missing field 'rejected'"),
    ("dpo", "prefs.jsonl", [{"prompt": "a?", "chosen": "no.", "rejected": "ok", "score": 1}],
     "prefs.jsonl:1: unknown field 'score'"),
    ("sft", "general.jsonl", [{"text": "ok"}, {"body": "x"}], "general.jsonl:2: missing field"),
])
def test_data_errors_name_file_line_and_field_before_the_model_loads(files, tmp_path, capsys, monkeypatch, stage,
                                                                     name, rows, needle):
    _no_model_load(monkeypatch)
    (tmp_path / "bad").mkdir()
    bad = _write(tmp_path / "bad", name, rows)
    data = bad if name != "general.jsonl" else (files["safety"] if stage == "sft" else files["prefs"])
    reference = bad if name == "general.jsonl" else files["general"]
    rc = main(["train", "--stage", stage, "--model", "tiny", "--data", data, "--reference", reference,
               "--output", str(tmp_path / "o")])
    _assert_usage_error(rc, capsys.readouterr().err, needle)


@pytest.mark.parametrize("extra, needle", [
    (["--lr=-1e-4"], "--lr must be a positive number, got -0.0001"),
    (["--lr", "nan"], "--lr must be a positive number"),
    (["--epochs", "0"], "--epochs must be a positive number"),
    (["--max-steps", "0"], "--max-steps must be >= 1 (or -1"),
    (["--optim", "adamw_troch"], "did you mean 'adamw_torch'?"),
    (["--stage", "sfft"], "invalid choice: 'sfft'"),
    (["--mode", "orthogonl"], "did you mean 'orthogonal'?"),
    (["--learning_rate", "1e-4"], "unrecognized arguments: --learning_rate 1e-4; did you mean --learning-rate?"),
    (["--reference", "MISSING.jsonl"], "--reference 'MISSING.jsonl' does not exist"),
    (["--subspace", "x", "--fresh-subspace"], "exclude each other"),
])
def test_cli_mistakes_print_usage_and_one_line(files, tmp_path, capsys, monkeypatch, extra, needle):
    _no_model_load(monkeypatch)
    argv = ["train", "--stage", "sft", "--model", "tiny", "--data", files["safety"], "--reference", files["general"],
            "--output", str(tmp_path / "o")]
    try:
        rc = main(argv + extra)
    except SystemExit as exc:  # argparse's own errors (choices, unknown options) exit with code 2
        rc = exc.code
    _assert_usage_error(rc, capsys.readouterr().err, needle)


def test_output_and_model_directory_mistakes(files, tmp_path, capsys, monkeypatch):
    _no_model_load(monkeypatch)
    argv = ["train", "--stage", "sft", "--data", files["safety"], "--reference", files["general"]]
    existing_file = tmp_path / "taken"
    existing_file.write_text("x")
    _assert_usage_error(main(argv + ["--model", "tiny", "--output", str(existing_file)]), capsys.readouterr().err,
                        "is an existing file")
    used = tmp_path / "used"
    used.mkdir()
    (used / "model.safetensors").write_text("x")
    _assert_usage_error(main(argv + ["--model", "tiny", "--output", str(used)]), capsys.readouterr().err,
                        "is not empty")
    empty = tmp_path / "empty_model"
    empty.mkdir()
    _assert_usage_error(main(argv + ["--model", str(empty), "--output", str(tmp_path / "o")]),
                        capsys.readouterr().err, "holds no tokenizer files")
    (empty / "tokenizer.json").write_text("{}")
    _assert_usage_error(main(argv + ["--model", str(empty), "--output", str(tmp_path / "o")]),
                        capsys.readouterr().err, "holds no config.json")


def test_sft_output_records_absolute_paths_basis_mode_and_space_for_dpo(files, tmp_path, monkeypatch, capsys):
    tok = char_tokenizer()
    monkeypatch.chdir(tmp_path)
    tiny_llama(tok, hidden=32, layers=1, seed=0).save_pretrained("ckpt")
    tok.save_pretrained("ckpt")
    common = ["--batch-size", "2", "--cpu", "--num-reference-samples", "3", "--logging-steps", "1"]
    assert main(["train", "--stage", "sft", "--model", "ckpt", "--data", files["safety"], "--reference",
                 files["general"], "--output", "sft", "--max-steps", "2", "--lora-r", "4", "--lora-targets",
                 "q_proj,v_proj", "--mode", "conflict", "--space", "update"] + common) == 0
    summary = json.loads((tmp_path / "sft" / "ogpsa_train_summary.json").read_text())
    assert summary["model"] == str(tmp_path / "ckpt") and summary["output"] == str(tmp_path / "sft")
    assert summary["ogpsa"] == {"mode": "conflict", "space": "update", "scope": "tensor",
                                "subspace": str(tmp_path / "sft" / "ogpsa_subspace.safetensors")}
    adapter = json.loads((tmp_path / "sft" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(tmp_path / "ckpt")  # absolute: works from anywhere
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main(["train", "--stage", "dpo", "--model", str(tmp_path / "sft"), "--data", files["prefs"],
                 "--reference", files["general"], "--output", "dpo", "--max-steps", "1"] + common) == 0
    err = capsys.readouterr().err
    assert "--mode conflict --space update --subspace" in err
    dpo = json.loads((elsewhere / "dpo" / "ogpsa_train_summary.json").read_text())
    assert dpo["ogpsa"]["mode"] == "conflict" and dpo["space"] == "update" and dpo["refresh_steps"] == []
    from ogpsa import Subspace

    assert Subspace.load(str(elsewhere / "dpo")).equal(Subspace.load(str(tmp_path / "sft")))
    # explicit flags win
    assert main(["train", "--stage", "dpo", "--model", str(tmp_path / "sft"), "--data", files["prefs"],
                 "--reference", files["general"], "--output", "dpo2", "--max-steps", "1", "--mode", "orthogonal",
                 "--space", "gradient", "--optim", "sgd"] + common) == 0
    assert json.loads((elsewhere / "dpo2" / "ogpsa_train_summary.json").read_text())["ogpsa"]["mode"] == "orthogonal"


def test_a_basis_of_another_model_is_a_usage_error_before_training(files, tmp_path, capsys):
    import ogpsa

    other = tiny_llama(char_tokenizer(), hidden=32, layers=1, seed=0)
    g = torch.Generator().manual_seed(0)
    grads = [{n: torch.randn(p.shape, generator=g) for n, p in other.named_parameters()}]
    ogpsa.Subspace.from_gradients(grads, ogpsa.OGPSAConfig()).save(str(tmp_path / "other.safetensors"))
    rc = main(["train", "--stage", "sft", "--model", "tiny", "--data", files["safety"], "--subspace",
               str(tmp_path / "other.safetensors"), "--refresh-every", "0", "--output", str(tmp_path / "o"), "--cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "usage: ogpsa train" in err and "Traceback" not in err  # after TRL's dataset progress bars
    assert "ogpsa train: error: --subspace" in err and "does not fit --model 'tiny'" in err and not (tmp_path / "o" / "model.safetensors").exists()


def test_tiny_lora_sft_output_is_a_loadable_dpo_model(files, tmp_path):
    common = ["--batch-size", "2", "--cpu", "--num-reference-samples", "3", "--max-steps", "1", "--lora-r", "4"]
    sft = tmp_path / "sft"
    assert main(["train", "--stage", "sft", "--model", "tiny", "--data", files["safety"], "--reference",
                 files["general"], "--output", str(sft)] + common) == 0
    adapter = json.loads((sft / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(sft / "tiny_base")
    from ogpsa.train_cli import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(str(sft))  # base + adapter
    fresh, _ = load_model_and_tokenizer("tiny", seed=42)  # the seeded base the SFT run started from
    base = dict(model.get_base_model().named_parameters())
    for name, p in fresh.named_parameters():  # LoRA left the base untouched: the saved base is the trained one's
        key = name if name in base else name.replace(".weight", ".base_layer.weight")
        assert torch.equal(base[key], p), name
    assert main(["train", "--stage", "dpo", "--model", str(sft), "--data", files["prefs"], "--reference",
                 files["general"], "--output", str(tmp_path / "dpo"), "--batch-size", "2", "--cpu",
                 "--num-reference-samples", "3", "--max-steps", "1"]) == 0
