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
