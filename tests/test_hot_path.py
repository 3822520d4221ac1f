"""The projector in real training loops (issue 12): plans keyed by parameters, nothing
retained, per-step state that cannot go stale, parameters followed by name."""

from __future__ import annotations

import weakref

import pytest
import torch

import ogpsa
from ogpsa import OGPSAConfig, ProjectionInputError, Subspace

pytestmark = pytest.mark.usefixtures("paper_preset")  # these tests mean the paper recipe (preset="paper")


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(9, 17), torch.nn.Tanh(), torch.nn.Linear(17, 5))


def _batch(seed, n=4):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 9, generator=gen), torch.randn(n, 5, generator=gen)


def _backward(model, seed):
    x, y = _batch(seed)
    torch.nn.functional.mse_loss(model(x), y).backward()


def _subspace(model, config=None, m=2):
    refs = []
    for i in range(m):
        model.zero_grad(set_to_none=True)
        _backward(model, 1000 + i)
        refs.append({n: p.grad.clone() for n, p in model.named_parameters()})
    model.zero_grad(set_to_none=True)
    return Subspace.from_gradients(refs, config)


def _in_subspace(sub, model, vectors) -> float:
    """max over tensors of ||U v|| / ||v|| (float64)."""
    worst = 0.0
    for name, v in vectors.items():
        u = sub.basis(name).double()
        v64 = v.double().reshape(-1)
        if float(v64.norm()) > 0:
            worst = max(worst, float((u @ v64).norm() / v64.norm()))
    return worst


