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
    assert summary["refresh_steps"] == [0]  # rebuilt at the DPO stage's own step 0; refresh default 5 > 2 steps
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

    # Or reuse the SFT basis: --subspace matches it to the continued adapter by parameter names.
    reuse_out = str(tmp_path / "dpo_reuse")
    assert main(["train", "--stage", "dpo", "--model", sft_out, "--data", files["prefs"], "--subspace", sft_out,
                 "--refresh-every", "0", "--output", reuse_out, "--max-steps", "1"] + common) == 0
    sft_sub = Subspace.load(sft_out)
    assert Subspace.load(reuse_out).equal(sft_sub) and set(sft_sub.ranks()) == names


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
        assert timing["refreshes"] == len(summary["refresh_steps"]) >= 1
        assert 0 < timing["refresh_share"] <= 1
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
