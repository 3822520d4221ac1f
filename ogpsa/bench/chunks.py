"""The chunk-gradient suite (``ogpsa bench --suite chunks``): K reference directions from one
forward and one backward (:mod:`ogpsa.chunkgrad`) against K separate forward+backward passes.

Workload: a seeded tiny Llama (:func:`ogpsa.tiny.tiny_llama`, full fine-tune: every tensor gets
a rule) and K chunks of ``chunk_samples`` random token sequences. Contenders, rounds interleaved
(order reversed every other round), samples pooled, min and median:

* ``one_pass``: :class:`ogpsa.chunkgrad.ChunkGradients`, one forward over all rows, one backward;
  the K per-chunk weight gradients are formed in the hooks;
* ``k_passes``: K forward+backward passes, one per chunk (what per-chunk directions cost without
  the hooks), each chunk's ``.grad`` copied out;
* ``mean_pass``: one forward+backward of the mean loss over all rows (one direction: the floor).

``speedup`` = median k_passes / median one_pass; ``x_mean`` = median one_pass / median
mean_pass. ``max_rel_err``: largest ||one_pass - k_passes|| / ||k_passes|| over chunks and
tensors (float32). Timings on a shared CPU are noisy: the load average is recorded.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..chunkgrad import ChunkGradients
from ..sequences import lm_token_loss_sums
from .timing import environment, time_fn, write_suite_files

DEFAULT_KS = (4, 8, 16)
FORMULA = {
    "one_pass": "ChunkGradients: one forward over all K chunks, one backward, per-chunk weight gradients in hooks",
    "k_passes": "K forward+backward passes, one per chunk, each .grad copied out",
    "mean_pass": "one forward+backward of the mean loss over all rows (one direction)",
    "speedup": "median k_passes / median one_pass",
    "x_mean": "median one_pass / median mean_pass",
    "max_rel_err": "max over chunks and tensors of ||one_pass - k_passes|| / ||k_passes|| (float32)",
}


def _model(hidden: int, layers: int, seed: int = 0):
    from ..tiny import char_tokenizer, tiny_llama

    tok = char_tokenizer()
    return tiny_llama(tok, hidden, layers, heads=4, intermediate=int(hidden * 2.75), seed=seed), len(tok)


def _sequences(vocab: int, n: int, seq: int, seed: int) -> list:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(seq // 2, seq + 1, (1,), generator=gen))
        ids = torch.randint(4, vocab, (length,), generator=gen).tolist()
        out.append((ids, list(ids)))
    return out


def run_case(k: int, *, hidden: int = 128, layers: int = 2, chunk_samples: int = 2, seq: int = 48, rounds: int = 3,
             budget_s: float = 1.0, device: Optional[torch.device] = None, log=print) -> dict:
    device = device or torch.device("cpu")
    model, vocab = _model(hidden, layers)
    model.to(device).eval()
    seqs = _sequences(vocab, k * chunk_samples, seq, seed=k)
    rows = torch.arange(k).repeat_interleave(chunk_samples)
    params = [(n, p) for n, p in model.named_parameters()]

    def one_pass():
        eng = ChunkGradients(model, params, k)

        def losses():
            sums, counts = lm_token_loss_sums(model, seqs, 0, device)
            return torch.zeros(k, device=sums.device).index_add(0, rows.to(sums.device), sums / counts)

        eng.accumulate(losses, rows=rows)
        return eng.gradients()

    def k_passes():
        out = []
        for g in range(k):
            model.zero_grad(set_to_none=True)
            sums, counts = lm_token_loss_sums(model, seqs[g * chunk_samples:(g + 1) * chunk_samples], 0, device)
            (sums / counts).sum().backward()
            out.append({n: p.grad.detach().clone() for n, p in params})
        model.zero_grad(set_to_none=True)
        return out

    def mean_pass():
        sums, counts = lm_token_loss_sums(model, seqs, 0, device)
        (sums / counts).mean().backward()
        model.zero_grad(set_to_none=True)

    a, b = one_pass(), k_passes()
    err = max(float((a[g][n] - b[g][n]).norm() / b[g][n].norm().clamp_min(1e-30)) for g in range(k) for n, _ in params)
    fns = {"one_pass": one_pass, "k_passes": k_passes, "mean_pass": mean_pass}
    samples: dict[str, list[float]] = {n: [] for n in fns}
    loads = []
    for r in range(rounds):
        order = list(fns) if r % 2 == 0 else list(reversed(fns))
        for name in order:
            samples[name] += time_fn(fns[name], device, budget_s=budget_s, max_reps=10).times_ms
        if hasattr(os, "getloadavg"):
            loads.append(round(os.getloadavg()[0], 2))
    res = {"k": k, "hidden": hidden, "layers": layers, "chunk_samples": chunk_samples, "seq": seq,
           "params": sum(p.numel() for _, p in params), "max_rel_err": err, "loadavg_1m": loads}
    for name, s in samples.items():
        res[name] = {"median_ms": statistics.median(s), "min_ms": min(s), "samples": len(s)}
    res["speedup"] = res["k_passes"]["median_ms"] / res["one_pass"]["median_ms"]
    res["speedup_min"] = res["k_passes"]["min_ms"] / res["one_pass"]["min_ms"]
    res["x_mean"] = res["one_pass"]["median_ms"] / res["mean_pass"]["median_ms"]
    log(f"chunks k={k}: one_pass {res['one_pass']['median_ms']:.1f} ms, k_passes {res['k_passes']['median_ms']:.1f} "
        f"ms ({res['speedup']:.2f}x), mean_pass {res['mean_pass']['median_ms']:.1f} ms, max rel err {err:.1e}")
    return res


def run_chunks_suite(device: torch.device, out_dir: Path, *, ks: Optional[Sequence[int]] = None, rounds: int = 3,
                     budget_s: Optional[float] = None, max_minutes: float = 9.0, hidden: int = 128, layers: int = 2,
                     log=print) -> dict:
    """Run the suite; write chunks.json and chunks.md into ``out_dir``."""

    start = time.time()
    data = {"suite": "chunks", "env": environment(device), "formula": FORMULA, "results": []}
    for k in (ks or DEFAULT_KS):
        if time.time() - start > 60 * max_minutes:
            log(f"time limit: skipping k={k}")
            continue
        data["results"].append(run_case(int(k), hidden=hidden, layers=layers, rounds=rounds, device=device,
                                        budget_s=budget_s if budget_s is not None else 1.0, log=log))
    data["env"]["wall_s"] = time.time() - start
    return write_suite_files(data, out_dir, "chunks", chunks_markdown)


def chunks_markdown(data: dict) -> str:
    env = data["env"]
    lines = [f"# Chunk gradients: one pass vs K passes on {env['hardware']} ({env['torch_threads']} threads)", "",
             f"{env['date']}, commit {env['git_commit']}, load average at start {env.get('loadavg_start')}, "
             f"at end {env.get('loadavg_end')}.", "",
             "| K | examples | parameters | one pass ms (min) | K passes ms (min) | speedup (median, min) | "
             "one pass / mean pass | max rel err | load (1 min) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in data["results"]:
        lines.append(
            f"| {r['k']} | {r['k'] * r['chunk_samples']} | {r['params'] / 1e6:.2f}M | "
            f"{r['one_pass']['median_ms']:.1f} ({r['one_pass']['min_ms']:.1f}) | "
            f"{r['k_passes']['median_ms']:.1f} ({r['k_passes']['min_ms']:.1f}) | "
            f"{r['speedup']:.2f}x, {r['speedup_min']:.2f}x | {r['x_mean']:.2f}x | {r['max_rel_err']:.1e} | "
            f"{', '.join(str(x) for x in r['loadavg_1m'])} |")
    lines += ["", "Definitions:"] + [f"- `{k}`: {v}" for k, v in data["formula"].items()]
    return "\n".join(lines) + "\n"
