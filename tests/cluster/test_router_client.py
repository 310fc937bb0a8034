"""The router client against a fake router: admission answers become OpenAI errors, a dead or hung router is
replaced once however many choices saw it die, and each choice resumes on the new router with exactly the tokens it
had delivered, so the caller gets every token once. Plain Python fakes of Ray's actor handle and streaming
generator; no Ray cluster, no Serve."""

from __future__ import annotations

import asyncio
import time

import pytest
import ray

from cluster.openai_errors import APIError
from cluster.router_client import RouterClient
from router.sampling import SamplingParams
from router.step import Admission, TokenEvent

PARAMS = SamplingParams(max_tokens=5)
ACCEPT = Admission.accept()
N_TOKENS = 5


def expected(prompt_ids: list[int]) -> list[int]:
    """What every fake router generates for a prompt: deterministic, as seeded sampling makes a real one."""
    return [prompt_ids[0] * 10 + k for k in range(N_TOKENS)]


class FakeRef:
    """An ObjectRef of one streamed item: awaiting it gives the item, or raises the error Ray would."""

    def __init__(self, item) -> None:
        self.item = item

    def __await__(self):
        async def get():
            await asyncio.sleep(0)
            if isinstance(self.item, BaseException):
                raise self.item
            return self.item

        return get().__await__()


class FakeGenerator:
    """Ray's ObjectRefGenerator of one `stream` call: each `__anext__` gives the ObjectRef of the next item."""

    def __init__(self, router: FakeRouter, prompt_ids: list[int], resume_ids: list[int]) -> None:
        self.router, self.prompt_ids, self.resume_ids = router, prompt_ids, resume_ids
        self.sent = 0  # items handed out, the Admission included
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def __aiter__(self):
        return self

    async def __anext__(self) -> FakeRef:
        await asyncio.sleep(0)
        return FakeRef(await self.router.next_item(self))


class FakeMethod:
    def __init__(self, call) -> None:
        self.call = call

    def options(self, **options) -> FakeMethod:
        assert options == {"num_returns": "streaming"}
        return self

    def remote(self, *args, **kwargs):
        return self.call(*args, **kwargs)


class FakeRouter:
    """The router actor's handle. Each stream answers `admission`, then the prompt's tokens from where `resume_ids`
    leave off. `die_after`: the router dies once a stream has delivered that many tokens; `hung`: nothing it is
    asked is ever answered; `vanish`: a dead router's streams just end (a lost node) instead of raising."""

    def __init__(
        self,
        admission: Admission = ACCEPT,
        die_after: int | None = None,
        alive: bool = True,
        hung: bool = False,
        vanish: bool = False,
        end_after: int | None = None,
        error_after: tuple[int, str] | None = None,
        admission_delay_s: float = 0.0,
        hang_after: int | None = None,
        token_delay_s: float = 0.0,
    ) -> None:
        self.admission, self.die_after, self.alive, self.hung, self.vanish = admission, die_after, alive, hung, vanish
        self.end_after, self.error_after, self.admission_delay_s = end_after, error_after, admission_delay_s
        self.hang_after, self.token_delay_s = hang_after, token_delay_s
        self.calls: list[tuple[list[int], list[int] | None]] = []  # (prompt_ids, resume_ids) of each stream
        self.generators: list[FakeGenerator] = []
        self.stream = FakeMethod(self._stream)
        self.ping = FakeMethod(self._ping)

    def kill(self) -> None:
        self.alive = False

    def _stream(self, prompt_ids: list[int], params: SamplingParams, resume_ids: list[int] | None = None):
        assert params is PARAMS
        self.calls.append((prompt_ids, resume_ids))
        self.generators.append(FakeGenerator(self, prompt_ids, list(resume_ids or [])))
        return self.generators[-1]

    async def _ping(self) -> bool:
        if self.hung:
            await asyncio.Event().wait()
        if not self.alive:
            raise ray.exceptions.RayActorError()
        return True

    async def next_item(self, gen: FakeGenerator):
        if self.hung:
            await asyncio.Event().wait()
        if gen.cancelled:
            return ray.exceptions.TaskCancelledError()
        delivered = gen.sent - 1  # tokens this stream has handed out
        if self.hang_after is not None and delivered >= self.hang_after:
            self.hung = True  # stopped (SIGSTOP): neither this stream nor a ping is ever answered again
            await asyncio.Event().wait()
        if delivered >= 0:
            await asyncio.sleep(self.token_delay_s)
        if self.alive and self.die_after is not None and delivered >= self.die_after:
            self.kill()
        if not self.alive:
            if self.vanish:
                raise StopAsyncIteration
            return ray.exceptions.RayActorError()
        if gen.sent == 0:
            await asyncio.sleep(self.admission_delay_s)
            gen.sent += 1
            return self.admission
        if not self.admission.accepted or delivered == self.end_after:
            raise StopAsyncIteration
        if self.error_after is not None and delivered == self.error_after[0]:
            gen.sent += 1
            return TokenEvent.failure(self.error_after[1])
        tokens = expected(gen.prompt_ids)
        at = len(gen.resume_ids) + delivered
        gen.sent += 1
        return TokenEvent(tokens[at], -0.5, None, "length" if at == len(tokens) - 1 else None)


