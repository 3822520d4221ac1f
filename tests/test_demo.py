"""`ogpsa demo`: task data, matched-safety interpolation, output structure, every arm active."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch

from ogpsa.demo import DemoConfig, report, tasks
from ogpsa.demo.arms import ALL_ARMS, available_arms, update_space_available
from ogpsa.demo.base import COMMITTED, RECIPE, sha256
from ogpsa.demo.evaluate import greedy_decode
from ogpsa.demo.model import build_tiny, make_batch


def test_tasks_answers_formats_and_splits():
    data = tasks.make_data(3, eval_per_task=40, reference_size=50)
    for ex in data.eval_general["add"]:
        a, b = ex.prompt[2:-1].split("+")
        assert ex.answer == str(int(a) + int(b))
    for ex in data.eval_general["reverse"]:
        assert ex.answer == ex.prompt[2:-1][::-1]
    for ex in tasks.distinct(tasks.GENERATORS["recall"], random.Random(5), 40):
        kv, key = ex.prompt[2:-1].split("|")
        assert dict(zip(kv[::2], kv[1::2]))[key] == ex.answer
    for ex in data.eval_general["format"]:
        assert ex.answer == "-".join(ex.prompt[2:-1])
    # General tasks never use the request format of the safety data.
    assert all(not e.prompt.startswith("q:") for exs in data.eval_general.values() for e in exs)
    assert all(e.prompt.startswith("q:") for e in data.eval_harmful + data.eval_benign)
    held = {e.prompt for exs in data.eval_general.values() for e in exs} | {e.prompt for e in data.eval_benign}
    rng = random.Random(0)
    assert not held & {e.prompt for e in data.general_batch(rng, 3000)}
    assert not held & {e.prompt for e in data.pretrain_batch(rng, 3000, 0.5) if e.task != "harmful"}
    assert not held & {e.prompt for s in data.reference_sets for e in s}
    assert not {e.prompt for e in data.refusal_batch(rng, 500)} & {e.prompt for e in data.eval_harmful}
    assert all(e.answer == tasks.REFUSAL for e in data.eval_harmful)
    assert all(e.answer.startswith("ok: ") for e in data.eval_benign)
    # Evaluation prompts are the same for every seed; reference sets differ.
    other = tasks.make_data(4, eval_per_task=40, reference_size=50)
    assert other.eval_general == data.eval_general and other.reference_sets != data.reference_sets
    assert len(tasks.make_data(0, reference_size=7, reference_split="task").reference_sets) == len(tasks.GENERAL_TASKS)


def test_matched_refusal_interpolation():
    start = {"refusal_rate": 0.0, "general_score": 0.9, "over_refusal_rate": 0.0}
    traj = [{"refusal_rate": 0.5, "general_score": 0.8, "over_refusal_rate": 0.1},
            {"refusal_rate": 1.0, "general_score": 0.4, "over_refusal_rate": 0.5}]
    assert report.at_refusal(traj, 0.75, "general_score", start) == pytest.approx(0.6)
    assert report.at_refusal(traj, 0.25, "over_refusal_rate", start) == pytest.approx(0.05)
    assert report.at_refusal(traj[:1], 0.9, "general_score", start) is None
    assert report.mean_std([None, 1.0, 3.0]) == {"mean": 2.0, "std": pytest.approx(2 ** 0.5), "n": 2, "of": 3}


def test_decoding_is_greedy():
    model, codec = build_tiny(32, 1, 2, 64, 0)
    batch = make_batch(codec, [("c:ab=", "ab")], torch.device("cpu"))
    assert batch.labels[0].tolist()[:4] == [-100] * 4
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


@pytest.mark.skipif(not os.path.isfile(os.path.join(COMMITTED, "recipe.json")), reason="no committed base model")
def test_committed_base_model_is_competent_and_verified():
    info = json.load(open(os.path.join(COMMITTED, "recipe.json")))
    assert info["recipe"] == RECIPE
    assert sha256(os.path.join(COMMITTED, "model.safetensors")) == info["sha256"]
    assert min(info["scores"]["exact_match"].values()) >= 0.8
    assert info["scores"]["refusal_rate"] == 0.0  # unaligned: it complies with harmful requests


def test_demo_outputs_and_every_arm_active(tmp_path):
    from ogpsa import cli

    tok_model, codec = build_tiny(32, 1, 2, 64, 1)
    tok_model.save_pretrained(tmp_path / "ckpt")
    codec.tokenizer.save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "out"
    rc = cli.main(["demo", "--model", str(tmp_path / "ckpt"), "--model-steps", "3", "--seeds", "1",
                   "--sft-steps", "4", "--dpo-steps", "2", "--eval-every", "2", "--refresh-every", "2",
                   "--reference-size", "8", "--eval-size", "4", "--stages", "sft,sft+dpo", "--arms", ",".join(ALL_ARMS),
                   "--output", str(out), "--publish", str(tmp_path / "pub"), "--quiet"])
    assert rc == 0
    data = json.loads((out / "results.json").read_text())
    assert data["command"].startswith("ogpsa demo --model")
    assert set(data) >= {"config", "base", "before", "runs", "summary", "arms_missing", "seconds"}
    assert ("update" in data["arms_missing"]) != update_space_available()
    assert [(r["stage"], r["seed"]) for r in data["runs"]] == [("sft", 0), ("sft+dpo", 0)]
    for run in data["runs"]:
        arms = run["arms"]
        assert set(arms) == set(available_arms())
        steps = 4 if run["stage"] == "sft" else 6
        for name, a in arms.items():
            traj = a["trajectory"]
            if name == "merge":  # interpolates: moved distance equals the mixing weight
                assert [p["merge_weight"] for p in traj] == list(DemoConfig().merge_weights)
                assert [p["moved"] for p in traj] == pytest.approx([p["merge_weight"] for p in traj], abs=1e-6)
                continue
            assert [p["step"] for p in traj][-1] == steps and len(traj) == steps // 2
            for key in ("general_score", "refusal_rate", "over_refusal_rate", "exact_match"):
                assert key in traj[-1]
            for stage, st in a["projection"].items():
                removes = name in ("orthogonal", "conflict", "update", "orthogonal+replay", "orthogonal-r5", "orthogonal-k16",
                                   "orthogonal-task")
                assert (st["removed_fraction"] > 0) == removes, (name, stage)
                assert (st["replay_examples"] > 0) == name.endswith("replay"), (name, stage)
                every = 5 if name == "orthogonal-r5" or stage == "dpo" else 2  # --refresh-every 2; DPO: 5
                assert st["refreshes"] == (-(-st["steps"] // every) if removes else 0), (name, stage)
    summ = data["summary"]["stages"]["sft"]["plain"]["forgetting_end"]
    assert set(summ) == {"mean", "std", "n", "of"} and summ["n"] == 1
    png = (out / "pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    table = (out / "table.md").read_text()
    assert table.startswith("Command: `ogpsa demo --model") and "**Stage sft+dpo**" in table
    assert (tmp_path / "pub" / "pareto.png").exists() and (tmp_path / "pub" / "table.md").exists()


def test_bad_arguments_are_rejected_clearly():
    with pytest.raises(ValueError, match="arms"):
        DemoConfig(arms=("plain", "sideways"))
    with pytest.raises(ValueError, match="plain"):
        DemoConfig(arms=("merge",))
    with pytest.raises(ValueError, match="stages"):
        DemoConfig(stages=("rlhf",))
    with pytest.raises(ValueError, match="seeds"):
        DemoConfig(seeds=0)
    with pytest.raises(FileNotFoundError, match="--model"):
        from ogpsa.demo.model import load_checkpoint
        load_checkpoint("/nonexistent/checkpoint")
