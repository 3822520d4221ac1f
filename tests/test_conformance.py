"""One contract for both spaces and every backend available here (torch; the compiled CPU op;
Triton under TRITON_INTERPRET=1): each case that once gave a silent wrong result now gives the
right numbers or a named error. Parametrised over backends x spaces."""

from __future__ import annotations

import copy
import gc

import pytest
import torch

import ogpsa
from ogpsa import OGPSAConfig, Subspace, SubspaceMismatchError
from ogpsa.interface import ProjectorLike
from ogpsa.optim import ProjectedAdamW
from ogpsa.optim import backends as adamw_backends


def _available() -> list[str]:
    out = ["torch"]
    if ogpsa.backends()["cpu"][0] and adamw_backends.cpu_kernel_available():
        out.append("cpu")
    ok, why = adamw_backends.triton_status()
    if ok and "interpreter" in why:
        out.append("triton")
    return out


BACKENDS = _available()
SPACES = ("gradient", "update")


def _model(seed: int, dtype=torch.float32) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(9, 7), torch.nn.Tanh(), torch.nn.Linear(7, 5)).to(dtype)


def _subspace(model, k=2, seed=1, config=None) -> Subspace:
    gen = torch.Generator().manual_seed(seed)
    refs = [{n: torch.randn(p.shape, generator=gen, dtype=torch.float32) for n, p in model.named_parameters()}
            for _ in range(k)]
    return Subspace.from_gradients(refs, config or OGPSAConfig())


def _grads(model, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)


def _attach(model, opt, sub, space, backend, **cfg):
    return ogpsa.attach(model, opt, sub, OGPSAConfig(space=space, backend=backend, **cfg))


@pytest.fixture(autouse=True)
def _no_env_backend(monkeypatch):
    monkeypatch.delenv("OGPSA_BACKEND", raising=False)


# -- never shadow the user's optimizer (update space) --------------------------------------------


def _train(model, opt, steps, seed0):
    for s in range(steps):
        _grads(model, seed0 + s)
        opt.step()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("order", ["load_after_attach", "load_before_attach"])
def test_resume_by_load_state_dict_equals_the_uninterrupted_run(backend, order):
    """The usual resume order (attach, then optimizer.load_state_dict) and the other one give
    exactly the uninterrupted run; the optimizer's own state keeps advancing."""
    model = _model(0)
    sub = _subspace(model)
    ref = copy.deepcopy(model)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    _attach(ref, opt_ref, sub, "update", backend)
    _train(ref, opt_ref, 3, 100)
    saved_model, saved_opt = copy.deepcopy(ref.state_dict()), copy.deepcopy(opt_ref.state_dict())
    _train(ref, opt_ref, 3, 200)

    resumed = _model(0)
    resumed.load_state_dict(saved_model)
    opt = torch.optim.AdamW(resumed.parameters(), lr=1e-2)
    if order == "load_before_attach":
        opt.load_state_dict(saved_opt)
        _attach(resumed, opt, sub, "update", backend)
    else:
        _attach(resumed, opt, sub, "update", backend)
        opt.load_state_dict(saved_opt)
    _train(resumed, opt, 3, 200)
    for a, b in zip(ref.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    for p in resumed.parameters():
        assert float(opt.state[p]["step"]) == 6.0  # the optimizer's state itself advanced
    after = opt.state_dict()
    for pid, st in opt_ref.state_dict()["state"].items():
        assert torch.equal(st["exp_avg"], after["state"][pid]["exp_avg"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_lr_scheduler_acts_on_the_projected_step(backend):
    """A scheduler changes param_groups' lr; the projected step reads it live (as ProjectedAdamW)."""
    model = _model(2)
    sub = _subspace(model)
    twin = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _attach(model, opt, sub, "update", backend)
    own = ProjectedAdamW(twin, sub, lr=1e-2, config=OGPSAConfig(space="update", backend=backend))
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 0.5 ** s) for o in (opt, own)]
    for s in range(4):
        _grads(model, s)
        _grads(twin, s)
        opt.step()
        own.step()
        for sc in scheds:
            sc.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5 ** 4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["attach", "ProjectedAdamW"])
