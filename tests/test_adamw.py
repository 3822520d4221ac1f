"""Update-space projection: ogpsa.optim.ProjectedAdamW and attach(space="update").

Orthogonality is measured in float64 on the applied update: ||U_i d_i|| / ||d_i|| per tensor
(the basis' rows are orthonormal in float32, so this is the relative residual of projection).
"""

import copy

import pytest
import torch

import ogpsa
from ogpsa import reference
from ogpsa.optim import ProjectedAdamW, UpdateSpaceProjector

pytestmark = pytest.mark.usefixtures("paper_preset")  # these tests mean the paper recipe (preset="paper")

TOL = 1e-5


def make_model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(13, 37), torch.nn.Tanh(), torch.nn.Linear(37, 5))
    return model.to(dtype)


def make_subspace(model, k=3, seed=1, **cfg):
    gen = torch.Generator().manual_seed(seed)
    refs = [{n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()} for _ in range(k)]
    return ogpsa.Subspace.from_gradients(refs, ogpsa.OGPSAConfig(**cfg))


def batch(seed, n=8):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 13, generator=gen), torch.randn(n, 5, generator=gen)


def loss_of(model, x, y):
    out = model(x.to(next(model.parameters()).dtype))
    return (out.float() - y).square().mean()


def residual(sub, name, d):
    u = sub.basis(name).double()
    d = d.double().reshape(-1)
    return float((u @ d).norm() / d.norm().clamp_min(1e-300))


def train(model, opt, steps, *, accumulate=1, clip=None, seed0=100):
    for s in range(steps):
        opt.zero_grad(set_to_none=True)
        for a in range(accumulate):
            x, y = batch(seed0 + s * accumulate + a)
            (loss_of(model, x, y) / accumulate).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()


@pytest.mark.parametrize("case", ["plain", "wd_projected", "clip", "accumulate", "bf16", "amsgrad"])
def test_every_update_orthogonal(case):
    dtype = torch.bfloat16 if case == "bf16" else torch.float32
    model = make_model(dtype)
    sub = make_subspace(model)
    wd = 0.1 if case == "wd_projected" else 0.0
    opt = ProjectedAdamW(model, sub, lr=1e-2, weight_decay=wd, project_weight_decay=True, keep_updates=True,
                         amsgrad=case == "amsgrad")
    names = dict(model.named_parameters())
    for s in range(25):
        before = {n: p.detach().double().clone() for n, p in names.items()}
        train(model, opt, 1, accumulate=3 if case == "accumulate" else 1, clip=0.05 if case == "clip" else None,
              seed0=1000 + 7 * s)
        for n, p in names.items():
            d = opt.last_updates[p]
            assert d.norm() > 0
            assert residual(sub, n, d) <= TOL, (case, s, n)
            if dtype == torch.float32:  # the applied change of p itself (p rounding is isotropic noise)
                assert residual(sub, n, p.detach().double() - before[n]) <= 10 * TOL
    if case == "bf16":
        assert all(opt.state[p]["exp_avg"].dtype == torch.float32 for p in names.values())


