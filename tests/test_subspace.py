"""Subspace construction, persistence and model validation."""

import json

import numpy as np
import pytest
import torch

import ogpsa
from ogpsa import OGPSAConfig, Subspace, SubspaceMismatchError
from ogpsa.subspace import SUBSPACE_FILE, SubspaceFileError

pytestmark = pytest.mark.usefixtures("paper_preset")  # these tests mean the paper recipe (preset="paper")


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


# ----------------------------------------------------------------------------------------
# basis files: every malformed or inconsistent file is rejected with a named error
# ----------------------------------------------------------------------------------------


def _saved(tmp_path, seed=6):
    from safetensors import safe_open
    from safetensors.torch import load_file

    sub = Subspace.from_gradients(_refs(seed)[0])
    path = tmp_path / "good.safetensors"
    sub.save(str(path))
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    return sub, load_file(str(path)), meta


def _write(tmp_path, tensors, meta, name="bad.safetensors"):
    from safetensors.torch import save_file

    path = str(tmp_path / name)
    save_file(tensors, path, metadata=meta)
    return path


def test_load_accepts_a_directory_with_the_standard_file_and_names_what_it_looked_for(tmp_path):
    from ogpsa.integrations.common import SUBSPACE_FILE as TRAINER_FILE

    assert SUBSPACE_FILE == TRAINER_FILE  # the trainers' checkpoints load with Subspace.load(dir)
    sub = Subspace.from_gradients(_refs(7)[0])
    sub.save(str(tmp_path))  # a directory: the standard name inside it
    assert (tmp_path / SUBSPACE_FILE).is_file()
    assert Subspace.load(tmp_path).equal(sub)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=f"looked for .*empty/{SUBSPACE_FILE}"):
        Subspace.load(empty)
    with pytest.raises(FileNotFoundError, match="no such file"):
        Subspace.load(tmp_path / "nope.safetensors")


def test_load_rejects_a_gram_matrix_that_does_not_belong_to_its_basis(tmp_path):
    sub, tensors, meta = _saved(tmp_path)
    # consistent checksum, wrong M: the file was written inconsistently (not corrupted later)
    tensors["gram.2"] = tensors["gram.2"] * 1.01
    meta.pop("sha256")
    with pytest.raises(SubspaceFileError, match="Gram matrix of 'b.weight' does not match its basis"):
        Subspace.load(_write(tmp_path, tensors, meta))
    # a Gram matrix summed in float32 in another order (e.g. over shards) still loads
    _, tensors, meta = _saved(tmp_path)
    u = tensors["basis.2"]
    tensors["gram.2"] = (u[:, :2000] @ u[:, :2000].T + u[:, 2000:] @ u[:, 2000:].T).float()
    meta.pop("sha256")
    assert Subspace.load(_write(tmp_path, tensors, meta, "resummed.safetensors")).equal(sub)


def test_load_rejects_data_changed_after_saving_by_checksum(tmp_path):
    _, tensors, meta = _saved(tmp_path)
    tensors["basis.0"] = tensors["basis.0"].clone()
    tensors["basis.0"][0, 0] = torch.nextafter(tensors["basis.0"][0, 0], torch.tensor(2.0))  # one ulp
    with pytest.raises(SubspaceFileError, match="SHA-256"):
        Subspace.load(_write(tmp_path, tensors, meta))


@pytest.mark.parametrize("key,value,match", [
    ("names", "[\"a.weight\", ", "'names' is not valid JSON"),
    ("shapes", "{{", "'shapes' is not valid JSON"),
    ("config", "not json", "'config' is not valid JSON"),
    ("config", '{"mode": "sideways"}', "'config' is invalid.*mode"),
    ("names", '["a.weight", "a.weight", "b.weight", "c"]', "repeats"),
    ("names", '[1, 2, 3, 4]', "list of strings"),
    ("shapes", '[[7, 5], [7], [4097]]', "one shape per name"),
    ("shapes", '[[7, 5], [7], [-1], [1]]', "'b.weight' is \\[-1\\]"),
    ("num_references", "three", "num_references"),
    ("format_version", "99", "format version '99'"),
    ("names", None, "'names' is missing"),
])
def test_load_rejects_malformed_metadata_naming_the_field(tmp_path, key, value, match):
    _, tensors, meta = _saved(tmp_path)
    if value is None:
        meta.pop(key)
    else:
        meta[key] = value
    with pytest.raises(SubspaceFileError, match=match):
        Subspace.load(_write(tmp_path, tensors, meta))


