"""One-pass chunk gradients (ogpsa.chunkgrad) equal K separate backward passes.

The reference is computed in float64 (a float64 copy of the model, one backward per chunk);
the one-pass result (float32 model) must agree within float32 tolerance, for Linear,
Embedding (with a padding index), RMSNorm (transformers' LlamaRMSNorm), LayerNorm, tied
embeddings, PEFT LoRA layers, and modules without a rule (fallback: one backward per chunk).
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

from ogpsa.chunkgrad import ChunkGradients, rule_of
from ogpsa.sequences import lm_token_loss_sums
from ogpsa.tiny import char_tokenizer, tiny_llama

TOL = 1e-5


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def _seqs(tok, n, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(3, 15, (1,), generator=g))
        ids = torch.randint(4, len(tok), (length,), generator=g).tolist()
        out.append((ids, list(ids)))
    return out


def _reference(model64, seqs, rows, k, params):
    """K separate backward passes in float64: the gradient of each chunk's loss alone."""
    out = []
    for g in range(k):
        model64.zero_grad(set_to_none=True)
        sub = [s for s, r in zip(seqs, rows) if r == g]
        sums, counts = lm_token_loss_sums(model64, sub, 0)
        (sums / counts).sum().backward()
        out.append({n: p.grad.detach().clone() for n, p in model64.named_parameters() if n in params
                    and p.grad is not None})
    return out


def _check(model, seqs, rows, k):
    """One pass on ``model`` vs the float64 reference; returns the engine."""
    model.eval()
    model64 = copy.deepcopy(model).double()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    eng = ChunkGradients(model, params, k)
    rows_t = torch.tensor(rows)

    def losses():
        sums, counts = lm_token_loss_sums(model, seqs, 0)
        return torch.zeros(k).index_add(0, rows_t, sums / counts)

    eng.accumulate(losses, rows=rows_t)
    got = eng.gradients()
    want = _reference(model64, seqs, rows, k, {n for n, _ in params})
    for g in range(k):
        assert set(got[g]) >= set(want[g])
        for n, ref in want[g].items():
            err = float((got[g][n].double() - ref).norm() / ref.norm().clamp_min(1e-300))
            assert err <= TOL, (g, n, err)
    for p in model.parameters():  # requires_grad restored, .grad never written
        assert p.grad is None
    return eng


@pytest.mark.parametrize("tie", [False, True])
def test_tiny_llama_linear_embedding_rmsnorm_one_backward(tok, tie):
    model = tiny_llama(tok, 24, 2, heads=2, intermediate=37, tie_embeddings=tie, seed=3)
    kinds = {rule_of(m) for m in model.modules()} - {None}
    assert kinds == {"linear", "embedding", "norm"}
    rows = [0, 2, 1, 1, 2, 0, 2]  # chunks of different sizes, rows interleaved
    eng = _check(model, _seqs(tok, 7, 1), rows, 3)
    assert eng.num_backward == 1 and not eng.fallback
    assert all(p.requires_grad for p in model.parameters())


def test_peft_lora_layers_are_linears(tok):
    peft = pytest.importorskip("peft")
    base = tiny_llama(tok, 24, 2, heads=2, intermediate=37, seed=4)
    model = peft.get_peft_model(base, peft.LoraConfig(r=3, target_modules=["q_proj", "v_proj", "down_proj"],
                                                      lora_dropout=0.0, init_lora_weights=False))
    eng = _check(model, _seqs(tok, 6, 2), [1, 0, 1, 0, 0, 1], 2)
    assert eng.num_backward == 1 and not eng.fallback
    assert any("lora_A" in n for n, _ in eng.covered) and any("lora_B" in n for n, _ in eng.covered)


class _Tagger(nn.Module):
    """A module with its own parameter and no rule (scales the hidden state per feature)."""

    def __init__(self, d):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x):
        return x * self.scale


class _Flattening(nn.Module):
    """Calls its Linear on [B*T, d] rows: the row rule does not hold, it must fall back."""

    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        b, t, d = x.shape
        return self.lin(x.reshape(b * t, d)).reshape(b, t, d)


