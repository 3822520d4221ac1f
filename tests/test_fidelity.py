"""Fidelity to the original implementation (issue 17).

The original OGPSA code is public: github.com/SunGL001/OGPSA (a LLaMA-Factory fork), commit
cddc63f9. Its math is restated below in a few readable float64 lines, from

* ``src/llamafactory/train/sft_pg/trainer.py``: ``OrthogonalProjectionTrainer``:
  ``finalize_base_grads_collection`` (reference gradient -> normalised base) and the tensor
  hook built by ``_register_gradient_hooks`` (one base: ``orthogonal_projection`` /
  ``threshold`` with ``base_scale``; two bases: Gram-Schmidt plane, ``orthogonal_projection``
  / ``plane_projection``, every other method falls back to the orthogonal projection);
* ``src/llamafactory/train/dpo_pg/trainer.py``: the same hook, except that with two bases
  ``threshold`` has no branch and leaves the gradient unchanged;
* ``src/llamafactory/train/sft_pg/workflow.py``: ``compute_base_gradients``: a DataLoader
  with ``batch_size=per_device_train_batch_size`` over the first ``base_num_samples``
  examples, ``loss = outputs.loss / num_batches`` (the model's token-mean loss per batch,
  right-padded, labels -100 on padding), gradients summed over batches.

Each test checks one claim of docs/fidelity.md
against that restatement on fresh seeded random inputs, and each option (reference
averaging, threshold mode, per-micro-batch hooks) on every backend that runs here.
"""

from __future__ import annotations

import copy
from typing import Optional

import pytest
import torch

import ogpsa
from ogpsa import OGPSAConfig, Subspace
from ogpsa.ops import backends

pytestmark = pytest.mark.usefixtures("paper_preset")  # these tests mean the paper recipe (preset="paper")

EPS = 1e-8  # OrthogonalProjectionTrainer.eps


# -- the original's math (float64) ---------------------------------------------------------------


def original_base(r: torch.Tensor) -> Optional[torch.Tensor]:
    """finalize_base_grads_collection: normalise; a reference gradient with norm <= 1e-10 gives no base."""
    norm = r.norm()
    return r / (norm + 1e-10) if norm > 1e-10 else None


