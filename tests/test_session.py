"""ogpsa.OGPSA, the one-call object for hand-written loops: builds, refreshes on the configured
schedule (counted in optimizer steps), projects, and round-trips basis + schedule through
state_dict()/load_state_dict() and save_pretrained()/from_pretrained()."""

import pytest
import torch

import ogpsa

pytestmark = pytest.mark.usefixtures("paper_preset")  # these tests mean the paper recipe (preset="paper")

REF = [[{"input_ids": [1, 5, 7, 2, 9, 4]}, {"input_ids": [3, 3, 8, 1]}],
       [{"input_ids": [6, 2, 2, 9, 1]}, {"input_ids": [4, 7, 5]}]]


class TinyLM(torch.nn.Module):
    def __init__(self, vocab=11, hidden=6, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = torch.nn.Parameter(torch.randn(vocab, hidden, generator=g) * 0.3)
        self.out = torch.nn.Parameter(torch.randn(vocab, hidden, generator=g) * 0.3)

    def forward(self, input_ids, attention_mask=None, **kw):
        class Out:
            pass

        o = Out()
        o.logits = self.emb[input_ids] @ self.out.T
        return o


def _loss(model, examples):
    ids = torch.tensor([e["input_ids"][:3] for e in examples])
    logits = model(ids).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _train_step(model, opt, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 11, (2, 5), generator=g)
    logits = model(ids).logits
    torch.nn.functional.cross_entropy(logits.reshape(-1, 11), ids.roll(1, 1).reshape(-1)).backward()
    before = [p.detach().clone().double() for p in model.parameters()]
    opt.step()
    opt.zero_grad()
    return [p.detach().double() - b for p, b in zip(model.parameters(), before)]


def _make(seed=0, **kw):
    model = TinyLM(seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    og = ogpsa.OGPSA(model, opt, reference=REF, config=ogpsa.OGPSAConfig(refresh_every=3), loss_fn=_loss,
                     progress=False, **kw)
    return model, opt, og


def test_builds_refreshes_on_schedule_and_projects():
    model, opt, og = _make()
    assert og.refresh_steps == [0] and og.step == 0
    names = [n for n, _ in model.named_parameters()]
    for s in range(7):
        sub = og.subspace
        deltas = _train_step(model, opt, s)
        for n, d in zip(names, deltas):  # every update orthogonal to the basis in use at that step
            u = sub.bases[sub.names.index(n)].double()
            assert (u @ d.flatten()).norm() <= 1e-5 * d.norm() + 1e-12
    assert og.step == 7 and og.refresh_steps == [0, 3, 6] and og.built_at == 6


def test_state_dict_and_save_pretrained_round_trip(tmp_path):
    model, opt, og = _make()
    for s in range(4):
        _train_step(model, opt, s)
    state = og.state_dict()
    torch.save(state, tmp_path / "og.pt")
    og.save_pretrained(tmp_path / "ckpt")
    og.remove()
    # Resume into a fresh optimizer (new model copy with the same weights).
    model2 = TinyLM(seed=1)
    model2.load_state_dict(model.state_dict())
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1)
    og2 = ogpsa.OGPSA(model2, opt2, reference=REF, config=ogpsa.OGPSAConfig(refresh_every=3), loss_fn=_loss,
                      progress=False)
    og2.load_state_dict(torch.load(tmp_path / "og.pt", weights_only=True))
    assert og2.subspace.equal(og.subspace) and og2.step == 4 and og2.built_at == 3
    og2.remove()
    opt3 = torch.optim.SGD(model2.parameters(), lr=0.1)
    og3 = ogpsa.OGPSA.from_pretrained(tmp_path / "ckpt", model2, opt3, reference=REF, loss_fn=_loss, progress=False)
    assert og3.subspace.equal(og.subspace) and og3.step == 4 and og3.refresh_every == 3
    _train_step(model2, opt3, 10)
    _train_step(model2, opt3, 11)
    assert og3.step == 6 and og3.built_at == 6  # the schedule continues: next refresh at step 6


def test_timing_and_metrics_of_a_hand_written_loop():
    model, opt, og = _make()
    t0 = og.timing()
    assert t0["refreshes"] == 1 and 0 < t0["refresh_seconds"] <= t0["train_seconds"]
    for s in range(3):
        _train_step(model, opt, s)
    m = og.pop_metrics()
    assert m["ogpsa/refreshes"] == 2.0  # the build at step 0 and the refresh at step 3
    assert 0.0 < m["ogpsa/removed_fraction"] < 1.0 and 0.0 < m["ogpsa/cosine"] <= 1.0
    t = og.timing()
    assert t["refreshes"] == 2 and t["refresh_seconds"] > t0["refresh_seconds"]
    assert m["ogpsa/refresh_seconds"] == t["refresh_seconds"] and 0.0 < m["ogpsa/refresh_share"] <= 1.0
    assert t["refresh_share"] == t["refresh_seconds"] / t["train_seconds"]
    again = og.pop_metrics()  # nothing happened since: no projection statistics, no refresh
    assert again["ogpsa/refreshes"] == 0.0 and "ogpsa/removed_fraction" not in again
    assert og.timing_summary().startswith("ogpsa: 2 subspace refresh(es) took ")
    og.stop_clock()
    assert og.timing()["train_seconds"] == og.timing()["train_seconds"]  # frozen


def test_bad_arguments():
    import pytest

    model = TinyLM()
    with pytest.raises(TypeError, match="optimizer"):
        ogpsa.OGPSA(model, object(), reference=REF, loss_fn=_loss)
    with pytest.raises(TypeError, match="config"):
        ogpsa.OGPSA(model, torch.optim.SGD(model.parameters(), lr=0.1), reference=REF, config={"mode": "x"})
    with pytest.raises(ValueError, match="reference"):
        ogpsa.OGPSA(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(FileNotFoundError, match="ogpsa_subspace"):
        ogpsa.OGPSA.from_pretrained("/nonexistent-dir", model, torch.optim.SGD(model.parameters(), lr=0.1))


def test_deferred_before_setup_raises_a_clear_error():
    import pytest

    og = ogpsa.OGPSA.deferred(REF, loss_fn=_loss)
    for call in (lambda: og.clip_grad_norm_(1.0), lambda: og.paused().__enter__(), og.state_dict,
                 lambda: og.load_state_dict({})):
        with pytest.raises(RuntimeError, match=r"before setup: .*call og.setup\(model, optimizer\) first"):
            call()
    assert og.maybe_refresh(3) is False  # nothing attached: nothing to refresh


def test_first_build_warm_up_is_reported_separately(monkeypatch):
    import ogpsa.session as session

    monkeypatch.setattr(session, "_WARMED_UP", False)  # as in a fresh process
    rng = torch.get_rng_state()
    model, opt, og = _make()
    t = og.timing()
    assert t["warmup_seconds"] > 0 and t["refreshes"] == 1
    # the warm-up is excluded from both the refresh time and the training time
    assert 0 < t["refresh_seconds"] <= t["train_seconds"]
    assert "one-off warm-up before the first build" in og.timing_summary()
    # it leaves the random state and the model alone: the same build as without it
    assert torch.equal(torch.get_rng_state(), rng)
    model2, opt2, og2 = _make()  # later objects in the process: no second warm-up
    assert og2.timing()["warmup_seconds"] == 0.0 and "warm-up" not in og2.timing_summary()
    assert og.subspace.equal(og2.subspace)
    # the warm-up never touches .grad
    monkeypatch.setattr(session, "_WARMED_UP", False)
    g = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) for i, p in enumerate(model.parameters())]
    for p, gi in zip(model.parameters(), g):
        p.grad = gi.clone()
    assert og._warm_up() > 0
    assert all(torch.equal(p.grad, gi) for p, gi in zip(model.parameters(), g))
