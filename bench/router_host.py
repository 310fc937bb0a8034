"""The router's host work per decode step (schedule, process, token events), with an executor that costs nothing.

On a GPU the router's work between two steps of one GPU is dead time for the GPU; at batch 128 the traced steps
(43 ms) and the cadence (52 ms) of the 2026-11-30 run differed by ~8 ms a step. This isolates the part that is the
scheduler and the engine loop, on this machine's CPU:

    PYTHONPATH=. python bench/router_host.py            # writes bench/results/router_host-<host>.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from router.engine_loop import EngineLoop
from router.sampling import SamplingParams
from router.scheduler import Scheduler, SchedulerConfig
from router.step import StepOutput

PROMPT = list(range(3, 515))  # 512 tokens, as gpu_scale's prompts


async def per_step_ms(batch: int, tokens: int, groups: int) -> float:
    """Median host time from one step's execute call to the next's, all greedy rows picked "on the stage"."""
    scheduler = Scheduler(
        SchedulerConfig(max_seqs=batch, token_budget=batch * 600, chunk_size=512).settled(4096), 100_000, 2
    )
    calls: list[float] = []

    async def execute(plan):
        calls.append(time.perf_counter())
        k = sum(plan.wants())
        await asyncio.sleep(0)
        return StepOutput(torch.empty(0, 32000), (True,) * k, (5,) * k, (0.0,) * k)

    loop = EngineLoop(execute, scheduler, 32000, 4096, steps_in_flight=groups)
    await loop.complete([PROMPT] * batch, [SamplingParams(max_tokens=tokens, ignore_eos=True)] * batch)
    # after the prefill steps; with groups in flight a cycle holds `groups` calls
    cycles = [b - a for a, b in zip(calls[2 * groups :: groups], calls[3 * groups :: groups], strict=False)]
    return 1000 * statistics.median(cycles)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / f"router_host-{platform.node()}.json"
    )
    args = p.parse_args()
    rows = []
    for batch, groups in ((1, 1), (32, 1), (128, 1), (128, 2), (256, 2)):
        ms = asyncio.run(per_step_ms(batch, args.tokens, groups))
        rows.append({"batch": batch, "steps_in_flight": groups, "host_ms_per_cycle": round(ms, 3)})
        print(f"batch {batch:4d}, {groups} in flight: {ms:.2f} ms of router host work per cycle", flush=True)
    args.out.write_text(json.dumps({"machine": platform.node(), "cpus": os.cpu_count(), "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
