"""`mistral-cluster describe`: what a model costs (parameters, weights, KV cache, FLOPs) before anything is loaded.

With `--config PLACEMENT` it also splits the bytes per shard: each stage's weights and the KV cache of its layers,
each expert group's weights.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cluster.cli.usage import UsageError
from cluster.placement import PlacementPlan, validate_against_model
from cluster.placement_file import DEFAULT_CHECKPOINT, ensure_default_checkpoint, load_placement
from shards.checkpoint import ShardSelection, parse_dtype
from shards.config import ConfigError, ModelConfig, load_config, preset
from shards.describe import describe, render, shard_table


def _positive(flag: str, text: str) -> int:
    """Parsed here, not by argparse, so a bad value is a one-line error naming it instead of a usage dump."""
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"{flag} must be a positive integer, got {text!r}") from None
    if value < 1:
        raise UsageError(f"{flag} must be a positive integer, got {value}")
    return value


def placement_shards(plan: PlacementPlan, config: ModelConfig) -> list[tuple[str, ShardSelection, tuple[int, ...]]]:
    """(name, selection, KV layers) of every shard of a placement: stages keep their layers' cache, groups none."""
    plan = validate_against_model(plan, config)
    return [(s.name, s.selection, s.selection.layers if s.kind == "stage" else ()) for s in plan.shards(config)]


def _model(args: argparse.Namespace, plan: PlacementPlan | None) -> tuple[ModelConfig, str]:
    if args.preset is not None:
        return preset(args.preset), args.preset
    if args.checkpoint is not None:
        return load_config(Path(args.checkpoint)), str(args.checkpoint)
    if plan is not None:
        if Path(plan.checkpoint) == DEFAULT_CHECKPOINT:
            ensure_default_checkpoint()  # as `plan` does: the embedded default is made on first use
        return load_config(Path(plan.checkpoint)), plan.checkpoint
    raise ConfigError("describe needs --checkpoint DIR, --preset NAME or --config PLACEMENT")


def cmd_describe(args: argparse.Namespace) -> int:
    plan = None
    if args.config is not None:
        plan = load_placement(args.config, checkpoint_override=args.checkpoint)
    config, name = _model(args, plan)
    context = None if args.context is None else _positive("--context", args.context)
    # A placement's stages allocate max_seqs slots in its dtype; --batch and --dtype still override.
    batch = _positive("--batch", args.batch) if args.batch is not None else plan.max_seqs if plan else 1
    dtype = parse_dtype(args.dtype or (plan.dtype if plan else "bf16"))
    d = describe(config, context=context, batch=batch, dtype=dtype, name=name)
    rows = shard_table(config, placement_shards(plan, config), d["context"], batch, dtype) if plan else None
    if args.json:
        print(json.dumps(d if rows is None else {**d, "placement": args.config, "shards": rows}, indent=2))
    else:
        print(render(d, rows))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "describe", help="parameters, weight and KV-cache bytes, receptive field and FLOPs of a model, by arithmetic"
    )
    which = p.add_mutually_exclusive_group()
    which.add_argument("--checkpoint", help="checkpoint directory (config.json or params.json)")
    which.add_argument("--preset", help="mistral-7b, mixtral-8x7b or mixtral-8x22b")
    p.add_argument("--config", help="placement YAML: bytes per shard (model: its checkpoint unless given above)")
    p.add_argument("--context", help="tokens per sequence (default: the model's max_seq_len)")
    p.add_argument("--batch", help="sequences held in the KV cache at once (default 1, or the placement's max_seqs)")
    p.add_argument("--dtype", help="weights and cache dtype: bf16, fp16, fp32 (default bf16, or the placement's)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_describe)
