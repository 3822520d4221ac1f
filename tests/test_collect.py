"""Reference-gradient collection (ogpsa.collect) and the tiny model helpers (ogpsa.tiny)."""

import pytest
import torch

pytest.importorskip("transformers")

import ogpsa  # noqa: E402
from ogpsa.collect import build_subspace, collect_reference_gradients, example_to_sequences  # noqa: E402
from ogpsa.tiny import CHAT_TEMPLATE, char_tokenizer, tiny_llama, tiny_model_and_tokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("paper_preset")  # these tests mean the paper recipe (preset="paper")

GENERAL = ["the cat sat on the mat.", "2+3=5", "copy: abc -> abc", "hello world", "x y z",
           "reverse: abc -> cba", "7*6=42"]
PAIRS = [{"prompt": "q: 2+2=", "completion": "4"}, {"prompt": "q: 3+4=", "completion": "7"},
         {"prompt": "q: 9+1=", "completion": "10"}]


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture
def model(tok):
    return tiny_llama(tok, hidden=32, layers=2, seed=3)


# -- ogpsa.tiny -----------------------------------------------------------------------------


def test_char_tokenizer_roundtrip_and_specials(tok):
    text = "Hello, world!\n\tx = 1"
    ids = tok(text).input_ids
    assert len(ids) == len(text)
    assert tok.decode(ids) == text
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok("<s>a</s>").input_ids == [1, tok("a").input_ids[0], 2]
    assert tok("\u00e9").input_ids == [3]
    assert tok.chat_template == CHAT_TEMPLATE
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered == "<|user|>hi</s><|assistant|>"
    small = char_tokenizer("ba", chat_template=None)
    assert len(small) == 6 and small("ab").input_ids == [4, 5] and small.chat_template is None
    with pytest.raises(ValueError, match="non-empty"):
        char_tokenizer("")


def test_tiny_llama_is_seeded_and_leaves_global_rng(tok):
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = tiny_llama(tok, hidden=32, layers=1, seed=5)
    after = torch.rand(3)
    assert torch.equal(before, after), "tiny_llama must not consume the global RNG"
    b = tiny_llama(tok, hidden=32, layers=1, seed=5)
    c = tiny_llama(tok, hidden=32, layers=1, seed=6)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(x, y) for x, y in zip(a.parameters(), c.parameters()))
    assert a.config.vocab_size == len(tok) and a.config.pad_token_id == tok.pad_token_id
    ids = torch.tensor([tok("abc").input_ids])
    assert torch.isfinite(a(input_ids=ids, labels=ids).loss)
    m, t = tiny_model_and_tokenizer("abc", hidden=16, layers=1, heads=2)
    assert m.config.vocab_size == len(t) == 7
    with pytest.raises(ValueError, match="multiple of heads"):
        tiny_llama(tok, hidden=30, heads=4)


# -- collect ----------------------------------------------------------------------------------


def _manual_mean_grad(model, tok, examples):
    """Float64 mean over examples of each example's mean next-token CE gradient (loop, no batching)."""
    m64 = model.double()
    params = [(n, p) for n, p in m64.named_parameters() if p.requires_grad]
    total = {n: torch.zeros_like(p) for n, p in params}
    for e in examples:
        seqs = example_to_sequences(e, tok)
        loss = 0.0
        for ids, labels in seqs:
            logits = m64(input_ids=torch.tensor([ids])).logits[0, :-1]
            lab = torch.tensor(labels[1:])
            loss = loss + torch.nn.functional.cross_entropy(logits, lab, ignore_index=-100) / len(seqs)
        gs = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
        for (n, _), g in zip(params, gs):
            if g is not None:
                total[n] += g / len(examples)
    model.float()
    return total


