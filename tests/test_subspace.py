"""Subspace construction, persistence and model validation."""

import numpy as np
import pytest
import torch

import ogpsa
from ogpsa import OGPSAConfig, Subspace, SubspaceMismatchError


def _refs(seed=0, m=3):
    gen = torch.Generator().manual_seed(seed)
    shapes = {"a.weight": (7, 5), "a.bias": (7,), "b.weight": (4097,), "c": (1,)}
    return [{n: torch.randn(*s, generator=gen) for n, s in shapes.items()} for _ in range(m)], shapes


def test_from_gradients_is_orthonormal_and_spans_refs():
    refs, shapes = _refs()
    sub = Subspace.from_gradients(refs)
    assert sub.names == list(shapes)
    assert sub.ranks() == {"a.weight": 3, "a.bias": 3, "b.weight": 3, "c": 1}
    for name in sub.names:
        u = sub.basis(name).double()
        np.testing.assert_allclose((u @ u.T).numpy(), np.eye(u.shape[0]), atol=1e-5)
        r = torch.stack([d[name].reshape(-1) for d in refs]).double()
        resid = r - (r @ u.T) @ u  # every reference gradient lies in the span
        assert float(resid.norm()) <= 1e-5 * float(r.norm())


def test_missing_and_zero_gradients_give_no_direction():
    refs, _ = _refs(1)
    refs[0]["a.bias"] = torch.zeros(7)
    refs[1].pop("a.bias")
    refs[2]["a.bias"] = None
    sub = Subspace.from_gradients(refs)
    assert sub.ranks()["a.bias"] == 0
    assert sub.basis("a.bias").shape == (0, 7)


def test_nan_reference_is_dropped():
    refs, _ = _refs(2)
    refs[1]["b.weight"][10] = float("inf")
    sub = Subspace.from_gradients(refs)
    assert sub.ranks()["b.weight"] == 2
    assert bool(torch.isfinite(sub.basis("b.weight")).all())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_save_load_round_trip_bit_identical(tmp_path, dtype, scope):
    refs, _ = _refs(3)
    cfg = OGPSAConfig(basis_dtype=dtype, scope=scope, mode="conflict", aligned_scale=0.25)
    sub = Subspace.from_gradients(refs, cfg)
    path = str(tmp_path / "s.safetensors")
    sub.save(path)
    back = Subspace.load(path)
    assert back.equal(sub)
    assert back.config == cfg
    assert all(torch.equal(a, b) for a, b in zip(back.grams, sub.grams))
    assert back.bases[0].dtype == (torch.bfloat16 if dtype == "bfloat16" else torch.float32)


def test_load_rejects_other_files(tmp_path):
    from safetensors.torch import save_file

    path = str(tmp_path / "x.safetensors")
    save_file({"x": torch.ones(2)}, path)
    with pytest.raises(ValueError, match="not an ogpsa subspace"):
        Subspace.load(path)


def test_to_dtype_memory_and_bf16_projection_exact():
    refs, _ = _refs(4)
    sub = Subspace.from_gradients(refs)
    half = sub.to(dtype=torch.bfloat16)
    assert half.memory_bytes() * 2 == sub.memory_bytes()
    assert half.config.basis_dtype == "bfloat16"
    # projection with the rounded basis is exactly orthogonal to its own rows (M corrects)
    g = torch.randn(4097)
    ogpsa.project_([g], [half.basis("b.weight")], grams=[half.gram("b.weight")])
    u = half.basis("b.weight").double()
    assert float((u @ g.double()).abs().max()) < 1e-4 * float(g.norm())
    assert "MiB" in sub.memory_report()


def test_global_scope_builds_one_whole_model_basis():
    refs, _ = _refs(5)
    sub = Subspace.from_gradients(refs, OGPSAConfig(scope="global"))
    u = torch.cat([b.double() for b in sub.bases], dim=1)
    np.testing.assert_allclose((u @ u.T).numpy(), np.eye(3), atol=1e-5)


def test_check_model_names_every_problem():
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3))
    grads = [{"0.weight": torch.randn(7, 5), "0.bias": torch.randn(7), "1.weight": torch.randn(3, 7),
              "ghost": torch.randn(2)} for _ in range(2)]
    sub = Subspace.from_gradients(grads)
    sub.shapes[1] = (8,)
    with pytest.raises(SubspaceMismatchError) as err:
        sub.check_model(model, require_all=True)
    text = str(err.value)
    assert "'ghost'" in text and "'0.bias'" in text and "'1.bias'" in text and "(8,)" in text


def test_bad_construction_inputs():
    with pytest.raises(ValueError, match="non-empty list"):
        Subspace.from_gradients([])
    with pytest.raises(ValueError, match="disagree on the shape"):
        Subspace.from_gradients([{"w": torch.randn(3)}, {"w": torch.randn(4)}])
    with pytest.raises(ValueError, match="NaN"):
        Subspace(["w"], [(3,)], [torch.tensor([[float("nan"), 0.0, 0.0]])])


@pytest.mark.parametrize("field,value,match", [
    ("mode", "sideways", "mode"), ("scope", "layer", "scope"), ("rank", 0, "rank"),
    ("energy", 0.9, "method='eigen'"), ("basis_dtype", "float16", "basis_dtype"),
    ("refresh_every", -1, "refresh_every"), ("max_norm", 0.0, "max_norm"), ("backend", "jax", "backend"),
])
def test_config_validation_names_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        OGPSAConfig(**{field: value})


def test_config_round_trip():
    cfg = OGPSAConfig(mode="conflict", method="eigen", energy=0.9, rank=4)
    assert OGPSAConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown fields"):
        OGPSAConfig.from_dict({"bogus": 1})
