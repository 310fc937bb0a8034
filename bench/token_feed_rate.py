"""Tokens/s the router -> ingress path can carry, side by side in one run: one Ray streaming item per token (the
per-request streams the ingress used until this commit) against the token feed (`cluster.token_feed`: one item
per step for all of an ingress's requests).

Two async actors, as in the server: a router whose fake engine gives every open request one token per step as
fast as it can (no model: the path's own ceiling), and an ingress that opens N requests and reads them to the end.
On the H200 host the served Mixtral reached 1336 tok/s at 128 streams where the GPUs decode ~3300
(bench/NOTES.md): this measures whether the path alone explains it.

    PYTHONPATH=. python bench/token_feed_rate.py [--out bench/results/token_feed_rate-cpu.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import ray

from cluster.token_feed import FeedHub, FeedMux
from router.step import Admission, TokenEvent


@ray.remote(num_cpus=0)
class FakeRouter:
    """Every open request gets one token a step; a step ends with the loop yielding, as the engine loop's does."""

    def __init__(self) -> None:
        self.hub = FeedHub()
        self.open: dict[tuple[str, int], tuple[asyncio.Queue, int]] = {}
        self._engine: asyncio.Task | None = None
        self._wake = asyncio.Event()

    def _add(self, name: tuple[str, int], tokens: int) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue()
        self.open[name] = (queue, tokens)
        self._wake.set()
        if self._engine is None:
            self._engine = asyncio.get_running_loop().create_task(self._run())
        return queue

    async def _run(self) -> None:
        while True:
            if not self.open:
                self._wake.clear()
                await self._wake.wait()
            if self.open:
                for name, (queue, left) in list(self.open.items()):
                    queue.put_nowait(TokenEvent(7, -0.5, None, "length" if left == 1 else None))
                    if left == 1:
                        del self.open[name]
                    else:
                        self.open[name] = (queue, left - 1)
            await asyncio.sleep(0)

    @staticmethod
    async def _follow(queue: asyncio.Queue):
        while True:
            event = await queue.get()
            yield event
            if event.last:
                return

    async def stream(self, key: int, tokens: int):
        """The per-request design: the admission, then one item per token."""
        queue = self._add(("stream", key), tokens)
        yield Admission.accept()
        async for event in self._follow(queue):
            yield event

    async def submit(self, feed: str, key: int, prompt_ids, tokens: int, resume_ids) -> Admission:
        self.hub.forward(feed, key, self._follow(self._add((feed, key), tokens)))
        return Admission.accept()

    async def cancel(self, feed: str, key: int) -> None:
        self.hub.cancel(feed, key)

    async def feed(self, feed: str):
        async for batch in self.hub.batches(feed):
            yield batch


@ray.remote(num_cpus=0)
class Ingress:
    def __init__(self, router) -> None:
        self.router = router

    async def run(self, mode: str, streams: int, tokens: int) -> float:
        """Open `streams` requests of `tokens` tokens at once and read them all; tokens/s."""

        async def per_request(key: int) -> int:
            gen = self.router.stream.options(num_returns="streaming").remote(key, tokens)
            count = -1  # the admission
            async for ref in gen:
                await ref
                count += 1
            return count

        async def on_feed(stream) -> int:
            await (await stream.__anext__())
            count = 0
            while True:
                event = await (await stream.__anext__())
                count += 1
                if event.last:
                    return count

        t0 = time.perf_counter()
        if mode == "per_token":
            counts = await asyncio.gather(*(per_request(k) for k in range(streams)))
        else:
            mux = FeedMux(self.router)
            counts = await asyncio.gather(*(on_feed(mux.open([1], tokens)) for _ in range(streams)))
        seconds = time.perf_counter() - t0
        assert sum(counts) == streams * tokens, (sum(counts), streams * tokens)
        return sum(counts) / seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--tokens", type=int, default=200, help="per request")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    router = FakeRouter.remote()
    ingress = Ingress.remote(router)
    ray.get(ingress.run.remote("feed", 2, 5))  # warm both paths up
    ray.get(ingress.run.remote("per_token", 2, 5))
    rows = []
    print(f"{'streams':>7} {'per token tok/s':>16} {'feed tok/s':>11} {'feed/per token':>15}")
    for n in args.streams:
        rates: dict[str, list[float]] = {"per_token": [], "feed": []}
        for _ in range(args.repeats):
            for mode in ("per_token", "feed"):
                rates[mode].append(ray.get(ingress.run.remote(mode, n, args.tokens)))
        best = {m: max(r) for m, r in rates.items()}
        rows.append({"streams": n, "tokens_per_s": rates, "best": best})
        print(
            f"{n:7d} {best['per_token']:16.0f} {best['feed']:11.0f} {best['feed'] / best['per_token']:15.2f}",
            flush=True,
        )
    ray.shutdown()
    if args.out:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        result = {
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "ray": ray.__version__},
            "commit": commit,
            "tokens_per_request": args.tokens,
            "rows": rows,
            "note": "a fake engine giving every open request one token per step, as fast as the actors allow",
        }
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