def test_collect_matches_float64_loop_and_is_batch_size_independent(model, tok):
    sets = [GENERAL, PAIRS, [{"prompt": "p:", "chosen": "yes", "rejected": "no"},
                             {"prompt": [{"role": "user", "content": "hi"}],
                              "chosen": [{"role": "assistant", "content": "hello"}],
                              "rejected": [{"role": "assistant", "content": "go"}]}]]
    grads, info = collect_reference_gradients(model, sets, tokenizer=tok, batch_size=3, progress=False)
    assert len(grads) == 3 and len(info.datasets) == 3 and info.seconds > 0
    assert [d.num_examples for d in info.datasets] == [len(GENERAL), len(PAIRS), 2]
    assert info.datasets[2].num_sequences == 4
    for j, ex in enumerate(sets):
        ref = _manual_mean_grad(model, tok, ex)
        num = sum(float((grads[j][n].double() - ref[n]).pow(2).sum()) for n in ref)
        den = sum(float(ref[n].pow(2).sum()) for n in ref)
        assert den > 0 and (num / den) ** 0.5 <= 1e-5, (j, (num / den) ** 0.5)
        assert all(g.dtype == torch.float32 for g in grads[j].values())
    one, _ = collect_reference_gradients(model, sets[:1], tokenizer=tok, batch_size=1, progress=False)
    for n, g in grads[0].items():
        torch.testing.assert_close(one[0][n], g, rtol=1e-5, atol=1e-7)


def test_num_samples_takes_the_first_examples(model, tok):
    a, info = collect_reference_gradients(model, [GENERAL], num_samples=2, tokenizer=tok, progress=False)
    b, _ = collect_reference_gradients(model, [GENERAL[:2]], tokenizer=tok, progress=False)
    assert info.datasets[0].num_examples == 2
    for n in a[0]:
        torch.testing.assert_close(a[0][n], b[0][n])


def test_existing_grads_are_restored_exactly_and_nothing_leaks(model, tok):
    torch.manual_seed(0)
    ids = torch.tensor([tok("training batch one").input_ids])
    ids2 = torch.tensor([tok("second micro batch!").input_ids])
    params = list(model.parameters())
    params[0].requires_grad_(False)  # a frozen parameter stays without a gradient
    # Reference: two micro-batches accumulated without any collection in between.
    model(input_ids=ids, labels=ids).loss.backward()
    model(input_ids=ids2, labels=ids2).loss.backward()
    expected = [None if p.grad is None else p.grad.clone() for p in params]
    model.zero_grad(set_to_none=True)
    # Same, with a collection between the micro-batches; one parameter has no grad yet.
    model(input_ids=ids, labels=ids).loss.backward()
    params[3].grad = None
    objs = [p.grad for p in params]
    values = [None if g is None else g.clone() for g in objs]
    collect_reference_gradients(model, [GENERAL, PAIRS], tokenizer=tok, batch_size=4, progress=False)
    for p, o, v in zip(params, objs, values):
        assert p.grad is o
        assert (v is None and p.grad is None) or torch.equal(p.grad, v)
    # Put params[3]'s first micro-batch gradient back by recomputing the whole thing, then compare.
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    collect_reference_gradients(model, [GENERAL], tokenizer=tok, progress=False)
    model(input_ids=ids2, labels=ids2).loss.backward()
    for p, e in zip(params, expected):
        assert (e is None and p.grad is None) or torch.equal(p.grad, e)


def test_bf16_model_accumulates_in_fp32(tok):
    model = tiny_llama(tok, hidden=32, layers=1, seed=1, dtype=torch.bfloat16)
    grads, _ = collect_reference_gradients(model, [GENERAL], tokenizer=tok, batch_size=2, progress=False)
    assert grads[0] and all(g.dtype == torch.float32 for g in grads[0].values())
    ref32 = tiny_llama(tok, hidden=32, layers=1, seed=1, dtype=torch.bfloat16).float()
    exp, _ = collect_reference_gradients(ref32, [GENERAL], tokenizer=tok, batch_size=2, progress=False)
    num = sum(float((grads[0][n] - exp[0][n]).pow(2).sum()) for n in exp[0])
    den = sum(float(exp[0][n].pow(2).sum()) for n in exp[0])
    assert (num / den) ** 0.5 < 5e-2  # bf16 forward/backward, fp32 sums
    assert all(p.grad is None for p in model.parameters())