def original_plane(b1: torch.Tensor, b2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The hook's two-base Gram-Schmidt: u1 along b1, u2 = normalised residual (0 if < 1e-6)."""
    u1 = b1 / (b1.norm() + EPS)
    perp = b2 - (b2 * u1).sum() * u1
    n2 = perp.norm() + EPS
    return u1, (torch.zeros_like(u1) if n2 < 1e-6 else perp / n2)


def original_hook(grad: torch.Tensor, bases: list, method: str, base_scale: float = 1.0,
                  trainer: str = "sft") -> torch.Tensor:
    """The tensor hook of _register_gradient_hooks, for one parameter (returns the new gradient)."""
    if len(bases) == 2:
        u1, u2 = original_plane(*bases)
        plane = (grad * u1).sum() * u1 + (grad * u2).sum() * u2
        if method == "plane_projection":
            return plane
        if method == "threshold" and trainer == "dpo":
            return grad  # dpo_pg/trainer.py: no else branch for two bases
        return grad - plane  # sft_pg/trainer.py: orthogonal_projection and the else fallback
    b = bases[0]
    dot = (grad * b).sum()
    if method == "orthogonal_projection":
        return grad - dot / ((b * b).sum() + EPS) * b
    if method == "threshold":
        cos = dot / ((grad.norm() + EPS) * (b.norm() + EPS))
        if cos < 0:
            return grad - dot / ((b * b).sum() + EPS) * b
        if cos > 0:
            return grad * base_scale
        return grad
    raise ValueError(method)


def original_step(grads: list, bases: list, method: str, base_scale: float = 1.0,
                  max_norm: Optional[float] = None, trainer: str = "sft") -> list:
    """Hook on every tensor (no bases: unchanged), then the Trainer's clip_grad_norm_."""
    out = [g.clone() if not b else original_hook(g.flatten(), b, method, base_scale, trainer).view(g.shape)
           for g, b in zip(grads, bases)]
    if max_norm is not None:
        total = torch.sqrt(sum((o * o).sum() for o in out))
        coef = min(1.0, max_norm / (float(total) + 1e-6))
        out = [o * coef for o in out]
    return out


# -- helpers ----------------------------------------------------------------------------------------


def rel(a, b) -> float:
    """||a - b|| / ||b|| over lists of tensors, in float64."""
    num = sum(float((x.double() - y.double()).pow(2).sum()) for x, y in zip(a, b))
    den = sum(float(y.double().pow(2).sum()) for y in b)
    return (num / den) ** 0.5


def available_backends() -> list:
    names = [n for n, (ok, _) in backends().items() if ok and n != "cuda"]
    return [pytest.param(n, marks=pytest.mark.skipif(n not in names, reason=f"{n} unavailable"))
            for n in ("torch", "cpu", "triton")]


def subspace_of(refs: list, names: list, **config) -> Subspace:
    """ogpsa's basis from per-tensor reference gradients ``refs[j][i]`` (dataset j, tensor i)."""
    return Subspace.from_gradients([dict(zip(names, r)) for r in refs], OGPSAConfig(**config))


def random_refs(gen: torch.Generator, shapes: list, m: int, scales=(1e-3, 1e4)) -> list:
    """m reference gradients per tensor, norms differing by up to 1e7, partly correlated."""
    refs = []
    for j in range(m):
        refs.append([torch.randn(*s, generator=gen, dtype=torch.float64) * scales[j % len(scales)] for s in shapes])
    if m > 1:  # make the second reference partly parallel to the first, as real ones are
        refs[1] = [r2 + 3.0 * r1 * (r2.norm() / r1.norm()) for r1, r2 in zip(refs[0], refs[1])]
    return refs


SHAPES = [(7, 5), (33,), (1, 129), (4097,)]


# -- basis ------------------------------------------------------------------------------------------


def test_basis_matches_normalisation_and_gram_schmidt():
    """Our float32 basis = the original's normalised bases + Gram-Schmidt (norms 1e-3 vs 1e4)."""
    gen = torch.Generator().manual_seed(1701)
    names = [f"t{i}" for i in range(len(SHAPES))]
    refs = random_refs(gen, SHAPES, 2)
    sub = subspace_of([[r.float() for r in rr] for rr in refs], names)
    for i, name in enumerate(names):
        u1, u2 = original_plane(original_base(refs[0][i].flatten()), original_base(refs[1][i].flatten()))
        ours = sub.basis(name)
        assert ours.shape[0] == 2 and ours.dtype == torch.float32
        assert rel([ours[0], ours[1]], [u1, u2]) <= 1e-5
    # one reference: the base is the normalised reference gradient
    sub1 = subspace_of([[r.float() for r in refs[1]]], names)
    for i, name in enumerate(names):
        assert rel([sub1.basis(name)[0]], [original_base(refs[1][i].flatten())]) <= 1e-5


@pytest.mark.parametrize("backend", available_backends())
def test_nearly_parallel_references_float32_vs_original_bf16(backend):
    """References at cosine ~0.99995: ogpsa (float64 Gram, float32 basis) projects within float32
    rounding of the original's float64 math; the original computing in bf16 (its dtype under bf16
    training) is far off (documented difference: precision)."""
    gen = torch.Generator().manual_seed(77)
    n = 4097
    r1 = torch.randn(n, generator=gen, dtype=torch.float64)
    r2 = r1 + 1e-2 * torch.randn(n, generator=gen, dtype=torch.float64) * r1.norm() / n ** 0.5
    g = torch.randn(n, generator=gen, dtype=torch.float64)
    b1, b2 = original_base(r1), original_base(r2)
    exact = original_hook(g, [b1, b2], "orthogonal_projection")
    in_bf16 = original_hook(g.bfloat16(), [b1.bfloat16(), b2.bfloat16()], "orthogonal_projection")
    ours = [g.float().clone()]
    ogpsa.project_(ours, [subspace_of([[r1.float()], [r2.float()]], ["t"]).basis("t")], backend=backend)
    assert rel(ours, [exact]) <= 1e-5
    assert rel([in_bf16], [exact]) > 1e-3


# -- projection rules -------------------------------------------------------------------------------


def _case(seed: int, k: int, sign: Optional[float] = None):
    """Gradients (float32) and the original's float64 bases for each tensor; with ``sign`` each
    gradient gets a strong component of that sign along its first base (aligned / conflicting)."""
    gen = torch.Generator().manual_seed(seed)
    names = [f"t{i}" for i in range(len(SHAPES))]
    refs = random_refs(gen, SHAPES, k)
    bases = [[original_base(refs[j][i].flatten()) for j in range(k)] for i in range(len(SHAPES))]
    grads = []
    for i, s in enumerate(SHAPES):
        g = torch.randn(*s, generator=gen, dtype=torch.float64)
        if sign is not None:
            b = bases[i][0].view(s)
            g = g - (g * b).sum() * b + sign * 2.0 * g.norm() * b
        grads.append(g)
    sub = subspace_of([[r.float() for r in rr] for rr in refs], names)
    return names, grads, bases, sub


def _ours(grads, sub, names, backend, **kw):
    out = [g.float().clone() for g in grads]
    stats = ogpsa.project_(out, [sub.basis(n) for n in names], backend=backend, **kw)
    return out, stats


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("k", [1, 2])
def test_orthogonal_matches(backend, k):
    names, grads, bases, sub = _case(2 + k, k)
    ours, _ = _ours(grads, sub, names, backend, mode="orthogonal")
    assert rel(ours, original_step(grads, bases, "orthogonal_projection")) <= 1e-5


@pytest.mark.parametrize("backend", available_backends())
def test_plane_matches(backend):
    names, grads, bases, sub = _case(11, 2)
    ours, _ = _ours(grads, sub, names, backend, mode="plane")
    assert rel(ours, original_step(grads, bases, "plane_projection")) <= 1e-5


def test_threshold_scale_one_is_conflict():
    """base_scale = 1 (the default): the original's threshold == conflict == threshold here."""
    for seed, sign in ((21, 1.0), (22, -1.0), (23, None)):
        names, grads, bases, sub = _case(seed, 1, sign)
        expected = original_step(grads, bases, "threshold", 1.0)
        for mode in ("conflict", "threshold"):
            ours, _ = _ours(grads, sub, names, "torch", mode=mode, aligned_scale=1.0)
            assert rel(ours, expected) <= 1e-5, (mode, sign)


def test_conflict_does_not_reproduce_threshold_scale():
    """With base_scale != 1 the original scales the whole gradient; conflict only the component
    along the base, so it differs (the reason for mode="threshold")."""
    names, grads, bases, sub = _case(31, 1, 1.0)
    expected = original_step(grads, bases, "threshold", 0.5)
    ours, _ = _ours(grads, sub, names, "torch", mode="conflict", aligned_scale=0.5)
    assert rel(ours, expected) > 0.1


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("scale", [0.5, 1.0, 0.0, 1.7])
@pytest.mark.parametrize("max_norm", [None, 0.5])
def test_threshold_matches_original(backend, scale, max_norm):
    """One call holding aligned (k=1), conflicting (k=1), two-base and base-less tensors, with
    and without clipping: mode="threshold" == the original SFT hook, then clip_grad_norm_."""
    _, ga, ba, sa = _case(41, 1, 1.0)
    _, gc, bc, sc = _case(42, 1, -1.0)
    _, g2, b2, s2 = _case(43, 2)
    gen = torch.Generator().manual_seed(44)
    g0 = [torch.randn(3, 11, generator=gen, dtype=torch.float64)]
    grads = ga + gc + g2 + g0
    bases = ba + bc + b2 + [[]]
    us = [sa.basis(f"t{i}") for i in range(4)] + [sc.basis(f"t{i}") for i in range(4)] \
        + [s2.basis(f"t{i}") for i in range(4)] + [torch.empty(0, 33)]
    expected = original_step(grads, bases, "threshold", scale, max_norm)
    ours = [g.float().clone() for g in grads]
    stats = ogpsa.project_(ours, us, mode="threshold", aligned_scale=scale, max_norm=max_norm, backend=backend)
    assert rel(ours, expected) <= 1e-5
    # statistics: post-projection (pre-clip) squared norms and removed parts, vs float64
    unclipped = original_step(grads, bases, "threshold", scale)
    sq_after = torch.stack([u.pow(2).sum() for u in unclipped])
    removed = torch.stack([(g - u).pow(2).sum() for g, u in zip(grads, unclipped)])
    torch.testing.assert_close(stats.sq_after.double(), sq_after, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(stats.removed_sq.double(), removed, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(stats.total_norm.double(), sq_after.sum().sqrt(), rtol=1e-5, atol=0)
    # the readable specification gives the same
    spec = [g.float().clone() for g in grads]
    ogpsa.reference.project_(spec, us, mode="threshold", aligned_scale=scale, max_norm=max_norm)
    assert rel(spec, expected) <= 1e-5


def test_threshold_two_bases_sft_vs_dpo():
    """Two bases: ours (and the original SFT trainer) project orthogonally; the original DPO
    trainer leaves the gradient unchanged (documented difference)."""
    names, grads, bases, sub = _case(51, 2)
    ours, _ = _ours(grads, sub, names, "torch", mode="threshold", aligned_scale=0.5)
    assert rel(ours, original_step(grads, bases, "threshold", 0.5, trainer="sft")) <= 1e-5
    assert rel(ours, original_step(grads, bases, "threshold", 0.5, trainer="dpo")) > 0.01


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_threshold_global_scope(backend, sign):
    """scope="global" (our extension): the rule on the one whole-model coefficient."""
    gen = torch.Generator().manual_seed(61 if sign > 0 else 62)
    numels = [5, 33, 4097]
    u = torch.randn(sum(numels), generator=gen, dtype=torch.float64)
    u = u / u.norm()
    g = torch.randn(sum(numels), generator=gen, dtype=torch.float64)
    g = g - (g @ u) * u + sign * 0.5 * g.norm() * u
    expected = original_hook(g, [u], "threshold", 0.25)
    chunks = list(torch.split(g.float(), numels))
    grads = [c.clone() for c in chunks]
    ubases = [c.float().reshape(1, -1).contiguous() for c in torch.split(u, numels)]
    ogpsa.project_(grads, ubases, mode="threshold", aligned_scale=0.25, scope="global", backend=backend)
    assert rel([torch.cat(grads)], [expected]) <= 1e-5


# -- per-micro-batch hooks vs once per step -------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    pytest.importorskip("transformers")
    from ogpsa.tiny import char_tokenizer

    return char_tokenizer()


def _tiny(tok, seed=3):
    from ogpsa.tiny import tiny_llama

    return tiny_llama(tok, hidden=32, layers=2, seed=seed)


TEXTS = ["the cat sat on the mat.", "2+3=5", "copy: abc -> abc and more text here", "hello world",
         "x y z", "reverse: abc -> cba", "7*6=42 is a product", "a", "one two three four five six"]
PAIRS = [{"prompt": "q: 2+2=", "chosen": "4", "rejected": "five, or so"},
         {"prompt": "q: name a colour", "chosen": "red", "rejected": "no"},
         {"prompt": "q: 9+1=", "chosen": "10 exactly", "rejected": "11"}]


def _micro_batches(tok, n: int):
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(4, len(tok), (2, 9 + 3 * i), generator=gen) for i in range(n)]


def _accumulate(model, batches) -> list:
    model.zero_grad(set_to_none=True)
    for ids in batches:
        (model(input_ids=ids, labels=ids).loss / len(batches)).backward()
    return [p.grad.clone() for p in model.parameters()]


def test_hooks_per_micro_batch_equal_once_per_step_for_orthogonal(tok):
    model = _tiny(tok)
    sub = ogpsa.build_subspace(model, [TEXTS[:4], TEXTS[4:]], tokenizer=tok, progress=False)
    batches = _micro_batches(tok, 4)
    hooks = ogpsa.register_gradient_hooks(model, sub)
    per_micro = _accumulate(model, batches)
    hooks.remove()
    raw = _accumulate(model, batches)
    ogpsa.attach(model, None, sub).project()
    once = [p.grad for p in model.parameters()]
    assert rel(per_micro, once) <= 1e-5
    assert rel(raw, once) > 1e-3  # the projection did something


def test_hooks_reproduce_the_original_threshold_per_micro_batch(tok):
    """register_gradient_hooks(mode="threshold") == the original's hooks on every backward."""
    model = _tiny(tok)
    sub = ogpsa.build_subspace(model, [TEXTS], OGPSAConfig(mode="threshold", aligned_scale=0.5), tokenizer=tok,
                               progress=False)
    batches = _micro_batches(tok, 4)
    names = [n for n, _ in model.named_parameters()]
    base = {n: sub.basis(n)[0].double() for n in sub.names if sub.basis(n).shape[0]}
    handles = [p.register_hook(lambda g, n=n: original_hook(g.double(), [base[n].view(g.shape)], "threshold",
                                                            0.5).to(g.dtype))
               for n, p in model.named_parameters() if n in base]
    expected = _accumulate(model, batches)
    for h in handles:
        h.remove()
    hooks = ogpsa.register_gradient_hooks(model, sub)
    ours = _accumulate(model, batches)
    hooks.remove()
    assert len(names) == len(ours) and rel(ours, expected) <= 1e-5


# -- reference averaging ----------------------------------------------------------------------------


def original_reference_gradients(model, examples, tok, batch_size: int) -> dict:
    """compute_base_gradients in float64: consecutive batches, right-padded, labels -100 on
    padding, ``model(**batch).loss / num_batches`` (the model's own token-mean loss)."""
    from ogpsa.collect import example_to_sequences

    m64 = copy.deepcopy(model).double()
    m64.eval()
    batches = [examples[i:i + batch_size] for i in range(0, len(examples), batch_size)]
    for batch in batches:
        seqs = [s for e in batch for s in example_to_sequences(e, tok)]  # a pair: chosen and rejected rows
        width = max(len(i) for i, _ in seqs)
        ids = torch.tensor([i + [tok.pad_token_id] * (width - len(i)) for i, _ in seqs])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in seqs])
        mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in seqs])
        (m64(input_ids=ids, attention_mask=mask, labels=labels).loss / len(batches)).backward()
    return {n: p.grad for n, p in m64.named_parameters() if p.grad is not None}


