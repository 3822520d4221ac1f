"""The second update-space rule (torch.optim.SGD: momentum, dampening, Nesterov, weight decay,
maximize), tested like AdamW: against a float64 computation, orthogonality of the applied step,
every mode and scope, the optimizer read live (resume by load_state_dict, schedulers,
add_param_group), state dicts interchangeable with torch's SGD, and the registry."""

from __future__ import annotations

import copy

import pytest
import torch

import ogpsa
from ogpsa import OGPSAConfig, Subspace, SubspaceMismatchError
from ogpsa.interface import ProjectorLike
from ogpsa.optim import RuleUpdateProjector, registered_rules, rule_for


@pytest.fixture(autouse=True)
def _no_env_backend(monkeypatch):
    monkeypatch.delenv("OGPSA_BACKEND", raising=False)


def _model(seed: int, dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(11, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).to(dtype)


def _subspace(model, k=2, seed=1, config=None) -> Subspace:
    gen = torch.Generator().manual_seed(seed)
    refs = [{n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()} for _ in range(k)]
    return Subspace.from_gradients(refs, config or OGPSAConfig())


def _grads(model, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)


SGD_CASES = [dict(momentum=0.0), dict(momentum=0.9), dict(momentum=0.9, nesterov=True, weight_decay=0.05),
             dict(momentum=0.8, dampening=0.3, weight_decay=0.1, maximize=True)]


def _reference(model0, sub, steps, hyper, lr, mode="orthogonal", scope="tensor", aligned_scale=1.0):
    """float64 SGD whose direction is projected with the float64 projector onto the rows' span."""
    params = {n: p.detach().double().clone() for n, p in model0.named_parameters()}
    bufs: dict = {}
    mom, damp = hyper.get("momentum", 0.0), hyper.get("dampening", 0.0)
    for s in range(steps):
        tmp = copy.deepcopy(model0)
        _grads(tmp, 100 + s)
        ds = {}
        for n, p in tmp.named_parameters():
            g = p.grad.double() * (-1 if hyper.get("maximize") else 1) + hyper.get("weight_decay", 0.0) * params[n]
            if mom:
                bufs[n] = g.clone() if n not in bufs else mom * bufs[n] + (1 - damp) * g
                g = g + mom * bufs[n] if hyper.get("nesterov") else bufs[n]
            ds[n] = g.reshape(-1)
        us = {n: sub.basis(n).double() for n in sub.names}
        if scope == "global":
            c = sum(us[n] @ ds[n] for n in ds)
            m = sum(us[n] @ us[n].T for n in ds)
            ws = {n: torch.linalg.solve(m, c) for n in ds}
        else:
            ws = {n: torch.linalg.solve(us[n] @ us[n].T, us[n] @ ds[n]) for n in ds}
        for n in ds:
            w = ws[n]
            if mode == "orthogonal":
                new = ds[n] - us[n].T @ w
            elif mode == "conflict":
                v = torch.where(w < 0, w, (1 - aligned_scale) * w)
                new = ds[n] - us[n].T @ v
            else:  # plane
                new = us[n].T @ w
            params[n] = params[n] - lr * new.reshape(params[n].shape)
    return params


@pytest.mark.parametrize("hyper", SGD_CASES)
@pytest.mark.parametrize("mode,scope", [("orthogonal", "tensor"), ("conflict", "tensor"), ("plane", "tensor"),
                                        ("orthogonal", "global")])
def test_projected_sgd_matches_float64(hyper, mode, scope):
    model = _model(0)
    cfg = OGPSAConfig(space="update", mode=mode, scope=scope, aligned_scale=0.5)
    sub = _subspace(model, config=OGPSAConfig(scope=scope))
    model0 = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, **hyper)
    proj = ogpsa.attach(model, opt, sub, cfg)
    assert isinstance(proj, RuleUpdateProjector) and isinstance(proj, ProjectorLike)
    for s in range(3):
        _grads(model, 100 + s)
        opt.step()
    ref = _reference(model0, sub, 3, hyper, 0.05, mode=mode, scope=scope, aligned_scale=0.5)
    for n, p in model.named_parameters():
        dp, dr = p.detach().double() - model0.get_parameter(n).double(), ref[n] - model0.get_parameter(n).double()
        assert float((dp - dr).norm() / dr.norm()) <= 1e-5, n
    assert proj.last_stats.backends == ("torch",) and proj.num_projections == 3
    if mode == "orthogonal" and scope == "tensor":  # the WHOLE step (decay included) is orthogonal
        for n, p in model.named_parameters():
            dp = (p.detach().double() - model0.get_parameter(n).double()).reshape(-1)
            u = torch.linalg.qr(sub.basis(n).double().T)[0].T
            assert float((u @ dp).norm() / dp.norm()) <= 1e-5, n


def test_float64_sgd_steps_in_float64():
    model = _model(1, torch.float64)
    sub = _subspace(model)
    model0 = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ogpsa.attach(model, opt, sub, OGPSAConfig(space="update"))
    for s in range(3):
        _grads(model, 100 + s)
        opt.step()
    ref = _reference(model0, sub, 3, {"momentum": 0.9}, 0.05)
    for n, p in model.named_parameters():
        assert p.dtype == torch.float64
        dr = ref[n] - model0.get_parameter(n)
        assert float((p.detach() - ref[n]).norm() / dr.norm()) <= 1e-10, n


