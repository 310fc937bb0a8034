"""A served step that carries new prompts beside running sequences, split (running rows through the decode kernel,
prompts packed) against packed whole, in one process on a few real-shaped layers: which is faster, and from how many
running rows. `MISTRAL_CLUSTER_SPLIT_MIXED` is flipped between the two timings of each case, so both see the same
machine, the same weights and the same cache (bench/NOTES.md: one 3-repeat timing read 22 running + 10 x 64 prompts as
9.6 ms a layer split against 7.3 packed; host-bound steps need longer timings).

    python3 bench/mixed_split.py --out bench/results/mixed_split-h200.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from bench.shard_profile import profile_mixed
from shards.config import preset
from shards.random_source import write_random_checkpoint

SEED, STD = 0, 0.02


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mixtral-8x7b")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--running", type=int, nargs="+", default=[8, 22, 48, 80, 112], help="running rows of a case")
    p.add_argument("--prompts", type=int, nargs="+", default=[10, 16], help="new prompts of a case")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--context", type=int, default=300, help="each running sequence's cached tokens")
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--out", required=True)
    args = p.parse_args()

    from shards.checkpoint import CheckpointReader, ShardSelection
    from shards.model import TransformerShard

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = replace(preset(args.model), n_layers=args.layers, max_seq_len=1024)
    if device.type == "cpu":  # a dry run: the shape shrunk, the code path the same
        cfg = replace(cfg, dim=64, hidden_dim=128, n_heads=4, n_kv_heads=2, head_dim=16, vocab_size=512)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_random_checkpoint(Path(tmp) / "mixed", cfg, SEED, STD)
        shard = TransformerShard.from_checkpoint(CheckpointReader(ckpt), ShardSelection.whole(cfg), dtype, device)
        for prompts in args.prompts:
            for running in args.running:
                row = {"running": running, "prompts": prompts}
                for name, flag in (("split", "1"), ("packed", "0")):
                    os.environ["MISTRAL_CLUSTER_SPLIT_MIXED"] = flag
                    r = profile_mixed(
                        shard, cfg, device, dtype, running, prompts, args.prompt_tokens, args.context, args.repeat
                    )
                    row[name] = {k: r[k] for k in ("mixed_ms_per_layer", "decode_ms_per_layer", "prefill_ms_per_layer",
                                                   "mixed_over_parts", "host_syncs")}  # fmt: skip
                row["split_over_packed"] = round(
                    row["split"]["mixed_ms_per_layer"] / row["packed"]["mixed_ms_per_layer"], 3
                )
                print(json.dumps(row), flush=True)
                rows.append(row)
    out = {
        "model": args.model,
        "layers": args.layers,
        "prompt_tokens": args.prompt_tokens,
        "context": args.context,
        "repeat": args.repeat,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
