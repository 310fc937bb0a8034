"""Ray streaming-generator items/s from one async actor to another over N concurrent streams: the shape of the
router -> ingress path, where every token of every request is one item (issue 20's risk at 128 streams).

    PYTHONPATH=. python bench/ray_stream_rate.py
"""

from __future__ import annotations

import asyncio
import time

import ray


@ray.remote
class Router:
    async def stream(self, n):
        for i in range(n):
            yield i
            await asyncio.sleep(0)


@ray.remote
class Ingress:
    def __init__(self, router):
        self.router = router

    async def consume(self, streams, n):
        async def one():
            c = 0
            async for ref in self.router.stream.options(num_returns="streaming").remote(n):
                await ref
                c += 1
            return c

        t = time.perf_counter()
        counts = await asyncio.gather(*(one() for _ in range(streams)))
        return sum(counts) / (time.perf_counter() - t)


def main() -> None:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    router = Router.remote()
    ingress = Ingress.remote(router)
    for streams in (1, 8, 32, 128):
        per_stream = 500 if streams <= 8 else 2000 // (streams // 8)
        rate = ray.get(ingress.consume.remote(streams, per_stream))
        print(f"{streams:4d} streams: {rate:7.0f} items/s", flush=True)


if __name__ == "__main__":
    main()
