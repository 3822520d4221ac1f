"""Rich subspaces: presets, the reference pool walk, chunked collection, the streaming basis,
and the default preset inside OGPSA (issue 21)."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

import ogpsa
from ogpsa import OGPSAConfig, Subspace
from ogpsa.collect import collect_reference_gradients
from ogpsa.pool import collect_chunk_gradients, pool_slice, rebuild_examples, reference_pool
from ogpsa.presets import resolve_space
from ogpsa.streaming import StreamingBasis
from ogpsa.tiny import char_tokenizer, tiny_llama

SET_A = [f"the cat {i} sat" + " on the mat" * (i % 3) for i in range(12)]
SET_B = [f"{i}+{2 * i}={3 * i}" for i in range(12)]


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture
def model(tok):
    return tiny_llama(tok, 24, 2, heads=2, intermediate=37, seed=11)


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


# -- presets -------------------------------------------------------------------------------


def test_default_is_the_rich_preset_and_paper_is_the_original_recipe():
    rich = OGPSAConfig()
    assert (rich.preset, rich.space, rich.chunks, rich.chunk_samples, rich.pool_walk, rich.refresh_every) == (
        "rich", "auto", 8, 2, "fresh", 10)
    assert rich.reference_examples_per_rebuild == 16
    paper = OGPSAConfig(preset="paper")
    assert (paper.space, paper.chunks, paper.refresh_every, paper.num_reference_samples, paper.mode) == (
        "gradient", 0, None, 200, "orthogonal")
    # explicit fields win over the preset
    assert OGPSAConfig(preset="paper", refresh_every=7, space="update").refresh_every == 7
    assert OGPSAConfig(chunks=16, refresh_every=20).chunks == 16
    # round trip keeps the preset; a dict from before presets (no "preset") is the paper recipe
    assert OGPSAConfig.from_dict(rich.to_dict()) == rich
    old = paper.to_dict()
    del old["preset"], old["chunks"], old["chunk_samples"], old["pool_walk"], old["stream_window"]
    assert OGPSAConfig.from_dict(old) == paper
    assert "preset 'rich'" in rich.describe() and "8 directions from 16 fresh" in rich.describe()
    assert "preset 'paper'" in paper.describe()


@pytest.mark.parametrize("bad, match", [
    (dict(preset="fast"), "preset"), (dict(chunks=17), "at most 16"), (dict(chunks=-1), "chunks"),
    (dict(chunk_samples=0), "chunk_samples"), (dict(pool_walk="random"), "pool_walk"),
    (dict(stream_window=4, chunks=8), "stream_window"), (dict(preset="paper", stream_window=4), "chunked"),
    (dict(space="both"), "space")])
def test_bad_preset_fields_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        OGPSAConfig(**bad)


def test_auto_space_resolves_by_optimizer(model):
    cfg = OGPSAConfig()
    adamw = torch.optim.AdamW(model.parameters())
    assert resolve_space(model, adamw, cfg).space == "update"
    # SGD has an update-space rule (ogpsa/optim/rules/sgd.py); Adagrad has none: gradient space
    assert resolve_space(model, torch.optim.SGD(model.parameters(), lr=0.1), cfg).space == "update"
    with pytest.warns(UserWarning, match="Adagrad, neither AdamW nor one with an update-space rule: falling back"):
        assert resolve_space(model, torch.optim.Adagrad(model.parameters()), cfg).space == "gradient"
    with pytest.warns(UserWarning, match="fused=True"):
        fused = torch.optim.AdamW(model.parameters(), fused=True) if torch.cuda.is_available() else None
        if fused is None:  # CPU fused AdamW exists in recent torch; build the flag by hand otherwise
            fused = torch.optim.AdamW(model.parameters())
            fused.param_groups[0]["fused"] = True
        assert resolve_space(model, fused, cfg).space == "gradient"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_space(model, adamw, OGPSAConfig(space="gradient")).space == "gradient"
    sub = Subspace.from_gradients([{n: torch.randn_like(p) for n, p in model.named_parameters()}], cfg)
    with pytest.warns(UserWarning, match="falling back"):
        proj = ogpsa.attach(model, torch.optim.Adagrad(model.parameters()), sub)
    assert type(proj).__name__ == "Projector"
    proj.remove()
    with pytest.raises(ValueError, match="no rule for Adagrad"):  # an explicit update space still errors
        ogpsa.attach(model, torch.optim.Adagrad(model.parameters()), sub, cfg.replace(space="update"))
    proj = ogpsa.attach(model, adamw, sub)
    assert type(proj).__name__ == "UpdateSpaceProjector"
    proj.remove()


# -- pool ------------------------------------------------------------------------------------


def test_pool_interleaves_and_walks_fresh_slices(monkeypatch):
    pool = reference_pool([["a0", "a1", "a2"], ["b0", "b1"]], per_dataset=10)
    assert pool == ["a0", "b0", "a1", "b1", "a2"]
    assert pool_slice(pool, 1, 2) == ["a1", "b1"] and pool_slice(pool, 2, 2) == ["a2", "a0"]  # wraps
    cfg = OGPSAConfig(chunks=2, chunk_samples=1)
    assert [rebuild_examples(pool, r, cfg) for r in range(3)] == [["a0", "b0"], ["a1", "b1"], ["a2", "a0"]]
    fixed = cfg.replace(pool_walk="fixed")
    assert rebuild_examples(pool, 5, fixed) == ["a0", "b0"]
    monkeypatch.setattr("ogpsa.pool._world", lambda: (1, 2))  # rank 1 of 2: its own slice
    assert rebuild_examples(pool, 0, cfg) == ["a1", "b1"] and rebuild_examples(pool, 1, cfg) == ["b0", "a1"]  # slice 3, wrapped
    assert reference_pool([SET_A, SET_B], 3) == [SET_A[0], SET_B[0], SET_A[1], SET_B[1], SET_A[2], SET_B[2]]
    # a pool smaller than one rebuild: fewer chunks, never an example twice in one rebuild
    from ogpsa.pool import chunk_plan

    rich = OGPSAConfig()
    assert chunk_plan(400, rich) == (8, 2) and chunk_plan(5, rich) == (2, 2) and chunk_plan(1, rich) == (1, 1)
    monkeypatch.setattr("ogpsa.pool._world", lambda: (0, 1))
    assert rebuild_examples(pool, 0, rich) == ["a0", "b0", "a1", "b1"]
    with pytest.raises(TypeError, match="wrap"):
        reference_pool(SET_A, 3)


def test_chunk_collection_equals_one_collection_per_chunk(model, tok):
    examples = reference_pool([SET_A, SET_B], 12)[:12]
    grads, info = collect_chunk_gradients(model, examples, 4, tokenizer=tok, batch_size=5)
    assert info["backward_passes"] == 3 and info["examples"] == 12 and not info["fallback"]  # 3 batches
    for g in range(4):
        want, _ = collect_reference_gradients(model, [examples[3 * g:3 * g + 3]], num_samples=3, tokenizer=tok,
                                              batch_size=1, progress=False)
        for n, ref in want[0].items():
            assert _rel(grads[g][n], ref) <= 1e-5, (g, n)
    for p in model.parameters():
        assert p.grad is None
    with pytest.raises(ValueError, match="equal chunks"):
        collect_chunk_gradients(model, examples[:10], 4, tokenizer=tok)


def test_chunk_collection_with_loss_fn_per_example_and_mean(model, tok):
    from ogpsa.sequences import example_to_sequences, lm_loss_per_sequence

    examples = SET_A[:6]

    def per_example(m, exs):
        seqs = [example_to_sequences(e, tok)[0] for e in exs]
        return lm_loss_per_sequence(m, seqs, 0)[0]

    def mean(m, exs):
        return per_example(m, exs).mean()

    g1, i1 = collect_chunk_gradients(model, examples, 3, loss_fn=per_example, batch_size=6)
    g2, i2 = collect_chunk_gradients(model, examples, 3, loss_fn=mean, batch_size=6)
    g3, _ = collect_chunk_gradients(model, examples, 3, tokenizer=tok, batch_size=6)
    assert i1["backward_passes"] == 1 and i2["backward_passes"] == 3  # a mean loss: one pass per chunk
    for g in range(3):
        for n in g3[g]:
            assert _rel(g1[g][n], g3[g][n]) <= 1e-5 and _rel(g2[g][n], g3[g][n]) <= 1e-5


def test_fsdp2_parameters_raise_a_clear_error(model, tok, monkeypatch):
    monkeypatch.setattr("ogpsa.distributed.is_dtensor", lambda t: True)
    with pytest.raises(ogpsa.UnsupportedSetupError, match="FSDP2.*preset='paper'"):
        collect_chunk_gradients(model, SET_A[:2], 2, tokenizer=tok)


# -- streaming -------------------------------------------------------------------------------


def _projector_matrix(sub, name):
    u = sub.basis(name).double()
    return u.t() @ u


@pytest.mark.parametrize("method", ["gram_schmidt", "eigen"])
def test_streaming_window_equals_a_full_rebuild_of_the_same_rows(method):
    gen = torch.Generator().manual_seed(21)
    shapes = {"w": (7, 13), "b": (11,), "late": (3, 4)}
    cfg = OGPSAConfig(chunks=2, chunk_samples=1, stream_window=5, method=method)
    stream = StreamingBasis(cfg)
    full_dots = 0
    for step in range(6):
        new = []
        for j in range(2):
            d = {n: torch.randn(s, generator=gen) for n, s in shapes.items() if n != "late" or step >= 2}
            if step == 3 and j == 1:
                d["b"] = torch.zeros(11)  # a zero row gives no direction
            new.append(d)
        stream.add(new)
        assert stream.count == min(5, 2 * (step + 1))
        got = stream.subspace()
        want = Subspace.from_gradients(stream.window_rows(), cfg)
        assert got.names == want.names and got.num_references == stream.count
        for n in want.names:
            assert got.basis(n).shape == want.basis(n).shape
            assert _rel(_projector_matrix(got, n), _projector_matrix(want, n)) <= 1e-5, (step, n)
            u = got.basis(n).double()
            assert _rel(u @ u.t(), torch.eye(u.shape[0], dtype=torch.float64)) <= 1e-5
        full_dots += len(got.names) * stream.count * (stream.count + 1) // 2  # per tensor
    assert stream.dots < full_dots  # incremental: only the new rows' dot products


def test_streaming_rows_are_the_last_window_oldest_first():
    cfg = OGPSAConfig(chunks=1, chunk_samples=1, stream_window=3)
    stream = StreamingBasis(cfg)
    for i in range(5):
        stream.add([{"x": torch.full((4,), float(i + 1)) + torch.arange(4.0) * i}])
    rows = [r["x"] for r in stream.window_rows()]
    assert [float(r[0]) for r in rows] == [3.0, 4.0, 5.0]
    with pytest.raises(ValueError, match="shape"):
        stream.add([{"x": torch.ones(5)}])


# -- the default preset inside OGPSA ---------------------------------------------------------


def test_ogpsa_default_preset_builds_chunked_bases_and_logs_it(model, tok, caplog):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with caplog.at_level(logging.INFO, logger="ogpsa"):
        og = ogpsa.OGPSA(model, opt, reference=[SET_A, SET_B], tokenizer=tok, progress=False,
                         config=OGPSAConfig(chunks=4, chunk_samples=2))
    assert "ogpsa preset 'rich': space auto, 4 directions from 8 fresh reference examples" in caplog.text
    assert type(og.projector).__name__ == "UpdateSpaceProjector"
    assert og.refresh_every == 10
    assert max(og.subspace.ranks().values()) == 4
    assert og.last_collect.chunked["examples"] == 8 and og.last_collect.chunked["backward_passes"] == 1
    ids = tok(["a safety example"], return_tensors="pt")["input_ids"]
    for _ in range(11):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert og.refresh_steps == [0, 10] and og.last_collect.chunked["rebuild"] == 1
    og.remove()


def test_ogpsa_streaming_grows_the_window(model, tok):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    og = ogpsa.OGPSA(model, opt, reference=[SET_A, SET_B], tokenizer=tok, progress=False,
                     config=OGPSAConfig(chunks=1, chunk_samples=2, refresh_every=2, stream_window=3))
    ids = tok(["x y"], return_tensors="pt")["input_ids"]
    ranks = []
    for _ in range(6):
        ranks.append(og.subspace.num_references)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert ranks == [1, 1, 2, 2, 3, 3]
    og.remove()


def test_ddp_ranks_take_their_own_chunks_and_share_one_basis(tmp_path):
    import os
    import subprocess
    import sys

    worker = os.path.join(os.path.dirname(__file__), "rich_dist_worker.py")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, worker, str(tmp_path)], capture_output=True, text=True, timeout=300,
                          env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    assert r0["world"] == r1["world"] == 2
    assert not set(r0["examples"]) & set(r1["examples"])  # each rank its own slice of the pool
    for g in range(2):
        for n, t in r0["synced"][g].items():
            assert torch.equal(t, r1["synced"][g][n])  # the same directions on every rank
            want = (r0["local"][g][n].double() + r1["local"][g][n].double()) / 2
            assert _rel(t, want) <= 1e-6
    for n, u in r0["bases"].items():
        assert torch.equal(u, r1["bases"][n])


def test_ogpsa_train_uses_the_default_preset_and_takes_preset_paper():
    import argparse

    from ogpsa import train_cli

    parser = argparse.ArgumentParser()
    train_cli.add_arguments(parser)
    base = ["--stage", "sft", "--model", "tiny", "--data", "x.jsonl", "--output", "out", "--mode", "orthogonal"]
    rich = OGPSAConfig(**train_cli._config_kwargs(parser.parse_args(base)))
    assert (rich.preset, rich.chunks, rich.space, rich.refresh_every) == ("rich", 8, "auto", 10)
    paper = OGPSAConfig(**train_cli._config_kwargs(parser.parse_args(base + ["--preset", "paper"])))
    assert (paper.preset, paper.chunks, paper.space, paper.refresh_every) == ("paper", 0, "gradient", None)


def test_resumed_streaming_run_seeds_its_window_with_the_saved_basis(model, tok, tmp_path):
    cfg = OGPSAConfig(chunks=1, chunk_samples=2, refresh_every=2, stream_window=4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    og = ogpsa.OGPSA(model, opt, reference=[SET_A, SET_B], tokenizer=tok, progress=False, config=cfg)
    ids = tok(["x y"], return_tensors="pt")["input_ids"]

    def steps(n):
        for _ in range(n):
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    steps(5)  # rebuilds at 0, 2, 4: three rows
    assert og.subspace.num_references == 3
    og.save_pretrained(tmp_path)
    og.remove()
    og2 = ogpsa.OGPSA.from_pretrained(tmp_path, model, opt, reference=[SET_A, SET_B], tokenizer=tok, progress=False)
    assert og2.step == 5 and og2.refresh_steps == [0, 2, 4]
    steps(1)  # step 6: a refresh; the window is the 3 saved basis rows + 1 new chunk gradient
    assert og2.refresh_steps == [0, 2, 4, 6] and og2.subspace.num_references == 4
    assert og2.last_collect.chunked["rebuild"] == 3  # the pool walk continues where it was
    og2.remove()


def test_rows_view_builds_the_same_basis_without_a_copy(model, tok):
    grads, info = collect_chunk_gradients(model, reference_pool([SET_A, SET_B], 12)[:8], 4, tokenizer=tok)
    copies = [{n: t.clone() for n, t in d.items()} for d in grads]
    names, shapes, refs = zip(*info["rows"])
    assert all(r.data_ptr() == grads[0][n].data_ptr() for n, r in zip(names, refs))  # views, not copies
    cfg = OGPSAConfig(chunks=4)
    got = Subspace.from_reference_rows(list(names), list(shapes), list(refs), cfg)
    assert got.equal(Subspace.from_gradients(copies, cfg))
