"""`mistral-cluster make-checkpoint` and `generate`: JSON output equal to transformers, one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.cli import build_parser, main
from shards.hf_tokenizer_files import HF_TOKENIZER_FILES
from shards.tokenizer import Tokenizer
from tests.conftest import hf_greedy


@pytest.fixture(scope="module")
def cli_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "ck"
    assert (
        main(["make-checkpoint", str(out), "--arch", "mixtral", "--layers", "2", "--window", "8", "--seed", "3"]) == 0
    )
    return out


def test_make_checkpoint_writes_a_loadable_hf_checkpoint_with_the_mistral_tokenizer(cli_checkpoint):
    cfg = json.loads((cli_checkpoint / "config.json").read_text())
    assert cfg["model_type"] == "mixtral" and cfg["num_hidden_layers"] == 2 and cfg["sliding_window"] == 8
    assert Tokenizer(cli_checkpoint).vocab_size == 32000
    assert all((cli_checkpoint / name).is_file() for name in HF_TOKENIZER_FILES)


def test_generate_json_gives_transformers_greedy_tokens_for_a_packed_batch(cli_checkpoint, hf_model, capsys):
    prompts = ["The quick brown fox jumps over the lazy dog and keeps running", "Hi"]
    args = ["generate", "--checkpoint", str(cli_checkpoint), "--max-tokens", "20", "--ignore-eos", "--json"]
    for p in prompts:
        args += ["--prompt", p]
    assert main(args) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    tok = Tokenizer(cli_checkpoint)
    assert len(lines) == 2
    for prompt, line in zip(prompts, lines, strict=True):
        assert line["prompt_token_ids"] == tok.encode(prompt)
        assert line["token_ids"] == hf_greedy(hf_model(cli_checkpoint), line["prompt_token_ids"], 20)
        assert line["text"] == tok.decode(line["token_ids"])


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--prompt", ""], "--prompt number 1 is empty"),
        (["--prompt", "hi", "--max-tokens", "0"], "--max-tokens must be at least 1, got 0"),
        (["--prompt", "hi", "--max-tokens", "-3"], "--max-tokens must be at least 1, got -3"),
        (["--prompt", "hi", "--temperature", "7"], "temperature must be between 0 and 2, got 7.0"),
        (["--prompt", "word " * 3000], "over the model's maximum context of 2048 tokens"),
        (
            ["--prompt", "hi", "--chunk-size", "9"],
            "--chunk-size 9 is larger than the model's KV cache of 8 rows per sequence",
        ),
    ],
)
def test_bad_generate_input_is_one_line_error_with_status_2(cli_checkpoint, capsys, extra, message):
    assert main(["generate", "--checkpoint", str(cli_checkpoint)] + extra) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_missing_checkpoint_is_named(capsys, tmp_path):
    assert main(["generate", "--checkpoint", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "nope" in capsys.readouterr().err


def test_unknown_model_type_is_a_clear_error(cli_checkpoint, tmp_path, capsys):
    copy = tmp_path / "ck"
    shutil.copytree(cli_checkpoint, copy)
    cfg = json.loads((copy / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (copy / "config.json").write_text(json.dumps(cfg))
    assert main(["generate", "--checkpoint", str(copy), "--prompt", "x"]) == 2
    assert "field 'model_type' is 'gpt2'" in capsys.readouterr().err


def test_experts_for_a_dense_model_is_a_one_line_error_naming_the_flag(tmp_path, capsys):
    assert main(["make-checkpoint", str(tmp_path / "ck"), "--arch", "mistral", "--experts", "4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--experts 4" in err and "Traceback" not in err
    assert not (tmp_path / "ck").exists()


def test_make_checkpoint_refuses_a_non_empty_directory_unless_forced(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["make-checkpoint", str(tmp_path), "--layers", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(tmp_path) in err and "--force" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]

    assert main(["make-checkpoint", str(tmp_path), "--layers", "1", "--force"]) == 0
    assert (tmp_path / "config.json").is_file() and (tmp_path / "notes.txt").read_text() == "mine"


def test_a_usage_error_under_python_m_is_one_line_with_status_2(tmp_path):
    """`python -m cluster.cli` runs the same classes as the console script: a command's UsageError is caught."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    args = ["serve", "--config", str(tmp_path / "unused.yaml"), "--drain-timeout", "-1"]
    done = subprocess.run([sys.executable, "-m", "cluster.cli", *args], env=env, capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr == "mistral-cluster serve: error: --drain-timeout must be 0 or more seconds, got -1\n"


# --- serve: random weights and replicas, checked before Ray starts ------------------------------------------------


def test_serve_help_names_random_weights_a_benchmark_aid_and_the_replica_flags(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # argparse wraps at hyphens otherwise
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--random-weights SHAPE benchmark aid: serve random weights" in out
    assert "served as random-SHAPE" in out and "mixtral-8x7b" in out and "small-mixtral" in out
    assert "--replicas" in out and "--autoscale MIN:MAX" in out


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--checkpoint", "ck", "--random-weights", "small-mixtral"], "give --checkpoint DIR or --random-weights"),
        (["--max-model-len", "512"], "--max-model-len goes with --random-weights"),
        (["--random-weights", "small-mixtral", "--replicas", "2", "--autoscale", "1:3"], "not both"),
        (["--random-weights", "small-mixtral", "--autoscale", "3:1"], "--autoscale expects MIN:MAX"),
        (["--random-weights", "small-mixtral", "--autoscale", "two"], "got 'two'"),
        (["--random-weights", "small-mixtral", "--target-ongoing-requests", "8"], "goes with --autoscale"),
        (["--random-weights", "small-mixtral", "--direct-ingress", "--address", "10.0.0.1:6379"], "starts a local"),
        (
            ["--random-weights", "small-mixtral", "--direct-ingress", "--replicas", "3", "--port", "65534"],
            "65535-65537",
        ),
    ],
)
def test_bad_serve_scaling_input_is_one_line_error_before_ray_starts(extra, message, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr("cluster.placement_file.HOME", tmp_path)  # where the random checkpoint is made
    root = Path(__file__).resolve().parents[1]
    assert main(["serve", "--config", str(root / "deploy/examples/local.yaml"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_autoscale_asks_serve_for_the_placements_batch_in_flight_per_copy():
    from cluster.cli.serve import replica_options

    args = build_parser().parse_args(["serve", "--config", "p.yaml", "--autoscale", "1:3"])
    assert replica_options(args, max_seqs=64) == (
        {"autoscaling_config": {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 64.0}},
        3,
    )
    args = build_parser().parse_args(["serve", "--config", "p.yaml", "--replicas", "2"])
    assert replica_options(args, max_seqs=64) == ({"num_replicas": 2}, 2)
