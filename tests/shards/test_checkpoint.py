"""Checkpoint config and tensors: both layouts, clear errors, and a shard loading only its own tensors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from shards.checkpoint import CheckpointError, CheckpointReader, HostCopy, ShardSelection
from shards.config import ConfigError, load_config


def write_config(tmp_path, **overrides):
    base = {
        "model_type": "mixtral",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "vocab_size": 32000,
        "rms_norm_eps": 1e-5,
        "sliding_window": 32,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
    }
    base.update(overrides)
    base = {k: v for k, v in base.items() if v is not ...}
    (tmp_path / "config.json").write_text(json.dumps(base))
    return tmp_path


def test_rope_theta_is_read_from_rope_parameters_or_the_top_level(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    new = load_config(write_config(tmp_path / "a", rope_parameters={"rope_theta": 1e6, "rope_type": "default"}))
    old = load_config(write_config(tmp_path / "b", rope_theta=500000.0))
    assert new.rope_theta == 1e6 and old.rope_theta == 500000.0


def test_sliding_window_may_be_null(tmp_path):
    assert load_config(write_config(tmp_path, sliding_window=None)).sliding_window is None


def test_head_dim_defaults_to_hidden_over_heads(tmp_path):
    assert load_config(write_config(tmp_path)).head_dim == 16


def test_unknown_model_type_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"config.json: field 'model_type' is 'llama'"):
        load_config(write_config(tmp_path, model_type="llama"))


def test_missing_field_names_file_and_field(tmp_path):
    with pytest.raises(ConfigError, match=r"config.json: missing field 'num_hidden_layers'"):
        load_config(write_config(tmp_path, num_hidden_layers=...))


def test_wrong_type_names_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"field 'hidden_size' has the wrong type: '64'"):
        load_config(write_config(tmp_path, hidden_size="64"))


def test_heads_not_divisible_by_kv_heads_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"n_heads \(4\) must be a multiple of n_kv_heads \(3\)"):
        load_config(write_config(tmp_path, num_key_value_heads=3))


def test_params_json_missing_field_is_named(tmp_path):
    (tmp_path / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 2}))
    with pytest.raises(ConfigError, match=r"params.json: missing field 'n_heads'"):
        load_config(tmp_path)


def test_directory_without_any_config_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="neither config.json"):
        load_config(tmp_path)


def test_missing_tensor_file_is_named(checkpoint_factory, tmp_path):
    import shutil

    ckpt = checkpoint_factory("mistral", seed=0)
    copy = tmp_path / "ck"
    shutil.copytree(ckpt, copy)
    (copy / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no \*.safetensors files"):
        CheckpointReader(copy)


def test_truncated_safetensors_file_is_named(checkpoint_factory, tmp_path):
    import shutil

    ckpt = checkpoint_factory("mistral", seed=0)
    copy = tmp_path / "ck"
    shutil.copytree(ckpt, copy)
    data = (copy / "model.safetensors").read_bytes()
    (copy / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model.safetensors"):
        CheckpointReader(copy).load(ShardSelection.whole(load_config(copy)))


def test_tensor_shape_that_disagrees_with_the_config_is_named(checkpoint_factory, tmp_path):
    import shutil

    ckpt = checkpoint_factory("mistral", seed=0)
    copy = tmp_path / "ck"
    shutil.copytree(ckpt, copy)
    cfg = json.loads((copy / "config.json").read_text())
    cfg["intermediate_size"] = 100
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        CheckpointError,
        match=r"tensor 'model.layers.0.mlp.gate_proj.weight' has shape \[128, 64\], the config asks for \[100, 64\]",
    ):
        CheckpointReader(copy).load(ShardSelection.whole(load_config(copy)))


def test_selection_reads_only_its_tensors(checkpoint_factory):
    reader = CheckpointReader(checkpoint_factory("mixtral", seed=0))
    sel = ShardSelection(layers=(1,), experts={1: (2,)})
    names = set(reader.load(sel))
    assert names == {
        "model.layers.1.input_layernorm.weight",
        "model.layers.1.post_attention_layernorm.weight",
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.1.self_attn.k_proj.weight",
        "model.layers.1.self_attn.v_proj.weight",
        "model.layers.1.self_attn.o_proj.weight",
        "model.layers.1.block_sparse_moe.gate.weight",
        "model.layers.1.block_sparse_moe.experts.2.w1.weight",
        "model.layers.1.block_sparse_moe.experts.2.w2.weight",
        "model.layers.1.block_sparse_moe.experts.2.w3.weight",
    }


@pytest.mark.parametrize("layout", ["hf", "reference"])
def test_a_part_of_the_experts_hidden_rows_is_that_slice_of_the_whole_experts(checkpoint_factory, layout):
    reader = CheckpointReader(checkpoint_factory("mixtral", seed=0, layout=layout))
    h = reader.config.hidden_dim
    whole = reader.load(ShardSelection(experts={1: (0, 3)}))
    for part in range(2):
        got = reader.load(ShardSelection(experts={1: (0, 3)}, hidden_rows=(part * h // 2, (part + 1) * h // 2)))
        rows = slice(part * h // 2, (part + 1) * h // 2)
        assert set(got) == set(whole)
        for name, t in got.items():
            expected = whole[name][:, rows] if name.endswith("w2.weight") else whole[name][rows]
            assert t.is_contiguous() and torch.equal(t, expected), name


def test_a_random_checkpoints_expert_part_is_that_slice_of_the_whole(tmp_path):
    from shards.make_checkpoint import small_config
    from shards.random_source import write_random_checkpoint

    reader = CheckpointReader(write_random_checkpoint(tmp_path / "r", small_config("mixtral"), 3, 0.02))
    whole = reader.load(ShardSelection(experts={0: (2,)}))
    h = reader.config.hidden_dim // 4
    got = reader.load(ShardSelection(experts={0: (2,)}, hidden_rows=(h, 2 * h)))
    w1, w2 = (
        "model.layers.0.block_sparse_moe.experts.2.w1.weight",
        "model.layers.0.block_sparse_moe.experts.2.w2.weight",
    )
    assert torch.equal(got[w1], whole[w1][h : 2 * h]) and torch.equal(got[w2], whole[w2][:, h : 2 * h])


PEAK_SCRIPT = """
import os, sys, torch
from shards.checkpoint import CheckpointReader, ShardSelection

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

