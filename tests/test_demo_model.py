"""``ogpsa demo --model``: the greedy decoder uses only current transformers API (an explicit
DynamicCache) and matches ``model.generate``; the format steps show a progress bar; a base that
cannot do the tasks after them is warned about (issue 23 item 7)."""

import logging
import warnings

import pytest
import torch

from ogpsa.demo.evaluate import greedy_decode
from ogpsa.demo.model import MIN_BASE_SCORE, build_tiny, teach_formats, warn_if_base_incapable


def test_greedy_decode_matches_generate_without_deprecated_api(caplog):
    model, codec = build_tiny(48, 2, 2, 96, 3)
    model.eval()
    prompts = ["12+3=", "copy ab: ", "reverse xyzw: ", "1+1="]  # different lengths: left padding
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        with caplog.at_level(logging.WARNING, logger="transformers"):
            got = greedy_decode(model, codec, prompts, 7, torch.device("cpu"))
    assert not [r for r in caplog.records if "deprecat" in r.getMessage().lower()]
    ref = []
    for p in prompts:  # one unpadded prompt at a time through transformers' own generation loop
        ids = torch.tensor([codec.encode(p)])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=7, do_sample=False,
                             eos_token_id=codec.eos_id, pad_token_id=codec.pad_id)
        row = out[0, ids.shape[1]:].tolist()
        ref.append(codec.decode(row[:row.index(codec.eos_id)] if codec.eos_id in row else row))
    assert got == ref


def test_format_steps_show_a_progress_bar(capsys):
    model, codec = build_tiny(32, 1, 2, 64, 0)
    loss = teach_formats(model, codec, 2, torch.device("cpu"))
    err = capsys.readouterr().err
    assert "learning the task formats" in err and "2/2" in err
    assert loss is not None and loss > 0
    assert teach_formats(model, codec, 0, torch.device("cpu"), progress=False) is None


def test_incapable_base_is_warned_about():
    weak = {"general_score": 0.05, "exact_match": {"add": 0.1, "copy": 0.0}}
    with pytest.warns(UserWarning, match=r"scores 5.0% on the general tasks \(add 10%, copy 0%\) after 300 format"):
        assert warn_if_base_incapable(weak, "m", 300)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not warn_if_base_incapable({"general_score": MIN_BASE_SCORE, "exact_match": {}}, "m", 300)
