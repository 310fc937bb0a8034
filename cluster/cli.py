"""`mistral-cluster`: make a checkpoint, generate, describe a model, plan and run a sharded cluster, serve."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from cluster.placement_file import DEFAULT_CHECKPOINT, ensure_default_checkpoint


class UsageError(Exception):
    """A command-line value is wrong; printed as one line, exit status 2."""


def resolve_checkpoint(value: str | None) -> Path:
    if value is None:
        return ensure_default_checkpoint()
    path = Path(value)
    if not path.exists():
        raise UsageError(f"--checkpoint {value!r}: no such directory")
    return path


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


# --- make-checkpoint ------------------------------------------------------------------------------------


def cmd_make_checkpoint(args: argparse.Namespace) -> int:
    from shards.checkpoint import parse_dtype
    from shards.make_checkpoint import make_checkpoint, small_config

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
    out = make_checkpoint(args.out, cfg, seed=args.seed, dtype=parse_dtype(args.dtype), layout=args.layout)
    print(json.dumps({"checkpoint": str(out), "config": cfg.to_hf_dict()}, indent=2) if args.json else f"wrote {out}")
    return 0


# --- generate -------------------------------------------------------------------------------------------


def sampling_from_args(args: argparse.Namespace):
    from router.sampling import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        ignore_eos=args.ignore_eos,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from router.generation import generate
    from shards.checkpoint import parse_dtype
    from shards.tokenizer import Tokenizer

    if args.max_tokens < 1:
        raise UsageError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    for i, p in enumerate(args.prompt):
        if not p.strip():
            raise UsageError(f"--prompt number {i + 1} is empty")
    params = sampling_from_args(args)
    try:
        params.validate()
    except ValueError as e:
        raise UsageError(str(e)) from None

    if args.config:
        _generate_on_cluster(args, params)
    else:
        from shards.engine import LocalEngine

        engine = LocalEngine(
            resolve_checkpoint(args.checkpoint),
            dtype=parse_dtype(args.dtype),
            device=args.device,
            max_seqs=len(args.prompt),
        )
        tokenizer = Tokenizer(engine.reader.root)
        prompts = _encode_prompts(args.prompt, tokenizer, params, engine.max_seq_len, engine.config.vocab_size)
        _print_results(generate(engine, prompts, params, chunk_size=args.chunk_size), tokenizer, args.json)
    return 0


def _encode_prompts(texts, tokenizer, params, max_seq_len: int, vocab_size: int) -> list[list[int]]:
    from router.generation import RequestError, check_prompt

    prompts = [tokenizer.encode(p) for p in texts]
    for i, ids in enumerate(prompts):
        try:
            check_prompt(ids, params, max_seq_len, vocab_size, i)
        except RequestError as e:
            raise UsageError(f"--prompt number {i + 1}: {e}") from None
    return prompts


def _print_results(results, tokenizer, as_json: bool) -> None:
    for r in results:
        text = tokenizer.decode(r.token_ids)
        if as_json:
            print(
                json.dumps(
                    {
                        "prompt_token_ids": r.prompt_ids,
                        "token_ids": r.token_ids,
                        "text": text,
                        "finish_reason": r.finish_reason,
                    }
                )
            )
        else:
            print(text)


def _generate_on_cluster(args: argparse.Namespace, params) -> None:
    from cluster.profile import profile_table
    from cluster.sharded import ShardedCluster
    from shards.tokenizer import Tokenizer

    with ShardedCluster.start(args.config, args.checkpoint, address=args.address) as cluster:
        tokenizer = Tokenizer(cluster.checkpoint_dir)
        prompts = _encode_prompts(args.prompt, tokenizer, params, cluster.config.max_seq_len, cluster.config.vocab_size)
        if len(prompts) > cluster.plan.max_seqs:
            raise UsageError(f"{len(prompts)} prompts, but the placement's max_seqs is {cluster.plan.max_seqs}")
        _print_results(cluster.generate(prompts, params), tokenizer, args.json)
        if args.profile:
            print(profile_table(cluster.take_traces(), cluster.expert_traces()), file=sys.stderr)


# --- entry ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mistral-cluster", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    mk = sub.add_parser("make-checkpoint", help="write a small random-weight checkpoint with the Mistral tokenizer")
    mk.add_argument("out")
    mk.add_argument("--arch", choices=["mistral", "mixtral"], default="mixtral")
    mk.add_argument("--layers", type=positive_int)
    mk.add_argument("--dim", type=positive_int)
    mk.add_argument("--heads", type=positive_int)
    mk.add_argument("--kv-heads", type=positive_int)
    mk.add_argument("--hidden", type=positive_int)
    mk.add_argument("--experts", type=positive_int)
    mk.add_argument("--window", type=positive_int)
    mk.add_argument("--no-window", action="store_true", help="full attention (sliding_window: null)")
    mk.add_argument("--max-seq-len", type=positive_int)
    mk.add_argument("--seed", type=int, default=0)
    mk.add_argument("--dtype", default="float32")
    mk.add_argument("--layout", choices=["hf", "reference"], default="hf")
    mk.add_argument("--json", action="store_true")
    mk.set_defaults(func=cmd_make_checkpoint)

    gen = sub.add_parser("generate", help="complete prompts, in one process or through the sharded cluster")
    gen.add_argument("--checkpoint", help=f"checkpoint directory (default: {DEFAULT_CHECKPOINT}, made on first run)")
    gen.add_argument("--config", help="placement YAML: run through the sharded Ray cluster instead of one process")
    gen.add_argument("--address", default=None, help="join this Ray cluster (default: RAY_ADDRESS or a local one)")
    gen.add_argument("--prompt", action="append", required=True, help="repeat for several prompts (one packed batch)")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--chunk-size", type=positive_int, default=None, help="prefill chunk (default: min(window, 512))")
    gen.add_argument("--dtype", default="float32")
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--profile", action="store_true", help="print per-step time in each component")
    gen.add_argument("--json", action="store_true")
    gen.set_defaults(func=cmd_generate)

    from cluster import describe_cli, plan_cli, serve_cli

    for module in (describe_cli, plan_cli, serve_cli):
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    parser = build_parser()
    args = parser.parse_args(argv)
    from router.generation import RequestError
    from shards.config import ConfigError

    try:
        return args.func(args)
    except (UsageError, ConfigError, RequestError) as e:
        print(f"mistral-cluster {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
