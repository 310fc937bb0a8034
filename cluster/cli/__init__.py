"""`mistral-cluster`: make a checkpoint, generate, describe a model, plan and run a sharded cluster, serve."""

from __future__ import annotations

import argparse
import os
import sys

# Ray reads this once, when it is first imported, and the command modules below import it: set here, every shard's
# log lines reach the terminal even when two shards print the same line.
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

from cluster.cli import describe, generate, make_checkpoint, plan, serve  # noqa: E402 - after RAY_DEDUP_LOGS
from cluster.cli.usage import UsageError  # noqa: E402
from router.generation import RequestError  # noqa: E402
from shards.config import ConfigError  # noqa: E402

COMMANDS = (make_checkpoint, generate, describe, plan, serve)  # in the order `--help` lists them


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mistral-cluster", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The console script: run one command; a mistake of the user's is one line on stderr and exit status 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (UsageError, ConfigError, RequestError) as e:
        print(f"mistral-cluster {args.command}: error: {e}", file=sys.stderr)
        return 2
