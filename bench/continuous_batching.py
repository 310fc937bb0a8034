"""Continuous batching, measured: the same 32 streaming requests of mixed lengths sent one at a time, then all at
once, against one running server. Prints aggregate output tokens/s of each and their ratio; writes JSON.

    python bench/continuous_batching.py [--config deploy/examples/local.yaml] [--requests 32]
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

import httpx
import ray
import torch
from ray import serve

from cluster.cli.serve import start_serve, wait_until_healthy
from cluster.placement_file import settle_placement
from cluster.reservation import ray_session
from cluster.transport import free_port


async def one(client: httpx.AsyncClient, base: str, prompt: str, max_tokens: int) -> tuple[int, float, float]:
    """(tokens, seconds to first token, seconds total) of one streaming request."""
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
        "return_token_ids": True,
    }
    t0 = time.perf_counter()
    first, tokens = None, 0
    async with client.stream("POST", base + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                for c in chunk["choices"]:
                    tokens += len(c.get("token_ids", []))
                if first is None:
                    first = time.perf_counter() - t0
    return tokens, first or 0.0, time.perf_counter() - t0


async def run(base: str, prompts: list[str], max_tokens: list[int]) -> dict:
    async with httpx.AsyncClient(timeout=600) as client:
        await one(client, base, "warm up", 4)
        t0 = time.perf_counter()
        sequential = [await one(client, base, p, n) for p, n in zip(prompts, max_tokens, strict=True)]
        seq_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        concurrent = await asyncio.gather(*(one(client, base, p, n) for p, n in zip(prompts, max_tokens, strict=True)))
        conc_seconds = time.perf_counter() - t0
    seq_tokens = sum(r[0] for r in sequential)
    conc_tokens = sum(r[0] for r in concurrent)
    assert seq_tokens == conc_tokens == sum(max_tokens), (seq_tokens, conc_tokens, sum(max_tokens))
    return {
        "requests": len(prompts),
        "output_tokens": conc_tokens,
        "one_at_a_time": {
            "seconds": seq_seconds,
            "tokens_per_s": seq_tokens / seq_seconds,
            "median_ttft_s": statistics.median_high([r[1] for r in sequential]),
        },
        "concurrent": {
            "seconds": conc_seconds,
            "tokens_per_s": conc_tokens / conc_seconds,
            "median_ttft_s": statistics.median_high([r[1] for r in concurrent]),
        },
        "throughput_ratio": (conc_tokens / conc_seconds) / (seq_tokens / seq_seconds),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="deploy/examples/local.yaml")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    plan, _ = settle_placement(args.config)
    prompts = [f"Request {i}: " + "the quick brown fox " * (1 + i % 12) for i in range(args.requests)]
    max_tokens = [8 + (i % 4) * 8 for i in range(args.requests)]
    port = free_port()
    with ray_session(plan):
        start_serve(
            {"placement": str(Path(args.config).resolve()), "max_queued_requests": 1024},
            "127.0.0.1",
            port,
            0,
        )
        base = f"http://127.0.0.1:{port}"
        if not wait_until_healthy(base, 300):
            raise SystemExit("the server did not become healthy in 300 s")
        result = asyncio.run(run(base, prompts, max_tokens))
        serve.shutdown()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    result["machine"] = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "gpu": gpu,
        "torch": torch.__version__,
        "ray": ray.__version__,
    }
    result["config"] = args.config
    slug = "cpu" if gpu is None else gpu.lower().replace(" ", "-")
    out = Path(args.out or f"bench/results/continuous_batching-{slug}.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'mode':<14} {'seconds':>8} {'tokens/s':>9} {'median TTFT':>12}")
    for mode in ("one_at_a_time", "concurrent"):
        r = result[mode]
        print(f"{mode:<14} {r['seconds']:>8.2f} {r['tokens_per_s']:>9.1f} {r['median_ttft_s']:>11.3f}s")
    print(f"throughput ratio (concurrent / one at a time): {result['throughput_ratio']:.2f}x  -> {out}")


if __name__ == "__main__":
    main()
