"""attach / Projector / register_gradient_hooks on real models."""

import pytest
import torch

import ogpsa
from ogpsa import OGPSAConfig, Subspace

pytestmark = pytest.mark.usefixtures("paper_preset")  # these tests mean the paper recipe (preset="paper")


def _mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(9, 17), torch.nn.Tanh(), torch.nn.Linear(17, 5))


def _llama(seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg)


def _loss(model, batch):
    if isinstance(model, torch.nn.Sequential):
        x, y = batch
        return torch.nn.functional.mse_loss(model(x), y)
    return model(input_ids=batch, labels=batch).loss


def _batch(model, seed, n=4):
    gen = torch.Generator().manual_seed(seed)
    if isinstance(model, torch.nn.Sequential):
        return torch.randn(n, 9, generator=gen), torch.randn(n, 5, generator=gen)
    return torch.randint(0, 61, (n, 12), generator=gen)


def _cat(batches):
    if isinstance(batches[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*batches))
    return torch.cat(batches)


def _subspace(model, config=None, m=2):
    refs = []
    for i in range(m):
        model.zero_grad()
        _loss(model, _batch(model, 1000 + i, 8)).backward()
        refs.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    model.zero_grad()
    return Subspace.from_gradients(refs, config)


def _orth_residual(sub, params, vectors):
    """max over tensors of ||U v|| / ||v|| in float64.

    For parameter updates v = new - old, storing the new parameter in fp32 rounds each
    element by up to eps/2 of its magnitude: that part of v is not the optimizer's doing,
    so ``params`` (the new values) lets the check allow exactly eps * ||new||."""
    worst = 0.0
    eps = torch.finfo(torch.float32).eps
    for name, v in vectors.items():
        if name not in sub or sub.ranks()[name] == 0:
            continue
        u = sub.basis(name).double()
        v64 = v.double().reshape(-1)
        rounding = eps * float(params[name].detach().double().norm()) if params is not None else 0.0
        if float(v64.norm()) > 0:
            worst = max(worst, max(0.0, float((u @ v64).norm()) - rounding) / float(v64.norm()))
    return worst


@pytest.mark.parametrize("make", [_mlp, _llama])
@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_sgd_update_is_orthogonal(make, scope):
    model = make()
    sub = _subspace(model, OGPSAConfig(scope=scope))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    proj = ogpsa.attach(model, opt, sub)
    for step in range(3):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.zero_grad()
        _loss(model, _batch(model, step)).backward()
        opt.step()
        delta = {n: p.detach() - before[n] for n, p in model.named_parameters()}
        if scope == "tensor":
            assert _orth_residual(sub, dict(model.named_parameters()), delta) < 1e-5
        else:
            u = torch.cat([sub.basis(n).double() for n in sub.names], 1)
            d = torch.cat([delta[n].double().reshape(-1) for n in sub.names])
            new = torch.cat([p.detach().double().reshape(-1) for n, p in model.named_parameters()])
            rounding = torch.finfo(torch.float32).eps * float(new.norm())
            assert max(0.0, float((u @ d).norm()) - rounding) / float(d.norm()) < 1e-5
        assert proj.last_stats.removed_fraction > 0
    assert proj.num_projections == 3


def test_adamw_consumes_projected_gradient():
    model = _llama()
    sub = _subspace(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ogpsa.attach(model, opt, sub)
    seen = {}

    def capture(optimizer, args, kwargs):  # registered after attach: runs after the projection
        seen.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})

    opt.register_step_pre_hook(capture)
    _loss(model, _batch(model, 5)).backward()
    opt.step()
    assert seen and _orth_residual(sub, None, seen) < 1e-5


def test_frozen_params_and_missing_grads_are_skipped():
    model = _mlp()
    sub = _subspace(model)
    model[0].weight.requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    proj = ogpsa.attach(model, opt, sub)
    x, y = _batch(model, 3)
    torch.nn.functional.mse_loss(model[2](torch.randn(4, 17)), y).backward()  # only layer 2 gets grads
    assert model[0].bias.grad is None
    opt.step()
    assert proj.last_stats.sq_before.numel() == 2
    assert model[0].weight.grad is None


