"""Basis memory per rank (ogpsa.memory, `ogpsa info --model`): exact byte counts checked
against numbers computed by hand, the dry run on a 7B-shaped Llama config built on the meta
device, and the trainers' start line."""

import json
import logging

import pytest
import torch

import ogpsa
from ogpsa import memory
from ogpsa.cli import main

# Llama-2-7B shapes: hidden 4096, MLP 11008, 32 layers, 32 heads (no GQA), vocab 32000, untied
LLAMA7B = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=4096, intermediate_size=11008,
               num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
               max_position_embeddings=4096, tie_word_embeddings=False, rms_norm_eps=1e-5)
# by hand: per layer q, k, v, o = 4 * 4096^2 = 67,108,864; gate, up, down = 3 * 4096 * 11008 =
# 135,266,304; two norms 8,192 -> 202,383,360; x 32 = 6,476,267,520; embed + lm_head
# 2 * 32000 * 4096 = 262,144,000; final norm 4,096
LLAMA7B_PARAMS = 6_476_267_520 + 262_144_000 + 4_096  # 6,738,415,616
LLAMA7B_TENSORS = 32 * 9 + 3  # 291


@pytest.fixture(scope="module")
def llama7b(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama7b") / "config.json"
    path.write_text(json.dumps(LLAMA7B))
    return path


def test_7b_full_fine_tune_sharded_over_8(llama7b):
    assert LLAMA7B_PARAMS == 6_738_415_616
    r = memory.dry_run(llama7b, k=16, basis_dtype="bfloat16", world_size=8)
    assert (r.params_model, r.params_trainable, r.tensors) == (LLAMA7B_PARAMS, LLAMA7B_PARAMS, LLAMA7B_TENSORS)
    # every dim 0 (32000, 4096, 11008) divides by 8: each rank holds exactly 1/8 of 16 x 2 B x P
    assert r.rank_bytes == [16 * 2 * LLAMA7B_PARAMS // 8] * 8 == [26_953_662_464] * 8
    assert r.total_bytes == 215_629_299_712
    assert r.per_param_per_rank == 4.0 and r.per_param_unsharded == 32.0
    assert r.sharding == "fsdp2"
    assert r.gram_bytes == LLAMA7B_TENSORS * 16 * 16 * 4  # 297,984 B, replicated
    shapes = memory.trainable_shapes(memory.meta_model(llama7b))  # the same model, for the variants
    fp32 = memory.basis_memory(shapes, k=16, world_size=8, rank=5)
    assert fp32.rank == 5 and fp32.bytes_on_rank == 53_907_324_928 and fp32.per_param_per_rank == 8.0
    single = memory.basis_memory(shapes, k=2, world_size=8, sharding="replicated")
    assert single.rank_bytes == [2 * 4 * LLAMA7B_PARAMS] * 8 and single.per_param_per_rank == 8.0
    zero = memory.basis_memory(shapes, k=16, basis_dtype="bfloat16", world_size=8, sharding="zero")
    # P = 6,738,415,616 is a multiple of 8: eight flat parts of P/8 elements, 16 x 2 B each
    assert zero.rank_bytes == [26_953_662_464] * 8


def test_7b_lora_default_targets(llama7b):
    r = memory.dry_run(llama7b, k=16, world_size=8, lora_r=16)
    # PEFT's default for llama: q_proj and v_proj; A [16, 4096] + B [4096, 16] per module
    assert r.trainable == "LoRA r=16 (q_proj, v_proj)"
    assert r.params_trainable == 32 * 2 * (16 * 4096 + 4096 * 16) == 8_388_608
    assert r.params_model == LLAMA7B_PARAMS
    # fsdp2 over 8: A keeps 2 of its 16 rows, B 512 of its 4096 rows, per rank
    per_module = 16 * (2 * 4096 + 512 * 16) * 4
    assert r.rank_bytes == [64 * per_module] * 8 == [67_108_864] * 8
    assert r.per_param_per_rank == 8.0


def test_lora_from_a_peft_config(llama7b, tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["o_proj"], "task_type": "CAUSAL_LM"}))
    r = memory.dry_run(llama7b, k=4, basis_dtype="bfloat16", peft_config=str(tmp_path))
    assert r.params_trainable == 32 * (8 * 4096 + 4096 * 8) == 2_097_152
    assert r.rank_bytes == [4 * 2 * 2_097_152] and r.world_size == 1 and r.sharding == "replicated"


SMALL = [("w", (10, 3)), ("b", (10,)), ("s", (2,))]  # 42 elements; k_i = min(4, N_i) = 4, 4, 2