def test_add_param_group_gets_its_bases(backend, how):
    """Parameters added after attach are projected with their bases (|U dp| / |dp| ~ 0); a
    parameter without a basis is a SubspaceMismatchError at the next step."""
    model = _model(3)
    sub = _subspace(model)
    first, second = list(model[0].parameters()), list(model[2].parameters())
    if how == "attach":
        opt = torch.optim.AdamW(first, lr=1e-2, weight_decay=0.0)
        _attach(model, opt, sub, "update", backend, allow_partial=True)
    else:
        opt = ProjectedAdamW(first, sub, lr=1e-2, weight_decay=0.0, model=model,
                             config=OGPSAConfig(space="update", backend=backend, allow_partial=True))
    opt.add_param_group({"params": second})
    before = [p.detach().clone() for p in second]
    _grads(model, 5)
    opt.step()
    for (n, p), b in zip(model[2].named_parameters(prefix="2"), before):
        dp = (p.detach() - b).double().reshape(-1)
        u = torch.linalg.qr(sub.basis(n).double().T)[0].T
        assert float(dp.norm()) > 0
        assert float((u @ dp).norm() / dp.norm()) <= 1e-5, n
    stray = torch.nn.Parameter(torch.randn(4))
    opt.add_param_group({"params": [stray]})
    _grads(model, 6)
    stray.grad = torch.randn(4)
    if how == "attach":  # allow_partial: stepped unprojected, by design
        opt.step()
    model2 = _model(3)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    _attach(model2, opt2, sub, "update", backend)
    opt2.add_param_group({"params": [torch.nn.Parameter(torch.randn(3))]})
    _grads(model2, 7)
    opt2.param_groups[-1]["params"][0].grad = torch.randn(3)
    with pytest.raises(SubspaceMismatchError, match="not a parameter of the model"):
        opt2.step()


def test_state_dict_round_trips_with_torch_adamw():
    model = _model(4)
    sub = _subspace(model)
    opt = ProjectedAdamW(model, sub, lr=1e-2)
    _train(model, opt, 2, 10)
    plain = torch.optim.AdamW(model.parameters(), lr=1e-2)
    plain.load_state_dict(opt.state_dict())
    back = ProjectedAdamW(model, sub, lr=1e-2)
    back.load_state_dict(plain.state_dict())
    for p in model.parameters():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(back.state[p][key], opt.state[p][key])


# -- same contract in both spaces ----------------------------------------------------------------


@pytest.mark.parametrize("space", SPACES)
def test_subspace_that_matches_nothing_or_misses_parameters_raises(space):
    model = _model(5)
    sub = _subspace(model)
    wrapped = Subspace([f"module.{n}" for n in sub.names], sub.shapes, [sub.basis(n) for n in sub.names])
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(SubspaceMismatchError, match="module.0.weight"):
        ogpsa.attach(model, opt, wrapped, OGPSAConfig(space=space))
    keep = [n for n in sub.names if n != "2.bias"]
    partial = Subspace(keep, [sub.shapes[sub.names.index(n)] for n in keep], [sub.basis(n) for n in keep])
    with pytest.raises(SubspaceMismatchError, match="(?s)'2.bias'.*allow_partial"):
        ogpsa.attach(model, opt, partial, OGPSAConfig(space=space))
    ogpsa.attach(model, opt, partial, OGPSAConfig(space=space, allow_partial=True)).remove()
    if space == "update":
        with pytest.raises(SubspaceMismatchError):
            ProjectedAdamW(model, wrapped)


