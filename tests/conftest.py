"""Shared fixtures: small random checkpoints made on the fly, and transformers as the independent reference."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory):
    """make(arch, window=.., seed=.., **small_config options) -> checkpoint dir, cached per arguments."""
    from shards.make_checkpoint import make_checkpoint, small_config

    made: dict[tuple, Path] = {}

    def make(
        arch: str = "mixtral",
        seed: int = 0,
        layout: str = "hf",
        dtype: torch.dtype = torch.float32,
        max_shard_bytes: int | None = None,
        **options,
    ) -> Path:
        key = (arch, seed, layout, dtype, max_shard_bytes, tuple(sorted(options.items())))
        if key not in made:
            out = tmp_path_factory.mktemp(f"{arch}-ckpt")
            made[key] = make_checkpoint(
                out,
                small_config(arch, **options),
                seed=seed,
                dtype=dtype,
                layout=layout,
                max_shard_bytes=max_shard_bytes,
            )
        return made[key]

    return make


@pytest.fixture(scope="session")
def hf_model():
    """The same checkpoint through transformers' MistralForCausalLM / MixtralForCausalLM (float32, eager CPU)."""
    from transformers import AutoModelForCausalLM

    cache: dict[Path, torch.nn.Module] = {}

    def load(path: Path):
        if path not in cache:
            cache[path] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        return cache[path]

    return load


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


def random_prompts(lengths: list[int], seed: int, vocab: int = 32000) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, vocab, (n - 1,), generator=gen).tolist() for n in lengths]
