"""Soak: many streaming clients for a minute or more against one server whose queue limit is low enough to say 429.

Each client loops: a random prompt and `max_tokens`, stream to `data: [DONE]` under a per-request deadline, and on
429 sleep for `Retry-After` and send the same request again. Passes when every status is 200 or 429, every 429
carries Retry-After, no request is lost (a 200 without [DONE] and a finish_reason) or hung (past its deadline),
and the cache slots are all free at the end. Also records tokens/s, latency and TTFT percentiles, and the resident
memory of the cluster's Ray workers before and after. Prints a table; writes JSON.

    python bench/soak.py [--config deploy/examples/local.yaml] [--clients 64] [--seconds 60] [--max-queued 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import ray
import torch
from ray import serve

from cluster.cli.serve import start_serve, wait_until_healthy
from cluster.placement_file import settle_placement
from cluster.reservation import ray_session
from cluster.transport import free_port

# Ray's process titles: `ray::ShardWorker` is one process per device holding its stages and expert groups
WORKER_ROLES = ("ShardWorker", "RouterActor", "ServeReplica")
WORDS = (
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "wizards",
    "quietly",
    "judge",
    "boxing",
    "matches",
)


@dataclass
class Record:
    """What the clients saw, summed over all of them."""

    statuses: Counter = field(default_factory=Counter)
    rejected_without_retry_after: int = 0
    finished: int = 0  # 200 streams that ended with [DONE] and a finish_reason
    lost: list[str] = field(default_factory=list)  # 200s that did not, transport errors, other statuses
    hung: int = 0  # past the per-request deadline
    tokens: int = 0
    finish_reasons: Counter = field(default_factory=Counter)
    latency: list[float] = field(default_factory=list)  # admitted attempt: send to [DONE]
    ttft: list[float] = field(default_factory=list)
    latency_with_retries: list[float] = field(default_factory=list)  # first attempt to [DONE], 429 waits included
    retries: int = 0


async def attempt(client: httpx.AsyncClient, url: str, body: dict, rec: Record) -> float | None:
    """One try of one request: None when admitted and done (recorded), else the seconds to wait before retrying."""
    t0 = time.perf_counter()
    async with client.stream("POST", url, json=body) as r:
        rec.statuses[r.status_code] += 1
        if r.status_code == 429:
            await r.aread()
            retry_after = r.headers.get("retry-after")
            if retry_after is None:
                rec.rejected_without_retry_after += 1
                return 1.0
            return float(retry_after)
        if r.status_code != 200:
            rec.lost.append(f"status {r.status_code}: {(await r.aread())[:200]!r}")
            return None
        first, tokens, finish, done = None, 0, None, False
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                chunk = json.loads(line[len("data: ") :])
                if "error" in chunk:
                    rec.lost.append(f"error event: {chunk['error']}")
                    continue
                first = first if first is not None else time.perf_counter() - t0
                for choice in chunk["choices"]:
                    tokens += len(choice.get("token_ids", []))
                    finish = choice["finish_reason"] or finish
        if not (done and finish):
            rec.lost.append(f"stream ended without [DONE] and a finish_reason (done={done}, finish={finish})")
            return None
        rec.finished += 1
        rec.tokens += tokens
        rec.finish_reasons[finish] += 1
        rec.latency.append(time.perf_counter() - t0)
        rec.ttft.append(first)
    return None


async def soak_client(
    client: httpx.AsyncClient, base: str, until: float, rng: random.Random, deadline_s: float, rec: Record
) -> None:
    url = base + "/v1/completions"
    while time.monotonic() < until:
        words = rng.randint(1, 96)
        body = {
            "prompt": " ".join(rng.choice(WORDS) for _ in range(words)),
            "max_tokens": rng.randint(4, 32),
            "temperature": rng.choice([0.0, 0.8]),
            "stream": True,
            "return_token_ids": True,
        }
        started = time.perf_counter()
        while True:  # the same request until it is admitted (429s wait for Retry-After)
            try:
                wait = await asyncio.wait_for(attempt(client, url, body, rec), timeout=deadline_s)
            except TimeoutError:
                rec.hung += 1
                break
            except httpx.HTTPError as e:
                rec.lost.append(f"{type(e).__name__}: {e}")
                break
            if wait is None:
                rec.latency_with_retries.append(time.perf_counter() - started)
                break
            rec.retries += 1
            await asyncio.sleep(wait)


def cluster_rss() -> dict[str, int]:
    """Resident bytes of this process's Ray workers, summed per role (ShardWorker, RouterActor, ...)."""
    import psutil  # Ray's own copy (ray/thirdparty_files, on sys.path once ray is imported): not a project dependency

    rss: dict[str, int] = dict.fromkeys(WORKER_ROLES, 0)
    for proc in psutil.Process().children(recursive=True):  # the local Ray's raylet, and its workers, are ours
        try:
            cmd = " ".join(proc.cmdline())
            role = next((r for r in WORKER_ROLES if f"ray::{r}" in cmd), None)
            if role:
                rss[role] += proc.memory_info().rss
        except psutil.Error:
            continue
    return rss


def metric(base: str, name: str) -> float | None:
    for line in httpx.get(base + "/metrics", timeout=30).text.splitlines():
        if line.startswith((name + " ", name + "{")):
            return float(line.rsplit(" ", 1)[1])
    return None


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


async def rss_samples(every_s: float, out: list[tuple[float, int]]) -> None:
    """Total worker RSS every `every_s` while the soak runs: a trend, where before/after alone hides warm-up."""
    t0 = time.monotonic()
    while True:
        rss = await asyncio.to_thread(cluster_rss)
        out.append((round(time.monotonic() - t0, 1), sum(rss.values())))
        await asyncio.sleep(every_s)


