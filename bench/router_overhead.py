"""How much of a decode step is the router's (planning, the step link, the logits, sampling), on the embedded
default cluster.

Starts `deploy/examples/local.yaml` (2 stages x 2 expert groups, CPU) with one micro-batch, and for batches of 1,
32 and 64 greedy sequences reports, per decode step, the router's share (`router_and_ray_ms`: the step's wall time
less the stages' span; no Ray call is left on a step's path, the key keeps its name for older runs in the file), and
the decode throughput: `traced_tokens_per_s` from the traced decode steps (`bench/ceilings.decode_rate`) and
`tokens_per_s` the wall-clock difference of an n-token and a 1-token run, as older runs have it. `--label` names the
code measured; runs append to the result file, so two versions of the code can be measured interleaved into one
file:

    PYTHONPATH=<worktree of the old commit> python bench/router_overhead.py --label before
    PYTHONPATH=. python bench/router_overhead.py --label after

`--one-stage` runs all four layers as one stage beside the two expert groups (the layout decode ahead needs), and
`--decode-ahead` turns it on there: an A/B of the router's round trip on the step's path.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
import yaml

from bench.ceilings import decode_rate
from cluster.placement_file import ensure_default_checkpoint
from cluster.profile import decode_components
from cluster.sharded import ShardedCluster
from router.sampling import SamplingParams

ROOT = Path(__file__).resolve().parent.parent


def measure(batches: list[int], new_tokens: int, one_stage: bool = False, decode_ahead: bool = False) -> dict:
    spec = yaml.safe_load((ROOT / "deploy/examples/local.yaml").read_text())
    spec["checkpoint"] = str(ensure_default_checkpoint())
    spec.update(micro_batch_size=max(batches), max_seqs=max(batches), token_budget=4096)
    if one_stage:  # the layout decode ahead runs on: one stage, its MoE layers dispatching to the two groups
        spec.update(stages=1, decode_ahead=decode_ahead)
    path = Path(tempfile.mkdtemp()) / "placement.yaml"
    path.write_text(yaml.safe_dump(spec))
    gen = torch.Generator().manual_seed(0)
    out = {}
    with ShardedCluster.start(path) as cluster:
        for b in batches:
            prompts = [[1] + torch.randint(3, 32000, (31,), generator=gen).tolist() for _ in range(b)]
            cluster.generate(prompts, SamplingParams(max_tokens=3, ignore_eos=True))  # warm-up
            cluster.take_traces()
            t = time.perf_counter()
            cluster.generate(prompts, SamplingParams(max_tokens=1, ignore_eos=True))
            t1 = time.perf_counter() - t
            cluster.take_traces()
            t = time.perf_counter()
            cluster.generate(prompts, SamplingParams(max_tokens=new_tokens + 1, ignore_eos=True))
            tn = time.perf_counter() - t
            traces = cluster.take_traces()
            parts = decode_components(traces, b)
            traced = decode_rate([traces], b, 1, 2 if decode_ahead else 1)["tokens_per_s"]
            out[str(b)] = {
                "tokens_per_s": round(b * new_tokens / (tn - t1), 1),
                "traced_tokens_per_s": round(traced, 1) if traced is not None else None,
                **{k: parts[k] for k in ("step_ms", "stages_busy_ms", "router_and_ray_ms")},
            }
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--label", required=True, help="which code this run measures (e.g. before, after)")
    parser.add_argument("--out", default="bench/results/router_overhead-cpu.json")
    parser.add_argument("--batches", nargs="*", type=int, default=[1, 32, 64])
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--one-stage", action="store_true", help="one stage (all layers) beside the expert groups")
    parser.add_argument("--decode-ahead", action="store_true", help="with --one-stage: decode_ahead: true")
    args = parser.parse_args()
    if args.decode_ahead and not args.one_stage:
        parser.error("--decode-ahead needs --one-stage (decode ahead runs on one pipeline stage)")
    row = {
        "label": args.label,
        "code": str(Path(__import__("cluster").__file__).parent.parent),
        "stages": 1 if args.one_stage else 2,
        "decode_ahead": args.decode_ahead,
        **measure(args.batches, args.new_tokens, args.one_stage, args.decode_ahead),
    }
    out = Path(args.out)
    result = (
        json.loads(out.read_text())
        if out.is_file()
        else {
            "machine": {"platform": platform.platform(), "cpus": __import__("os").cpu_count()},
            "config": "deploy/examples/local.yaml (or one stage with --one-stage), one micro-batch, 32-token "
            "prompts, greedy",
            "runs": [],
        }
    )
    result["runs"].append(row)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