def _cosines(a: dict, b: dict) -> list:
    return [float(torch.nn.functional.cosine_similarity(a[n].double().flatten(), b[n].double().flatten(), dim=0))
            for n in b if float(b[n].norm()) > 0]


@pytest.mark.parametrize("data", ["texts", "pairs"])
def test_reference_averaging_batch_reproduces_the_original(tok, data):
    model = _tiny(tok)
    examples = TEXTS if data == "texts" else PAIRS
    for bs in (4, 1, 2):
        expected = original_reference_gradients(model, examples, tok, bs)
        cfg = OGPSAConfig(reference_averaging="batch", reference_batch_size=bs)
        (got,), _ = ogpsa.collect_reference_gradients(model, [examples], tokenizer=tok, config=cfg, progress=False)
        names = list(expected)
        assert rel([got[n] for n in names], [expected[n] for n in names]) <= 1e-5, bs
    # per-example averaging equals the original with batch size 1 for single-sequence examples
    # (a pair's two sequences are token-mean'd separately there, together in the original),
    # and differs from it with batch size 4
    (example,), _ = ogpsa.collect_reference_gradients(model, [examples], tokenizer=tok, batch_size=4,
                                                      progress=False)
    one = original_reference_gradients(model, examples, tok, 1)
    err_one = rel([example[n] for n in one], list(one.values()))
    assert err_one <= 1e-5 if data == "texts" else err_one > 1e-3
    four = original_reference_gradients(model, examples, tok, 4)
    assert min(_cosines(example, four)) < 0.9999