async def soak(
    base: str, clients: int, seconds: float, deadline_s: float, seed: int, rss_trend: list[tuple[float, int]]
) -> tuple[Record, float]:
    rec = Record()
    limits = httpx.Limits(max_connections=clients * 2, max_keepalive_connections=clients * 2)
    sampler = asyncio.create_task(rss_samples(10.0, rss_trend))
    async with httpx.AsyncClient(timeout=deadline_s, limits=limits) as client:
        t0 = time.monotonic()
        until = t0 + seconds
        await asyncio.gather(
            *(soak_client(client, base, until, random.Random(seed + i), deadline_s, rec) for i in range(clients))
        )
        sampler.cancel()
        return rec, time.monotonic() - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="deploy/examples/local.yaml")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=60.0, help="clients start new requests until then")
    parser.add_argument("--max-queued", type=int, default=16, help="the server's max_queued_requests")
    parser.add_argument("--deadline", type=float, default=60.0, help="seconds one request may take")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    plan, _ = settle_placement(args.config)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with ray_session(plan):
        start_serve(
            {"placement": str(Path(args.config).resolve()), "max_queued_requests": args.max_queued},
            "127.0.0.1",
            port,
            0,
            blocking=False,
        )
        try:
            if not wait_until_healthy(base, 300):
                raise SystemExit("the server did not become healthy in 300 s")
            httpx.post(base + "/v1/completions", json={"prompt": "warm up", "max_tokens": 4}, timeout=120)
            rss_before, load_before = cluster_rss(), os.getloadavg()
            rss_trend: list[tuple[float, int]] = []
            rec, wall = asyncio.run(soak(base, args.clients, args.seconds, args.deadline, args.seed, rss_trend))
            settle_t0 = time.monotonic()
            while (
                slots := metric(base, "mistral_cluster_kv_cache_slots_in_use")
            ) and time.monotonic() - settle_t0 < 10:
                time.sleep(0.5)
            rss_after, load_after = cluster_rss(), os.getloadavg()
            server = {
                "kv_cache_slots_in_use": slots,
                "kv_cache_slots_total": metric(base, "mistral_cluster_kv_cache_slots_total"),
                "rejected_429": metric(base, 'mistral_cluster_rejected_requests_total{status="429"}'),
                "aborted_requests": metric(base, "mistral_cluster_aborted_requests_total"),
                "failed_steps": metric(base, "mistral_cluster_failed_steps_total"),
            }
        finally:
            serve.shutdown()

    statuses = {str(k): v for k, v in sorted(rec.statuses.items())}
    checks = {
        "only_200_and_429": set(rec.statuses) <= {200, 429},
        "every_429_has_retry_after": rec.rejected_without_retry_after == 0,
        "none_lost": not rec.lost,
        "none_hung": rec.hung == 0,
        "slots_free_at_end": slots == 0,
    }
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    result = {
        "clients": args.clients,
        "seconds": wall,
        "max_queued_requests": args.max_queued,
        "request_deadline_s": args.deadline,
        "config": args.config,
        "requests_finished": rec.finished,
        "statuses": statuses,
        "retries_after_429": rec.retries,
        "lost": len(rec.lost),
        "lost_examples": rec.lost[:5],
        "hung": rec.hung,
        "finish_reasons": dict(rec.finish_reasons),
        "output_tokens": rec.tokens,
        "tokens_per_s": rec.tokens / wall,
        "latency_s": {"p50": percentile(rec.latency, 0.5), "p99": percentile(rec.latency, 0.99)},
        "ttft_s": {"p50": percentile(rec.ttft, 0.5), "p99": percentile(rec.ttft, 0.99)},
        "latency_with_retries_s": {
            "p50": percentile(rec.latency_with_retries, 0.5),
            "p99": percentile(rec.latency_with_retries, 0.99),
        },
        "worker_rss_bytes": {
            "before": rss_before,
            "after": rss_after,
            "total_before": sum(rss_before.values()),
            "total_after": sum(rss_after.values()),
            "total_during": rss_trend,
        },
        "server": server,
        "checks": checks,
        "passed": all(checks.values()),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "gpu": gpu,
            "torch": torch.__version__,
            "ray": ray.__version__,
            "load_avg_1_5_15min": {"before": load_before, "after": load_after},
        },
    }
    slug = "cpu" if gpu is None else gpu.lower().replace(" ", "-")
    out = Path(args.out or f"bench/results/soak-{slug}.json")
    out.write_text(json.dumps(result, indent=2) + "\n")

    mib = 1 << 20
    rows = [
        ("clients x seconds", f"{args.clients} x {wall:.0f}"),
        ("requests finished", f"{rec.finished}"),
        ("statuses", ", ".join(f"{k}: {v}" for k, v in statuses.items())),
        ("429 without Retry-After", f"{rec.rejected_without_retry_after}"),
        ("lost / hung", f"{len(rec.lost)} / {rec.hung}"),
        ("output tokens/s", f"{result['tokens_per_s']:.1f}"),
        ("latency p50 / p99", f"{result['latency_s']['p50']:.2f} / {result['latency_s']['p99']:.2f} s"),
        ("TTFT p50 / p99", f"{result['ttft_s']['p50']:.2f} / {result['ttft_s']['p99']:.2f} s"),
        (
            "worker RSS before -> after",
            f"{sum(rss_before.values()) / mib:.0f} -> {sum(rss_after.values()) / mib:.0f} MiB",
        ),
        ("worker RSS every 10 s", " ".join(f"{b / mib:.0f}" for _, b in rss_trend) + " MiB"),
        ("KV slots in use at end", f"{slots:g}" if slots is not None else "?"),
        ("passed", f"{result['passed']}"),
    ]
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
