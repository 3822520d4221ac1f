"""Smoke tests for ``ogpsa bench``: every contender on one tiny case, checked for what it
computes (not for speed), the authors' hook scheme against real autograd hooks, the byte
accounting, the result files, and the README/docs tables against their committed result files."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from oracle import float64_project, make_case, rel_err, tolerance

from ogpsa import bench
from ogpsa.bench import process as _process  # noqa: F401  (bench.process in the tests)

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
    """Every benchmark block in README.md and docs/*.md is exactly what ``ogpsa bench --readme <file>
    --update-readme <page>`` writes for the result file it names (links relative to the page), and
    that file is in the repository."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    found = []
    for page in pages:
        for b in bench.README_BLOCK_RE.finditer(page.read_text()):
            found.append(b.group(1))
            m = re.search(r"Source: \[`([^`]+/(?:results|loop|adamw)\.json)`\]", b.group(0))
            assert m, f"{page.name}: block {b.group(1)!r} does not name its result file"
            src = (page.parent / m.group(1)).resolve()
            assert src.is_file() and ROOT in src.parents, f"{src} is not in the repository"
            assert b.group(0) == bench.readme_block(src, page.parent, name=b.group(1)), page.name
    assert found, "no benchmark block in README.md or docs/*.md"
    assert None in found, "no default (CPU) benchmark block in README.md or docs/*.md"


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
                 "--hidden", "32", "--layers", "1", "--seq", "8", "--batch", "2", "--repeats", "2", *extra])


@pytest.fixture(scope="module")
def loop_run(tmp_path_factory):
    """One tiny loop-suite run (both workloads, 2 repeats of 2 iterations) for the tests below."""
    import contextlib
    import io

    pytest.importorskip("transformers")
    out, buf = tmp_path_factory.mktemp("loop"), io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = _run_loop_cli(out)
    return rc, out, buf.getvalue()


def test_loop_suite_smoke_reports_step_and_projection_ratios(loop_run):
    rc, tmp_path, out = loop_run
    assert rc == 0
    data = json.loads((tmp_path / "loop.json").read_text())
    rows = {r["workload"]: r for r in data["results"]}
    assert set(rows) == {"lora", "full"}
    for name, r in rows.items():
        if r["status"] == "skipped":
            assert name == "lora" and "peft" in r["reason"]
            continue
        for key in ("adamw_step_ms", "ogpsa_step_ms", "project_fresh_ms", "project_reused_ms"):
            assert r[key] > 0 and len(r["raw_ms"][key.split("_")[0] if "step" in key else key.split("_")[1]]) == 4
        assert r["step_ratio"] == pytest.approx(r["ogpsa_step_ms"] / r["adamw_step_ms"])
        assert r["fresh_over_reused"] == pytest.approx(r["project_fresh_ms"] / r["project_reused_ms"])
        raw = r["raw_ms"]
        paired = sorted(a / b for a, b in zip(raw["ogpsa"], raw["adamw"]))
        assert r["step_ratio_paired"] == pytest.approx((paired[1] + paired[2]) / 2, rel=1e-3)  # rounded raw
        # two repeats of 2 iterations, each with its own medians and load average
        assert len(r["repeat_results"]) == 2 and all("loadavg_1min" in x for x in r["repeat_results"])
        # per iteration: one projection in the hooked step, one per explicit project() (before the fused
        # step, and the fresh/reused pair); the paused step and the steps after project() add none
        per_iter = 4 if "fused_step_ms" in r else 3
        assert r["projections"] == per_iter * (r["warmup"] + r["repeats"] * r["steps"])
        # torch's fused AdamW (CPU too) and the whole training step beside the optimizer step
        assert "step_ratio_fused" in r and r["fused_step_ms"] > 0
        assert r["step_ratio_fused"] == pytest.approx(r["ogpsa_fused_step_ms"] / r["fused_step_ms"])
        for kind in ("adamw", "ogpsa", "fused", "ogpsa_fused"):
            # forward + backward + step >= the step alone, iteration by iteration
            assert all(t >= s for t, s in zip(raw["train_" + kind], raw[kind]))
        assert r["train_ratio"] == pytest.approx(r["train_ogpsa_ms"] / r["train_adamw_ms"])
        assert r["train_ratio_min"] == pytest.approx(min(raw["train_ogpsa"]) / min(raw["train_adamw"]), rel=1e-3)
    if rows["lora"]["status"] == "ok":
        assert rows["lora"]["trainable_tensors"] == 14  # A and B of 7 linears in 1 layer
    md = (tmp_path / "loop.md").read_text()
    assert "step ratio" in md and "Targets" in md and "Per repeat" in md
    assert all(("met" in t or "short" in t) for t in data["targets"] if "target <=" in t)
    assert "optimizer.step() with OGPSA / AdamW alone" in out
    assert "whole training step (zero_grad, forward, backward, step)" in "\n".join(data["targets"])
    assert "| fused AdamW step ms |" in md and "| training step ratio (paired) |" in md
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


# ----------------------------------------------------------------------------------------
# timing: explicit warm-up calls, never samples (a fake clock: nothing here depends on speed)
# ----------------------------------------------------------------------------------------


def _fake_clock(monkeypatch, durations):
    """``fn`` advancing a fake clock by ``durations[i]`` seconds on its i-th call (the last
    value repeats); returns (fn, calls)."""
    from ogpsa.bench import timing

    now, calls = [0.0], []
    monkeypatch.setattr(timing, "_clock", lambda: now[0])

    def fn():
        now[0] += durations[min(len(calls), len(durations) - 1)]
        calls.append(1)

    return fn, calls


def test_time_fn_slow_first_call_is_a_warmup_never_a_sample(monkeypatch):
    fn, calls = _fake_clock(monkeypatch, [5.0, 0.001])  # a 5 s compile, then 1 ms calls
    t = bench.time_fn(fn, torch.device("cpu"), budget_s=0.0045, min_reps=3, max_reps=5)
    assert t.warmup_ms == pytest.approx([5000.0])
    assert len(t.times_ms) == 4 and t.times_ms == pytest.approx([1.0] * 4)  # 4.5 ms budget / 1 ms
    assert t.median == pytest.approx(1.0) and len(calls) == 1 + 4 and t.warm


def test_time_fn_several_warmups_and_a_contender_slow_when_warm(monkeypatch):
    fn, calls = _fake_clock(monkeypatch, [9.0, 0.5, 0.002])
    t = bench.time_fn(fn, torch.device("cpu"), budget_s=1.0, min_reps=3, max_reps=5, warmup=2)
    assert t.warmup_ms == pytest.approx([9000.0, 500.0])
    assert t.times_ms == pytest.approx([2.0] * 5)  # reps from the first sample, at most max_reps
    fn, calls = _fake_clock(monkeypatch, [3.0])  # slower than slow_s even when warm: one timed sample
    t = bench.time_fn(fn, torch.device("cpu"), slow_s=2.0)
    assert t.warmup_ms == pytest.approx([3000.0]) and t.times_ms == pytest.approx([3000.0]) and len(calls) == 2
    with pytest.raises(ValueError, match="warmup"):
        bench.time_fn(fn, torch.device("cpu"), warmup=0)


# ----------------------------------------------------------------------------------------
# the projected-AdamW suite
# ----------------------------------------------------------------------------------------


def test_adamw_byte_floors_per_element():
    from ogpsa.bench import adamw

    params = [torch.nn.Parameter(torch.ones(10)), torch.nn.Parameter(torch.ones(3, 7))]
    for p in params:
        p.grad = torch.ones_like(p)
    for k in (1, 2, 4):
        b = adamw.byte_counts(params, [torch.ones(k, p.numel()) for p in params])
        n = 31
        assert b["numel"] == n and b["bytes_adamw"] == 28 * n  # read g, p, m, v; write p, m, v
        assert b["bytes_projected"] == (36 + 8 * k) * n  # + m, v re-read in pass 2 + the rows twice
        assert b["bytes_one_pass"] == (28 + 4 * k) * n and b["bytes_separate"] == (40 + 8 * k) * n
    bf = [torch.nn.Parameter(torch.ones(6, dtype=torch.bfloat16))]
    bf[0].grad = torch.ones_like(bf[0])
    b = adamw.byte_counts(bf, [torch.ones(2, 6, dtype=torch.bfloat16)])
    assert b["bytes_adamw"] == (2 + 4 + 16) * 6 and b["bytes_projected"] == (2 + 4 + 24 + 2 * 2 * 2) * 6


def test_adamw_backends_are_timed_only_where_they_run(monkeypatch):
    from ogpsa.bench import adamw

    monkeypatch.delenv("OGPSA_BACKEND", raising=False)
    got = dict(adamw.projected_backends(torch.device("cpu")))
    assert got["torch"] is None and "no CUDA device" in got["triton"] and "no CUDA device" in got["cuda"]
    from ogpsa.optim import backends as ob

    assert (got["cpu"] is None) == ob.cpu_kernel_available()
    # a backend that is not available is skipped with the reason its check gives
    monkeypatch.setattr(ob, "cpu_kernel_available", lambda: False)
    assert "not available" in dict(adamw.projected_backends(torch.device("cpu")))["cpu"]
    monkeypatch.undo()
    monkeypatch.setenv("OGPSA_BACKEND", "torch")
    got = dict(adamw.projected_backends(torch.device("cpu")))
    assert got["torch"] is None and "OGPSA_BACKEND=torch" in got["cpu"]


def test_adamw_contenders_each_take_a_real_step():
    """Every contender changes the parameters and the shared moments; the separate gradient
    projection projects at every call (its setup marks the fixed gradients as rewritten)."""
    from ogpsa.bench import adamw

    case = adamw._Case(bench.tiny_workload(), 2, torch.device("cpu"))
    contenders = adamw.build_adamw_contenders(case, torch.device("cpu"))
    ran = []
    for c in contenders:
        if "fn" not in c:
            assert c["skip"].strip()
            continue
        before = [p.detach().clone() for p in case.params]
        m0 = case.moments[0][0].clone()
        for _ in range(2):
            if c.get("setup"):
                c["setup"]()
            c["fn"]()
        assert max(float((p.detach() - b).abs().max()) for p, b in zip(case.params, before)) > 0, c["name"]
        assert not torch.equal(case.moments[0][0], m0), c["name"]
        ran.append(c["name"])
    assert {"torch-adamw:foreach", "project+adamw:foreach", "projected-adamw:torch"} <= set(ran)
    proj = contenders[0]["cleanup"].__self__
    assert proj.num_projections == 2 * len([n for n in ran if n.startswith("project+")])
    contenders[0]["cleanup"]()


def test_adamw_suite_cli_smoke_and_readme_block(tmp_path):
    from ogpsa.bench import adamw
    from ogpsa.cli import main

    assert main(["bench", "--suite", "adamw", "--workloads", "tiny", "--out", str(tmp_path), "--budget-s", "0.02"]) == 0
    data = json.loads((tmp_path / "adamw.json").read_text())
    assert data["suite"] == "adamw" and data["env"]["hardware"]
    rows = {r["contender"]: r for r in data["results"]}
    foreach = rows["torch-adamw:foreach"]
    assert foreach["status"] == "ok" and foreach["x_adamw"] == pytest.approx(1.0)
    for r in rows.values():
        if r["status"] != "ok":
            assert r["reason"]
            continue
        assert len(r["raw_ms"]) == r["reps"] >= 2 * 3 and len(r["warmup_ms"]) == 2  # 2 rounds, 1 warm-up each
        assert r["eff_gbps"] == pytest.approx(r[r["floor"]] / (r["median_ms"] * 1e-3) / 1e9)
        assert r["bytes_per_element"] == {"bytes_adamw": 28, "bytes_separate": 56, "bytes_projected": 52}[r["floor"]]
    assert rows["projected-adamw:torch"]["x_best_separate"] is not None
    assert rows["projected-adamw:torch"]["ran_backends"] == ["torch"]  # from the step's own statistics
    md = (tmp_path / "adamw.md").read_text()
    assert "| projected-adamw:torch |" in md and "36 + 8k" in md
    start, end = bench.readme_markers("adamw")
    block = bench.readme_block(tmp_path / "adamw.json", tmp_path, name="adamw")
    assert block.startswith(start + "\nSource: [`adamw.json`]") and block.endswith(end)
    assert "\n".join(adamw.adamw_table([rows["torch-adamw:foreach"]])) in block


def test_loop_readme_block_from_a_loop_result(loop_run):
    rc, tmp_path, _ = loop_run
    block = bench.readme_block(tmp_path / "loop.json", tmp_path, name="loop")
    start, end = bench.readme_markers("loop")
    assert block.startswith(start + "\nSource: [`loop.json`]") and block.endswith(end)
    assert "| full |" in block and "zero_grad()" in block and "target <= 1.2x" in block


# ----------------------------------------------------------------------------------------
# the process ogpsa bench runs in: header, wait policy, threads, no profiler/driver noise
# ----------------------------------------------------------------------------------------

_NOISE = ("USDT", "profiler_start", "gpuGetDeviceCount", "SyncActivityProfilerHandler", "CPUAllocator.cpp")


def _bench_command(tmp_path, *extra, env_extra=None):
    import os
    import subprocess
    import sys

    exe = Path(sys.executable).with_name("ogpsa")
    if not exe.exists():
        pytest.skip(f"no ogpsa console script next to {sys.executable}")
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "KINETO_LOG_LEVEL", "TORCH_CPP_LOG_LEVEL",
                        bench.process.REEXEC_MARK)}
    env.update(env_extra or {})
    out = tmp_path / "out"
    cmd = [str(exe), "bench", "--suite", "smoke", "--no-plot", "--out", str(out), "--budget-s", "0.02",
           "--contenders", "torch-foreach", "ogpsa:cpu", "copy", *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done, json.loads((out / "results.json").read_text())


def test_bench_command_sets_passive_wait_and_says_so_without_noise(tmp_path):
    done, data = _bench_command(tmp_path, "--threads", "1")
    head = done.stdout.splitlines()[0]
    assert head.startswith("ogpsa bench: 1 threads (--threads), OMP_WAIT_POLICY=PASSIVE (set by ogpsa bench "
                           "before torch started)"), head
    assert "load average" in head
    for word in _NOISE:
        assert word not in done.stdout and word not in done.stderr, word
    proc = data["env"]["process"]
    assert proc["omp_wait_policy"] == "PASSIVE" and proc["omp_wait_policy_in_effect"] and proc["threads"] == 1
    assert data["env"]["torch_threads"] == 1 and data["env"]["env_vars"]["OMP_WAIT_POLICY"] == "PASSIVE"
    assert data["env"]["command"].startswith("ogpsa bench --suite smoke")
    assert "- process: 1 threads (--threads), OMP_WAIT_POLICY=PASSIVE" in (tmp_path / "out" / "results.md").read_text()


def test_bench_command_keeps_the_callers_wait_policy(tmp_path):
    done, data = _bench_command(tmp_path, env_extra={"OMP_WAIT_POLICY": "ACTIVE"})
    assert "OMP_WAIT_POLICY=ACTIVE (from the caller's environment)" in done.stdout.splitlines()[0]
    assert data["env"]["process"]["threads_source"] == "torch default"


def test_in_process_bench_says_the_policy_is_not_in_effect(tmp_path, monkeypatch, capsys):
    from ogpsa.cli import main

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv(bench.process.REEXEC_MARK, raising=False)
    threads = torch.get_num_threads()
    try:
        assert main(["bench", "--suite", "smoke", "--no-plot", "--out", str(tmp_path), "--budget-s", "0.02",
                     "--contenders", "copy"]) == 0
    finally:
        torch.set_num_threads(threads)
    head = capsys.readouterr().out.splitlines()[0]
    assert "OMP_WAIT_POLICY=PASSIVE (requested after torch started (in-process call): not in effect" in head
    assert json.loads((tmp_path / "results.json").read_text())["env"]["process"]["omp_wait_policy_in_effect"] is False
    assert main(["bench", "--threads", "0", "--out", str(tmp_path)]) == 2


def test_plot_one_colour_per_contender_and_one_legend(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from ogpsa.bench import report

    figs = []
    monkeypatch.setattr(report.atomic, "save_figure", lambda fig, path, **kw: figs.append(fig))
    env = {"hardware": "cpu", "torch_threads": 2, "torch": "x", "git_commit": "0" * 40, "date": "2026-01-01"}
    rows = [{"status": "ok", "workload": wl, "k": k, "contender": c, "grad_dtype": "torch.float32",
             "basis_dtype": "torch.float32", "median_ms": 1.0 + k + i, "pct_copy": 10.0 * (i + 1)}
            for wl, names in (("lora", ("a", "b", "copy")), ("125m", ("b", "copy", "a"))) for k in (1, 2)
            for i, c in enumerate(names)]
    assert report.plot_results({"env": env, "results": rows}, tmp_path / "x.png") is not None
    (fig,) = figs
    colours: dict = {}
    for ax in fig.axes:
        assert ax.get_legend() is None  # one legend, for the figure
        for line in ax.get_lines():
            assert colours.setdefault(line.get_label(), line.get_color()) == line.get_color(), line.get_label()
    assert len(set(colours.values())) == len(colours) == 3 and len(fig.legends) == 1