reader = CheckpointReader(sys.argv[1])
sel = ShardSelection(layers=(0,), experts={0: (0,)}) if sys.argv[2] == "shard" else ShardSelection.whole(reader.config)
before = rss()
tensors = reader.load(sel)
checksum = sum(float(t.sum()) for t in tensors.values())  # touch every byte (mmap-backed or not), no copy
print(rss() - before, sum(t.nbytes for t in tensors.values()))
"""


def test_shard_loader_peak_memory_is_its_own_size_not_the_checkpoints(checkpoint_factory):
    """A 1/32 shard of a ~170 MB checkpoint grows the process's resident memory by its own size, not the whole's."""
    ckpt = checkpoint_factory("mixtral", seed=0, dim=256, hidden=1024, layers=4, experts=8)
    total = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
    peaks = {}
    for which in ("shard", "whole"):
        out = subprocess.run(
            [sys.executable, "-c", PEAK_SCRIPT, str(ckpt), which], capture_output=True, text=True, check=True
        )
        peaks[which] = [int(x) for x in out.stdout.split()]
    shard_peak, shard_bytes = peaks["shard"]
    whole_peak, _ = peaks["whole"]
    assert total > 100e6
    assert shard_peak < 2 * shard_bytes + 12e6, (shard_peak, shard_bytes)  # its own bytes, plus page fault-around
    assert shard_peak < total / 8
    assert whole_peak > total / 2  # the measurement does see a full load


def test_a_host_copy_gives_the_checkpoints_tensors_without_reading_its_files_again(checkpoint_factory, tmp_path):
    import shutil

    import torch

    copy = tmp_path / "ck"
    shutil.copytree(checkpoint_factory("mixtral", seed=0), copy)
    reader = CheckpointReader(copy)
    stage, group = ShardSelection(layers=(0, 1), experts={}), ShardSelection(layers=(), experts={1: (2, 3)})
    host = HostCopy(reader, [stage, group], torch.bfloat16)
    expected = {**reader.load(stage, dtype=torch.bfloat16), **reader.load(group, dtype=torch.bfloat16)}
    for f in copy.glob("*.safetensors"):
        f.unlink()  # a standby's promotion must not need them
    got = {**host.load(stage, dtype=torch.bfloat16, device="cpu"), **host.load(group, dtype=torch.bfloat16)}
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[n], expected[n]) and got[n].dtype == torch.bfloat16 for n in expected)
    assert host.nbytes == sum(t.nbytes for t in expected.values())
    with pytest.raises(CheckpointError, match="is missing"):  # what it does not hold comes from the files
        host.load(ShardSelection(layers=(3,), experts={}), dtype=torch.bfloat16)