def test_gradient_space_update_is_not_orthogonal():
    model = make_model()
    sub = make_subspace(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    ogpsa.attach(model, opt, sub, ogpsa.OGPSAConfig(space="gradient"))
    train(model, opt, 3)
    worst = 0.0
    for _ in range(3):
        before = {n: p.detach().double().clone() for n, p in model.named_parameters()}
        train(model, opt, 1, seed0=500)
        worst = max(worst, max(residual(sub, n, p.detach().double() - before[n]) for n, p in model.named_parameters()))
    assert worst > 1e-3  # Adam's per-element scaling leaks the projected gradient back into the subspace


def adamw64(params, grads, state, step, lr, b1, b2, eps, wd, bases, project_wd):
    """Independent float64 projected AdamW step (per tensor)."""
    out = []
    for i, (p, g) in enumerate(zip(params, grads)):
        m, v = state[i]
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        state[i] = (m, v)
        d = (m / (1 - b1 ** step)) / ((v / (1 - b2 ** step)).sqrt() + eps)
        d = d.reshape(-1)
        if project_wd:
            d = d + wd * p.reshape(-1)
        u = bases[i]
        if u.shape[0]:
            d = d - u.T @ torch.linalg.solve(u @ u.T, u @ d)
        q = p.reshape(-1) if project_wd else p.reshape(-1) * (1 - lr * wd)
        out.append((q - lr * d).reshape(p.shape))
    return out


@pytest.mark.parametrize("project_wd", [False, True])
@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_matches_reference_and_float64(project_wd, scope):
    torch.manual_seed(3)
    shapes = [(7, 11), (129,), (3, 5, 2)]
    params = [torch.randn(s) for s in shapes]
    gen = torch.Generator().manual_seed(4)
    ks = [2, 2, 2] if scope == "global" else [3, 1, 0]
    bases = []
    for p, k in zip(params, ks):
        q, _ = torch.linalg.qr(torch.randn(p.numel(), max(k, 1), generator=gen, dtype=torch.float64))
        bases.append(q.T[:k].float().contiguous())
    if scope == "global":  # one whole-model subspace: rows orthonormal over the concatenation
        cat = torch.cat([b.double() for b in bases], 1)
        q, _ = torch.linalg.qr(cat.T)
        cuts = torch.tensor([p.numel() for p in params]).cumsum(0).tolist()
        bases = [q.T[:, a:b].float().contiguous() for a, b in zip([0] + cuts[:-1], cuts)]
    names = [f"t{i}" for i in range(len(params))]
    model = torch.nn.Module()
    for n, p in zip(names, params):
        model.register_parameter(n, torch.nn.Parameter(p.clone()))
    sub = ogpsa.Subspace(names, shapes, bases, ogpsa.OGPSAConfig(scope=scope))
    opt = ProjectedAdamW(model, sub, lr=3e-2, weight_decay=0.2, project_weight_decay=project_wd, eps=1e-6)
    ref_p = [p.clone() for p in params]
    ref_m = [torch.zeros_like(p) for p in params]
    ref_v = [torch.zeros_like(p) for p in params]
    p64 = [p.double() for p in params]
    st64 = [(torch.zeros_like(p), torch.zeros_like(p)) for p in p64]
    b64 = [b.double() for b in bases]
    if scope == "global":
        b64 = [torch.cat(b64, 1)]
    for step in range(1, 6):
        grads = [torch.randn(s, generator=gen) for s in shapes]
        for n, g in zip(names, grads):
            getattr(model, n).grad = g.clone()
        opt.step()
        reference.projected_adamw_step_(ref_p, grads, ref_m, ref_v, [None] * 3, [step] * 3, bases, lr=3e-2,
                                        beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.2, scope=scope,
                                        project_weight_decay=project_wd)
        if scope == "tensor":
            p64 = adamw64(p64, [g.double() for g in grads], st64, step, 3e-2, 0.9, 0.999, 1e-6, 0.2, b64, project_wd)
        else:  # global: project the concatenated direction
            flat = [torch.cat([p.reshape(-1) for p in p64])]
            st = [(torch.cat([m.reshape(-1) for m, _ in st64]), torch.cat([v.reshape(-1) for _, v in st64]))]
            new = adamw64(flat, [torch.cat([g.double().reshape(-1) for g in grads])], st, step, 3e-2, 0.9, 0.999,
                          1e-6, 0.2, b64, project_wd)[0]
            cuts = torch.tensor([p.numel() for p in params]).cumsum(0).tolist()
            p64 = [new[a:b].reshape(s) for a, b, s in zip([0] + cuts[:-1], cuts, shapes)]
            st64 = [(st[0][0][a:b].reshape(s), st[0][1][a:b].reshape(s)) for a, b, s in zip([0] + cuts[:-1], cuts,
                                                                                              shapes)]
    for n, r, e in zip(names, ref_p, p64):
        got = getattr(model, n).detach().double()
        assert float((got - e).norm() / e.norm()) <= TOL
        assert float((r.double() - e).norm() / e.norm()) <= TOL


def test_empty_subspace_equals_torch_adamw_and_state_dict_compat():
    a, b = make_model(), make_model()
    ta = torch.optim.AdamW(a.parameters(), lr=1e-2, weight_decay=0.05)
    pb = ProjectedAdamW(b.parameters(), lr=1e-2, weight_decay=0.05)
    train(a, ta, 5)
    train(b, pb, 5)
    for p, q in zip(a.parameters(), b.parameters()):
        # |update| <= lr per element per step: rounding differences stay ~1e-5 of the 5 steps' travel
        assert float((p - q).abs().max()) <= 1e-5 * 5 * 1e-2
    sa, sb = ta.state_dict(), pb.state_dict()
    assert sa["param_groups"][0].keys() == sb["param_groups"][0].keys()
    assert all(sa["state"][i].keys() == sb["state"][i].keys() for i in sa["state"])
    assert all(sb["state"][i]["step"].dtype == sa["state"][i]["step"].dtype for i in sa["state"])
    # torch AdamW state -> ProjectedAdamW and back
    c = make_model()
    pc = ProjectedAdamW(c.parameters(), lr=1.0)
    pc.load_state_dict(sa)
    assert pc.param_groups[0]["lr"] == 1e-2
    torch.optim.AdamW(make_model().parameters()).load_state_dict(pc.state_dict())


def test_resume_bit_identical():
    model = make_model()
    sub = make_subspace(model)
    opt = ProjectedAdamW(model, sub, lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2, gamma=0.5)
    for s in range(4):
        train(model, opt, 1, seed0=10 + s)
        sched.step()
    ckpt = copy.deepcopy((model.state_dict(), opt.state_dict(), sched.state_dict()))
    for s in range(4, 8):
        train(model, opt, 1, seed0=10 + s)
        sched.step()
    model2 = make_model(seed=9)
    model2.load_state_dict(ckpt[0])
    opt2 = ProjectedAdamW(model2, sub, lr=5.0, weight_decay=0.1)
    opt2.load_state_dict(ckpt[1])
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, 2, gamma=0.5)
    sched2.load_state_dict(ckpt[2])
    for s in range(4, 8):
        train(model2, opt2, 1, seed0=10 + s)
        sched2.step()
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    for i in s1:
        for key in s1[i]:
            assert torch.equal(s1[i][key], s2[i][key])