@pytest.mark.parametrize("first", SPACES)
@pytest.mark.parametrize("second", SPACES)
def test_one_projector_per_optimizer_across_spaces(first, second):
    model = _model(6)
    sub = _subspace(model)
    opt = torch.optim.AdamW(model.parameters())
    proj = ogpsa.attach(model, opt, sub, OGPSAConfig(space=first))
    with pytest.raises(RuntimeError, match=f"already has an OGPSA projector.*space='{first}'"):
        ogpsa.attach(model, opt, _subspace(model, seed=9), OGPSAConfig(space=second))
    proj.remove()
    ogpsa.attach(model, opt, sub, OGPSAConfig(space=second))
    own = ProjectedAdamW(model, sub)
    with pytest.raises(RuntimeError, match="already projects its update"):
        ogpsa.attach(model, own, sub, OGPSAConfig(space="gradient"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_norm_in_update_space_is_clip_grad_norm_then_adamw(backend):
    model = _model(7)
    sub = _subspace(model)
    twin = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _attach(model, opt, sub, "update", backend, max_norm=1e-3)
    opt2 = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    _attach(twin, opt2, sub, "update", backend)
    for s in range(3):
        _grads(model, 30 + s)
        _grads(twin, 30 + s)
        torch.nn.utils.clip_grad_norm_(twin.parameters(), 1e-3)
        opt.step()
        opt2.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    for p in model.parameters():
        assert float(opt.state[p]["exp_avg"].norm()) < 1e-3  # the moments saw the clipped gradient


def _near_dependent_subspace(model, exact: bool) -> Subspace:
    gen = torch.Generator().manual_seed(21)
    names, shapes, bases = [], [], []
    for n, p in model.named_parameters():
        a = torch.randn(p.numel(), generator=gen)
        b = a + (0 if exact else 1e-7) * torch.randn(p.numel(), generator=gen)
        c = torch.randn(p.numel(), generator=gen)
        u = torch.stack([a, b, c]) / a.norm()
        names.append(n)
        shapes.append(tuple(p.shape))
        bases.append(u.contiguous())
    return Subspace(names, shapes, bases)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("space", SPACES)
@pytest.mark.parametrize("exact", [False, True])
def test_dependent_basis_rows_project_onto_their_span(backend, space, exact):
    """Nearly (or exactly) dependent rows: the applied step projects onto the span (never
    longer than the unprojected one), no LinAlgError."""
    model = _model(8)
    sub = _near_dependent_subspace(model, exact)
    twin = copy.deepcopy(model)
    opt = (torch.optim.SGD if space == "gradient" else torch.optim.AdamW)(model.parameters(), lr=1e-2)
    plain = (torch.optim.SGD if space == "gradient" else torch.optim.AdamW)(twin.parameters(), lr=1e-2)
    if space == "update":
        opt.param_groups[0]["weight_decay"] = plain.param_groups[0]["weight_decay"] = 0.0
    _attach(model, opt, sub, space, backend)
    before = [p.detach().clone() for p in model.parameters()]
    _grads(model, 40)
    _grads(twin, 40)
    opt.step()
    plain.step()
    for (n, p), b, q in zip(model.named_parameters(), before, twin.parameters()):
        dp = (p.detach() - b).double().reshape(-1)
        dq = (q.detach() - b).double().reshape(-1)
        assert float(dp.norm()) <= float(dq.norm()) * (1 + 1e-5), n
        span = torch.linalg.qr(sub.basis(n).double()[[0, 2]].T)[0]  # the rows' span (b ~ a)
        expect = dq - span @ (span.T @ dq)
        assert float((dp - expect).norm() / dq.norm()) <= 1e-4, n


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_parameters_are_stepped_in_float64(backend):
    torch.manual_seed(0)
    model = _model(9, torch.float64)
    sub = _subspace(model)
    opt = ProjectedAdamW(model, sub, lr=1e-2, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8,
                         config=OGPSAConfig(space="update", backend=backend))
    p0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    _grads(model, 50)
    g = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    for n, p in model.named_parameters():
        d = (0.1 * g[n] / 0.1) / ((0.001 * g[n] ** 2 / 0.001).sqrt() + 1e-8)  # step 1: m_hat = g, v_hat = g^2
        u = sub.basis(n).double()
        d = d.reshape(-1)
        d = d - u.T @ torch.linalg.solve(u @ u.T, u @ d)
        expect = p0[n].reshape(-1) - 1e-2 * d
        assert p.dtype == torch.float64
        assert float((p.detach().reshape(-1) - expect).norm() / (1e-2 * d.norm())) <= 1e-10, n


@pytest.mark.parametrize("space", SPACES)
def test_is_paused_is_a_property_and_every_projector_has_the_interface(space):
    model = _model(10)
    proj = ogpsa.attach(model, torch.optim.AdamW(model.parameters()), _subspace(model), OGPSAConfig(space=space))
    assert isinstance(proj, ProjectorLike)
    assert proj.is_paused is False
    with proj.paused():
        assert proj.is_paused is True
    proj.pause()
    state = proj.state_dict()
    proj.resume()
    assert not proj.is_paused
    proj.load_state_dict(state)
    assert proj.is_paused
    proj.resume()


def test_one_backend_rule_for_both_spaces(monkeypatch):
    """OGPSA_BACKEND wins over config.backend in BOTH spaces (ogpsa.ops.requested_backend)."""
    if "cpu" not in BACKENDS:
        pytest.skip("the compiled CPU op is not built")
    monkeypatch.setenv("OGPSA_BACKEND", "torch")
    for space in SPACES:
        model = _model(11)
        opt = torch.optim.AdamW(model.parameters())
        proj = ogpsa.attach(model, opt, _subspace(model), OGPSAConfig(space=space, backend="cpu"))
        _grads(model, 60)
        opt.step()
        assert proj.last_stats.backends == ("torch",), space


@pytest.mark.parametrize("backend", BACKENDS)
def test_caches_hold_nothing_of_freed_bases(backend):
    model = _model(12)
    opt = torch.optim.AdamW(model.parameters())
    proj = _attach(model, opt, _subspace(model), "update", backend)
    sizes = []
    for r in range(6):
        proj.set_subspace(_subspace(model, seed=100 + r))
        _grads(model, r)
        opt.step()
        gc.collect()
        sizes.append(len(adamw_backends._CACHE) + len(adamw_backends._GRAMS))
    assert sizes[-1] <= sizes[1], sizes


# -- gradient-space leftovers --------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_optimizer_parameters_outside_the_model_are_counted_and_clipped(backend):
    model = _model(13)
    extra = torch.nn.Parameter(torch.zeros(5))
    opt = torch.optim.SGD(list(model.parameters()) + [extra], lr=0.1)
    proj = _attach(model, opt, _subspace(model), "gradient", backend, allow_partial=True)
    _grads(model, 70)
    extra.grad = torch.full((5,), 10.0)
    raw = extra.grad.clone()
    total = proj.clip_grad_norm_(1.0)
    assert float(total) >= float(raw.norm())  # 22.36: the extra parameter counts
    coef = float(proj.last_stats.clip_coef)
    torch.testing.assert_close(extra.grad, raw * coef)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unclipped_statistics_are_exact_under_cancellation(backend):
    """|g_perp| / |g| = 1e-4: the reported ||g'||^2 is the float64 squared norm of the gradient
    the projection wrote (the fused algebra alone cancels down to float32 rounding: 1-5 % off)."""
    torch.manual_seed(14)
    n = 4099
    u = torch.linalg.qr(torch.randn(n, 3, dtype=torch.float64))[0].T.contiguous()
    perp = torch.randn(n, dtype=torch.float64)
    perp -= u.T @ (u @ perp)
    g64 = u.T @ torch.randn(3, dtype=torch.float64) * 1e4 / 3 ** 0.5 + perp / perp.norm()
    g = g64.float()
    stats = ogpsa.project_([g], [u.float()], backend=backend)
    written = float(g.double().dot(g.double()))
    assert 0.5 < written < 2.0  # the projection did leave the small orthogonal part
    assert float(stats.sq_after[0]) == pytest.approx(written, rel=1e-6)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the compiled CPU op is not built")
@pytest.mark.parametrize("mode", ["conflict", "plane", "threshold"])
@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_compiled_pass_ops_run_every_mode_and_scope(mode, scope):
    """The CPU op's pass1_/pass2_ around the shared tiny step (ogpsa.modes) take every rule and
    scope the fused op does not; they agree with the torch path."""
    from adamw_problem import run, setup_problem

    model, sub = setup_problem(torch.float32)
    if scope == "global":
        gen = torch.Generator().manual_seed(3)
        refs = [{n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters() if n != "t2"}
                for _ in range(2)]
        sub = Subspace.from_gradients(refs, OGPSAConfig(scope="global", allow_partial=True))
    cfg = OGPSAConfig(mode=mode, scope=scope, aligned_scale=0.5, allow_partial=True)
    sub = Subspace(sub.names, sub.shapes, [sub.basis(n) for n in sub.names], cfg)
    p0 = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    oa, ob = run(a, sub, "torch", steps=3), run(b, sub, "cpu", steps=3)
    assert oa.last_stats.backends == ("torch",) and ob.last_stats.backends == ("cpu",)
    for (n, x), y in zip(a.named_parameters(), b.parameters()):
        dx, dy = x.detach().double() - p0[n], y.detach().double() - p0[n]
        assert float((dx - dy).norm() / dx.norm()) <= 1e-5, n
    torch.testing.assert_close(oa.last_stats.removed_sq, ob.last_stats.removed_sq, rtol=1e-4, atol=1e-9)


def test_every_projector_class_implements_the_interface():
    """Gradient, update, rule, FSDP2 and both ZeRO projectors: the methods of ProjectorLike, and
    is_paused a property (``if proj.is_paused:`` reads it; a bound method would always be true)."""
    from ogpsa.distributed import ShardedProjector, ZeroProjector
    from ogpsa.optim import RuleUpdateProjector, UpdateSpaceProjector
    from ogpsa.optim.distributed import ZeroUpdateProjector

    methods = ("pause", "resume", "paused", "set_subspace", "project", "clip_grad_norm_", "remove", "state_dict",
               "load_state_dict")
    for cls in (ogpsa.Projector, ShardedProjector, ZeroProjector, UpdateSpaceProjector, ZeroUpdateProjector,
                RuleUpdateProjector):
        assert isinstance(getattr(cls, "is_paused", None), property), cls.__name__
        assert isinstance(getattr(cls, "attached", None), property), cls.__name__
        for name in methods:
            assert callable(getattr(cls, name, None)), (cls.__name__, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["plane", "threshold", "conflict"])
def test_clipped_tensor_without_basis_is_only_clipped_in_every_mode(backend, mode):
    """A tensor without basis rows (allow_partial) joins the plan only to be clipped: no mode rule
    changes it (plane once zeroed it: kappa 0 for the whole group)."""
    model = _model(15)
    full = _subspace(model, k=1)
    keep = [n for n in full.names if n != "2.bias"]
    sub = Subspace(keep, [full.shapes[full.names.index(n)] for n in keep], [full.basis(n) for n in keep])
    proj = _attach(model, None, sub, "gradient", backend, mode=mode, aligned_scale=0.5, allow_partial=True)
    _grads(model, 80)
    raw = model[2].bias.grad.clone()
    proj.clip_grad_norm_(1e-2)
    coef = float(proj.last_stats.clip_coef)
    assert 0 < coef < 1
    torch.testing.assert_close(model[2].bias.grad, raw * coef, rtol=1e-6, atol=1e-9)