def test_one_plan_build_in_a_zero_grad_loop_and_no_gradient_survives_its_step():
    model = _model()
    sub = _subspace(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    proj = ogpsa.attach(model, opt, sub)
    previous = []
    for step in range(10):
        opt.zero_grad()  # set_to_none=True: new gradient tensors every step
        _backward(model, step)
        current = [weakref.ref(p.grad) for p in model.parameters()]
        opt.step()
        # gradients of the previous step: dropped by zero_grad, and nothing of ours holds them
        assert previous == [] or all(r() is None for r in previous), f"step {step}: an old gradient is alive"
        previous = current
    assert proj.num_projections == 10
    assert proj.num_plan_builds == 1


def _snapshot_step(model, opt):
    """Parameters' change over one optimizer.step()."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    return {n: p.detach() - before[n] for n, p in model.named_parameters()}


@pytest.mark.parametrize("first", ["project", "clip", "exception"])
def test_projection_without_step_never_leaves_the_next_step_unprojected(first):
    model = _model(1)
    sub = _subspace(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    proj = ogpsa.attach(model, opt, sub)
    _backward(model, 5)  # e.g. a validation batch, or a GradScaler step that is skipped
    if first == "project":
        proj.project()
    elif first == "clip":
        proj.clip_grad_norm_(1e-3)
    else:
        with pytest.raises(RuntimeError, match="boom"):
            proj.project()
            raise RuntimeError("boom")
    opt.zero_grad()
    _backward(model, 6)
    delta = _snapshot_step(model, opt)
    assert _in_subspace(sub, model, delta) < 1e-5
    assert proj.num_projections == 2


def test_a_step_is_never_projected_twice():
    """conflict mode with aligned_scale=0.5 is not idempotent: projecting twice would show."""
    config = OGPSAConfig(mode="conflict", aligned_scale=0.5)
    model, twin = _model(2), _model(2)
    sub = _subspace(model, config)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    proj = ogpsa.attach(model, opt, sub)
    _backward(model, 7)
    _backward(twin, 7)
    proj.project()
    seen = {}
    opt.register_step_pre_hook(lambda *a: seen.update({n: p.grad.clone() for n, p in model.named_parameters()}))
    opt.step()
    assert proj.num_projections == 1
    grads = [p.grad for p in twin.parameters()]
    ogpsa.project_(grads, [sub.basis(n) for n, _ in twin.named_parameters()], mode="conflict", aligned_scale=0.5)
    for (n, _), g in zip(twin.named_parameters(), grads):
        torch.testing.assert_close(seen[n], g, rtol=1e-6, atol=1e-9)
    # clip after project: clipped only, not projected again
    proj.clip_grad_norm_(1e-4)
    assert proj.num_projections == 1
    # a gradient written after the projection (set_to_none=False + backward) is projected again
    opt.zero_grad(set_to_none=False)
    _backward(model, 8)
    opt.step()
    assert proj.num_projections == 2


@pytest.mark.parametrize("how", ["load_state_dict_assign", "to_empty_overwrite"])
def test_parameters_replaced_after_attach_are_followed_by_name(how):
    model = _model(3)
    sub = _subspace(model)
    proj = ogpsa.attach(model, None, sub)
    state = {n: p.detach().clone() * 1.5 for n, p in model.named_parameters()}
    old = [id(p) for p in model.parameters()]
    if how == "load_state_dict_assign":
        model.load_state_dict(state, assign=True)  # new Parameter objects
    else:
        overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
        torch.__future__.set_overwrite_module_params_on_conversion(True)
        try:
            model.to_empty(device="cpu")  # new Parameter objects with uninitialised data
        finally:
            torch.__future__.set_overwrite_module_params_on_conversion(overwrite)
        model.load_state_dict(state)
    assert all(id(p) not in old for p in model.parameters())
    _backward(model, 9)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    proj.project()
    assert proj.num_projections == 1
    projected = {n: p.grad for n, p in model.named_parameters()}
    assert _in_subspace(sub, model, projected) < 1e-5
    assert _in_subspace(sub, model, grads) > 1e-2  # it really was projected


def test_grad_scaler_skipped_step_then_projected_step():
    """AMP loop: unscale_ -> clip_grad_norm_ -> scaler.step. An inf step is skipped by the
    scaler after OGPSA has projected; the next (finite) step is projected again."""
    model = _model(12)
    sub = _subspace(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    proj = ogpsa.attach(model, opt, sub)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for step, poison in enumerate([True, False]):
        opt.zero_grad()
        x, y = _batch(20 + step)
        scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
        if poison:
            model[0].weight.grad[0, 0] = float("inf")
        scaler.unscale_(opt)
        proj.clip_grad_norm_(1.0)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        scaler.step(opt)
        scaler.update()
        delta = {n: p.detach() - before[n] for n, p in model.named_parameters()}
        if poison:
            assert all(float(d.abs().max()) == 0 for d in delta.values())  # skipped by the scaler
        else:
            assert max(float(d.abs().max()) for d in delta.values()) > 0
            assert _in_subspace(sub, model, delta) < 1e-5
    assert proj.num_projections == 2


def test_single_pass_count_in_statistics():
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(40, generator=gen), torch.randn(3, 11, generator=gen)]
    bases = [torch.linalg.qr(torch.randn(n, 2, generator=gen))[0].T.contiguous() for n in (40, 33)]
    assert ogpsa.project_(grads, bases, backend="torch").single_pass == 0  # no single-pass kernel
    if ogpsa.backends()["cpu"][0]:
        assert ogpsa.project_(grads, bases, backend="cpu").single_pass == 2
        assert ogpsa.project_(grads, bases, backend="cpu", max_norm=1.0).single_pass == 0  # clipping: two passes


def test_removed_or_reshaped_parameter_is_a_clear_error():
    model = _model(4)
    sub = _subspace(model)
    proj = ogpsa.attach(model, None, sub)
    model[2].weight = torch.nn.Parameter(torch.randn(5, 16))
    with pytest.raises(ogpsa.SubspaceMismatchError, match=r"'2.weight'.*shape"):
        proj.project()
    del model[2].weight
    model[2].register_parameter("weight", None)
    with pytest.raises(ogpsa.SubspaceMismatchError, match=r"'2.weight'.*no longer a parameter"):
        proj.project()


def test_parameters_added_after_attach_count_in_clipping():
    model = _model(5)
    sub = _subspace(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    proj = ogpsa.attach(model, opt, sub, OGPSAConfig(allow_partial=True))  # the added layer has no basis
    extra = torch.nn.Linear(5, 3)
    model.append(extra)
    opt.add_param_group({"params": extra.parameters()})
    x, y = _batch(10)
    torch.nn.functional.mse_loss(model(x), y[:, :3]).backward()
    raw = extra.weight.grad.clone()
    proj.clip_grad_norm_(1e-3)
    names = proj.last_stats.names
    assert "3.weight" in names and "3.bias" in names
    coef = float(proj.last_stats.clip_coef)
    assert coef < 1
    torch.testing.assert_close(extra.weight.grad, raw * coef, rtol=1e-6, atol=1e-12)


def test_second_projector_on_one_optimizer_is_an_error():
    model = _model(6)
    sub = _subspace(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    proj = ogpsa.attach(model, opt, sub)
    with pytest.raises(RuntimeError, match="already has an OGPSA projector"):
        ogpsa.attach(model, opt, sub)
    proj.remove()
    ogpsa.attach(model, opt, sub)  # after remove() a new one may attach


def test_basis_problems_are_rejected_at_attach():
    model = _model(7)
    sub = _subspace(model)
    gen = torch.Generator().manual_seed(0)
    big = Subspace(["0.weight"], [(17, 9)], [torch.linalg.qr(torch.randn(153, 17, generator=gen))[0].T.contiguous()])
    with pytest.raises(ProjectionInputError, match=r"'0.weight'.*k=17 exceeds the maximum 16"):
        ogpsa.attach(model, None, big)
    sub.bases[1][0, 3] = float("nan")  # corrupted after construction
    with pytest.raises(ProjectionInputError, match=r"'0.bias'.*NaN or Inf"):
        ogpsa.attach(model, None, sub)


def test_meta_device_model_is_a_clear_error():
    model = _model(8)
    sub = _subspace(model)
    meta = model.to("meta")
    with pytest.raises(ValueError, match="meta device"):
        ogpsa.attach(meta, None, sub)


def test_zero_element_and_sparse_gradients():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(11, 3, sparse=True)
    lin = torch.nn.Linear(3, 4)
    empty = torch.nn.Parameter(torch.zeros(0, 3))
    model = torch.nn.ModuleDict({"emb": emb, "lin": lin})
    model.register_parameter("empty", empty)
    twin_emb = torch.nn.Embedding(11, 3, sparse=True)
    twin_emb.load_state_dict(emb.state_dict())
    sub = Subspace.from_gradients([{n: torch.randn_like(p) for n, p in lin.named_parameters(prefix="lin")}])
    proj = ogpsa.attach(model, None, sub, OGPSAConfig(allow_partial=True))  # "emb" has no basis

    def run(e):
        out = lin(e(torch.tensor([1, 4, 4])))
        (out.sum() + (empty.sum() if e is emb else 0)).backward()

    run(emb)
    run(twin_emb)
    empty.grad = torch.zeros(0, 3)
    total = proj.clip_grad_norm_(1e-2)  # the sparse gradient without a basis is clipped as torch does
    assert proj.last_stats.names == ["lin.weight", "lin.bias"]  # zero-element "empty" skipped
    ref = twin_emb.weight.grad.coalesce()
    coef = float(proj.last_stats.clip_coef)
    assert coef < 1
    torch.testing.assert_close(emb.weight.grad.coalesce().values(), ref.values() * coef, rtol=1e-6, atol=0)
    sq = float(proj.last_stats.sq_after.sum()) + float(ref.values().double().pow(2).sum())
    assert float(total) == pytest.approx(sq ** 0.5, rel=1e-6)
    # with a basis, a sparse gradient is a named error
    sub2 = Subspace.from_gradients([{"emb.weight": torch.randn(11, 3)}])
    proj.remove()
    proj2 = ogpsa.attach(model, None, sub2, OGPSAConfig(allow_partial=True))
    before = emb.weight.grad.coalesce().values().clone()
    with pytest.raises(ProjectionInputError, match=r"'emb.weight' has a sparse gradient"):
        proj2.project()
    assert torch.equal(emb.weight.grad.coalesce().values(), before)


def test_error_if_nonfinite_raises_before_any_gradient_changes():
    model = _model(9)
    sub = _subspace(model)
    proj = ogpsa.attach(model, None, sub)
    _backward(model, 11)
    model[0].bias.grad[2] = float("inf")
    before = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="non-finite"):
        proj.clip_grad_norm_(1.0, error_if_nonfinite=True)
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.grad, b)


class _AllocSpy:
    """Largest new storage any aten op allocates inside the block (views excluded)."""

    def __enter__(self):
        from torch.utils import _pytree as pytree
        from torch.utils._python_dispatch import TorchDispatchMode

        spy = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                seen = {a.untyped_storage().data_ptr() for a in pytree.tree_leaves((args, kwargs))
                        if isinstance(a, torch.Tensor) and not a.is_sparse}
                for o in pytree.tree_leaves(out):
                    if isinstance(o, torch.Tensor) and not o.is_sparse and o.untyped_storage().data_ptr() not in seen:
                        spy.largest = max(spy.largest, o.untyped_storage().nbytes())
                return out

        self.largest = 0
        self.mode = Mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


@pytest.mark.parametrize("basis_dtype", ["float32", "bfloat16"])
def test_building_a_plan_allocates_no_basis_sized_temporaries(basis_dtype):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(700, 900), torch.nn.Linear(900, 3))
    refs = [{n: torch.randn_like(p) for n, p in model.named_parameters()} for _ in range(4)]
    sub = Subspace.from_gradients(refs, OGPSAConfig(basis_dtype=basis_dtype))
    basis_bytes = sub.memory_bytes()
    with _AllocSpy() as at_attach:
        proj = ogpsa.attach(model, None, sub)
    torch.nn.functional.mse_loss(model(torch.randn(2, 700)), torch.randn(2, 3)).backward()
    grads, index, _ = proj._gather(True)
    with _AllocSpy() as at_plan:
        proj._plan(grads, index, True)
    assert proj.num_plan_builds == 1
    largest_tensor_basis = 4 * 900 * 700 * (2 if basis_dtype == "bfloat16" else 4)
    assert basis_bytes > largest_tensor_basis
    # float64 Gram accumulation works on [k, 32768] column blocks: 1 MiB at k=4, never a basis copy
    assert at_attach.largest <= 4 * 32768 * 8 < largest_tensor_basis / 2
    assert at_plan.largest < 4096


def test_piece_projection_builds_its_plan_once_for_fresh_pieces():
    """The sharded/ZeRO path shares the basis-side plan: fresh local pieces every step, one
    build; a piece shorter than k goes through its zero-padded stand-in."""
    from oracle import float64_project, random_basis

    from ogpsa.distributed.pieces import PieceProjection

    gen = torch.Generator().manual_seed(21)
    bases = [random_basis(50, 3, gen).contiguous(), torch.empty(0, 2), random_basis(31, 2, gen).contiguous()]
    # k=3 rows over a 2-element piece (a rank's sliver of a parameter): padded to 3 columns
    short = torch.linalg.qr(torch.randn(5, 3, generator=gen, dtype=torch.float64))[0].T[:, :2].float().contiguous()
    bases.append(short)
    grams = [None, None, None, (short.double() @ short.double().T).float()]
    runner = PieceProjection(["a", "b", "c", "d"], bases, grams, OGPSAConfig(), None)
    for _step in range(4):
        pieces = [torch.randn(u.shape[1], generator=gen) for u in bases]
        full = [p.clone() for p in pieces]
        runner.run(pieces, torch.float32, "cpu", None)
        expected, _ = float64_project(full[:3], bases[:3])
        for got, want in zip(pieces[:3], expected):
            torch.testing.assert_close(got.double(), torch.as_tensor(want).double().reshape(-1), rtol=1e-5,
                                       atol=1e-6)
    assert runner.num_plan_builds == 1


def test_projector_and_plan_do_not_import_distributed():
    """One direction only: ogpsa.distributed builds on the projector; attach decides in attaching.py."""
    import ast
    import pathlib

    root = pathlib.Path(ogpsa.__file__).parent
    for name in ("projector.py", "plan.py", "ops.py"):
        tree = ast.parse((root / name).read_text())
        mods = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        mods += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        assert not [m for m in mods if "distributed" in m.split(".") and "torch" not in m], (name, mods)
        assert "attaching" not in mods, name


def test_replaced_module_is_followed_by_name():
    model = _model(13)
    sub = _subspace(model)
    proj = ogpsa.attach(model, None, sub)
    model[2] = torch.nn.Linear(17, 5)  # the old layer keeps its old parameters
    _backward(model, 14)
    proj.project()
    assert _in_subspace(sub, model, {n: p.grad for n, p in model.named_parameters()}) < 1e-5


def test_peft_merge_unmerge_and_unload():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(9, 17), torch.nn.Tanh(), torch.nn.Linear(17, 5))
    cfg = peft.LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False)
    model = peft.get_peft_model(base, cfg)
    refs = []
    for i in range(2):
        model.zero_grad(set_to_none=True)
        x, y = _batch(30 + i)
        torch.nn.functional.mse_loss(model(x), y).backward()
        refs.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    model.zero_grad(set_to_none=True)
    sub = Subspace.from_gradients(refs)
    proj = ogpsa.attach(model, None, sub)
    model.merge_adapter()
    model.unmerge_adapter()
    x, y = _batch(40)
    torch.nn.functional.mse_loss(model(x), y).backward()
    proj.project()
    assert _in_subspace(sub, model, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}) < 1e-5
    model.merge_and_unload()  # the adapters are gone: their bases cannot be applied any more
    with pytest.raises(ogpsa.SubspaceMismatchError, match="lora_A"):
        proj.project()


def test_project_then_clip_with_unprojected_parameters_projects_once():
    """project() covers the tensors with a basis only; a following clip_grad_norm_ must clip
    everything without projecting those again (conflict, aligned_scale=0.5: not idempotent)."""
    config = OGPSAConfig(mode="conflict", aligned_scale=0.5)
    model, twin = _model(15), _model(15)
    full = _subspace(model, config)
    keep = [n for n in full.names if n != "2.bias"]
    sub = Subspace(keep, [full.shapes[full.names.index(n)] for n in keep], [full.basis(n) for n in keep], config)
    proj = ogpsa.attach(model, None, sub, config.replace(allow_partial=True))
    _backward(model, 16)
    _backward(twin, 16)
    proj.project()
    total = proj.clip_grad_norm_(1e-3)
    assert proj.num_projections == 1
    grads = [p.grad for _, p in twin.named_parameters()]
    bases = [sub.basis(n) if n in sub else torch.empty(0, p.numel()) for n, p in twin.named_parameters()]
    ogpsa.project_(grads, bases, mode="conflict", aligned_scale=0.5)
    expected = torch.nn.utils.clip_grad_norm_(twin.parameters(), 1e-3)
    assert float(total) == pytest.approx(float(expected), rel=1e-5)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-10)


def test_a_rejected_refresh_keeps_the_previous_subspace():
    model = _model(17)
    sub = _subspace(model)
    proj = ogpsa.attach(model, None, sub)
    bad = _subspace(model)
    bad.bases[0][0, 0] = float("inf")
    with pytest.raises(ProjectionInputError, match=r"'0.weight'.*NaN or Inf"):
        proj.set_subspace(bad)
    assert proj.subspace is sub
    _backward(model, 18)
    proj.project()
    assert _in_subspace(sub, model, {n: p.grad for n, p in model.named_parameters()}) < 1e-5
