"""`mistral-cluster make-checkpoint`: a small random-weight checkpoint with the real Mistral tokenizer."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cluster.cli.usage import UsageError, positive_int
from shards.checkpoint import parse_dtype
from shards.make_checkpoint import make_checkpoint, small_config


def register(subparsers: argparse._SubParsersAction) -> None:
    mk = subparsers.add_parser(
        "make-checkpoint", help="write a small random-weight checkpoint with the Mistral tokenizer"
    )
    mk.add_argument("out")
    mk.add_argument("--arch", choices=["mistral", "mixtral"], default="mixtral")
    mk.add_argument("--layers", type=positive_int)
    mk.add_argument("--dim", type=positive_int)
    mk.add_argument("--heads", type=positive_int)
    mk.add_argument("--kv-heads", type=positive_int)
    mk.add_argument("--hidden", type=positive_int)
    mk.add_argument("--experts", type=positive_int, help="experts per layer (--arch mixtral only; default 4)")
    mk.add_argument("--window", type=positive_int)
    mk.add_argument("--no-window", action="store_true", help="full attention (sliding_window: null)")
    mk.add_argument("--max-seq-len", type=positive_int)
    mk.add_argument("--seed", type=int, default=0)
    mk.add_argument("--dtype", default="float32")
    mk.add_argument("--layout", choices=["hf", "reference"], default="hf")
    mk.add_argument(
        "--force",
        action="store_true",
        help="write into a non-empty OUT (files of the same name are replaced, the others are left)",
    )
    mk.add_argument("--json", action="store_true")
    mk.set_defaults(func=cmd_make_checkpoint)


def cmd_make_checkpoint(args: argparse.Namespace) -> int:
    window = None if args.no_window else (args.window if args.window is not None else "default")
    cfg = small_config(
        args.arch,
        layers=args.layers,
        dim=args.dim,
        experts=args.experts,
        window=window,
        heads=args.heads,
        kv_heads=args.kv_heads,
        hidden=args.hidden,
        max_seq_len=args.max_seq_len,
    )
    dtype = parse_dtype(args.dtype)
    _check_out(Path(args.out), args.force)
    out = make_checkpoint(args.out, cfg, seed=args.seed, dtype=dtype, layout=args.layout)
    print(json.dumps({"checkpoint": str(out), "config": cfg.to_hf_dict()}, indent=2) if args.json else f"wrote {out}")
    return 0


def _check_out(out: Path, force: bool) -> None:
    """A checkpoint written over another one would mix their files (a stale params.json beside a new config.json)."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"{str(out)!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UsageError(f"{str(out)!r} is not empty; give --force to write into it")