def test_uneven_fsdp2_shards_by_hand():
    r = memory.basis_memory(SMALL, k=4, world_size=4)
    # d0=10 -> chunks of 3 rows: 3, 3, 3, 1; d0=2 -> 1, 1, 0, 0
    # rank 0: w 4*3*3*4 = 144, b 4*3*4 = 48, s 2*1*4 = 8 -> 200; rank 2: 144 + 48 = 192;
    # rank 3: w 4*1*3*4 = 48, b 4*1*4 = 16 -> 64
    assert r.rank_bytes == [200, 200, 192, 64]
    assert r.total_bytes == (4 * 30 + 4 * 10 + 2 * 2) * 4 == 656
    assert r.rank == 0 and r.per_param_per_rank == 200 / 42
    assert r.gram_bytes == 4 * (16 + 16 + 4)


def test_zero_flat_partitions_by_hand():
    r = memory.basis_memory(SMALL, k=4, world_size=4, sharding="zero", rank=3)
    # 42 elements in parts of ceil(42/4) = 11: [0,11) [11,22) [22,33) [33,44)
    # rank 2: w[22,30) 8*4*4 = 128 + b[30,33) 3*4*4 = 48; rank 3: b[33,40) 7*16 = 112 + s 2*2*4 = 16
    assert r.rank_bytes == [176, 176, 176, 128]
    assert r.bytes_on_rank == 128 and r.per_param_per_rank == 128 / 42


def test_ranks_from_a_subspace_and_replicated():
    r = memory.basis_memory(SMALL, k={"w": 3, "b": 1}, basis_dtype="bfloat16")
    assert r.rank_bytes == [(3 * 30 + 1 * 10) * 2] and r.k == "per tensor"  # "s" has no basis


@pytest.mark.parametrize("kwargs, match", [
    (dict(basis_dtype="float8"), "basis_dtype='float8'"),
    (dict(world_size=0), "world_size=0"),
    (dict(world_size=2, rank=2), r"rank=2 must be in \[0, 2\)"),
    (dict(sharding="ddp"), "sharding='ddp'"),
    (dict(k=0), "k=0"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        memory.basis_memory(SMALL, **kwargs)


def test_bad_model_paths(tmp_path, llama7b):
    with pytest.raises(FileNotFoundError, match="config.json"):
        memory.dry_run(tmp_path / "nowhere")
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not a JSON config"):
        memory.dry_run(bad)
    with pytest.raises(ValueError, match="--lora-r or --peft-config, not both"):
        memory.dry_run(llama7b, lora_r=4, peft_config=str(tmp_path))


def test_cli_dry_run(llama7b, capsys):
    assert main(["info", "--model", str(llama7b), "--world-size", "8", "--k", "16", "--basis-dtype", "bfloat16",
                 "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["bytes_on_rank"] == 26_953_662_464 and data["per_param_per_rank"] == 4.0
    assert main(["info", "--model", str(llama7b.parent), "--world-size", "8", "--lora-r", "16"]) == 0  # a model dir
    out = capsys.readouterr().out
    assert "67,108,864 B" in out and "8.000 B per trainable parameter per rank" in out
    assert main(["info", "--world-size", "8"]) == 2
    assert "need --model" in capsys.readouterr().err


def test_trainer_start_line(caplog):
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)  # weight 15 + bias 3 elements
    refs = [{n: torch.randn_like(p) for n, p in model.named_parameters()} for _ in range(2)]
    sub = ogpsa.Subspace.from_gradients(refs)
    with caplog.at_level(logging.INFO, logger="ogpsa"):
        r = memory.log_basis_memory(model, sub)
    assert r.rank_bytes == [2 * (15 + 3) * 4] and r.per_param_per_rank == 8.0  # k = 2 rows of fp32
    (line,) = [rec.getMessage() for rec in caplog.records if "basis memory" in rec.getMessage()]
    assert "8.000 B per trainable parameter per rank" in line and "rank 0 of 1 (replicated)" in line


def test_session_logs_the_line_at_setup(caplog):
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    refs = [{n: torch.randn_like(p) for n, p in model.named_parameters()} for _ in range(2)]
    sub = ogpsa.Subspace.from_gradients(refs)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    from ogpsa.session import OGPSA

    session = OGPSA(model, opt, subspace=sub, refresh_every=0, progress=False)
    with caplog.at_level(logging.INFO, logger="ogpsa"):
        session.setup(model, opt)
    lines = [rec.getMessage() for rec in caplog.records if "basis memory" in rec.getMessage()]
    # k = 2 fp32 rows for each of 4x4 weight, 4 bias, 2x4 weight, 2 bias: 2 * 30 * 4 = 240 B
    assert len(lines) == 1 and "240 B (240 B) on rank 0 of 1 (replicated) = 8.000 B per trainable" in lines[0]