def test_bf16_state_load_keeps_fp32_moments():
    model = make_model(torch.bfloat16)
    opt = ProjectedAdamW(model, make_subspace(model), lr=1e-2)
    train(model, opt, 2)
    sd = copy.deepcopy(opt.state_dict())
    opt2 = ProjectedAdamW(model, make_subspace(model), lr=1e-2)
    opt2.load_state_dict(sd)
    for i, p in enumerate(model.parameters()):
        assert opt2.state[p]["exp_avg"].dtype == torch.float32
        assert torch.equal(opt2.state[p]["exp_avg"], sd["state"][i]["exp_avg"])


def test_attach_update_space_on_torch_adamw_with_scheduler_and_scaler():
    model = make_model()
    sub = make_subspace(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4)
    proj = ogpsa.attach(model, opt, sub, ogpsa.OGPSAConfig(space="update"))
    assert isinstance(proj, UpdateSpaceProjector)
    keys_before = None
    for s in range(6):
        before = {n: p.detach().double().clone() for n, p in model.named_parameters()}
        opt.zero_grad(set_to_none=True)
        x, y = batch(50 + s)
        scaler.scale(loss_of(model, x, y)).backward()
        scaler.unscale_(opt)
        proj.clip_grad_norm_(1.0)
        scaler.step(opt)
        scaler.update()
        sched.step()
        for n, p in model.named_parameters():
            delta = p.detach().double() - before[n]
            assert delta.norm() > 0 and residual(sub, n, delta) <= 10 * TOL
            assert p.grad is not None  # gradients are given back after the step
        keys_before = keys_before or {k for st in opt.state.values() for k in st}
    assert type(opt) is torch.optim.AdamW and keys_before == {"step", "exp_avg", "exp_avg_sq"}
    assert proj.num_projections == 6 and proj.last_stats is not None
    proj.remove()
    before = [p.detach().clone() for p in model.parameters()]
    train(model, opt, 1)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_attach_update_space_errors():
    model = make_model()
    sub = make_subspace(model)
    cfg = ogpsa.OGPSAConfig(space="update")
    with pytest.raises(ValueError, match="no rule for Adagrad"):  # SGD has a rule (tests/test_update_rules.py)
        ogpsa.attach(model, torch.optim.Adagrad(model.parameters(), lr=0.1), sub, cfg)
    with pytest.raises(ValueError, match="needs the optimizer"):
        ogpsa.attach(model, None, sub, cfg)
    with pytest.raises(ValueError, match="space"):
        ogpsa.OGPSAConfig(space="weights")
    with pytest.raises(ValueError, match="fused"):
        ProjectedAdamW(model.parameters(), fused=True)
    with pytest.raises(ValueError, match="model="):
        ProjectedAdamW(model.parameters(), sub)
