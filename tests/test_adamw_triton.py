"""The projected AdamW step's Triton kernels (kernels/adamw.py) vs float64 and the torch path (here
in the interpreter; compiled for sm_90 without a GPU; on a GPU when there is one), the
``reduce_dots`` hook of ``projected_step`` (simulated shards) and backend routing."""

import copy
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from adamw_problem import run, setup_problem

from ogpsa import reference
from ogpsa.optim import backends as adamw_backends
from ogpsa.optim.backends import cpu_kernel_available
from ogpsa.optim.functional import StepHyper, projected_step


def _interpreted_triton() -> bool:
    ok, _ = adamw_backends.triton_status()
    if not ok:
        return False
    from ogpsa.kernels import common

    return common.INTERPRETED


needs_triton = pytest.mark.skipif(not _interpreted_triton(), reason="Triton interpreter (TRITON_INTERPRET=1) needed")

#: mixed shapes (odd sizes, one of 2**16 + 3) and their per-tensor ranks (0: no basis)
SHAPES = [(1,), (7,), (4097,), (2**16 + 3,), (3, 5), (17, 33), (2, 3, 4), (300,)]
RANKS = [1, 2, 5, 16, 2, 16, 1, 0]
#: the same without the large tensor (the interpreter's time goes there)
SMALL = dict(shapes=SHAPES[:3] + SHAPES[4:], ranks=RANKS[:3] + RANKS[4:])


