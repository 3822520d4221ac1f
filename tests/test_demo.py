"""`ogpsa demo`: task generators, output structure, and that the projection really ran."""

from __future__ import annotations

import json
import random

import pytest
import torch

from ogpsa.demo import DemoConfig, report, run_experiment, tasks
from ogpsa.demo.experiment import build_tiny, greedy_decode, make_batch

SMALL = dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, pretrain_steps=12, pretrain_batch=16,
             sft_steps=4, sft_batch=8, sft_refresh_every=2, dpo_steps=2, dpo_batch=4, dpo_refresh_every=1,
             reference_size=12, eval_per_task=6, eval_harmful=6, eval_batch=64)


def test_task_answers_are_correct_and_eval_prompts_never_trained():
    data = tasks.make_data(3, eval_per_task=40, reference_size=50)
    for ex in data.eval_general["add"]:
        a, b = ex.prompt[2:-1].split("+")
        assert ex.answer == str(int(a) + int(b))
    for ex in data.eval_general["reverse"]:
        assert ex.answer == ex.prompt[2:-1][::-1]
    for ex in data.eval_general["recall"]:
        pairs, key = ex.prompt[2:-1].split("|")
        assert dict(zip(pairs[::2], pairs[1::2]))[key] == ex.answer
    held = {e.prompt for exs in data.eval_general.values() for e in exs}
    train = data.general_batch(random.Random(0), 3000)
    assert not held & {e.prompt for e in train}
    assert not held & {e.prompt for s in data.reference_sets for e in s}
    # Held-out harmful objects never appear in safety training batches.
    seen = {e.prompt for e in data.refusal_batch(random.Random(1), 500)}
    assert not seen & {e.prompt for e in data.eval_harmful}
    assert all(e.answer == tasks.REFUSAL for e in data.eval_harmful)
    assert tasks.is_refusal(tasks.REFUSAL) and not tasks.is_refusal("ok: bomb")
    assert set("".join(e.prompt + e.answer for e in train)) <= set(tasks.CHARSET)


def test_batches_mask_prompts_and_decoding_is_greedy():
    cfg = DemoConfig(**SMALL)
    model, codec = build_tiny(cfg, 0)
    batch = make_batch(codec, [("c:ab=", "ab"), ("a:10+10=", "20")], torch.device("cpu"))
    row = batch.labels[0].tolist()
    assert row[:5] == [-100] * 5 and row[5:8] == codec.encode("ab") + [codec.eos_id]
    assert batch.attention_mask[0].sum() == 8 and batch.labels[1, 8:11].tolist() == codec.encode("20") + [codec.eos_id]
    # Left-padded, cached decoding equals step-by-step argmax on each unpadded prompt.
    prompts = ["c:abcde=", "q:bake a cake?"]
    got = greedy_decode(model.eval(), codec, prompts, 4, torch.device("cpu"))
    for p, g in zip(prompts, got):
        ids = codec.encode(p)
        out = []
        for _ in range(4):
            nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            if nxt == codec.eos_id:
                break
            ids.append(nxt)
            out.append(nxt)
        assert g == codec.decode(out)


def test_demo_outputs_and_projection_active(tmp_path):
    cfg = DemoConfig(seeds=1, **SMALL)
    results = run_experiment(cfg, log=lambda _m: None)
    paths = report.write(results, str(tmp_path / "out"), command="ogpsa demo --test")
    data = json.loads(open(paths["json"]).read())
    assert set(data) >= {"config", "runs", "summary", "seconds", "command"}
    run = data["runs"][0]
    assert set(run["arms"]) == {"plain", "orthogonal", "conflict"}
    for key in ("exact_match", "exact_match_mean", "general_loss", "refusal_rate", "safety_loss"):
        assert key in run["before"]
    assert set(run["before"]["exact_match"]) == set(tasks.GENERAL_TASKS)
    for arm, a in run["arms"].items():
        assert set(a) == {"after", "forgetting", "projection"}
        assert set(a["projection"]) == {"sft", "dpo"}
        for stage, st in a["projection"].items():
            assert st["steps"] == (4 if stage == "sft" else 2)
            assert st["refreshes"] == (2 if stage == "sft" else 2)
            if arm == "plain":
                assert st["removed_fraction"] == 0.0  # measured from the gradients, not assumed
                assert st["subspace_fraction"] > 0.0  # the subspace existed; it was not applied
            else:
                assert st["removed_fraction"] > 0.0
        f = a["forgetting"]
        assert f["exact_match_mean"] == pytest.approx(run["before"]["exact_match_mean"]
                                                      - a["after"]["exact_match_mean"])
    summ = data["summary"]["arms"]["orthogonal"]["forgetting/exact_match_mean"]
    assert set(summ) == {"mean", "std", "n"} and summ["n"] == 1
    png = open(paths["png"], "rb").read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    lines = open(paths["table"]).read().strip().splitlines()
    assert lines[0].startswith("Command: `ogpsa demo --test`")
    assert sum(line.startswith("|") for line in lines) == 2 + 1 + 3  # header + rule, before, three arms


def test_cli_runs_on_a_local_checkpoint(tmp_path):
    from ogpsa import cli
    from ogpsa.tiny import char_tokenizer, tiny_llama

    tok = char_tokenizer(tasks.CHARSET, chat_template=None)
    tiny_llama(tok, 32, 1, heads=2, intermediate=64, seed=1).save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "out"
    rc = cli.main(["demo", "--model", str(tmp_path / "ckpt"), "--seeds", "1", "--pretrain-steps", "2", "--steps", "2",
                   "--refresh-every", "1", "--reference-size", "8", "--eval-size", "4", "--arms", "plain,orthogonal",
                   "--output", str(out), "--publish", str(tmp_path / "pub"), "--quiet"])
    assert rc == 0
    data = json.loads((out / "results.json").read_text())
    assert data["config"]["model"] == str(tmp_path / "ckpt")
    assert data["command"].startswith("ogpsa demo --model")
    assert set(data["runs"][0]["arms"]) == {"plain", "orthogonal"}
    assert (tmp_path / "pub" / "forgetting.png").exists() and (tmp_path / "pub" / "table.md").exists()


def test_bad_arguments_are_rejected_clearly():
    with pytest.raises(ValueError, match="arms"):
        DemoConfig(arms=("plain", "sideways"))
    with pytest.raises(ValueError, match="seeds"):
        DemoConfig(seeds=0)
    with pytest.raises(ValueError, match="nothing to safety-tune"):
        DemoConfig(sft_steps=0, dpo_steps=0)
    with pytest.raises(FileNotFoundError, match="--model"):
        from ogpsa.demo.experiment import load_checkpoint
        load_checkpoint("/nonexistent/checkpoint")