def test_reference_averaging_options_reach_build_subspace(tok):
    """build_subspace reads config.reference_averaging / reference_batch_size; explicit
    keyword arguments win over the config."""
    model = _tiny(tok)
    cfg = OGPSAConfig(reference_averaging="batch", reference_batch_size=4)
    sub = ogpsa.build_subspace(model, [TEXTS], cfg, tokenizer=tok, progress=False)
    (grads,), _ = ogpsa.collect_reference_gradients(model, [TEXTS], tokenizer=tok, averaging="batch",
                                                    batch_size=4, progress=False)
    expected = Subspace.from_gradients([grads], cfg)
    assert rel([sub.basis(n) for n in sub.names], [expected.basis(n) for n in sub.names]) <= 1e-6
    (over,), _ = ogpsa.collect_reference_gradients(model, [TEXTS], tokenizer=tok, config=cfg, averaging="example",
                                                   batch_size=2, progress=False)
    (plain,), _ = ogpsa.collect_reference_gradients(model, [TEXTS], tokenizer=tok, progress=False)
    assert rel([over[n] for n in plain], list(plain.values())) <= 1e-5
    with pytest.raises(ValueError, match="reference_averaging"):
        OGPSAConfig(reference_averaging="token")
    with pytest.raises(ValueError, match="reference_batch_size"):
        OGPSAConfig(reference_batch_size=0)
    with pytest.raises(ValueError, match="averaging"):
        ogpsa.collect_reference_gradients(model, [TEXTS], tokenizer=tok, averaging="token", progress=False)
    assert OGPSAConfig.from_dict(cfg.to_dict()) == cfg