def test_load_rejects_missing_and_extra_tensors_and_names(tmp_path):
    _, tensors, meta = _saved(tmp_path)
    names = json.loads(meta["names"])
    extra = dict(tensors, stray=torch.ones(2))
    with pytest.raises(SubspaceFileError, match="unexpected \\['stray'\\]"):
        Subspace.load(_write(tmp_path, extra, meta))
    missing = {k: v for k, v in tensors.items() if k != "basis.3"}
    with pytest.raises(SubspaceFileError, match="missing \\[\"basis.3 \\(for 'c'\\)\"\\]"):
        Subspace.load(_write(tmp_path, missing, meta, "missing.safetensors"))
    # one name too many (its tensors are absent) / one too few (its tensors are extra)
    more = dict(meta, names=json.dumps(names + ["d"]), shapes=json.dumps(json.loads(meta["shapes"]) + [[3]]))
    with pytest.raises(SubspaceFileError, match="basis.4 \\(for 'd'\\)"):
        Subspace.load(_write(tmp_path, tensors, more, "more.safetensors"))
    fewer = dict(meta, names=json.dumps(names[:3]), shapes=json.dumps(json.loads(meta["shapes"])[:3]))
    with pytest.raises(SubspaceFileError, match="unexpected \\['basis.3', 'gram.3'\\]"):
        Subspace.load(_write(tmp_path, tensors, fewer, "fewer.safetensors"))


@pytest.mark.parametrize("change,match", [
    (lambda t: t.update({"basis.1": t["basis.1"][:, :6].contiguous()}), "basis of 'a.bias' has shape \\(3, 6\\)"),
    (lambda t: t.update({"basis.1": t["basis.1"].bfloat16()}), "basis of 'a.bias' is torch.bfloat16"),
    (lambda t: t.update({"gram.1": t["gram.1"][:2, :2].contiguous()}), "Gram matrix of 'a.bias' is .*\\(2, 2\\)"),
    (lambda t: t["basis.2"].__setitem__((1, 5), float("nan")), "basis of 'b.weight' contains NaN"),
    (lambda t: t["gram.0"].__setitem__((0, 1), float("inf")), "Gram matrix of 'a.weight' contains NaN"),
])
def test_load_rejects_bad_tensor_shapes_dtypes_and_values(tmp_path, change, match):
    _, tensors, meta = _saved(tmp_path)
    tensors = {k: v.clone() for k, v in tensors.items()}
    change(tensors)
    meta.pop("sha256")  # reach the per-tensor checks, not only the checksum
    with pytest.raises(SubspaceFileError, match=match):
        Subspace.load(_write(tmp_path, tensors, meta))


def test_load_rejects_a_file_that_is_not_safetensors(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"\x00" * 40)
    with pytest.raises(SubspaceFileError, match="not readable as safetensors"):
        Subspace.load(str(path))


def test_failed_save_leaves_no_file_behind(tmp_path, monkeypatch):
    import ogpsa.subspace as subspace_module

    sub = Subspace.from_gradients(_refs(8)[0])
    target = tmp_path / "s.safetensors"
    sub.save(str(target))
    before = target.read_bytes()

    real_open = subspace_module.atomic.open_atomic

    def broken(path, data):  # fails after part of the file reached the temporary file
        with real_open(path) as f:
            f.write(b"partial")
            raise OSError("disk full")

    monkeypatch.setattr(subspace_module.atomic, "write_bytes", broken)
    with pytest.raises(OSError, match="disk full"):
        Subspace.from_gradients(_refs(9)[0]).save(str(target))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.safetensors"]  # no temporary file
    assert target.read_bytes() == before  # the old file is intact
    with pytest.raises(OSError, match="disk full"):
        sub.save(str(tmp_path / "new.safetensors"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.safetensors"]