def test_projection_is_paused_and_custom_loss(model, tok):
    sub = build_subspace(model, [GENERAL], ogpsa.OGPSAConfig(), tokenizer=tok, progress=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    proj = ogpsa.attach(model, opt, sub)
    seen = []

    def loss_fn(m, examples):
        seen.append((proj.is_paused, len(examples)))
        ids = torch.tensor([[4 + (len(e) % 50) for e in examples] + [7, 9]])
        return m(input_ids=ids, labels=ids).loss

    grads, info = collect_reference_gradients(model, [["a", "bb", "ccc", "dddd", "e"]], loss_fn=loss_fn,
                                              batch_size=2, projector=proj, progress=False)
    assert seen == [(True, 2), (True, 2), (True, 1)] and not proj.is_paused
    assert grads[0] and info.datasets[0].num_examples == 5
    assert all(torch.isfinite(g).all() for g in grads[0].values())
    with pytest.raises(TypeError, match="scalar"):
        collect_reference_gradients(model, [["a"]], loss_fn=lambda m, e: torch.ones(2), progress=False)


def test_names_and_eval_mode(model, tok):
    names = [n for n, _ in model.named_parameters() if "layers.0." in n]
    model.train()
    grads, info = collect_reference_gradients(model, [GENERAL], tokenizer=tok, names=names, progress=False)
    assert set(grads[0]) == set(names) and info.num_tensors == len(names)
    assert model.training
    assert all(p.grad is None for p in model.parameters())


def test_bad_inputs_raise_before_touching_grads(model, tok):
    ids = torch.tensor([tok("abc").input_ids])
    model(input_ids=ids, labels=ids).loss.backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="tokenizer"):
        collect_reference_gradients(model, [GENERAL], progress=False)
    with pytest.raises(TypeError, match="list of reference datasets"):
        collect_reference_gradients(model, GENERAL[0], tokenizer=tok, progress=False)
    with pytest.raises(ValueError, match="empty"):
        collect_reference_gradients(model, [[]], tokenizer=tok, progress=False)
    with pytest.raises(ValueError, match="not trainable parameters"):
        collect_reference_gradients(model, [GENERAL], tokenizer=tok, names=["nope"], progress=False)
    with pytest.raises(ValueError, match="needs one of"):
        collect_reference_gradients(model, [[{"foo": 1}]], tokenizer=tok, progress=False)
    with pytest.raises(ValueError, match="num_samples"):
        collect_reference_gradients(model, [GENERAL], tokenizer=tok, num_samples=0, progress=False)
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, before[n]), n


def test_token_id_and_hf_dataset_inputs(model, tok):
    datasets = pytest.importorskip("datasets")
    rows = [tok(t).input_ids for t in GENERAL]
    a, _ = collect_reference_gradients(model, [rows], progress=False)
    b, _ = collect_reference_gradients(model, [datasets.Dataset.from_dict({"input_ids": rows})], progress=False)
    c, _ = collect_reference_gradients(model, [datasets.Dataset.from_dict({"text": GENERAL})], tokenizer=tok,
                                       progress=False)
    d, _ = collect_reference_gradients(model, [[torch.tensor(r) for r in rows]], progress=False)
    for n in a[0]:
        for other in (b, c, d):
            torch.testing.assert_close(other[0][n], a[0][n], rtol=1e-5, atol=1e-7)


def test_lora_zero_b_gives_no_direction_for_a(tok):
    peft = pytest.importorskip("peft")
    base = tiny_llama(tok, hidden=32, layers=2, seed=0)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    sub = build_subspace(model, [GENERAL, PAIRS], ogpsa.OGPSAConfig(), tokenizer=tok, progress=False)
    ranks = sub.ranks()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(sub.names) <= trainable and not any("base_layer" in n for n in sub.names)
    a_names = [n for n in sub.names if "lora_A" in n]
    b_names = [n for n in sub.names if "lora_B" in n]
    assert a_names and b_names
    assert all(ranks[n] == 0 for n in a_names), ranks
    assert all(ranks[n] == 2 for n in b_names), ranks
    assert all(torch.isfinite(u).all() for u in sub.bases)
    # The projector accepts the empty bases and projects B only.
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p)
    a_before = {n: p.grad.clone() for n, p in model.named_parameters() if "lora_A" in n}
    stats = ogpsa.attach(model, None, sub).project()
    assert stats is not None and 0 < stats.removed_fraction < 1
    for n, p in model.named_parameters():
        if "lora_A" in n:
            assert torch.equal(p.grad, a_before[n])


