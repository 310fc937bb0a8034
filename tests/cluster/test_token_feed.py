"""The token feed on its own: a router-side `FeedHub` behind a fake actor handle, read by the ingress-side `FeedMux`
as Ray would deliver it (ObjectRef-like awaitables, a streaming generator). Every request gets its events in order,
a step's events for all requests arrive as one item, a cancel stops the request on the router, and a router that
dies or vanishes ends every open request the way the client's resume logic expects. No Ray cluster."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
import ray

from cluster.token_feed import FeedHub, FeedMux
from router.step import Admission, TokenEvent


def event(token: int, last: bool = False) -> TokenEvent:
    return TokenEvent(token, -0.1, None, "length" if last else None)


class Method:
    def __init__(self, call) -> None:
        self.call = call

    def options(self, **options) -> Method:
        assert options == {"num_returns": "streaming"}
        return self

    def remote(self, *args):
        return self.call(*args)


class FakeRouter:
    """A router actor's handle around a real FeedHub. Each submitted request gets its own queue of events, which the
    test fills step by step (`step`), as the engine loop does; `die()` makes the feed call fail as Ray's does."""

    def __init__(self) -> None:
        self.hub = FeedHub()
        self.requests: dict[int, asyncio.Queue] = {}
        self.aborted: list[int] = []
        self.items = 0  # Ray items the feed yielded
        self.error: BaseException | None = None
        self._dead = asyncio.Event()
        self.submit, self.cancel, self.feed = Method(self._submit), Method(self._cancel), Method(self._feed)

    def _submit(self, feed: str, key: int, prompt_ids, params, resume_ids):
        queue = self.requests[key] = asyncio.Queue()

        async def follow():
            try:
                while True:
                    e = await queue.get()
                    yield e
                    if e.last:
                        return
            finally:
                self.aborted.append(key)  # the engine loop's abort: a no-op for a finished request

        self.hub.forward(feed, key, follow())
        return asyncio.ensure_future(asyncio.sleep(0, Admission.accept()))

    def _cancel(self, feed: str, key: int):
        self.hub.cancel(feed, key)

    def _feed(self, feed: str):
        router = self

        class Generator:
            def __init__(self) -> None:
                self.batches = router.hub.batches(feed)

            def __aiter__(self):
                return self

            async def __anext__(self):
                nxt = asyncio.ensure_future(self.batches.__anext__())
                dead = asyncio.ensure_future(router._dead.wait())
                done, _ = await asyncio.wait({nxt, dead}, return_when=asyncio.FIRST_COMPLETED)
                if nxt not in done:
                    nxt.cancel()  # the router's side of the call is gone, and its feed with it
                    with contextlib.suppress(asyncio.CancelledError):
                        await nxt
                    if router.error is None:
                        raise StopAsyncIteration
                    raise router.error
                dead.cancel()
                router.items += 1
                return asyncio.ensure_future(asyncio.sleep(0, nxt.result()))

        return Generator()

    async def step(self, tokens: dict[int, TokenEvent]) -> None:
        """One engine step: each request's new event, then the loop yields (as the actor's does between steps)."""
        for key, e in tokens.items():
            self.requests[key].put_nowait(e)
        for _ in range(5):
            await asyncio.sleep(0)

    def die(self, error: BaseException | None = None) -> None:
        self.error = error
        self._dead.set()


async def drain(stream) -> list:
    """The stream as the client reads it: the admission, then events, until the last (or an exception)."""
    admission = await (await stream.__anext__())
    out = [admission]
    while True:
        e = await (await stream.__anext__())
        out.append(e.token_id)
        if e.last:
            return out


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=10))


def test_each_request_gets_its_events_in_order_and_a_step_is_one_item_for_all_requests():
    async def scenario():
        router = FakeRouter()
        mux = FeedMux(router)
        streams = [mux.open([1], None) for _ in range(3)]
        readers = [asyncio.ensure_future(drain(s)) for s in streams]
        await asyncio.sleep(0)
        for step in range(4):
            await router.step({k: event(100 * k + step, last=step == 3) for k in range(3)})
        results = await asyncio.gather(*readers)
        return router, results

    router, results = run(scenario())
    assert results == [[Admission.accept(), *(100 * k + s for s in range(4))] for k in range(3)]
    assert router.items == 4  # 12 token events in 4 steps: 4 Ray items, not 12
    assert sorted(router.aborted) == [0, 1, 2]  # each ended; its slot freed


def test_a_cancelled_request_stops_on_the_router_and_its_reader_hears_task_cancelled():
    async def scenario():
        router = FakeRouter()
        mux = FeedMux(router)
        kept, cut = mux.open([1], None), mux.open([2], None)
        await (await kept.__anext__())
        await (await cut.__anext__())
        await router.step({0: event(10), 1: event(20)})
        assert (await (await cut.__anext__())).token_id == 20
        cut.cancel()
        await router.step({0: event(11, last=True)})
        with pytest.raises(ray.exceptions.TaskCancelledError):
            await cut.__anext__()
        tokens = [(await (await kept.__anext__())).token_id for _ in range(2)]
        [feed] = router.hub._feeds.values()
        return router, tokens, set(feed.pumps)

    router, tokens, pumping = run(scenario())
    assert tokens == [10, 11]
    assert 1 in router.aborted and 1 not in pumping


@pytest.mark.parametrize("how", ["dies", "vanishes"])
def test_a_router_that_dies_or_vanishes_ends_every_open_request_and_every_later_one(how):
    async def scenario():
        router = FakeRouter()
        mux = FeedMux(router)
        stream = mux.open([1], None)
        await (await stream.__anext__())
        await router.step({0: event(7)})
        first = (await (await stream.__anext__())).token_id
        router.die(ray.exceptions.RayActorError() if how == "dies" else None)
        await asyncio.sleep(0.01)
        later = mux.open([2], None)
        await later.__anext__()  # its admission ref (the router is gone: awaiting it would fail, as with Ray)
        outcomes = []
        for s in (stream, later):
            try:
                await s.__anext__()
                outcomes.append("event")
            except StopAsyncIteration:
                outcomes.append("ended")
            except ray.exceptions.RayActorError:
                outcomes.append("dead")
        return first, outcomes, mux.ended, router

    first, outcomes, ended, router = run(scenario())
    assert first == 7
    assert outcomes == (["dead", "dead"] if how == "dies" else ["ended", "ended"])
    assert ended
    assert 0 in router.aborted  # the router's side of the feed went with it: its open request was stopped


def test_the_hub_buffers_events_until_the_subscriber_reads_and_forgets_a_feed_whose_subscriber_left():
    async def scenario():
        hub = FeedHub()

        async def events():
            for t in range(3):
                yield event(t, last=t == 2)

        hub.forward("a", 5, events())
        await asyncio.sleep(0.01)  # all three produced before anyone reads
        batches = hub.batches("a")
        first = await batches.__anext__()
        await batches.aclose()
        return first, len(hub)

    first, feeds = run(scenario())
    assert [(k, e.token_id) for k, e in first] == [(5, 0), (5, 1), (5, 2)]  # one item for all three
    assert feeds == 0