def test_resume_state_dict_scheduler_and_add_param_group():
    model = _model(2)
    sub = _subspace(model)
    ref = copy.deepcopy(model)
    o_ref = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    ogpsa.attach(ref, o_ref, sub, OGPSAConfig(space="update"))
    sched = torch.optim.lr_scheduler.StepLR(o_ref, 1, gamma=0.5)
    for s in range(2):
        _grads(ref, s)
        o_ref.step()
        sched.step()
    saved_m, saved_o, saved_s = copy.deepcopy(ref.state_dict()), copy.deepcopy(o_ref.state_dict()), sched.state_dict()
    for s in range(2, 4):
        _grads(ref, s)
        o_ref.step()
        sched.step()
    # resume in the usual order: attach, then load the optimizer state
    res = _model(2)
    res.load_state_dict(saved_m)
    o = torch.optim.SGD(res.parameters(), lr=0.05, momentum=0.9)
    ogpsa.attach(res, o, sub, OGPSAConfig(space="update"))
    o.load_state_dict(saved_o)
    sched2 = torch.optim.lr_scheduler.StepLR(o, 1, gamma=0.5)
    sched2.load_state_dict(saved_s)
    for s in range(2, 4):
        _grads(res, s)
        o.step()
        sched2.step()
    for a, b in zip(ref.parameters(), res.parameters()):
        assert torch.equal(a, b)
    # the state dict is torch SGD's: it loads into a plain SGD and back
    plain = torch.optim.SGD(res.parameters(), lr=0.05, momentum=0.9)
    plain.load_state_dict(o.state_dict())
    for p in res.parameters():
        assert torch.equal(plain.state[p]["momentum_buffer"], o.state[p]["momentum_buffer"])
    # add_param_group: a parameter of the model without a basis is a named error at the next step
    extra = torch.nn.Parameter(torch.randn(4))
    res.register_parameter("extra", extra)
    o.add_param_group({"params": [extra]})
    _grads(res, 9)
    with pytest.raises(SubspaceMismatchError, match="'extra'"):
        o.step()


def test_paused_is_plain_sgd_and_registry():
    model = _model(3)
    twin = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    plain = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    proj = ogpsa.attach(model, opt, _subspace(model), OGPSAConfig(space="update"))
    with proj.paused():
        for s in range(3):
            _grads(model, s)
            _grads(twin, s)
            opt.step()
            plain.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert rule_for(opt).name == "sgd" and any(r.name == "sgd" for r in registered_rules())
    assert rule_for(torch.optim.RMSprop(twin.parameters())) is None
    with pytest.raises(ValueError, match="no rule for RMSprop"):
        ogpsa.attach(twin, torch.optim.RMSprop(twin.parameters()), _subspace(twin), OGPSAConfig(space="update"))
    proj.remove()
    with pytest.raises(ogpsa.BackendUnavailableError, match="torch backend only"):
        ogpsa.attach(model, opt, _subspace(model), OGPSAConfig(space="update", backend="cpu"))


@pytest.mark.parametrize("mode,scope", [("orthogonal", "tensor"), ("conflict", "tensor"), ("orthogonal", "global")])
def test_adamw_rule_through_rule_step_is_the_projected_adamw_step(mode, scope, monkeypatch):
    """AdamW decomposed as a rule (moments -> direction -> projection -> decoupled decay and apply)
    and stepped by the generic rule_step gives ProjectedAdamW's step (torch backend)."""
    from ogpsa.optim import ProjectedAdamW
    from ogpsa.optim.rule import match_bases, rule_step

    monkeypatch.setenv("OGPSA_BACKEND", "torch")
    model = _model(4)
    sub = _subspace(model, config=OGPSAConfig(scope=scope))
    twin = copy.deepcopy(model)
    cfg = OGPSAConfig(space="update", mode=mode, scope=scope, aligned_scale=0.5)
    own = ProjectedAdamW(model, sub, lr=1e-2, weight_decay=0.1, amsgrad=True, config=cfg)
    plain = torch.optim.AdamW(twin.parameters(), lr=1e-2, weight_decay=0.1, amsgrad=True)
    rule = rule_for(plain)
    assert rule.name == "adamw" and rule_for(own) is rule
    bases = match_bases(twin, sub, list(twin.parameters()), allow_partial=False)
    for s in range(3):
        _grads(model, s)
        _grads(twin, s)
        own.step()
        stats = rule_step(rule, plain.param_groups, plain.state, bases, mode=mode, scope=scope, aligned_scale=0.5)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(stats.removed_sq, own.last_stats.removed_sq, rtol=1e-5, atol=1e-12)
    for p, q in zip(model.parameters(), twin.parameters()):  # the same torch AdamW state
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            torch.testing.assert_close(own.state[p][key], plain.state[q][key], rtol=1e-6, atol=1e-9)
