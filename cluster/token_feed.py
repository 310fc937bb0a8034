"""The token feed: every request's new tokens from the router to one ingress as one Ray item per step, not one per
token.

A Ray streaming item costs both actors a fraction of a millisecond; with one item per token the router and the
ingress passed ~1300-1800 tokens/s on the H200 host, 0.4x of what the GPUs decode at 128 streams
(bench/NOTES.md). So each ingress subscribes once to a feed on the router (`RouterActor.feed`), and submits
each request under a key of its own choosing (`RouterActor.submit`); the router forwards every request's token
events into its feed's buffer, and the feed yields the buffer as one batch (`FeedBatch`) whenever it has anything,
which under load is once per step.

Router side: `FeedHub`. Ingress side: `FeedMux`, which hands each request a `FeedStream` that iterates like Ray's
generator of a per-request streaming call (its admission first, then one awaitable per event), so the client's
logic for dead, hung and replaced routers (`cluster.router_client`) is the same either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import ray

from router.step import TokenEvent

FeedBatch = list[tuple[int, TokenEvent]]  # (the request's key, one of its events), in each request's order


# --- the router's side -------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Feed:
    buffer: FeedBatch = field(default_factory=list)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    pumps: dict[int, asyncio.Task] = field(default_factory=dict)  # key -> the task forwarding its events


class FeedHub:
    """The router's feeds, one per subscribed ingress, by the id the ingress chose."""

    def __init__(self) -> None:
        self._feeds: dict[str, _Feed] = {}

    def _feed(self, feed: str) -> _Feed:
        return self._feeds.setdefault(feed, _Feed())

    def forward(self, feed: str, key: int, events: AsyncIterator[TokenEvent]) -> None:
        """Forward a request's events into the feed until its last one (or until `cancel`)."""
        f = self._feed(feed)
        f.pumps[key] = asyncio.get_running_loop().create_task(self._pump(f, key, events))

    async def _pump(self, f: _Feed, key: int, events: AsyncIterator[TokenEvent]) -> None:
        try:
            async for event in events:
                f.buffer.append((key, event))
                f.ready.set()
        finally:  # done, or cancelled: the events' own `finally` frees the request's cache slot
            f.pumps.pop(key, None)

    def cancel(self, feed: str, key: int) -> None:
        f = self._feeds.get(feed)
        pump = f.pumps.get(key) if f is not None else None
        if pump is not None:
            pump.cancel()

    async def batches(self, feed: str) -> AsyncIterator[FeedBatch]:
        """Whatever the feed's requests produced since the last batch, as soon as there is anything. When the
        subscriber goes (its call is cancelled or closed), its requests stop."""
        f = self._feed(feed)
        try:
            while True:
                await f.ready.wait()
                f.ready.clear()
                batch, f.buffer = f.buffer, []
                if batch:
                    yield batch
        finally:
            for pump in list(f.pumps.values()):
                pump.cancel()
            self._feeds.pop(feed, None)

    def __len__(self) -> int:
        return len(self._feeds)


# --- the ingress's side ------------------------------------------------------------------------------------------


class _Ready:
    """An already-known value, awaitable as the ObjectRef of a streamed item is."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __await__(self):
        if False:  # pragma: no cover - makes this a generator, as __await__ must return an iterator
            yield
        return self.value


class FeedStream:
    """One request on a feed, as the client iterates a per-request stream: `__anext__` gives the admission's
    ObjectRef first, then one awaitable per token event; it raises RayActorError when the router died, ends when
    the feed ended without an error (a lost node), and raises TaskCancelledError once `cancel` was called."""

    def __init__(self, mux: FeedMux, key: int, admission: Any) -> None:
        self.mux, self.key = mux, key
        self._admission = admission
        self._events: asyncio.Queue = asyncio.Queue()
        self.cancelled = False

    def put(self, event: TokenEvent) -> None:
        self._events.put_nowait(event)

    def end(self, why: BaseException) -> None:
        self._events.put_nowait(why)

    def cancel(self) -> None:
        """Stop the request on the router (which frees its cache slot); a no-op once it has ended."""
        if self.cancelled:
            return
        self.cancelled = True
        if self.mux.forget(self.key):
            with contextlib.suppress(Exception):  # the router is gone: nothing runs there any more
                self.mux.router.cancel.remote(self.mux.id, self.key)
        self.end(ray.exceptions.TaskCancelledError())

    def __aiter__(self) -> FeedStream:
        return self

    async def __anext__(self) -> Any:
        if self._admission is not None:
            admission, self._admission = self._admission, None
            return admission
        item = await self._events.get()
        if isinstance(item, BaseException):
            self._events.put_nowait(item)  # every later call ends the same way
            raise item
        if item.last:
            self.mux.forget(self.key)
        return _Ready(item)


class FeedMux:
    """The ingress's subscription to one router's feed: submits requests under keys it chooses, and hands each
    event of a batch to its request's `FeedStream`."""

    def __init__(self, router: Any) -> None:
        self.router = router
        self.id = uuid.uuid4().hex
        self._keys = itertools.count()
        self._streams: dict[int, FeedStream] = {}
        self._ended: BaseException | None = None
        self._reader: asyncio.Task | None = None

    @property
    def ended(self) -> bool:
        return self._ended is not None

    def open(self, prompt_ids: list[int], params: Any, resume_ids: list[int] | None = None) -> FeedStream:
        key = next(self._keys)
        admission = self.router.submit.remote(self.id, key, prompt_ids, params, resume_ids)
        stream = self._streams[key] = FeedStream(self, key, admission)
        if self._ended is not None:
            stream.end(self._ended)
        elif self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read())
        return stream

    def forget(self, key: int) -> bool:
        """Stop routing events to `key`; whether it was still routed."""
        return self._streams.pop(key, None) is not None

    async def _read(self) -> None:
        end: BaseException = StopAsyncIteration()
        try:
            async for ref in self.router.feed.options(num_returns="streaming").remote(self.id):
                for key, event in await ref:
                    stream = self._streams.get(key)
                    if stream is not None:
                        stream.put(event)
        except asyncio.CancelledError:
            end = ray.exceptions.RayActorError()
            raise
        except Exception:  # noqa: BLE001 - the router died, or its node went: every open request resumes elsewhere
            end = ray.exceptions.RayActorError()
        finally:
            self._ended = end
            for stream in list(self._streams.values()):
                stream.end(end)
            self._streams.clear()