def make_items(dtype=torch.float32, basis_dtype=torch.float32, scope="tensor", k_global=5, amsgrad=False,
               seed=0, shapes=SHAPES, ranks=RANKS, device="cpu"):
    """Fresh parameters, zero states and bases ``(name, U, M^-1)`` (global: slices of one whole-model
    orthonormal basis of rank ``k_global``; a rank-0 tensor stays without basis)."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).to(dtype).to(device) for s in shapes]
    states = []
    for p in params:
        st = {"step": torch.tensor(0.0), "exp_avg": torch.zeros(p.shape, device=device),
              "exp_avg_sq": torch.zeros(p.shape, device=device)}
        if amsgrad:
            st["max_exp_avg_sq"] = torch.zeros(p.shape, device=device)
        states.append(st)
    numels = [p.numel() for p in params]
    bases = []
    if scope == "global":
        covered = [i for i, k in enumerate(ranks) if k]
        q, _ = torch.linalg.qr(torch.randn(sum(numels[i] for i in covered), k_global, generator=gen,
                                           dtype=torch.float64))
        off = 0
        for i, n in enumerate(numels):
            if i not in covered:
                bases.append(None)
                continue
            u = q.T[:, off:off + n].contiguous().to(basis_dtype).to(device)
            off += n
            bases.append((f"t{i}", u, torch.eye(k_global, device=device)))  # M^-1 unused by the global rule
    else:
        for i, (n, k) in enumerate(zip(numels, ranks)):
            if not k:
                bases.append(None)
                continue
            q, _ = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))
            u = q.T.contiguous().to(basis_dtype)
            minv = torch.linalg.inv(u.double() @ u.double().T).float()
            bases.append((f"t{i}", u.to(device), minv.to(device)))
    return params, states, bases


def grads_for(params, step, seed=100):
    gen = torch.Generator().manual_seed(seed + step)
    return [torch.randn(p.shape, generator=gen).to(p.dtype).to(p.device) for p in params]


def run_steps(params, states, bases, h, backend, steps=3, reduce_dots=None, **kw):
    """``steps`` projected steps in place; returns the last StepResult."""
    res = None
    for s in range(steps):
        for p, g in zip(params, grads_for(params, s)):
            p.grad = g
        res = projected_step([(p, st, h, b) for p, st, b in zip(params, states, bases)], backend=backend,
                             reduce_dots=reduce_dots, **kw)
    return res


def adamw64(params, bases, h, steps, scope, project_wd, dtype):
    """Independent float64 NumPy AdamW + projection onto the stored bases' row spaces (orthogonal
    rule); parameters rounded to ``dtype`` after every step (their storage), nothing else."""
    p = [x.detach().double().cpu().numpy().reshape(-1).copy() for x in params]
    m = [np.zeros_like(x) for x in p]
    v = [np.zeros_like(x) for x in p]
    vmax = [np.zeros_like(x) for x in p]
    us = [None if b is None else b[1].double().cpu().numpy() for b in bases]
    for s in range(steps):
        t = s + 1
        gs = [g.double().cpu().numpy().reshape(-1) * (-1.0 if h.maximize else 1.0) for g in grads_for(params, s)]
        ds = []
        for i, g in enumerate(gs):
            m[i] = h.beta1 * m[i] + (1 - h.beta1) * g
            v[i] = h.beta2 * v[i] + (1 - h.beta2) * g * g
            vmax[i] = np.maximum(vmax[i], v[i])
            vv = vmax[i] if h.amsgrad else v[i]
            d = (m[i] / (1 - h.beta1 ** t)) / (np.sqrt(vv) / math.sqrt(1 - h.beta2 ** t) + h.eps)
            if project_wd:
                d = d + h.weight_decay * p[i]
            ds.append(d)
        proj = [i for i, u in enumerate(us) if u is not None]
        if scope == "global" and proj:
            c = sum(us[i] @ ds[i] for i in proj)
            w = np.linalg.solve(sum(us[i] @ us[i].T for i in proj), c)
            for i in proj:
                ds[i] = ds[i] - us[i].T @ w
        else:
            for i in proj:
                ds[i] = ds[i] - us[i].T @ np.linalg.solve(us[i] @ us[i].T, us[i] @ ds[i])
        for i, d in enumerate(ds):
            q = p[i] if project_wd else p[i] * (1 - h.lr * h.weight_decay)
            new = torch.from_numpy(q - h.lr * d).to(dtype).double().numpy()
            p[i] = new
    return p, m, v, vmax


def rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64).reshape(-1), np.asarray(b, dtype=np.float64).reshape(-1)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


TRITON_CASES = [
    # (param dtype, basis dtype, scope, k_global, amsgrad, maximize, project_weight_decay, with the 2**16+3 tensor)
    (torch.float32, torch.float32, "tensor", 0, False, False, False, True),
    (torch.float32, torch.float32, "global", 16, True, False, True, True),
    (torch.float32, torch.bfloat16, "tensor", 0, True, True, True, False),
    (torch.float32, torch.float32, "global", 1, False, True, False, False),
    (torch.bfloat16, torch.float32, "tensor", 0, False, False, False, True),
    (torch.bfloat16, torch.bfloat16, "global", 2, False, True, False, False),
    (torch.float16, torch.float32, "tensor", 0, True, False, True, False),
]


@needs_triton
@pytest.mark.parametrize("dtype,basis_dtype,scope,k_global,amsgrad,maximize,pwd,big", TRITON_CASES)
def test_triton_matches_float64_and_reference(dtype, basis_dtype, scope, k_global, amsgrad, maximize, pwd, big):
    """Three steps over many tensors of mixed shapes and ranks (k 1, 2, 5, 16; one without basis)."""
    shapes = {} if big else SMALL
    params, states, bases = make_items(dtype, basis_dtype, scope, k_global, amsgrad, seed=11, **shapes)
    p0 = [p.detach().double().clone() for p in params]
    h = StepHyper(lr=5e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, maximize=maximize, amsgrad=amsgrad)
    exp_p, exp_m, exp_v, exp_x = adamw64(params, bases, h, 3, scope, pwd, dtype)
    res = run_steps(params, states, bases, h, "triton", scope=scope, project_weight_decay=pwd)
    assert res.stats.backends == ("triton",)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for i, (p, st) in enumerate(zip(params, states)):
        got_delta = p.detach().double().reshape(-1).numpy() - p0[i].reshape(-1).numpy()
        exp_delta = exp_p[i] - p0[i].reshape(-1).numpy()
        assert rel(got_delta, exp_delta) <= tol, (i, rel(got_delta, exp_delta))
        assert rel(st["exp_avg"].double(), exp_m[i]) <= 1e-5, i  # moments are float32 for every dtype
        assert rel(st["exp_avg_sq"].double(), exp_v[i]) <= 1e-5, i
        if amsgrad:
            assert rel(st["max_exp_avg_sq"].double(), exp_x[i]) <= 1e-5, i
        assert float(st["step"]) == 3.0
    if dtype == torch.float32:
        # and the readable reference (float32 torch), from the same start
        ref_p = [x.float().reshape(q.shape).clone() for x, q in zip(p0, params)]
        ref_m = [torch.zeros(p.shape) for p in params]
        ref_v = [torch.zeros(p.shape) for p in params]
        ref_x = [torch.zeros(p.shape) if amsgrad else None for p in params]
        ref_u = [b[1] if b is not None else torch.zeros(0, p.numel()) for p, b in zip(params, bases)]
        for s in range(3):
            reference.projected_adamw_step_(ref_p, grads_for(ref_p, s), ref_m, ref_v, ref_x, [s + 1] * len(ref_p),
                                            ref_u, lr=h.lr, beta1=h.beta1, beta2=h.beta2, eps=h.eps,
                                            weight_decay=h.weight_decay, maximize=maximize,
                                            project_weight_decay=pwd, scope=scope)
        for p, r, q0 in zip(params, ref_p, p0):
            assert rel(p.detach().double() - q0, r.double() - q0) <= 1e-5
    # statistics: ||d||^2 before and the removed part, against the torch path's
    tp, ts, tb = make_items(dtype, basis_dtype, scope, k_global, amsgrad, seed=11, **shapes)
    tres = run_steps(tp, ts, tb, h, "torch", scope=scope, project_weight_decay=pwd)
    assert tres.stats.names == res.stats.names
    assert torch.allclose(res.stats.sq_before, tres.stats.sq_before, rtol=1e-4)
    assert torch.allclose(res.stats.removed_sq, tres.stats.removed_sq, rtol=1e-3,
                          atol=1e-5 * float(tres.stats.sq_before.max()))


@needs_triton
@pytest.mark.parametrize("mode,scope", [("conflict", "tensor"), ("plane", "tensor"), ("threshold", "tensor"),
                                        ("conflict", "global"), ("plane", "global")])
def test_triton_modes_match_torch_path(mode, scope):
    h = StepHyper(lr=5e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.05)
    out = []
    for backend in ("triton", "torch"):
        params, states, bases = make_items(scope=scope, k_global=2, seed=5, **SMALL)
        p0 = [p.clone() for p in params]
        res = run_steps(params, states, bases, h, backend, steps=2, mode=mode, scope=scope, aligned_scale=0.3)
        out.append(([p - q for p, q in zip(params, p0)], res.stats))
    for a, b in zip(out[0][0], out[1][0]):
        assert rel(a, b) <= 1e-5
    assert torch.allclose(out[0][1].removed_sq, out[1][1].removed_sq, rtol=1e-3,
                          atol=1e-5 * float(out[1][1].sq_before.max()))


@needs_triton
def test_triton_single_pass_equals_two_passes(monkeypatch):
    from ogpsa.kernels import adamw as kern

    h = StepHyper(lr=5e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, amsgrad=True)
    results = []
    for limit in (0, 4096, 1 << 13):  # none, the small ones, every tensor in one pass
        monkeypatch.setattr(kern, "SINGLE_PASS_MAX_NUMEL", limit)
        params, states, bases = make_items(amsgrad=True, seed=3, **SMALL)
        p0 = [p.clone() for p in params]
        res = run_steps(params, states, bases, h, "triton", steps=2, project_weight_decay=True)
        results.append(([p - q for p, q in zip(params, p0)], [st["exp_avg_sq"].clone() for st in states], res.stats))
        expect = sum(1 for p, b in zip(params, bases) if b is not None and p.numel() <= limit)
        assert res.stats.single_pass == expect  # reported by the statistics
    for other in results[1:]:
        for a, b in zip(results[0][0], other[0]):
            assert rel(a, b) <= 1e-6
        for a, b in zip(results[0][1], other[1]):
            assert torch.equal(a, b)  # moments: the same elementwise arithmetic in both kernels
        assert torch.allclose(results[0][2].sq_before, other[2].sq_before, rtol=1e-5)
        assert torch.allclose(results[0][2].removed_sq, other[2].removed_sq, rtol=1e-4, atol=1e-9)


@needs_triton
@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_triton_bitwise_deterministic(scope):
    h = StepHyper(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
    runs = []
    for _ in range(2):
        params, states, bases = make_items(torch.bfloat16, scope=scope, k_global=5, seed=9, **SMALL)
        res = run_steps(params, states, bases, h, "triton", steps=2, scope=scope)
        runs.append((params, states, res.stats))
    (pa, sa, ra), (pb, sb, rb) = runs
    assert all(torch.equal(a, b) for a, b in zip(pa, pb))
    assert all(torch.equal(a[k], b[k]) for a, b in zip(sa, sb) for k in a)
    assert torch.equal(ra.sq_before, rb.sq_before) and torch.equal(ra.removed_sq, rb.removed_sq)


def _halves(params, states, bases, scope):
    """Split every tensor into two uneven 'rank' shards (the second may be empty): shard items
    carry the whole tensor's M^-1 and M as FSDP2 would."""
    ranks = ([], [])
    for p, st, b in zip(params, states, bases):
        n = p.numel()
        cut = (n + 1) // 2
        for r, (a, z) in enumerate(((0, cut), (cut, n))):
            q = p.detach().reshape(-1)[a:z].clone()
            sst = {key: (val.reshape(-1)[a:z].clone() if key != "step" else val.clone()) for key, val in st.items()}
            sb = None
            if b is not None:
                full_m = (b[1].double() @ b[1].double().T)
                sb = (b[0], b[1][:, a:z].contiguous(), b[2], full_m)
            ranks[r].append([q, sst, sb, (a, z)])
    return ranks


