"""Random weights at any shape, made on the device that holds them: real-size benchmarks with no download.

A "random checkpoint" is a directory with a `config.json` and a `random_weights.json` (seed, scale) and no
tensor files. Every tensor is drawn from a generator seeded by the checkpoint's seed and the tensor's name, on
the device it is loaded to, so each shard makes only its own tensors (47 GB of Mixtral experts take a fraction
of a second on a GPU, against minutes from a file), and any process that asks for a tensor by name gets the
same values: the Hugging Face model built beside ours for comparison holds identical weights.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import torch

from shards.config import ConfigError, ModelConfig

MARKER = "random_weights.json"


def is_random_checkpoint(root: str | Path) -> bool:
    return (Path(root) / MARKER).is_file()


def read_marker(root: str | Path) -> tuple[int, float]:
    path = Path(root) / MARKER
    try:
        data = json.loads(path.read_text())
        seed, std = data["seed"], data["std"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConfigError(f'{path}: expected {{"seed": int, "std": float}} ({e})') from None
    if not isinstance(seed, int) or isinstance(seed, bool) or not isinstance(std, (int, float)) or std <= 0:
        raise ConfigError(f"{path}: seed must be an integer and std a positive number, got seed={seed!r} std={std!r}")
    return seed, float(std)


def write_random_checkpoint(out_dir: str | Path, config: ModelConfig, seed: int = 0, std: float = 0.02) -> Path:
    """A directory every loader in the project accepts as a checkpoint; its weights are made when loaded."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_whole(out / "config.json", json.dumps(config.to_hf_dict(), indent=2) + "\n")
    write_whole(out / MARKER, json.dumps({"seed": seed, "std": std}) + "\n")
    return out


def write_whole(path: Path, data: str | bytes) -> None:
    """Written beside and moved into place: processes making the same checkpoint at once (two Serve replicas, a
    copy to another node) never read half a file."""
    part = path.with_name(f"{path.name}.{os.getpid()}.part")
    if isinstance(data, bytes):
        part.write_bytes(data)
    else:
        part.write_text(data)
    os.replace(part, path)


def random_tensor(
    name: str, shape: tuple[int, ...], seed: int, std: float, dtype: torch.dtype, device: str | torch.device
) -> torch.Tensor:
    """N(0, std) for matrices, 1 + N(0, 0.1) for norm weights: the scale of trained Mistral weights, so the gates
    route as unevenly as real ones do rather than by uninitialised memory.

    Drawn in float32 on `device` and rounded to `dtype`: the same name, shape and device type give the same
    values in every process.
    """
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
    if name.endswith("norm.weight"):
        t.mul_(0.1).add_(1.0)
    else:
        t.mul_(std)
    return t.to(dtype)