def test_threshold_mode_in_the_sft_trainer(tok, tmp_path):
    """mode="threshold" runs through the TRL trainer's clip step (project -> clip -> step)."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from ogpsa.integrations.trl import OGPSASFTTrainer

    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=0.1,
                         optim="sgd", logging_steps=1, report_to="none", save_strategy="no", use_cpu=True,
                         disable_tqdm=True, max_grad_norm=1.0, bf16=False, fp16=False, seed=0)
    cfg = OGPSAConfig(mode="threshold", aligned_scale=0.5)
    trainer = OGPSASFTTrainer(model=_tiny(tok), args=args, processing_class=tok,
                              train_dataset=datasets.Dataset.from_dict({"text": TEXTS}),
                              ogpsa_config=cfg, reference_datasets=[TEXTS])
    trainer.train()
    proj = trainer.ogpsa.projector
    assert proj.config.mode == "threshold" and proj.config.aligned_scale == 0.5
    assert proj.num_projections >= 2 and proj.last_stats is not None
    logged = [h for h in trainer.state.log_history if "ogpsa/removed_fraction" in h]
    assert logged and all(0.0 <= h["ogpsa/removed_fraction"] <= 1.0 for h in logged)


@pytest.mark.parametrize("mode", ["plane", "threshold", "orthogonal"])
def test_global_scope_tensor_without_a_slice_follows_the_whole_gradient(mode):
    """scope="global": a tensor without a slice of the basis is part of the whole gradient:
    plane zeroes it, threshold (aligned) scales it; the spec, the dispatch and the float64
    oracle agree."""
    from oracle import float64_project

    gen = torch.Generator().manual_seed(91)
    u = torch.randn(5, generator=gen, dtype=torch.float64)
    u = (u / u.norm()).reshape(1, 5)
    g0 = torch.randn(5, generator=gen, dtype=torch.float64)
    grads = [g0 - (g0 @ u[0]) * u[0] + 0.5 * g0.norm() * u[0], torch.randn(7, generator=gen, dtype=torch.float64)]
    bases = [u.float(), torch.empty(0, 7)]
    expected = [original_hook(torch.cat(grads), [torch.cat([u[0], torch.zeros(7, dtype=torch.float64)])],
                              "threshold", 0.25).split([5, 7])] if mode == "threshold" else None
    for project in (ogpsa.project_, ogpsa.reference.project_):
        out = [g.float().clone() for g in grads]
        project(out, bases, mode=mode, scope="global", aligned_scale=0.25)
        if expected is not None:
            assert rel(out, list(expected[0])) <= 1e-5
        else:
            want, _ = float64_project([g.float() for g in grads], bases, mode, "global")
            assert rel(out, [torch.from_numpy(w) for w in want]) <= 1e-5