class FakeCluster:
    """The part of ShardedCluster the ingress hands the client: the current router, and a blocking restart that
    puts the next replacement in place (it does not deduplicate: that is the client's job here)."""

    def __init__(self, *routers: FakeRouter, restart_s: float = 0.0, restart_error: Exception | None = None) -> None:
        self.router, self.replacements = routers[0], list(routers[1:])
        self.restart_s, self.restart_error = restart_s, restart_error
        self.restarted: list[FakeRouter] = []  # the dead router of each restart

    def restart_router(self, dead: FakeRouter) -> None:
        time.sleep(self.restart_s)
        self.restarted.append(dead)
        if self.restart_error is not None:
            raise self.restart_error
        self.router = self.replacements.pop(0)


def open_fake_stream(router: FakeRouter, ids: list[int], params: SamplingParams, resume_ids: list[int] | None):
    """A request on a fake router: one per-request stream (the client's feed is tested in test_token_feed.py)."""
    return router.stream.options(num_returns="streaming").remote(ids, params, resume_ids=resume_ids)


def client_of(cluster: FakeCluster, draining: bool = False, replace_timeout_s: float = 5.0, **options) -> RouterClient:
    return RouterClient(
        router=lambda: cluster.router,
        restart=cluster.restart_router,
        replace_timeout_s=replace_timeout_s,
        draining=lambda: draining,
        ping_after_s=0.05,
        ping_timeout_s=0.05,
        cancel=FakeGenerator.cancel,
        open_stream=open_fake_stream,
        **options,
    )


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=20))


async def tokens_of(client: RouterClient, stream) -> list[int]:
    return [event.token_id async for event in client.events(stream)]


async def admit_and_stream(client: RouterClient, *prompts: list[int]) -> list[list[int]]:
    streams = await client.admit([(p, PARAMS) for p in prompts])
    return list(await asyncio.gather(*(tokens_of(client, s) for s in streams)))


def api_error(coro) -> APIError:
    with pytest.raises(APIError) as caught:
        run(coro)
    return caught.value


# --- admission ---------------------------------------------------------------------------------------------------


def test_an_admitted_request_gets_every_token_of_its_router():
    router = FakeRouter()
    cluster = FakeCluster(router)
    assert run(admit_and_stream(client_of(cluster), [1], [2])) == [[10, 11, 12, 13, 14], [20, 21, 22, 23, 24]]
    assert router.calls == [([1], None), ([2], None)]
    assert cluster.restarted == []


def test_a_request_the_router_cannot_run_is_a_400_and_none_of_its_choices_keeps_running():
    router = FakeRouter(admission=Admission.reject(400, "prompt: 40 tokens do not fit a cache of 32"))
    e = api_error(client_of(FakeCluster(router)).admit([([1], PARAMS), ([2], PARAMS)]))
    assert (e.status, e.message, e.code, e.kind, e.headers) == (
        400,
        "prompt: 40 tokens do not fit a cache of 32",
        None,
        "invalid_request_error",
        {},
    )
    assert [g.cancelled for g in router.generators] == [True, True]


def test_a_full_queue_is_a_429_with_the_routers_retry_after():
    router = FakeRouter(admission=Admission.reject(429, "40 requests are waiting", retry_after_s=2))
    e = api_error(client_of(FakeCluster(router)).admit([([1], PARAMS)]))
    assert (e.status, e.message, e.code, e.kind, e.headers) == (
        429,
        "40 requests are waiting",
        "queue_full",
        "rate_limit_error",
        {"Retry-After": "2"},
    )


def test_a_router_found_dead_on_arrival_is_replaced_and_the_request_runs_on_the_new_one():
    dead, new = FakeRouter(alive=False), FakeRouter()
    cluster = FakeCluster(dead, new)
    assert run(admit_and_stream(client_of(cluster), [3])) == [[30, 31, 32, 33, 34]]
    assert cluster.restarted == [dead]
    assert new.calls == [([3], None)]
    assert [g.cancelled for g in dead.generators] == [True]


