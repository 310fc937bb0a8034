"""Soak: many streaming clients for a minute or more against one server whose queue limit is low enough to say 429.

Each client loops: a random prompt and `max_tokens`, stream to `data: [DONE]` under a per-request deadline, and on
429 sleep for `Retry-After` and send the same request again. Passes when every status is 200 or 429, every 429
carries Retry-After, no request is lost (a 200 without [DONE] and a finish_reason) or hung (past its deadline),
and the cache slots are all free at the end. Mixed in: clients that go away after a few tokens (`--cancel`), and
bad requests that must get a 400 (`--bad`). Also records tokens/s, latency and TTFT percentiles, and the resident
memory of every Ray worker process of the cluster each `--sample-s`: after the first third of the run, each
process's least-squares slope must stay under `--max-slope-mib` per minute (a leak grows; warm-up levels off).
Prints a table; writes JSON and a plot of every process's memory.

    python bench/soak.py [--config deploy/examples/local.yaml] [--clients 64] [--seconds 60] [--max-queued 16]
    python bench/soak.py --seconds 1800 --sample-s 60 --out bench/results/soak-30min-cpu.json   # the long soak
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
    cancelled: int = 0  # streams the client left after a few tokens, on purpose
    bad_rejected: int = 0  # bad requests answered 400, as they must be


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


async def bad_request(client: httpx.AsyncClient, url: str, body: dict, rng: random.Random, rec: Record) -> None:
    """A request the server must refuse with a 400 naming the field, losing nothing else."""
    bad = dict(body, **rng.choice([{"max_tokens": 0}, {"temperature": 7}, {"prompt": ""}, {"top_p": -1}]))
    r = await client.post(url, json=bad)
    rec.statuses[r.status_code] += 1
    if r.status_code == 400 and "error" in r.json():
        rec.bad_rejected += 1
    else:
        rec.lost.append(f"bad request answered {r.status_code}: {r.text[:200]}")


async def cancelled_request(client: httpx.AsyncClient, url: str, body: dict, rec: Record) -> None:
    """A client that reads two chunks and goes away: its slot must come back (checked at the end)."""
    async with client.stream("POST", url, json=body) as r:
        rec.statuses[r.status_code] += 1
        if r.status_code != 200:
            await r.aread()
            return
        seen = 0
        async for line in r.aiter_lines():
            seen += line.startswith("data: ")
            if seen >= 2:
                break
    rec.cancelled += 1


async def soak_client(
    client: httpx.AsyncClient,
    base: str,
    until: float,
    rng: random.Random,
    deadline_s: float,
    rec: Record,
    cancel_share: float = 0.0,
    bad_share: float = 0.0,
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
        if rng.random() < bad_share:
            await bad_request(client, url, body, rng, rec)
            continue
        if rng.random() < cancel_share:
            await cancelled_request(client, url, body, rec)
            continue
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


def process_rss() -> dict[str, int]:
    """Resident bytes of each of this process's Ray workers, keyed `role pid`."""
    import psutil  # Ray's own copy, as in cluster_rss

    out = {}
    for proc in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(proc.cmdline())
            role = next((r for r in WORKER_ROLES if f"ray::{r}" in cmd), None)
            if role:
                out[f"{role} {proc.pid}"] = proc.memory_info().rss
        except psutil.Error:
            continue
    return out


async def rss_samples(every_s: float, out: list[tuple[float, dict[str, int]]]) -> None:
    """Every worker process's RSS every `every_s` while the soak runs: a trend per process, where before/after
    alone hides warm-up."""
    t0 = time.monotonic()
    while True:
        rss = await asyncio.to_thread(process_rss)
        out.append((round(time.monotonic() - t0, 1), rss))
        await asyncio.sleep(every_s)


def slopes_mib_per_minute(trend: list[tuple[float, dict[str, int]]], skip_share: float = 1 / 3) -> dict[str, float]:
    """Each process's least-squares RSS slope after the first `skip_share` of the run (warm-up), MiB per minute."""
    if not trend:
        return {}
    start = trend[-1][0] * skip_share
    out = {}
    for name in trend[-1][1]:
        points = [(t, rss[name]) for t, rss in trend if t >= start and name in rss]
        if len(points) < 3:
            continue
        mean_t = sum(t for t, _ in points) / len(points)
        mean_m = sum(m for _, m in points) / len(points)
        var = sum((t - mean_t) ** 2 for t, _ in points)
        cov = sum((t - mean_t) * (m - mean_m) for t, m in points)
        out[name] = round(cov / var * 60 / (1 << 20), 3) if var else 0.0
    return out


def plot_rss(trend: list[tuple[float, dict[str, int]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    for name in sorted({n for _, rss in trend for n in rss}):
        points = [(t / 60, rss[name] / (1 << 20)) for t, rss in trend if name in rss]
        ax.plot([p[0] for p in points], [p[1] for p in points], label=name)
    ax.set_xlabel("minutes")
    ax.set_ylabel("resident MiB")
    ax.set_title("soak: resident memory of every Ray worker process")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


async def soak(base: str, args, rss_trend: list[tuple[float, dict[str, int]]]) -> tuple[Record, float]:
    rec = Record()
    clients = args.clients
    limits = httpx.Limits(max_connections=clients * 2, max_keepalive_connections=clients * 2)
    sampler = asyncio.create_task(rss_samples(args.sample_s, rss_trend))
    async with httpx.AsyncClient(timeout=args.deadline, limits=limits) as client:
        t0 = time.monotonic()
        until = t0 + args.seconds
        await asyncio.gather(
            *(
                soak_client(
                    client, base, until, random.Random(args.seed + i), args.deadline, rec, args.cancel, args.bad
                )
                for i in range(clients)
            )
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
    parser.add_argument("--cancel", type=float, default=0.1, help="share of requests whose client leaves early")
    parser.add_argument("--bad", type=float, default=0.05, help="share of requests that must get a 400")
    parser.add_argument("--sample-s", type=float, default=10.0, help="seconds between memory samples")
    parser.add_argument("--max-slope-mib", type=float, default=1.0, help="MiB per minute a process may grow")
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
        )
        try:
            if not wait_until_healthy(base, 300):
                raise SystemExit("the server did not become healthy in 300 s")
            httpx.post(base + "/v1/completions", json={"prompt": "warm up", "max_tokens": 4}, timeout=120)
            rss_before, load_before = cluster_rss(), os.getloadavg()
            rss_trend: list[tuple[float, dict[str, int]]] = []
            rec, wall = asyncio.run(soak(base, args, rss_trend))
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
    slopes = slopes_mib_per_minute(rss_trend)
    checks = {
        "only_200_429_and_400_for_bad_requests": set(rec.statuses) <= {200, 429, 400},
        "memory_flat": all(v < args.max_slope_mib for v in slopes.values()),
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
            "per_process_during": rss_trend,
            "slope_mib_per_minute_after_warm_up": slopes,
            "max_slope_allowed_mib_per_minute": args.max_slope_mib,
        },
        "cancelled_by_client": rec.cancelled,
        "bad_requests_rejected_400": rec.bad_rejected,
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
    plot_rss(rss_trend, out.with_suffix(".png"))

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
        ("cancelled / bad (400)", f"{rec.cancelled} / {rec.bad_rejected}"),
        ("largest RSS slope after warm-up", f"{max(slopes.values(), default=0.0):.3f} MiB/min"),
        ("KV slots in use at end", f"{slots:g}" if slots is not None else "?"),
        ("passed", f"{result['passed']}"),
    ]
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