class _Abort(Exception):
    pass


def _shard_items(shards, grads, h):
    out = []
    for (q, sst, sb, (a, z)), g in zip(shards, grads):
        q.grad = g.reshape(-1)[a:z].clone()
        out.append((q, sst, h, sb))
    return out


def _pass1_table(shards, grads, h, **kw):
    """A rank's pass-1 table, from a call aborted inside its hook (its buffers restored after)."""
    saved = copy.deepcopy([(q, sst) for q, sst, _, _ in shards])
    got = []

    def capture(t):
        got.append(t.clone())
        raise _Abort

    with pytest.raises(_Abort):
        projected_step(_shard_items(shards, grads, h), reduce_dots=capture, **kw)
    for entry, (q, sst) in zip(shards, saved):
        entry[0].copy_(q)
        for key in sst:
            entry[1][key].copy_(sst[key])
    return got[0]


class _Adder:
    """A fake all_reduce of two ranks: adds the other rank's table in place, records the calls."""

    def __init__(self, other):
        self.other, self.calls, self.own = other, [], []

    def __call__(self, t):
        assert t.dtype == torch.float64
        self.calls.append(tuple(t.shape))
        self.own.append(t.clone())
        t.add_(self.other)


@needs_triton
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_reduce_dots_sums_shards_once(backend, scope):
    """Two 'ranks' each hold one part of every tensor (one part empty); each rank's reduce_dots
    adds the other rank's pass-1 table to its own. Called once per step and rank, the parts then
    step exactly as the whole tensors do without the hook; with a no-op hook (local dots) they do not."""
    h = StepHyper(lr=5e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
    shapes, ranks_k = [(7,), (4097,), (1,), (33, 3), (50,)], [2, 5, 1, 3, 0]
    kw = dict(backend=backend, scope=scope)
    params, states, bases = make_items(scope=scope, k_global=4, seed=21, shapes=shapes, ranks=ranks_k)
    whole_p, whole_s = [p.clone() for p in params], copy.deepcopy(states)
    shards = _halves(params, states, bases, scope)
    lone = _halves(params, states, bases, scope)[0]
    lone_start = [e[0].clone() for e in lone]
    for s in range(2):
        grads = grads_for(params, s)
        for p, g in zip(whole_p, grads):
            p.grad = g
        projected_step([(p, st, h, b) for p, st, b in zip(whole_p, whole_s, bases)], backend="torch", scope=scope)
        if s == 0:
            first_whole = [p.clone() for p in whole_p]
            projected_step(_shard_items(lone, grads, h), reduce_dots=lambda t: None, **kw)
        rank0 = _Adder(_pass1_table(shards[1], grads, h, **kw))
        projected_step(_shard_items(shards[0], grads, h), reduce_dots=rank0, **kw)
        rank1 = _Adder(rank0.own[0])
        projected_step(_shard_items(shards[1], grads, h), reduce_dots=rank1, **kw)
        shape = (4, (5 if scope == "tensor" else 4) + 1)  # T projected tensors, K + 1
        assert rank0.calls == [shape] and rank1.calls == [shape]  # once per rank and step
    for i, p in enumerate(whole_p):
        joined = torch.cat([shards[0][i][0], shards[1][i][0]])
        assert rel(joined, p.reshape(-1)) <= 1e-6, i
        assert float(shards[1][i][1]["step"]) == 2.0
    # the summed table is what the step uses: with local dots only, the parts move differently
    moved = [e[0] - s0 for e, s0 in zip(lone, lone_start)]
    want = [(w.reshape(-1) - p.reshape(-1))[:e[3][1]] for w, p, e in zip(first_whole, params, lone)]
    assert max(rel(a, b) for a, b, k in zip(moved, want, ranks_k) if k and a.numel() > 1) > 1e-3


@needs_triton
def test_reduce_dots_called_once_without_projected_tensors():
    h = StepHyper(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    params, states, bases = make_items(seed=2, shapes=[(5,), (9,)], ranks=[0, 0])
    seen = []
    run_steps(params, states, bases, h, "triton", steps=1, reduce_dots=lambda t: seen.append(tuple(t.shape)))
    assert seen == [(0, 1)]


def _snapshot(params, states):
    return [p.detach().clone() for p in params], [{k: v.clone() for k, v in st.items()} for st in states]


def _bad_inputs():
    """(description, items mutator, call kwargs) of inputs the step must refuse before writing."""
    def wrong_basis(items):
        name, u, minv = items[2][3]
        items[2] = items[2][:3] + ((name, torch.randn(u.shape[0], u.shape[1] + 1), minv),)

    def wrong_minv(items):
        name, u, minv = items[3][3]
        items[3] = items[3][:3] + ((name, u, torch.eye(u.shape[0] + 1)),)

    def no_grad(items):
        items[-1][0].grad = None

    def mixed_global_ranks(items):
        name, u, minv = items[1][3]
        items[1] = items[1][:3] + ((name, u[:1].contiguous(), minv[:1, :1].contiguous()),)

    def amsgrad_without_state(items):
        p, st, h, b = items[-2]
        items[-2] = (p, st, StepHyper(**{**h.__dict__, "amsgrad": True}), b)

    return [("basis shape", wrong_basis, {}), ("M^-1 shape", wrong_minv, {}), ("no gradient", no_grad, {}),
            ("global ranks", mixed_global_ranks, {"scope": "global"}), ("amsgrad state", amsgrad_without_state, {}),
            ("mode", lambda items: None, {"mode": "sideways"}), ("scope", lambda items: None, {"scope": "model"}),
            ("backend", lambda items: None, {"backend": "fastest"})]


@needs_triton
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bad_input_raises_before_any_change(backend):
    h = StepHyper(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
    for what, mutate, kw in _bad_inputs():
        params, states, bases = make_items(seed=4, **SMALL)
        for p, g in zip(params, grads_for(params, 0)):
            p.grad = g
        items = [(p, st, h, b) for p, st, b in zip(params, states, bases)]
        mutate(items)
        before_p, before_s = _snapshot(params, states)
        with pytest.raises(ValueError):
            projected_step(items, **{"backend": backend, **kw})
        assert all(torch.equal(a, b) for a, b in zip(params, before_p)), what
        assert all(torch.equal(st[k], sb[k]) for st, sb in zip(states, before_s) for k in sb), what


def test_routing_on_cpu(monkeypatch):
    h = StepHyper(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    params, states, bases = make_items(seed=1, shapes=[(7,), (9,)], ranks=[2, 0])
    params[0].grad = torch.randn(7)
    item = (params[0], states[0], h, bases[0])
    opts = dict(scope="tensor", mode="orthogonal", reduce_dots=None, keep_updates=False)
    cpu = "cpu" if cpu_kernel_available() else "torch"
    assert adamw_backends.route(item, "auto", **opts) == cpu
    assert adamw_backends.route(item, "torch", **opts) == "torch"
    # the hook, the global scope and the other rules: the compiled op's pass1_/pass2_ (issue 20)
    assert adamw_backends.route(item, "auto", **{**opts, "reduce_dots": print}) == cpu
    assert adamw_backends.route(item, "auto", **{**opts, "scope": "global"}) == cpu
    assert adamw_backends.route(item, "auto", **{**opts, "mode": "conflict"}) == cpu
    assert adamw_backends.route(item, "auto", **{**opts, "keep_updates": True}) == "torch"
    if _interpreted_triton():
        assert adamw_backends.route(item, "triton", **opts) == "triton"
        assert adamw_backends.route(item, "triton", **{**opts, "reduce_dots": print}) == "triton"
        bf16_moments = {**states[0], "exp_avg": states[0]["exp_avg"].bfloat16()}
        assert adamw_backends.route((params[0], bf16_moments, h, bases[0]), "triton", **opts) == "torch"
        empty = torch.zeros(0)
        empty.grad = torch.zeros(0)
        st = {"step": torch.tensor(0.0), "exp_avg": torch.zeros(0), "exp_avg_sq": torch.zeros(0)}
        assert adamw_backends.route((empty, st, h, None), "triton", **opts) == "torch"
    monkeypatch.setenv("OGPSA_BACKEND", "fastest")
    with pytest.raises(ValueError, match="fastest"):
        adamw_backends.requested("auto")
    monkeypatch.setenv("OGPSA_BACKEND", "torch")
    assert adamw_backends.requested("cpu") == "torch"  # the environment wins over the config
    info = adamw_backends.info()
    assert set(info) >= {"cpu", "cuda", "triton", "torch", "auto", "requested"}


@needs_triton
def test_projected_adamw_with_triton_backend(monkeypatch):
    """ProjectedAdamW end to end with OGPSA_BACKEND=triton agrees with the torch backend."""
    model, sub = setup_problem(torch.float32)
    results = []
    for backend in ("triton", "torch"):
        m = copy.deepcopy(model)
        p0 = [p.detach().clone() for p in m.parameters()]
        opt = run(m, sub, backend, steps=2, amsgrad=True)
        results.append(([p.detach() - q for p, q in zip(m.parameters(), p0)], opt.last_stats))
    (da, sa), (db, sb) = results
    assert sa.backends == ("triton",) and sb.backends == ("torch",)
    for a, b in zip(da, db):
        assert rel(a, b) <= 1e-5
    assert torch.allclose(sa.removed_sq, sb.removed_sq, rtol=1e-3, atol=1e-6 * float(sb.sq_before.max()))


_COMPILE = r"""
import json, sys
from ogpsa.kernels import adamw, aot
want = json.loads(sys.argv[1])
out = []
for fn, sig, meta, warps in adamw.aot_variants(kinds=((0, 0), (1, 1)), aligned=(True, False), k_pads=(1, 4, 8, 16)):
    key = [fn.__name__, meta["P_KIND"], meta["U_KIND"], meta["ALIGNED"], meta["K_PAD"]]
    if want and key not in want:
        continue
    k = aot.compile_variant(fn, sig, meta, warps, 90)
    out.append({"key": key, "loads": aot.vector_loads(k.asm["ptx"]), **aot._resources(k.asm["cubin"])})
print(json.dumps(out))
"""


def _compile_for_sm90(want: list) -> list:
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run_ = subprocess.run([sys.executable, "-c", _COMPILE, json.dumps(want)], env=env, capture_output=True, text=True,
                          timeout=900)
    if run_.returncode != 0 and "ptxas" in run_.stderr and "not found" in run_.stderr.lower():
        pytest.skip(f"no ptxas for sm_90: {run_.stderr[-300:]}")
    assert run_.returncode == 0, run_.stderr[-3000:]
    return json.loads(run_.stdout.strip().splitlines()[-1])


def _check_compiled(report: list) -> None:
    assert report
    assert all(r.get("local_bytes", 0) == 0 for r in report), report  # no register spills
    for r in report:
        if r["key"][3]:  # ALIGNED: 128-bit loads
            assert r["loads"]["v4"] > 0, r
        else:  # no 16-byte assumption without the alignment check
            assert r["loads"]["v4"] == 0, r


def test_triton_adamw_compiles_for_sm90_and_vectorises():
    """Compile-only (no GPU): a few variants, in a process without TRITON_INTERPRET."""
    _check_compiled(_compile_for_sm90([["_adamw_fused_small_kernel", 0, 0, True, 16],
                                       ["_adamw_dots_kernel", 1, 1, True, 1],
                                       ["_adamw_apply_kernel", 0, 0, True, 8],
                                       ["_adamw_dots_kernel", 0, 0, False, 4]]))


@pytest.mark.slow
def test_triton_adamw_compiles_for_sm90_every_variant():
    _check_compiled(_compile_for_sm90([]))


# ---------------------------------------------------------------------------------------------
# on a GPU (skipped without one): compiled Triton and the routing of CUDA tensors
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype,basis_dtype,scope,amsgrad,pwd", [
    (torch.float32, torch.float32, "tensor", False, False), (torch.float32, torch.bfloat16, "global", True, True),
    (torch.bfloat16, torch.float32, "tensor", True, True), (torch.float16, torch.bfloat16, "global", False, False)])
def test_triton_on_gpu_matches_float64_and_is_deterministic(dtype, basis_dtype, scope, amsgrad, pwd):
    _gpu_case(dtype, basis_dtype, scope, amsgrad, pwd, "cuda", SHAPES + [(2**20 + 3,), (1000, 257)], RANKS + [16, 3])


def _gpu_case(dtype, basis_dtype, scope, amsgrad, pwd, device, shapes, ranks):
    k_global = 7 if scope == "global" else 0
    h = StepHyper(lr=5e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, amsgrad=amsgrad, maximize=True)
    setup = dict(seed=17, shapes=shapes, ranks=ranks)
    runs = []
    for _ in range(2):
        params, states, bases = make_items(dtype, basis_dtype, scope, k_global, amsgrad, device=device, **setup)
        res = run_steps(params, states, bases, h, "triton", scope=scope, project_weight_decay=pwd)
        runs.append((params, states, res))
    (pa, sa, ra), (pb, sb, rb) = runs
    assert ra.stats.backends == ("triton",)
    assert all(torch.equal(a, b) for a, b in zip(pa, pb))
    assert all(torch.equal(a[k], b[k]) for a, b in zip(sa, sb) for k in a)
    assert torch.equal(ra.stats.removed_sq, rb.stats.removed_sq)
    start, _, cpu_bases = make_items(dtype, basis_dtype, scope, k_global, amsgrad, **setup)  # same values, on CPU
    exp_p, exp_m, _, _ = adamw64(start, cpu_bases, h, 3, scope, pwd, dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for i, (p, st, p0) in enumerate(zip(pa, sa, start)):
        p0 = p0.double().reshape(-1).numpy()
        got = p.detach().double().cpu().reshape(-1).numpy() - p0
        assert rel(got, exp_p[i] - p0) <= tol, i
        assert rel(st["exp_avg"].double().cpu(), exp_m[i]) <= 1e-5, i


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_route_to_cuda_op_then_triton():
    h = StepHyper(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    params, states, bases = make_items(seed=1, shapes=[(7,)], ranks=[2], device="cuda")
    params[0].grad = torch.randn(7, device="cuda")
    item = (params[0], states[0], h, bases[0])
    opts = dict(scope="tensor", mode="orthogonal", reduce_dots=None, keep_updates=False)
    first = "cuda" if adamw_backends.cuda_kernel_available() else "triton"
    assert adamw_backends.route(item, "auto", **opts) == first
    assert adamw_backends.route(item, "auto", **{**opts, "reduce_dots": print}) == "triton"
    assert adamw_backends.route(item, "auto", **{**opts, "scope": "global"}) == "triton"
    assert adamw_backends.route(item, "triton", **opts) == "triton"


@needs_triton
@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_triton_tables_reused_across_steps_and_never_stale(scope):
    """The basis-side tables are built once (not per step, though gradients are new tensors every
    step); new bases and M^-1 are used at once, as new tensors (maybe at the freed ones'
    addresses) or written in place into the old ones."""
    h = StepHyper(lr=5e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    params, states, bases = make_items(scope=scope, k_global=3, seed=6, **SMALL)
    run_steps(params, states, bases, h, "triton", steps=1, scope=scope)
    builds = adamw_backends._CACHE.builds
    run_steps(params, states, bases, h, "triton", steps=2, scope=scope)
    assert adamw_backends._CACHE.builds == builds
    for in_place in (False, True):
        new = make_items(scope=scope, k_global=3, seed=7 + in_place, **SMALL)[2]  # other bases, same shapes,
        f = 3.0 if in_place else 2.0  # rows of norm f: M^-1 = I / f^2 matters
        new = [None if b is None else (b[0], f * b[1], b[2] / f**2) for b in new]
        if in_place:
            for b, nb in zip(bases, new):
                if b is not None:
                    b[1].copy_(nb[1])
                    b[2].copy_(nb[2])
        else:
            del bases
            bases = [copy.deepcopy(b) for b in new]
        twin_p, twin_s = [p.clone() for p in params], copy.deepcopy(states)
        p0 = [p.clone() for p in params]
        run_steps(params, states, bases, h, "triton", steps=1, scope=scope)
        run_steps(twin_p, twin_s, new, h, "torch", steps=1, scope=scope)
        for p, q, t in zip(params, p0, twin_p):
            assert rel(p - q, t - q) <= 1e-5, in_place