def test_a_hung_router_is_reported_dead_and_replaced_instead_of_hanging_the_request():
    hung, new = FakeRouter(hung=True), FakeRouter()
    cluster = FakeCluster(hung, new)
    assert run(admit_and_stream(client_of(cluster), [1])) == [[10, 11, 12, 13, 14]]
    assert cluster.restarted == [hung]


def test_a_slow_but_live_router_is_waited_for():
    slow = FakeRouter(admission_delay_s=0.3)
    cluster = FakeCluster(slow)
    assert run(admit_and_stream(client_of(cluster), [1])) == [[10, 11, 12, 13, 14]]
    assert cluster.restarted == []


def test_routers_that_keep_dying_on_arrival_end_in_a_503_after_admit_tries():
    routers = [FakeRouter(alive=False) for _ in range(4)]
    cluster = FakeCluster(*routers)
    e = api_error(client_of(cluster, admit_tries=3).admit([([1], PARAMS)]))
    assert (e.status, e.message, e.code, e.headers) == (
        503,
        "the router died 3 times while admitting the request",
        "router_unavailable",
        {"Retry-After": "5"},
    )
    assert cluster.restarted == routers[:3]


def test_while_draining_a_dead_router_is_not_replaced():
    cluster = FakeCluster(FakeRouter(alive=False), FakeRouter())
    e = api_error(client_of(cluster, draining=True).admit([([1], PARAMS)]))
    assert (e.status, e.message, e.code) == (503, "the server is shutting down; retry later", "server_shutting_down")
    assert cluster.restarted == []


# --- a router that dies mid-stream -------------------------------------------------------------------------------


def test_a_router_that_dies_mid_stream_is_replaced_once_and_the_stream_resumes_with_the_remaining_tokens():
    first, second = FakeRouter(die_after=3), FakeRouter()
    cluster = FakeCluster(first, second)
    assert run(admit_and_stream(client_of(cluster), [4])) == [[40, 41, 42, 43, 44]]
    assert cluster.restarted == [first]
    assert second.calls == [([4], [40, 41, 42])]


def test_a_stream_that_just_ends_on_a_lost_router_resumes_too():
    first, second = FakeRouter(die_after=2, vanish=True), FakeRouter()
    cluster = FakeCluster(first, second)
    assert run(admit_and_stream(client_of(cluster), [4])) == [[40, 41, 42, 43, 44]]
    assert second.calls == [([4], [40, 41])]


def test_a_stream_ended_by_a_live_router_is_not_resumed():
    router = FakeRouter(end_after=2)
    cluster = FakeCluster(router, FakeRouter())
    assert run(admit_and_stream(client_of(cluster), [4])) == [[40, 41]]
    assert cluster.restarted == []


def test_two_choices_that_see_the_same_death_cause_one_restart():
    first, second = FakeRouter(), FakeRouter()
    cluster = FakeCluster(first, second, restart_s=0.2)  # both choices wait on the same restart
    client = client_of(cluster)

    async def scenario():
        streams = await client.admit([([1], PARAMS), ([2], PARAMS)])
        events = [client.events(s) for s in streams]
        before = [[(await e.__anext__()).token_id for _ in range(2)] for e in events]
        first.kill()

        async def rest(e):
            return [event.token_id async for event in e]

        return before, await asyncio.gather(*(rest(e) for e in events))

    before, after = run(scenario())
    assert before == [[10, 11], [20, 21]]
    assert after == [[12, 13, 14], [22, 23, 24]]
    assert cluster.restarted == [first]
    assert sorted(second.calls) == [([1], [10, 11]), ([2], [20, 21])]


def test_a_router_that_dies_again_after_its_replacement_is_replaced_again():
    first, second, third = FakeRouter(die_after=1), FakeRouter(die_after=2), FakeRouter()
    cluster = FakeCluster(first, second, third)
    assert run(admit_and_stream(client_of(cluster), [5])) == [[50, 51, 52, 53, 54]]
    assert cluster.restarted == [first, second]
    assert (second.calls, third.calls) == ([([5], [50])], [([5], [50, 51, 52])])


def test_a_restart_that_keeps_failing_is_a_503_naming_why_and_the_next_caller_tries_again():
    dead, new = FakeRouter(alive=False), FakeRouter()
    cluster = FakeCluster(dead, new, restart_error=RuntimeError("no node has the resource router_node"))
    client = client_of(cluster, replace_timeout_s=1.2)

    async def twice():
        with pytest.raises(APIError) as caught:
            await client.admit([([1], PARAMS)])
        cluster.restart_error = None
        return caught.value, await admit_and_stream(client, [1])

    e, tokens = run(twice())
    assert (e.status, e.message, e.code, e.headers) == (
        503,
        "the router died and could not be restarted: RuntimeError: no node has the resource router_node",
        "router_unavailable",
        {"Retry-After": "5"},
    )
    assert tokens == [[10, 11, 12, 13, 14]]
    assert len(cluster.restarted) >= 3 and set(cluster.restarted) == {dead}  # tried again until the timeout