class _LNModel(nn.Module):
    """Embedding (padding index) -> LayerNorm -> Linear -> rule-less module -> flattening Linear
    -> head; a causal LM in shape (``logits`` of the next token)."""

    def __init__(self, vocab, d=11):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.ln = nn.LayerNorm(d)
        self.lin = nn.Linear(d, d)
        self.tag = _Tagger(d)
        self.flat = _Flattening(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        h = torch.tanh(self.lin(self.ln(h)))
        h = self.flat(self.tag(h))
        return type("Out", (), {"logits": self.head(h)})()


def test_layernorm_embedding_padding_and_fallback_modules(tok, caplog):
    torch.manual_seed(5)
    model = _LNModel(len(tok))
    with torch.no_grad():
        model.ln.weight.uniform_(0.5, 1.5)
        model.ln.bias.uniform_(-0.2, 0.2)
    with caplog.at_level(logging.INFO, logger="ogpsa"):
        eng = _check(model, _seqs(tok, 5, 3), [0, 1, 2, 1, 0], 3)
    fallback = {n for n, _ in eng.fallback}
    assert fallback == {"tag.scale", "flat.lin.weight", "flat.lin.bias"}
    assert eng.num_backward == 1 + 3  # one pass for the ruled tensors, one backward per chunk for the rest
    assert "_Tagger" in caplog.text and "falls back" in caplog.text


def test_chunk_mode_several_forwards_one_backward_each(tok):
    model = tiny_llama(tok, 16, 1, heads=2, intermediate=19, seed=6).eval()
    seqs = _seqs(tok, 4, 4)
    params = [(n, p) for n, p in model.named_parameters()]
    eng = ChunkGradients(model, params, 2)
    for g, part in enumerate((seqs[:2], seqs[2:])):
        def loss(part=part):
            sums, counts = lm_token_loss_sums(model, part, 0)
            return (sums / counts).sum()
        eng.accumulate(loss, chunk=g)
    want = _reference(copy.deepcopy(model).double(), seqs, [0, 0, 1, 1], 2, {n for n, _ in params})
    got = eng.gradients()
    for g in range(2):
        for n, ref in want[g].items():
            assert float((got[g][n].double() - ref).norm() / ref.norm()) <= TOL


def test_existing_grads_untouched_and_bad_inputs(tok):
    model = tiny_llama(tok, 16, 1, heads=2, intermediate=19, seed=7).eval()
    grads = {}
    for n, p in model.named_parameters():
        p.grad = torch.randn_like(p)
        grads[n] = (p.grad, p.grad.clone())
    eng = ChunkGradients(model, list(model.named_parameters()), 2)
    seqs = _seqs(tok, 2, 5)

    def losses():
        sums, counts = lm_token_loss_sums(model, seqs, 0)
        return sums / counts

    eng.accumulate(losses, rows=torch.tensor([0, 1]))
    for n, p in model.named_parameters():
        assert p.grad is grads[n][0] and torch.equal(p.grad, grads[n][1])
    with pytest.raises(ValueError, match="exactly one of rows"):
        eng.accumulate(losses)
    with pytest.raises(ValueError, match="chunk indices"):
        eng.accumulate(losses, rows=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="per-chunk losses"):
        eng.accumulate(lambda: losses().sum(), rows=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="num_chunks"):
        ChunkGradients(model, list(model.named_parameters()), 0)


def test_bench_chunks_case_runs_and_agrees(tmp_path):
    from ogpsa.bench.chunks import run_chunks_suite

    data = run_chunks_suite(torch.device("cpu"), tmp_path, ks=[2], rounds=1, budget_s=0.01, hidden=16, layers=1,
                            log=lambda *a: None)
    (r,) = data["results"]
    assert r["k"] == 2 and r["max_rel_err"] <= TOL
    assert r["one_pass"]["samples"] >= 1 and r["speedup"] > 0 and r["x_mean"] > 0
    assert (tmp_path / "chunks.md").read_text().startswith("# Chunk gradients")


def test_bf16_model_within_bf16_tolerance(tok):
    """bf16 weights and activations; the chunk products accumulate in float32. Reference: the same
    bf16 weights in float64, one backward per chunk."""
    model = tiny_llama(tok, 32, 1, heads=2, intermediate=43, seed=9).to(torch.bfloat16).eval()
    seqs, rows, k = _seqs(tok, 6, 7), [0, 1, 2, 0, 1, 2], 3
    params = [(n, p) for n, p in model.named_parameters()]
    eng = ChunkGradients(model, params, k)
    rows_t = torch.tensor(rows)

    def losses():
        sums, counts = lm_token_loss_sums(model, seqs, 0)
        return torch.zeros(k).index_add(0, rows_t, sums.float() / counts)

    eng.accumulate(losses, rows=rows_t)
    got = eng.gradients()
    want = _reference(copy.deepcopy(model).double(), seqs, rows, k, {n for n, _ in params})
    for g in range(k):
        for n, ref in want[g].items():
            assert got[g][n].dtype == torch.float32
            assert float((got[g][n].double() - ref).norm() / ref.norm()) <= 1e-2, (g, n)
