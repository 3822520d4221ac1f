"""Data files checked per stage at the door (issue 23 item 5): file:line, the missing or unknown
field, what the stage expects; model directories checked for config and tokenizer files."""

import json

import pytest

from ogpsa.datacheck import DataFileError, ModelDirError, check_model_dir, read_jsonl


def _file(tmp_path, rows, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("stage, rows, needle", [
    ("sft", [{"prompt": "a", "completion": "b"}, {"prompt": "c"}], ":2: missing field 'completion'"),
    ("sft", [{"question": "a", "answer": "b"}], ":1: missing field"),
    ("sft", [{"prompt": "a", "completon": "b"}], "unknown field(s) ['completon'] (did you mean 'completion'?)"),
    ("sft", [{"text": "a", "source": "web"}], ":1: unknown field 'source'"),
    ("sft", [{"text": "a"}, {"prompt": "a", "completion": "b"}], ":2: a 'completion' + 'prompt' row, but line 1"),
    ("sft", [{"prompt": "a", "completion": None}], "field 'completion' is null"),
    ("sft", [{"text": 3}], "field 'text' must be a string"),
    ("sft", ["[1, 2]"], ":1: each line must be a JSON object"),
    ("sft", ['{"text": "a"', ], ":1: not valid JSON"),
    ("dpo", [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": "b"}],
     ":2: missing field 'rejected'"),
    ("dpo", [{"prompt": "a", "completion": "b"}], "DPO rows hold 'prompt' + 'chosen' + 'rejected'"),
    ("reference", [{"txt": "a"}], "unknown field(s) ['txt'] (did you mean 'text'?)"),
    ("reference", [{"input_ids": [1, "x"]}], "field 'input_ids' must be a non-empty list of integer token ids"),
])
def test_bad_rows_name_file_line_field_and_expectation(tmp_path, stage, rows, needle):
    path = _file(tmp_path, rows)
    with pytest.raises(DataFileError) as info:
        read_jsonl(path, stage)
    message = str(info.value)
    assert message.startswith(path) and needle in message, message


def test_good_files_of_every_stage(tmp_path):
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert len(read_jsonl(_file(tmp_path, [{"text": "a"}, "", {"text": "b"}]), "sft")) == 2  # blank line skipped
    read_jsonl(_file(tmp_path, [{"prompt": "a", "completion": "b"}]), "sft")
    read_jsonl(_file(tmp_path, [{"messages": chat}]), "sft")
    read_jsonl(_file(tmp_path, [{"prompt": chat[:1], "completion": chat[1:]}]), "sft")
    read_jsonl(_file(tmp_path, [{"prompt": "a", "chosen": "b", "rejected": "c"}]), "dpo")
    for row in ({"text": "a"}, {"prompt": "a", "completion": "b"}, {"prompt": "a", "chosen": "b", "rejected": "c"},
                {"chosen": "b", "rejected": "c"}, {"input_ids": [1, 2], "labels": [-100, 2]}, {"messages": chat}):
        read_jsonl(_file(tmp_path, [row]), "reference")
    with pytest.raises(DataFileError, match="holds no examples"):
        read_jsonl(_file(tmp_path, [""]), "sft")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_jsonl(str(tmp_path / "missing.jsonl"), "sft")
    with pytest.raises(ValueError, match="stage"):
        read_jsonl(_file(tmp_path, [{"text": "a"}]), "pretrain")


def test_model_dir_checks(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelDirError, match="holds no tokenizer files"):
        check_model_dir(str(empty))
    (empty / "tokenizer.json").write_text("{}")
    with pytest.raises(ModelDirError, match="holds no config.json"):
        check_model_dir(str(empty))
    (empty / "config.json").write_text("{}")
    assert check_model_dir(str(empty)) == "model"
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "tokenizer.json").write_text("{}")
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "ckpt"}))
    with pytest.raises(ModelDirError, match="base model 'ckpt' is not a local directory"):
        check_model_dir(str(adapter))
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(empty)}))
    assert check_model_dir(str(adapter)) == "adapter"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_model_dir(str(tmp_path / "nope"))


def test_demo_with_a_missing_or_empty_model_directory_is_a_usage_error(tmp_path, capsys):
    from ogpsa.cli import main

    assert main(["demo", "--model", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: ogpsa demo") and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("ogpsa demo: error: --model") and "does not exist" in err
    assert main(["demo", "--model", str(tmp_path)]) == 2
    assert "holds no tokenizer files" in capsys.readouterr().err