def test_a_restart_that_fails_once_is_tried_again_and_the_request_is_served():
    """Overlapping kills: the first replacement dies while it starts; the request waits for the next one."""
    dead, new = FakeRouter(die_after=2), FakeRouter()
    cluster = FakeCluster(dead, new, restart_error=RuntimeError("the new router died while it started"))

    async def heal_after_first_failure():
        while not cluster.restarted:
            await asyncio.sleep(0.01)
        cluster.restart_error = None

    async def main():
        healer = asyncio.ensure_future(heal_after_first_failure())
        tokens = await admit_and_stream(client_of(cluster), [6])
        await healer
        return tokens

    assert run(main()) == [[60, 61, 62, 63, 64]]
    assert cluster.restarted == [dead, dead] and new.calls == [([6], [60, 61])]


def test_a_restart_slower_than_the_timeout_is_a_503():
    first, second = FakeRouter(die_after=1), FakeRouter()
    client = client_of(FakeCluster(first, second, restart_s=1.0), replace_timeout_s=0.1)
    e = api_error(admit_and_stream(client, [1]))
    assert (e.status, e.message, e.code) == (
        503,
        "the router died and no new one was ready within 0.1 s",
        "router_unavailable",
    )


def test_a_resume_the_new_router_refuses_is_a_503():
    first, second = FakeRouter(die_after=1), FakeRouter(admission=Admission.reject(429, "40 requests are waiting"))
    e = api_error(admit_and_stream(client_of(FakeCluster(first, second)), [1]))
    assert (e.status, e.message, e.code) == (
        503,
        "could not resume after a router restart: 40 requests are waiting",
        "engine_failure",
    )


# --- errors and the drain ----------------------------------------------------------------------------------------


def test_an_error_event_ends_the_stream_with_a_503_after_the_tokens_before_it():
    router = FakeRouter(error_after=(2, "stage 1 did not answer within 20 s"))
    client = client_of(FakeCluster(router))

    async def scenario():
        [stream] = await client.admit([([1], PARAMS)])
        with pytest.raises(APIError) as caught:
            await tokens_of(client, stream)
        return stream.token_ids, caught.value

    delivered, e = run(scenario())
    assert delivered == [10, 11]
    assert (e.status, e.message, e.code) == (
        503,
        "generation failed: stage 1 did not answer within 20 s",
        "engine_failure",
    )


def test_the_drain_cuts_every_admitted_stream_with_a_503():
    router = FakeRouter()
    draining = False
    client = RouterClient(
        router=lambda: router,
        restart=lambda dead: None,
        replace_timeout_s=1.0,
        draining=lambda: draining,
        cancel=FakeGenerator.cancel,
        open_stream=open_fake_stream,
    )

    async def scenario():
        nonlocal draining
        streams = await client.admit([([1], PARAMS), ([2], PARAMS)])
        events = [client.events(s) for s in streams]
        for e in events:
            await e.__anext__()
        draining = True
        client.release_all()
        errors = []
        for e in events:
            with pytest.raises(APIError) as caught:
                await e.__anext__()
            errors.append((caught.value.status, caught.value.message))
        return errors

    assert run(scenario()) == [(503, "the server shut down before the request finished")] * 2
    assert [g.cancelled for g in router.generators] == [True, True]


def test_a_router_that_hangs_mid_stream_is_replaced_within_the_silence_and_a_ping_and_the_stream_resumes():
    hung, new = FakeRouter(hang_after=2), FakeRouter()
    cluster = FakeCluster(hung, new)
    t0 = time.monotonic()
    assert run(admit_and_stream(client_of(cluster, silence_s=0.1), [4])) == [[40, 41, 42, 43, 44]]
    assert time.monotonic() - t0 < 2  # silence 0.1 s + ping 0.05 s, not the request's deadline
    assert cluster.restarted == [hung]
    assert new.calls == [([4], [40, 41])]


def test_a_slow_router_that_still_answers_pings_is_not_replaced_mid_stream():
    slow = FakeRouter(token_delay_s=0.3)
    cluster = FakeCluster(slow)
    assert run(admit_and_stream(client_of(cluster, silence_s=0.05), [5])) == [[50, 51, 52, 53, 54]]
    assert cluster.restarted == []
