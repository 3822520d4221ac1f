"""`ogpsa demo`: task data, matched-safety interpolation, output structure, every arm active."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch

from ogpsa.demo import DemoConfig, report, tasks
from ogpsa.demo.arms import ALL_ARMS, PROJECTION_ARMS, UPDATE_ARMS, available_arms, update_space_available
from ogpsa.demo.base import COMMITTED, RECIPE, sha256
from ogpsa.demo.evaluate import greedy_decode
from ogpsa.demo.model import build_tiny, make_batch

try:
    from ogpsa.optim import ProjectedAdamW
except ImportError:  # the update arms are skipped, not faked
    ProjectedAdamW = None


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
                   "--reference-size", "8", "--eval-size", "4", "--stages", "sft+dpo", "--arms", ",".join(ALL_ARMS),
                   "--output", str(out), "--publish", str(tmp_path / "pub"), "--quiet"])
    assert rc == 0
    data = json.loads((out / "results.json").read_text())
    assert data["command"].startswith("ogpsa demo --model")
    assert set(data) >= {"config", "base", "before", "runs", "summary", "arms_missing", "seconds", "load_average"}
    assert ("update" in data["arms_missing"]) != update_space_available()
    assert [(r["stage"], r["seed"]) for r in data["runs"]] == [("sft+dpo", 0)]  # covers both SFT and DPO
    for run in data["runs"]:
        arms = run["arms"]
        assert set(arms) == set(available_arms())
        steps = 6
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
                removes = name in PROJECTION_ARMS + UPDATE_ARMS
                # conflict removes only directions whose descent would raise the reference loss: after SFT,
                # a DPO step may have none (measured: exactly 0 here), so its DPO part is not required to remove
                if not (name == "conflict" and stage == "dpo"):
                    assert (st["removed_fraction"] > 0) == removes, (name, stage)
                assert (st["replay_examples"] > 0) == name.endswith("replay"), (name, stage)
                every = 5 if "-r5" in name or stage == "dpo" else 2  # --refresh-every 2; DPO and -r5 arms: 5
                every = {"rich": 10, "rich-stream": 4, "rich-gradient": 10}.get(name, every)  # the presets' own
                assert st["refreshes"] == (-(-st["steps"] // every) if removes else 0), (name, stage)
                assert st["refresh_every"] == (every if removes else 0)
                full = 16 if stage == "sft" else 8  # --reference-size 8: 2 sets (SFT) or 1 set (DPO)
                full = {"rich": 16, "rich-stream": 2, "rich-gradient": 16}.get(name, full)  # chunks x samples
                if removes and name not in ("orthogonal-task", "orthogonal-k16"):
                    assert st["reference_examples"] == (full // 4 if name.endswith("-small") else full), (name, stage)
                assert st["reference_total"] == st["refreshes"] * st["reference_examples"], (name, stage)
                assert st["train_examples"] == st["steps"] * 16, (name, stage)  # --batch default 16
                assert 0 <= st["refresh_seconds"] <= st["seconds"]
    stage = data["summary"]["stages"]["sft+dpo"]
    assert set(stage["plain"]["forgetting_end"]) == {"mean", "std", "n", "of"} and stage["plain"]["forgetting_end"]["n"] == 1
    assert stage["update"]["refresh_share"]["mean"] > 0 and stage["plain"]["refreshes"]["mean"] == 0
    assert "forgetting_part2" in stage["plain"]
    assert "forgetting_part2" not in report.run_metrics(data["runs"][0]["arms"]["plain"], data["before"], 0.9)
    assert set(data["summary"]["refresh_design"]["sft+dpo"]) == set(PROJECTION_ARMS + UPDATE_ARMS) & set(available_arms())
    png = (out / "pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    table = (out / "table.md").read_text()
    assert table.startswith("Command: `ogpsa demo --model") and "**Stage sft+dpo**" in table
    assert "Refresh cost, stage sft+dpo" in table and "DPO part adds" in table
    assert (tmp_path / "pub" / "pareto.png").exists() and (tmp_path / "pub" / "table.md").exists()
    cost = (tmp_path / "pub" / "pareto_cost.png").read_bytes()  # forgetting vs reference examples per step
    assert cost[:8] == b"\x89PNG\r\n\x1a\n" and len(cost) > 10_000
    assert "reference ex. per training ex." in table
    rich = data["summary"]["stages"]["sft+dpo"]["rich"]
    assert rich["reference_per_train_example"]["mean"] == pytest.approx(2 * 16 / (6 * 16))  # rebuilds at 0 (SFT), 0 (DPO)


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


@pytest.mark.skipif(not update_space_available(), reason="ogpsa.optim.ProjectedAdamW not installed")
@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_update_arm_refreshes_its_optimizer(monkeypatch, stage):
    """The update arms run ProjectedAdamW, and every rebuild reaches the optimizer: a new
    subspace (new bases) is in use from the next step on, and every step removes > 0."""
    from ogpsa.demo import arms
    from ogpsa.demo.evaluate import evaluate

    seen = []
    made = arms._update_space_optimizer

    def recording(model, params, subspace, lr, config):
        opt = made(model, params, subspace, lr, config)
        seen.append(opt)
        orig = opt.set_subspace
        opt.installed = [subspace]

        def set_subspace(sub, model=None):
            orig(sub, model)
            opt.installed.append(sub)
        opt.set_subspace = set_subspace
        return opt

    monkeypatch.setattr(arms, "_update_space_optimizer", recording)
    model, codec = build_tiny(32, 1, 2, 64, 2)
    data = tasks.make_data(1, eval_per_task=2, eval_harmful=2, reference_size=8)
    hp = arms.Hyper(12, 1e-3, batch=8, refresh_every=30, reference_size=8, eval_every=12)
    device = torch.device("cpu")
    _, log = arms.train_stage(model, codec, data, "update-r5-small", stage, hp, 0, device,
                              lambda m: evaluate(m, codec, data, device, losses=False))
    (opt,) = seen
    assert isinstance(opt, ProjectedAdamW) and log.refresh_every == 5
    assert log.refreshes == 3 == len(opt.installed)  # before step 1, at steps 5 and 10
    assert log.reference_examples == (16 if stage == "sft" else 8) // 4
    assert opt.subspace is opt.installed[-1]
    name = next(n for n, k in opt.installed[0].ranks().items() if k)
    first, last = opt.installed[0].basis(name), opt.installed[-1].basis(name)
    assert first.shape != last.shape or not torch.allclose(first, last)  # rebuilt from the trained model
    assert len(log.removed_fraction) == 12 and min(log.removed_fraction) > 0
    assert opt.num_projections == 12


@pytest.mark.skipif(not os.path.isfile(os.path.join(COMMITTED, "recipe.json")), reason="no committed base model")
def test_dpo_stage_raises_refusal_from_the_base_model():
    """With the default DPO recipe, DPO alone makes refusal the greedy answer on held-out harmful
    requests (the base model refuses none)."""
    from ogpsa.demo.arms import train_stage
    from ogpsa.demo.evaluate import evaluate
    from ogpsa.demo.experiment import load_model

    cfg = DemoConfig(eval_per_task=2, eval_harmful=20)
    model, codec, _ = load_model(cfg, lambda _m: None)
    for p in model.parameters():
        p.requires_grad_(True)
    data = tasks.make_data(0, eval_per_task=2, eval_harmful=20, reference_size=8)
    device = torch.device("cpu")
    before = evaluate(model, codec, data, device, losses=False)
    hp = cfg.hypers()["dpo"]
    hp.eval_every = hp.steps
    traj, log = train_stage(model, codec, data, "plain", "dpo", hp, 0, device,
                            lambda m: evaluate(m, codec, data, device, losses=False))
    assert before["refusal_rate"] == 0.0
    assert log.steps == cfg.dpo_steps and traj[-1]["refusal_rate"] >= 0.5


def test_readme_demo_tables_come_from_the_committed_runs():
    """Every table row and the table legend in docs/demo.md (the demo page behind the README)
    are lines of a committed docs/demo/<run>/table.md (no hand-edited numbers)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    section = open(os.path.join(root, "docs", "demo.md")).read()
    published = set()
    runs = sorted(os.listdir(os.path.join(root, "docs", "demo")))
    assert {"default", "full", "rich"} <= set(runs)
    for run in runs:
        published |= set(open(os.path.join(root, "docs", "demo", run, "table.md")).read().splitlines())
    rows = [line for line in section.splitlines() if line.startswith("|") or line.startswith('"vs plain"')]
    assert len(rows) > 40
    assert [r for r in rows if r not in published] == []
