"""Random checkpoints: every process that asks for a tensor by name gets the same values, made where it loads."""

from __future__ import annotations

import json

import pytest
import torch

from shards.checkpoint import CheckpointReader, ShardSelection
from shards.config import PRESETS, ConfigError, load_config
from shards.make_checkpoint import make_random_checkpoint, small_config
from shards.random_source import is_random_checkpoint, random_tensor, write_random_checkpoint
from shards.tokenizer import Tokenizer


def test_a_shard_gets_the_same_tensors_as_the_whole_model(tmp_path):
    cfg = small_config("mixtral", layers=4)
    reader = CheckpointReader(write_random_checkpoint(tmp_path / "r", cfg, seed=3))
    whole = reader.load(ShardSelection.whole(cfg))
    part = reader.load(ShardSelection(layers=(2,), experts={2: (1, 3)}))
    assert set(part) < set(whole)
    for name, t in part.items():
        assert torch.equal(t, whole[name]), name
    assert not list(tmp_path.glob("r/*.safetensors"))  # nothing written but the config and the marker


def test_values_depend_on_seed_and_name_and_have_a_realistic_scale(tmp_path):
    a = random_tensor("model.layers.0.self_attn.q_proj.weight", (256, 256), 0, 0.02, torch.float32, "cpu")
    b = random_tensor("model.layers.1.self_attn.q_proj.weight", (256, 256), 0, 0.02, torch.float32, "cpu")
    c = random_tensor("model.layers.0.self_attn.q_proj.weight", (256, 256), 1, 0.02, torch.float32, "cpu")
    assert not torch.equal(a, b) and not torch.equal(a, c)
    assert abs(a.std().item() - 0.02) < 0.001
    norm = random_tensor("model.norm.weight", (4096,), 0, 0.02, torch.float32, "cpu")
    assert abs(norm.mean().item() - 1.0) < 0.01


def test_the_shards_model_loads_from_a_random_checkpoint_and_matches_the_rounded_dtype(tmp_path):
    cfg = small_config("mistral")
    reader = CheckpointReader(write_random_checkpoint(tmp_path / "r", cfg))
    f32 = reader.load(ShardSelection.whole(cfg), dtype=torch.float32)
    bf16 = reader.load(ShardSelection.whole(cfg), dtype=torch.bfloat16)
    for name in f32:
        assert torch.equal(f32[name].bfloat16(), bf16[name]), name


def test_a_bad_marker_is_refused_naming_the_file(tmp_path):
    root = write_random_checkpoint(tmp_path / "r", small_config("mistral"))
    (root / "random_weights.json").write_text(json.dumps({"seed": "x", "std": 0.02}))
    with pytest.raises(ConfigError, match="random_weights.json.*seed must be an integer"):
        CheckpointReader(root)


def test_a_preset_shape_is_made_with_its_config_the_tokenizer_of_its_vocabulary_and_no_tensors(tmp_path):
    root = make_random_checkpoint(tmp_path / "r", "mixtral-8x7b")
    assert is_random_checkpoint(root) and load_config(root) == PRESETS["mixtral-8x7b"]
    assert Tokenizer(root).vocab_size == PRESETS["mixtral-8x7b"].vocab_size
    assert sorted(p.name for p in root.iterdir()) == ["config.json", "random_weights.json", "tokenizer.model"]
    short = make_random_checkpoint(tmp_path / "s", "mixtral-8x7b", max_seq_len=1024)
    assert load_config(short).max_seq_len == 1024


def test_an_unknown_shape_is_refused_naming_the_choices(tmp_path):
    with pytest.raises(ConfigError, match="unknown shape 'mixtral-9x9b'; choose one of .*mixtral-8x7b.*small-mixtral"):
        make_random_checkpoint(tmp_path / "r", "mixtral-9x9b")
    assert not (tmp_path / "r").exists()