def test_clip_grad_norm_projects_once_and_matches_torch():
    model = _mlp(1)
    sub = _subspace(model)
    twin = _mlp(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    proj = ogpsa.attach(model, opt, sub)
    batch = _batch(model, 7)
    _loss(model, batch).backward()
    _loss(twin, batch).backward()
    total = proj.clip_grad_norm_(0.05)
    # twin: project with the functional API, then torch's clipping
    grads = [p.grad for _, p in twin.named_parameters()]
    ogpsa.project_(grads, [sub.basis(n) for n, _ in twin.named_parameters()])
    expected = torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.05)
    assert float(total) == pytest.approx(float(expected), rel=1e-5)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-8)
    opt.step()  # the pre-hook must not project again
    assert proj.num_projections == 1
    _loss(model, batch).backward()
    opt.step()  # next step: the pre-hook projects again
    assert proj.num_projections == 2
    with pytest.raises(ValueError, match="norm_type"):
        proj.clip_grad_norm_(1.0, norm_type=1.0)


def test_clip_includes_params_without_basis():
    model = _mlp(2)
    sub = _subspace(model)
    partial = Subspace([n for n in sub.names if n != "2.bias"], [s for n, s in zip(sub.names, sub.shapes) if n != "2.bias"],
                       [sub.basis(n) for n in sub.names if n != "2.bias"])
    proj = ogpsa.attach(model, None, partial, OGPSAConfig(allow_partial=True))
    _loss(model, _batch(model, 8)).backward()
    bias_before = model[2].bias.grad.clone()
    total = proj.clip_grad_norm_(1e-3)
    assert float(total) > 1e-3
    coef = float(proj.last_stats.clip_coef)
    torch.testing.assert_close(model[2].bias.grad, bias_before * coef, rtol=1e-5, atol=1e-9)


def test_paused_and_remove():
    model = _mlp(3)
    sub = _subspace(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    proj = ogpsa.attach(model, opt, sub)
    _loss(model, _batch(model, 9)).backward()
    raw = [p.grad.clone() for p in model.parameters()]
    with proj.paused():
        assert proj.is_paused
        opt.step()
    assert all(torch.equal(p.grad, r) for p, r in zip(model.parameters(), raw))
    proj.remove()
    opt.step()
    assert all(torch.equal(p.grad, r) for p, r in zip(model.parameters(), raw))
    assert proj.num_projections == 0


@pytest.mark.parametrize("mode", ["orthogonal", "plane", "conflict"])
def test_accumulation_equals_per_microbatch_hooks(mode):
    """Linear modes: projecting the sum of 4 micro-batches equals projecting each one."""
    config = OGPSAConfig(mode=mode)
    step_model, hook_model = _llama(4), _llama(4)
    sub = _subspace(step_model, config)
    opt = torch.optim.SGD(step_model.parameters(), lr=0.0)
    ogpsa.attach(step_model, opt, sub)
    if mode == "conflict":
        with pytest.warns(UserWarning, match="conflict"):
            hooks = ogpsa.register_gradient_hooks(hook_model, sub, config)
    else:
        hooks = ogpsa.register_gradient_hooks(hook_model, sub, config)
    batches = [_batch(step_model, 20 + i) for i in range(4)]
    for b in batches:
        (_loss(step_model, b) / 4).backward()
        (_loss(hook_model, b) / 4).backward()
    opt.step()
    diffs = [float((p.grad - q.grad).norm() / p.grad.norm()) for p, q in
             zip(step_model.parameters(), hook_model.parameters()) if p.grad.norm() > 0]
    if mode == "conflict":
        assert max(diffs) > 1e-3  # clamping per micro-batch is not clamping the sum
    else:
        assert max(diffs) < 1e-5
    hooks.remove()
    assert not hooks.handles


def test_accumulation_equals_one_big_batch():
    small, big = _llama(6), _llama(6)
    sub = _subspace(small)
    opt_s = torch.optim.SGD(small.parameters(), lr=0.05)
    opt_b = torch.optim.SGD(big.parameters(), lr=0.05)
    ogpsa.attach(small, opt_s, sub)
    ogpsa.attach(big, opt_b, sub)
    batches = [_batch(small, 40 + i, 2) for i in range(4)]
    for b in batches:
        (_loss(small, b) / 4).backward()
    opt_s.step()
    # same tokens in one batch: equal-length sequences, so the mean loss is the same
    _loss(big, _cat(batches)).backward()
    opt_b.step()
    for p, q in zip(small.parameters(), big.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_set_subspace_and_scope_mismatch():
    model = _mlp(5)
    proj = ogpsa.attach(model, None, _subspace(model))
    proj.set_subspace(_subspace(model))
    with pytest.raises(ValueError, match="scope"):
        proj.set_subspace(_subspace(model, OGPSAConfig(scope="global")))
