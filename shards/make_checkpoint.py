"""A small random-weight checkpoint in the Hugging Face layout, with the real Mistral tokenizer.

It is the project's embedded default: big enough to exercise every path (GQA, window, experts, chunked
prefill), small enough that a test suite on two CPU cores stays fast. `make_random_checkpoint` writes a checkpoint
of a preset's real shape with no tensor files (each shard draws its own, `shards/random_source.py`): what
`serve --random-weights` serves, for benchmarks without the download.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import torch

from shards.checkpoint import ShardSelection, save_checkpoint
from shards.config import PRESETS, ConfigError, ModelConfig
from shards.random_source import write_random_checkpoint, write_whole

SMALL = ModelConfig(
    dim=64,
    n_layers=4,
    n_heads=4,
    n_kv_heads=2,
    head_dim=16,
    hidden_dim=128,
    vocab_size=32000,
    norm_eps=1e-5,
    rope_theta=10000.0,
    sliding_window=32,
    max_seq_len=2048,
)


# The sentencepiece models mistral-common ships, by vocabulary size: v1 (Mistral 7B v0.1, Mixtral 8x7B) and v3
# (32768 pieces: Mixtral 8x22B, Mistral 7B v0.3).
TOKENIZER_OF_VOCAB = {32000: "tokenizer.model.v1", 32768: "mistral_instruct_tokenizer_240323.model.v3"}


def mistral_tokenizer_file(vocab_size: int = 32000) -> Path:
    """The sentencepiece model that mistral-common ships for this vocabulary size (the v1 model by default)."""
    if vocab_size not in TOKENIZER_OF_VOCAB:
        raise ConfigError(f"no Mistral tokenizer has {vocab_size} pieces; known: {sorted(TOKENIZER_OF_VOCAB)}")
    # Here, not at the top: callers that write no tokenizer (benchmarks: with_tokenizer=False) need no mistral-common.
    import mistral_common

    path = Path(os.path.dirname(mistral_common.__file__)) / "data" / TOKENIZER_OF_VOCAB[vocab_size]
    if not path.is_file():
        raise ConfigError(f"mistral-common does not ship {path}; reinstall mistral-common")
    return path


def small_config(
    arch: str = "mixtral",
    layers: int | None = None,
    dim: int | None = None,
    experts: int | None = None,
    window: int | None | str = "default",
    heads: int | None = None,
    kv_heads: int | None = None,
    hidden: int | None = None,
    max_seq_len: int | None = None,
) -> ModelConfig:
    if arch not in ("mistral", "mixtral"):
        raise ConfigError(f"--arch must be 'mistral' or 'mixtral', got {arch!r}")
    if arch == "mistral" and experts is not None:
        raise ConfigError(f"--experts {experts}: a mistral model has no experts; use --arch mixtral")
    n_heads = heads or SMALL.n_heads
    model_dim = dim or SMALL.dim
    if model_dim % n_heads:
        raise ConfigError(f"--dim {model_dim} must be divisible by the number of heads {n_heads}")
    cfg = replace(
        SMALL,
        dim=model_dim,
        n_layers=layers or SMALL.n_layers,
        n_heads=n_heads,
        n_kv_heads=kv_heads or min(SMALL.n_kv_heads, n_heads),
        head_dim=model_dim // n_heads,
        hidden_dim=hidden or 2 * model_dim,
        sliding_window=SMALL.sliding_window if window == "default" else window,
        max_seq_len=max_seq_len or SMALL.max_seq_len,
        num_experts=(experts or 4) if arch == "mixtral" else 0,
        rope_theta=1e6 if arch == "mixtral" else 10000.0,
    )
    return cfg.validate("make-checkpoint options")


def random_weights(
    config: ModelConfig, seed: int, std: float = 0.02, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Every tensor drawn from N(0, std) (norm weights around 1), from one seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in ShardSelection.whole(config).tensor_shapes(config).items():
        if name.endswith("norm.weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            t = std * torch.randn(shape, generator=gen)
        out[name] = t.to(dtype)
    return out


def make_checkpoint(
    out_dir: str | Path,
    config: ModelConfig,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    layout: str = "hf",
    max_shard_bytes: int | None = None,
    with_tokenizer: bool = True,
) -> Path:
    """`with_tokenizer=False` leaves the tokenizer out (benchmarks that feed token ids need no mistral-common)."""
    return save_checkpoint(
        out_dir,
        config,
        random_weights(config, seed, dtype=dtype),
        layout=layout,
        max_shard_bytes=max_shard_bytes,
        tokenizer_file=mistral_tokenizer_file() if with_tokenizer else None,
    )


# --- random weights at a named shape ----------------------------------------------------------------------------

SMALL_SHAPE = "small-mixtral"  # the embedded default's shape: what a CPU test serves in place of a preset


def random_shapes() -> list[str]:
    """What `--random-weights` accepts: every preset, and the small default shape for CPU runs."""
    return [*sorted(PRESETS), SMALL_SHAPE]


def random_shape(name: str) -> ModelConfig:
    if name == SMALL_SHAPE:
        return small_config("mixtral")
    if name not in PRESETS:
        raise ConfigError(f"random weights: unknown shape {name!r}; choose one of {', '.join(random_shapes())}")
    return PRESETS[name]


def make_random_checkpoint(
    out_dir: str | Path, name: str, seed: int = 0, std: float = 0.02, max_seq_len: int | None = None
) -> Path:
    """A checkpoint of `name`'s shape whose weights each shard draws on its own device, with the real tokenizer.
    `max_seq_len` shortens the context (and so each sequence's KV cache when it is under the sliding window)."""
    config = random_shape(name)
    if max_seq_len is not None:
        config = replace(config, max_seq_len=max_seq_len).validate(f"random weights of {name}")
    out = write_random_checkpoint(out_dir, config, seed, std)
    tokenizer = out / "tokenizer.model"
    if not tokenizer.is_file():
        write_whole(tokenizer, mistral_tokenizer_file(config.vocab_size).read_bytes())
    return out
