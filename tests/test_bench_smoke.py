"""Smoke tests for ``ogpsa bench``: every contender on one tiny case, checked for what it
computes (not for speed), the authors' hook scheme against real autograd hooks, the byte
accounting, the result files, and the README table against its committed result file."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from oracle import float64_project, make_case, rel_err, tolerance

from ogpsa import bench

ROOT = Path(__file__).resolve().parent.parent
PAIRS = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)]


def _flat_err(got, want) -> float:
    return rel_err(list(got), [w.reshape(-1) for w in want])


@pytest.mark.parametrize("gdt,udt", PAIRS)
@pytest.mark.parametrize("max_norm", [None, 1.0])
def test_foreach_projector_matches_float64(gdt, udt, max_norm):
    grads, bases = make_case(11, [7, 33, 4097, 1, 300], 3, gdt, udt)  # mixed k_i, k_i = 0 included
    want, _ = float64_project(grads, bases, max_norm=max_norm)
    total = bench.ForeachProjector(grads, bases).step(max_norm)
    assert _flat_err(grads, want) <= tolerance(gdt, udt)
    assert math.isfinite(total) and total > 0


def test_foreach_projector_rejects_mismatched_basis_before_touching_grads():
    grads, bases = make_case(1, [10, 20], 2)
    before = [g.clone() for g in grads]
    with pytest.raises(ValueError, match="tensor 1"):
        bench.ForeachProjector(grads, [bases[0], bases[1][:, :5].contiguous()])
    assert all(torch.equal(a, b) for a, b in zip(before, grads))


@pytest.mark.parametrize("k", [1, 2])
def test_authors_hooks_on_real_autograd_equal_projection_of_accumulated_gradient(k):
    """The re-implementation, registered with Tensor.register_hook and run over 8
    micro-batches, gives the projection of the accumulated gradient (projection is linear)."""
    mod, where = bench.load_authors_scheme()
    assert mod is not None, where
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(13, 17), torch.nn.Tanh(), torch.nn.Linear(17, 5))
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(3)
    bases = [bench.make_tensors(bench.Workload("p", "", [("p", tuple(p.shape))]), k, torch.float32, torch.float32,
                                torch.device("cpu"), seed=i)[1][0] for i, p in enumerate(params)]
    batches = [torch.randn(4, 13, generator=gen) for _ in range(bench.MICRO_BATCHES)]

    for x in batches:  # plain accumulation, for the expected result
        model(x).pow(2).sum().backward()
    plain = [p.grad.clone() for p in params]
    model.zero_grad()

    scheme = mod.AuthorsHookScheme([f"p{i}" for i in range(len(params))], [p.detach() for p in params], bases)
    handles = scheme.register(params)
    for x in batches:
        model(x).pow(2).sum().backward()
    for h in handles:
        h.remove()
    want, _ = float64_project(plain, bases)
    assert _flat_err([p.grad for p in params], want) <= 1e-5


def test_authors_scheme_refuses_k_above_two():
    mod, _ = bench.load_authors_scheme()
    grads, bases = make_case(2, [50], 3)
    with pytest.raises(ValueError, match="one or two reference gradients"):
        mod.AuthorsHookScheme(["w"], grads, bases)


def test_every_contender_on_a_tiny_case_computes_what_it_claims():
    wl = bench.tiny_workload()
    grads, bases = bench.make_tensors(wl, 2, torch.float32, torch.float32, torch.device("cpu"))
    original = [g.clone() for g in grads]
    contenders = bench.build_contenders(grads, bases, [n for n, _ in wl.shapes])
    names = [c.name for c in contenders]
    assert names[:3] == ["reference", "torch-foreach", "authors-hooks"]
    assert names[-2:] == ["clip_grad_norm_", "copy"]
    assert {f"ogpsa:{n}" for n in bench.ops.backends()} <= set(names)
    want, _ = float64_project(original, bases, max_norm=bench.MAX_NORM)
    norm = math.sqrt(sum(float(g.double().square().sum()) for g in original))
    clipped = [g.double().numpy().reshape(-1) * min(1.0, bench.MAX_NORM / (norm + 1e-6)) for g in original]
    ran = []
    for c in contenders:
        for g, o in zip(grads, original):
            g.copy_(o)
        if c.skip:
            assert c.skip.strip(), c.name
            if c.name == "ogpsa:triton":
                assert "interpreter" in c.skip or "GPU" in c.skip or "not part" in c.skip
            continue
        if c.setup is not None:
            c.setup()
        c.fn()
        ran.append(c.name)
        outs = c.outputs() if c.outputs is not None else grads
        if c.name == "clip_grad_norm_":
            assert _flat_err(outs, clipped) <= 1e-6
        elif c.name == "copy":
            assert all(torch.equal(g, o) for g, o in zip(outs, original))  # reads only
        else:
            assert _flat_err(outs, want) <= 1e-5, c.name
    assert {"reference", "torch-foreach", "authors-hooks", "ogpsa:torch", "ogpsa:projector-fresh",
            "ogpsa:projector-reused", "clip_grad_norm_", "copy"} <= set(ran)


def test_copy_contender_moves_every_byte():
    wl = bench.tiny_workload()
    grads, bases = bench.make_tensors(wl, 2, torch.bfloat16, torch.float32, torch.device("cpu"))
    dsts, srcs = bench._copy_lists(grads, bases)
    assert len(srcs) == len(grads) + sum(u.shape[0] for u in bases)
    assert sum(s.numel() * s.element_size() for s in srcs) == bench.byte_counts(grads, bases)["bytes_copy"] // 2
    torch._foreach_copy_(dsts[-1:], srcs[-1:])
    assert torch.equal(dsts[-1], srcs[-1])


def test_byte_counts_formula():
    grads = [torch.ones(10), torch.ones(3, 2, dtype=torch.bfloat16)]
    bases = [torch.ones(2, 10), torch.ones(2, 6, dtype=torch.bfloat16)]
    b = bench.byte_counts(grads, bases)
    b_g, kb_u = 10 * 4 + 6 * 2, 2 * 10 * 4 + 2 * 6 * 2
    assert b == {"bytes_g": b_g, "bytes_kU": kb_u, "bytes_floor": 3 * b_g + 2 * kb_u,
                 "bytes_one_pass": 2 * b_g + kb_u, "bytes_copy": 2 * (b_g + kb_u)}


def test_derived_metrics_and_per_element_extrapolation():
    wl = bench.Workload("w", "", [("a", (1000,))], full_numel=8_000)
    base = {"workload": "w", "k": 2, "grad_dtype": "fp32", "basis_dtype": "fp32", "numel": 1000, "status": "ok",
            **bench.byte_counts([torch.ones(1000)], [torch.ones(2, 1000)])}
    rows = [dict(base, contender="reference", median_ms=4.0), dict(base, contender="ogpsa:cpu", median_ms=1.0),
            dict(base, contender="authors-hooks", median_ms=200.0), dict(base, contender="clip_grad_norm_", median_ms=0.5),
            dict(base, contender="copy", median_ms=2.0)]
    bench._derive(rows, wl, peak_copy_gbps=None)
    r = rows[1]
    assert r["x_reference"] == 4.0 and r["x_authors"] == 200.0 and r["over_clip"] == 2.0
    assert r["eff_gbps"] == pytest.approx((3 * 4000 + 2 * 8000) / 1e-3 / 1e9)
    assert r["pct_copy"] == pytest.approx(100 * r["eff_gbps"] / (2 * (4000 + 8000) / 2e-3 / 1e9))
    assert r["extrapolated_full_ms"] == pytest.approx(8.0)  # 1 ms for 1000 elements -> 8000 elements
    bench._derive(rows, wl, peak_copy_gbps=1e6)  # a faster measured ceiling lowers the percentage
    assert rows[1]["pct_copy"] == pytest.approx(100 * rows[1]["eff_gbps"] / 1e6)


def test_workload_shapes():
    assert bench.lora_workload().tensors == 448
    assert abs(bench.llama8b_full_numel() - 8.03e9) < 0.01e9
    assert abs(bench.gpt2_125m_workload().numel - 124.4e6) < 0.1e6
    assert bench.llama8b_workload(2).numel == 2 * bench.llama8b_workload(1).numel


def test_missing_benchmarks_dir_skips_authors_scheme_with_reason(monkeypatch, tmp_path):
    monkeypatch.setenv("OGPSA_BENCHMARKS_DIR", str(tmp_path))
    grads, bases = make_case(4, [20, 30], 2)
    c = {c.name: c for c in bench.build_contenders(grads, bases)}["authors-hooks"]
    assert c.fn is None and "benchmarks/" in c.skip


def test_cli_smoke_suite_writes_json_markdown_and_png(tmp_path):
    from ogpsa.cli import main

    assert main(["bench", "--suite", "smoke", "--out", str(tmp_path), "--budget-s", "0.05"]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    for key in ("hardware", "torch", "triton", "git_commit", "date"):
        assert data["env"][key]
    rows = {r["contender"]: r for r in data["results"]}
    assert {"reference", "torch-foreach", "authors-hooks", "clip_grad_norm_", "copy"} <= set(rows)
    ref = rows["reference"]
    assert ref["status"] == "ok" and ref["median_ms"] > 0 and ref["x_reference"] == pytest.approx(1.0)
    assert ref["eff_gbps"] == pytest.approx(ref["bytes_floor"] / (ref["median_ms"] * 1e-3) / 1e9)
    md = (tmp_path / "results.md").read_text()
    assert "| reference |" in md and "3*B_g + 2*k*B_u" in md
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_readme_table_equals_the_committed_result_file():
    """Every benchmark block in the README is exactly what ``ogpsa bench --readme <file>``
    prints for the result file it names, and that file is in the repository."""
    text = (ROOT / "README.md").read_text()
    blocks = list(bench.README_BLOCK_RE.finditer(text))
    assert blocks, "README has no benchmark block"
    assert any(b.group(1) is None for b in blocks), "README has no default (CPU) benchmark block"
    for b in blocks:
        m = re.search(r"Source: \[`([^`]+/results\.json)`\]", b.group(0))
        assert m, f"README block {b.group(1)!r} does not name its result file"
        src = ROOT / m.group(1)
        assert src.is_file(), f"{src} is not in the repository"
        assert b.group(0) == bench.readme_block(src, ROOT, name=b.group(1))


def test_named_readme_block_round_trip(tmp_path):
    src = ROOT / "benchmarks" / "results"
    results = [p for p in sorted(src.glob("*/*/results.json")) if '"suite"' in p.read_text()[:4000]]
    assert results, "no committed result file"
    start, end = bench.readme_markers("gpu")
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{start}\nold\n{end}\noutro\n")
    bench.update_readme(readme, bench.readme_block(results[0], ROOT, name="gpu"), "gpu")
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "old" not in text
    (b,) = bench.README_BLOCK_RE.finditer(text)
    assert b.group(1) == "gpu" and b.group(0) == bench.readme_block(results[0], ROOT, name="gpu")
    with pytest.raises(ValueError, match="markers"):
        bench.update_readme(readme, "x", "cpu-2")


def test_projector_contenders_give_fresh_tensors_or_rewrite_the_same_buffers():
    wl = bench.tiny_workload()
    grads, bases = bench.make_tensors(wl, 2, torch.float32, torch.float32, torch.device("cpu"))
    cs = {c.name: c for c in bench.build_contenders(grads, bases, only=["ogpsa:projector"])}
    for name, fresh in (("ogpsa:projector-fresh", True), ("ogpsa:projector-reused", False)):
        c = cs[name]
        c.setup()
        first = [id(t) for t in c.outputs()]
        c.fn()
        c.setup()
        again = [id(t) for t in c.outputs()]
        assert (first != again) if fresh else (first == again), name
        before = [t.clone() for t in c.outputs()]
        c.fn()
        if fresh:  # new, unprojected tensors: this call projected them
            assert max(float((a - b).abs().max()) for a, b in zip(c.outputs(), before)) > 0


def _run_loop_cli(tmp_path, *extra):
    from ogpsa.cli import main

    return main(["bench", "--suite", "loop", "--out", str(tmp_path), "--steps", "2", "--warmup", "1",
                 "--hidden", "32", "--layers", "1", "--seq", "8", "--batch", "2", *extra])


def test_loop_suite_smoke_reports_step_and_projection_ratios(tmp_path, capsys):
    pytest.importorskip("transformers")
    assert _run_loop_cli(tmp_path) == 0
    data = json.loads((tmp_path / "loop.json").read_text())
    rows = {r["workload"]: r for r in data["results"]}
    assert set(rows) == {"lora", "full"}
    for name, r in rows.items():
        if r["status"] == "skipped":
            assert name == "lora" and "peft" in r["reason"]
            continue
        for key in ("adamw_step_ms", "ogpsa_step_ms", "project_fresh_ms", "project_reused_ms"):
            assert r[key] > 0 and len(r["raw_ms"][key.split("_")[0] if "step" in key else key.split("_")[1]]) == 2
        assert r["step_ratio"] == pytest.approx(r["ogpsa_step_ms"] / r["adamw_step_ms"])
        assert r["fresh_over_reused"] == pytest.approx(r["project_fresh_ms"] / r["project_reused_ms"])
        # per step: one projection in the hooked step, one per explicit project(); the paused
        # step and the steps after project() add none
        assert r["projections"] == 3 * (r["warmup"] + r["steps"])
    if rows["lora"]["status"] == "ok":
        assert rows["lora"]["trainable_tensors"] == 14  # A and B of 7 linears in 1 layer
    md = (tmp_path / "loop.md").read_text()
    assert "step ratio" in md and "Targets" in md
    out = capsys.readouterr().out
    assert "optimizer.step() with OGPSA / AdamW alone" in out
    assert (tmp_path / "loop.png").read_bytes()[:4] == b"\x89PNG" and "loop.png" in out


def test_no_plot_claimed_without_matplotlib(tmp_path, capsys, monkeypatch):
    from ogpsa.bench import cli

    monkeypatch.setattr(cli, "_matplotlib_missing", lambda: "ModuleNotFoundError: No module named 'matplotlib'")
    from ogpsa.cli import main

    assert main(["bench", "--suite", "smoke", "--out", str(tmp_path), "--budget-s", "0.01",
                 "--contenders", "reference"]) == 0
    captured = capsys.readouterr()
    assert "pip install matplotlib" in captured.err
    assert "bench.png" not in captured.out and not (tmp_path / "bench.png").exists()
    assert "results.json" in captured.out


def test_default_output_is_ignored_and_publish_is_explicit():
    import subprocess

    from ogpsa.bench.cli import default_out

    out = default_out(torch.device("cpu"), publish=False)
    assert out.is_relative_to(ROOT / "out" / "bench")
    probe = out / "results.json"
    ignored = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", str(probe)])
    assert ignored.returncode == 0, f"{probe} is not ignored by git"
    assert default_out(torch.device("cpu"), publish=True).is_relative_to(ROOT / "benchmarks" / "results")
