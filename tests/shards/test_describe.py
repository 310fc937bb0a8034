"""`describe`'s arithmetic against published model sizes and against what the engine really allocates and loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cluster.cli import main
from shards.checkpoint import ShardSelection
from shards.config import PRESETS, load_config
from shards.describe import describe, shard_table
from shards.engine import LocalEngine
from shards.make_checkpoint import small_config

# Published sizes: Mistral 7B (HF model card, 7.24 B); Mixtral 8x7B paper (46.7 B total, 12.9 B active per token);
# Mixtral 8x22B (Mistral AI's announcement: 141 B total, 39 B active).
PUBLISHED = {"mistral-7b": (7.24e9, 7.24e9), "mixtral-8x7b": (46.7e9, 12.9e9), "mixtral-8x22b": (141e9, 39e9)}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_parameter_counts_match_the_published_totals_within_one_percent(name):
    total, active = PUBLISHED[name]
    params = describe(PRESETS[name], name=name)["parameters"]
    assert params["total"]["total"] == pytest.approx(total, rel=0.01)
    assert params["active"]["total"] == pytest.approx(active, rel=0.01)


def test_mixtral_8x22b_counts_equal_the_shape_formula():
    """dim 6144, 56 layers, 48 query and 8 KV heads of 128, 16384 hidden, 8 experts (top-2), vocabulary 32768."""
    d, layers, hidden, vocab = 6144, 56, 16384, 32768
    attention = 48 * 128 * d * 2 + 8 * 128 * d * 2  # q and o; k and v: 88 080 384
    norms = 2 * d  # before attention and before the experts
    gate = 8 * d  # the router's linear layer
    expert = 3 * d * hidden  # w1, w3, w2: 301 989 888
    embedding = head = vocab * d  # 201 326 592 each
    total = layers * (attention + norms + gate + 8 * expert) + embedding + head + d  # + the final norm
    active = layers * (attention + norms + gate + 2 * expert) + embedding + head + d
    assert (total, active) == (140_630_071_296, 39_161_468_928)

    d8x22 = describe(PRESETS["mixtral-8x22b"], name="mixtral-8x22b")
    assert d8x22["parameters"]["total"]["total"] == total
    assert d8x22["parameters"]["active"]["total"] == active
    assert d8x22["weight_bytes"] == 2 * total  # bf16: 261.94 GiB, more than one H200 holds
    assert d8x22["kv_cache"]["bytes_per_token"] == 2 * layers * 8 * 128 * 2  # 224 KiB, no window to bound it
    assert d8x22["kv_cache"]["bytes_per_sequence_full"] == 65536 * 2 * layers * 8 * 128 * 2  # 14 GiB at 64k


def test_parameter_counts_equal_the_parameters_the_engine_loads(checkpoint_factory):
    engine = LocalEngine(checkpoint_factory("mixtral"), max_seqs=1)
    loaded = sum(p.numel() for p in engine.model.parameters())
    assert describe(engine.config)["parameters"]["total"]["total"] == loaded


def test_weight_bytes_equal_the_whole_selection_at_the_dtype():
    config = PRESETS["mixtral-8x7b"]
    d = describe(config, dtype=torch.bfloat16)
    assert d["weight_bytes"] == ShardSelection.whole(config).nbytes(config, torch.bfloat16)


@pytest.mark.parametrize("context", [10, 32, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rolling_kv_bytes_equal_what_the_cache_allocates_per_slot(checkpoint_factory, context, dtype):
    """Shorter than, equal to and longer than the window of 32: the buffer holds min(context, window) rows."""
    engine = LocalEngine(checkpoint_factory("mixtral"), dtype=dtype, max_seqs=3, max_seq_len=context)
    kv = describe(engine.config, context=context, batch=3, dtype=dtype)["kv_cache"]
    assert engine.cache.bytes_per_slot() == kv["bytes_per_sequence_window"]
    assert engine.cache.nbytes == kv["bytes_batch_window"]


def test_full_attention_kv_bytes_equal_what_the_cache_allocates_per_slot(checkpoint_factory):
    engine = LocalEngine(checkpoint_factory("mixtral", window=None), max_seqs=2, max_seq_len=100)
    kv = describe(engine.config, context=100, batch=2, dtype=torch.float32)["kv_cache"]
    assert engine.cache.bytes_per_slot() == kv["bytes_per_sequence_full"] == kv["bytes_per_sequence_window"]


def test_shard_table_splits_weights_and_kv_of_the_whole_model_exactly():
    config = small_config("mixtral")
    half = config.n_layers // 2
    shards = [
        ("stage 0", ShardSelection(embedding=True, layers=tuple(range(half))), range(half)),
        (
            "stage 1",
            ShardSelection(layers=tuple(range(half, config.n_layers)), final_norm=True, head=True),
            range(half, config.n_layers),
        ),
        ("experts", ShardSelection(experts={i: tuple(range(config.num_experts)) for i in range(config.n_layers)}), 0),
    ]
    rows = shard_table(config, shards, context=500, batch=2, dtype=torch.float32)
    whole = describe(config, context=500, batch=2, dtype=torch.float32)
    assert sum(r["weight_bytes"] for r in rows) == whole["weight_bytes"]
    assert sum(r["kv_bytes"] for r in rows) == whole["kv_cache"]["bytes_batch_window"]


def test_receptive_field_is_window_times_layers():
    assert describe(PRESETS["mistral-7b"])["receptive_field_tokens"] == 4096 * 32


def test_decode_attention_flops_stop_growing_at_the_window():
    config = PRESETS["mistral-7b"]
    at_window = describe(config, context=4096)["flops_per_token"]
    beyond = describe(config, context=32768)["flops_per_token"]
    assert beyond["decode_attention_window"] == at_window["decode_attention_window"]
    assert beyond["decode_attention_full"] == 8 * at_window["decode_attention_full"]


def test_text_output_names_the_totals(capsys):
    assert main(["describe", "--preset", "mixtral-8x7b", "--context", "8192"]) == 0
    out = capsys.readouterr().out
    assert "46.70 B" in out and "12.88 B" in out
    assert main(["describe", "--preset", "mixtral-8x22b"]) == 0
    out = capsys.readouterr().out
    assert "140.63 B" in out and "39.16 B" in out and "261.94 GiB" in out and "224.00 KiB" in out


@pytest.mark.parametrize(
    "argv,named",
    [
        (["--preset", "mixtral-9x9b"], "mixtral-9x9b"),
        (["--checkpoint", "/no/such/checkpoint"], "/no/such/checkpoint"),
        (["--preset", "mistral-7b", "--context", "-5"], "-5"),
        (["--preset", "mistral-7b", "--context", "0"], "--context"),
        (["--preset", "mistral-7b", "--batch", "0"], "--batch"),
    ],
)
def test_a_bad_value_is_a_one_line_error_naming_it(capsys, argv, named):
    assert main(["describe", *argv]) == 2
    err = capsys.readouterr().err
    assert named in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_json_output_of_a_checkpoint_is_the_description_of_its_config(checkpoint_factory, capsys):
    ckpt = checkpoint_factory("mixtral")
    assert main(["describe", "--checkpoint", str(ckpt), "--context", "100", "--dtype", "fp32", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == describe(load_config(ckpt), context=100, dtype=torch.float32, name=str(ckpt))


def test_placement_shards_add_up_to_the_whole_model(checkpoint_factory, capsys):
    """deploy/examples/local.yaml: two stages keep the KV cache of their layers, two expert groups keep none."""
    placement = Path(__file__).parents[2] / "deploy" / "examples" / "local.yaml"
    ckpt = checkpoint_factory("mixtral")
    assert main(["describe", "--config", str(placement), "--checkpoint", str(ckpt), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    shards = {s["shard"]: s for s in printed["shards"]}
    assert sorted(shards) == ["experts0", "experts1", "stage0", "stage1"]
    assert sum(s["weight_bytes"] for s in shards.values()) == printed["weight_bytes"]
    assert sum(s["kv_bytes"] for s in shards.values()) == printed["kv_cache"]["bytes_batch_window"]
    assert shards["experts0"]["kv_bytes"] == 0
