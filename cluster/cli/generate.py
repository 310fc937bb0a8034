"""`mistral-cluster generate`: complete prompts in one process, or through the sharded cluster with `--config`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cluster.cli.usage import UsageError, positive_int
from cluster.placement_file import DEFAULT_CHECKPOINT, ensure_default_checkpoint
from cluster.profile import profile_table
from cluster.sharded import ShardedCluster
from router.generation import Completion, RequestError, check_prompt, generate
from router.sampling import SamplingParams
from router.scheduler import SchedulerConfig
from shards.checkpoint import parse_dtype
from shards.engine import LocalEngine
from shards.tokenizer import Tokenizer


def register(subparsers: argparse._SubParsersAction) -> None:
    gen = subparsers.add_parser("generate", help="complete prompts, in one process or through the sharded cluster")
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


def cmd_generate(args: argparse.Namespace) -> int:
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
        _generate_locally(args, params)
    return 0


def sampling_from_args(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        ignore_eos=args.ignore_eos,
    )


def resolve_checkpoint(value: str | None) -> Path:
    if value is None:
        return ensure_default_checkpoint()
    path = Path(value)
    if not path.exists():
        raise UsageError(f"--checkpoint {value!r}: no such directory")
    return path


def _generate_locally(args: argparse.Namespace, params: SamplingParams) -> None:
    engine = LocalEngine(
        resolve_checkpoint(args.checkpoint),
        dtype=parse_dtype(args.dtype),
        device=args.device,
        max_seqs=len(args.prompt),
    )
    tokenizer = Tokenizer(engine.reader.root)
    prompts = _encode_prompts(args.prompt, tokenizer, params, engine.max_seq_len, engine.config.vocab_size)
    if args.chunk_size is not None and args.chunk_size > engine.cache_capacity:
        raise UsageError(
            f"--chunk-size {args.chunk_size} is larger than the model's KV cache of {engine.cache_capacity} rows per "
            "sequence (its sliding window or context)"
        )
    scheduling = SchedulerConfig(max_seqs=len(prompts), chunk_size=args.chunk_size)
    try:
        scheduling.settled(engine.cache_capacity)
    except ValueError as e:
        raise UsageError(f"--chunk-size: {e}") from None
    _print_results(generate(engine, prompts, params, scheduling), tokenizer, args.json)


def _generate_on_cluster(args: argparse.Namespace, params: SamplingParams) -> None:
    with ShardedCluster.start(args.config, args.checkpoint, address=args.address) as cluster:
        tokenizer = Tokenizer(cluster.checkpoint_dir)
        prompts = _encode_prompts(args.prompt, tokenizer, params, cluster.config.max_seq_len, cluster.config.vocab_size)
        if len(prompts) > cluster.plan.max_seqs:
            raise UsageError(f"{len(prompts)} prompts, but the placement's max_seqs is {cluster.plan.max_seqs}")
        _print_results(cluster.generate(prompts, params), tokenizer, args.json)
        if args.profile:
            print(profile_table(cluster.take_traces(), cluster.expert_traces()), file=sys.stderr)


def _encode_prompts(
    texts: list[str], tokenizer: Tokenizer, params: SamplingParams, max_seq_len: int, vocab_size: int
) -> list[list[int]]:
    prompts = [tokenizer.encode(p) for p in texts]
    for i, ids in enumerate(prompts):
        try:
            check_prompt(ids, params, max_seq_len, vocab_size, i)
        except RequestError as e:
            raise UsageError(f"--prompt number {i + 1}: {e}") from None
    return prompts


def _print_results(results: list[Completion], tokenizer: Tokenizer, as_json: bool) -> None:
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