def test_batched_example_averaging_equals_batch_size_one(model, tok):
    """averaging="example" computes B examples per forward/backward, with each example's
    token-mean weighted 1/num_examples: the same as batch size 1 within float32 rounding."""
    sets = [GENERAL, PAIRS]
    one, _ = collect_reference_gradients(model, sets, tokenizer=tok, batch_size=1, progress=False)
    for bs in (3, 100):
        many, _ = collect_reference_gradients(model, sets, tokenizer=tok, batch_size=bs, progress=False)
        for j in range(len(sets)):
            num = sum(float((many[j][n].double() - one[j][n].double()).pow(2).sum()) for n in one[j])
            den = sum(float(one[j][n].double().pow(2).sum()) for n in one[j])
            assert den > 0 and (num / den) ** 0.5 <= 1e-6, (bs, j, (num / den) ** 0.5)
    cfg = ogpsa.OGPSAConfig(reference_batch_size=3)
    assert cfg.reference_batch_size == 3 and cfg.reference_averaging == "example"
    with pytest.raises(ValueError, match="batch_size"):
        collect_reference_gradients(model, sets, tokenizer=tok, batch_size=0, progress=False)


def test_progress_bar_on_by_default_and_off_on_request(model, tok, capsys):
    pytest.importorskip("tqdm")
    collect_reference_gradients(model, [GENERAL], tokenizer=tok)
    assert "ogpsa reference gradients" in capsys.readouterr().err
    collect_reference_gradients(model, [GENERAL], tokenizer=tok, progress=False)
    assert "ogpsa reference gradients" not in capsys.readouterr().err


def test_list_of_examples_instead_of_datasets_says_wrap_it(model, tok):
    """build_subspace(model, texts) with a list of strings: the error names the fix, [texts]."""
    for wrong in (GENERAL, PAIRS, [tok("abc").input_ids, tok("de").input_ids]):
        with pytest.raises(TypeError, match=r"\[texts\]"):
            build_subspace(model, wrong, tokenizer=tok, progress=False)
    with pytest.raises(TypeError, match="list of reference datasets"):
        build_subspace(model, "just one text", tokenizer=tok, progress=False)
    assert build_subspace(model, [GENERAL], tokenizer=tok, progress=False).names


def test_trainer_reference_batch_size_rule_takes_any_set_value_even_the_direct_default():
    """None in the config means "not set": trainers then use their train batch size; any integer the
    user sets (8 included, the direct-collection default) is used as given."""
    from ogpsa.config import DEFAULT_REFERENCE_BATCH_SIZE
    from ogpsa.integrations.common import trainer_reference_batch_size

    assert ogpsa.OGPSAConfig().reference_batch_size is None
    assert trainer_reference_batch_size(None, ogpsa.OGPSAConfig(), 4) == 4
    for size in (DEFAULT_REFERENCE_BATCH_SIZE, 3):
        # None: the collection reads the config's value
        assert trainer_reference_batch_size(None, ogpsa.OGPSAConfig(reference_batch_size=size), 4) is None
    assert trainer_reference_batch_size(2, ogpsa.OGPSAConfig(reference_batch_size=8), 4) == 2
    with pytest.raises(ValueError, match="reference_batch_size"):
        ogpsa.OGPSAConfig(reference_batch_size=0)
    assert ogpsa.OGPSAConfig.from_dict(ogpsa.OGPSAConfig().to_dict()).reference_batch_size is None


def test_example_averaging_batches_sorted_by_length_batch_averaging_keeps_order(model, tok):
    """Issue 22 item 3: with example averaging, examples are sorted by length before batching
    (little padding; exact, the result does not depend on the batches); batch averaging keeps the
    original order (its result depends on which examples share a batch)."""
    sentence = "the quick brown fox jumps over the lazy dog, 12+30=42."
    texts = [sentence[i:i + n] for i, n in enumerate((3, 40, 5, 38, 4, 41))]
    widths = []
    handle = model.model.embed_tokens.register_forward_hook(lambda m, a, out: widths.append(a[0].shape[1]))
    try:
        got, _ = collect_reference_gradients(model, [texts], tokenizer=tok, batch_size=3, progress=False)
        assert widths == [5, 41]  # short with short, long with long
        widths.clear()
        collect_reference_gradients(model, [texts], tokenizer=tok, batch_size=3, averaging="batch", progress=False)
        assert widths == [40, 41]  # the original batches
    finally:
        handle.remove()
    one, _ = collect_reference_gradients(model, [texts], tokenizer=tok, batch_size=1, progress=False)
    for n, ref in one[0].items():
        assert float((got[0][n].double() - ref.double()).norm() / ref.double().norm()) <= 1e-6
