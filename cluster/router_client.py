"""The ingress's side of the router actor: admit a request's choices, stream their token events, and outlive the
router.

The router (cluster/router_actor.py) answers each request's `submit` with an `Admission`, then sends its
`TokenEvent`s on this client's token feed (`cluster.token_feed`: one Ray item per step for all requests, where one
per token capped the served rate). When it dies, or hangs, this client starts one replacement however many
requests saw the death, and resumes each choice on the new router from the tokens it already delivered
(`resume_ids`): sampling is seeded per (request, token index), so the client gets the tokens it would have got
anyway, after a pause. No FastAPI and no Serve here: the ingress hands in
how to find the current router, how to restart one, and its timeouts, so tests drive this with plain fakes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.actor import ActorHandle

from cluster.openai_errors import APIError, shutting_down
from cluster.token_feed import FeedMux, FeedStream
from router.sampling import SamplingParams
from router.step import Admission, TokenEvent

log = logging.getLogger("mistral_cluster.serve")
ADMIT_TRIES = 3  # routers a request may find dead on arrival (each replaced) before it gets a 503
ADMIT_PING_S = 10.0  # a router this slow to accept a request is pinged: hung or dead ones are replaced
PING_TIMEOUT_S = 1.5  # a router that does not answer a ping this fast is taken for dead (its loop only awaits)
RETRY_RESTART_S = 0.5  # between attempts to restart a router, while a request waits for one
SILENCE_S = 1.5  # a stream this long without an event pings its router: a hung one is replaced within ~3 s


@dataclass(eq=False)
class ChoiceStream:
    """One choice's generation on the router: what to resume from if that router dies."""

    index: int  # the choice's place in its request (for the logs)
    prompt_ids: list[int]
    params: SamplingParams
    router: ActorHandle  # the router actor the stream runs on: if it dies, that one (and only it) is restarted
    generator: Any  # its `FeedStream` on the router's feed (or a test's fake), past its Admission item
    token_ids: list[int] = field(default_factory=list)  # delivered to the caller: the `resume_ids` of a resume


def router_unavailable(message: str) -> APIError:
    return APIError(503, message, code="router_unavailable", kind="server_error", headers={"Retry-After": "5"})


def refusal(admission: Admission) -> APIError:
    """The router's 400 (the request cannot run) or 429 (its queue is full) as an OpenAI error."""
    full = admission.status == 429
    return APIError(
        admission.status,
        admission.message,
        code="queue_full" if full else None,
        kind="rate_limit_error" if full else "invalid_request_error",
        headers={"Retry-After": str(admission.retry_after_s)} if admission.retry_after_s else None,
    )


class RouterClient:
    """Talks to whichever router is current, and replaces it when it dies.

    `router()` gives the current router's actor handle; `restart(dead)` blocks until a router replaces `dead` (it
    runs in a thread); `draining()` tells whether the server is shutting down (then no router is replaced).
    """

    def __init__(
        self,
        router: Callable[[], ActorHandle],
        restart: Callable[[ActorHandle], None],
        replace_timeout_s: float,
        draining: Callable[[], bool] = lambda: False,
        admit_tries: int = ADMIT_TRIES,
        ping_after_s: float = ADMIT_PING_S,
        ping_timeout_s: float = PING_TIMEOUT_S,
        cancel: Callable[[Any], None] = lambda stream: stream.cancel(),
        silence_s: float = SILENCE_S,
        open_stream: Callable[[ActorHandle, list[int], SamplingParams, list[int] | None], Any] | None = None,
    ) -> None:
        self.router, self._restart, self.draining = router, restart, draining
        self.replace_timeout_s, self.admit_tries = replace_timeout_s, admit_tries
        self.ping_after_s, self.ping_timeout_s, self.silence_s = ping_after_s, ping_timeout_s, silence_s
        self._cancel = cancel  # `FeedStream.cancel`; a test's fake generators bring their own
        # A request's stream on a router: on its feed (cluster.token_feed) unless a test brings fakes
        self._open = open_stream or self._open_on_feed
        self._feeds: dict[ActorHandle, FeedMux] = {}
        self._live: set[ChoiceStream] = set()  # admitted and not yet released: what `release_all` cuts
        self._restarting: tuple[ActorHandle, asyncio.Future] | None = None  # (the dead router, its replacement)

    # --- admission -----------------------------------------------------------------------------------------------

    async def admit(self, choices: list[tuple[list[int], SamplingParams]]) -> list[ChoiceStream]:
        """One router stream per (prompt ids, params), each past its admission item; all are admitted or none (the
        admitted ones are cancelled). A router found dead (it died while idle, so nothing restarted it) is replaced
        and the choices are submitted again to the new one."""
        for _ in range(self.admit_tries):
            router, streams = self.router(), []
            try:
                for index, (ids, params) in enumerate(choices):
                    generator = self._open(router, ids, params, None)
                    streams.append(ChoiceStream(index, ids, params, router, generator))
                for s in streams:
                    admission = await self._admission(router, s.generator)
                    if not admission.accepted:
                        raise refusal(admission)
            except ray.exceptions.RayActorError:
                self.release(streams)
                if self.draining():  # no new router: the 503 says why
                    raise shutting_down() from None
                await self.replace(router)
                continue
            except BaseException:
                self.release(streams)
                raise
            self._live.update(streams)
            return streams
        raise router_unavailable(f"the router died {self.admit_tries} times while admitting the request")

    async def _admission(self, router: ActorHandle, generator: Any) -> Admission:
        """The router's admission answer. A live router always answers at once (a stream that ends here is a dead
        router's); one that has not answered in `ping_after_s` is pinged, and if it does not answer that either it
        is treated as dead (a hung router must not hang the request)."""
        pending = asyncio.ensure_future(_first_item(generator))
        while True:
            done, _ = await asyncio.wait({pending}, timeout=self.ping_after_s)
            if done:
                try:
                    return pending.result()
                except StopAsyncIteration:
                    raise ray.exceptions.RayActorError() from None
            if not await self.answers(router):  # dead, unreachable or hung: replaced by the caller
                pending.cancel()
                raise ray.exceptions.RayActorError()

    async def answers(self, router: ActorHandle) -> bool:
        """Whether the router answers a ping within `ping_timeout_s` (what tells a dead or hung router from a busy
        one)."""
        try:
            await asyncio.wait_for(router.ping.remote(), timeout=self.ping_timeout_s)
            return True
        except Exception:  # noqa: BLE001 - dead, unreachable or hung alike
            return False

    # --- token events --------------------------------------------------------------------------------------------

    async def events(self, stream: ChoiceStream) -> AsyncIterator[TokenEvent]:
        """The choice's token events until its last, each token recorded as delivered. If the router dies, start a
        new one and resume the choice from the tokens it already has: the caller sees a pause, then the tokens it
        would have got anyway. An error event, or a cut by the drain, ends it with a 503."""
        try:
            while True:
                try:
                    async for ref in self._watched(stream):
                        event = await ref
                        if event.error:
                            raise APIError(
                                503, f"generation failed: {event.error}", code="engine_failure", kind="server_error"
                            )
                        stream.token_ids.append(event.token_id)
                        yield event
                        if event.last:
                            return
                    # The stream ended with no finish event. If the router no longer answers, it went away (a lost
                    # node ends the generator without an error): treat it as a RayActorError. A live router means
                    # the stream was ended on purpose (cancelled), and there is nothing to resume.
                    if await self.answers(stream.router):
                        return
                    raise ray.exceptions.RayActorError()  # dead, unreachable or hung: restarted below
                except ray.exceptions.RayActorError:
                    if self.draining():
                        raise
                    await self._resume(stream)
        except ray.exceptions.TaskCancelledError:
            if not self.draining():
                raise
            raise APIError(
                503,
                "the server shut down before the request finished",
                code="server_shutting_down",
                kind="server_error",
            ) from None

    async def _watched(self, stream: ChoiceStream) -> AsyncIterator[Any]:
        """The stream's object refs, as they come. A stream silent for `silence_s` pings its router: a live one (a
        request waiting for a slot, a long prefill) is waited for, a hung one raises RayActorError (replaced by the
        caller) instead of stalling the client until the request's deadline."""
        pending = None
        try:
            while True:
                if pending is None:
                    pending = asyncio.ensure_future(stream.generator.__anext__())
                done, _ = await asyncio.wait({pending}, timeout=self.silence_s)
                if not done:
                    if await self.answers(stream.router):
                        continue
                    raise ray.exceptions.RayActorError()
                try:
                    ref = pending.result()
                except StopAsyncIteration:
                    return
                pending = None
                yield ref
        finally:
            if pending is not None:
                pending.cancel()

    async def _resume(self, stream: ChoiceStream) -> None:
        """Start the choice again on the router that replaces its dead one, from the tokens it already delivered."""
        log.warning(
            "router died; restarting it and resuming choice %d after %d tokens", stream.index, len(stream.token_ids)
        )
        await self.replace(stream.router)
        stream.router = self.router()
        stream.generator = self._open(stream.router, stream.prompt_ids, stream.params, list(stream.token_ids))
        admission = await self._admission(stream.router, stream.generator)
        if not admission.accepted:
            raise APIError(
                503,
                f"could not resume after a router restart: {admission.message}",
                code="engine_failure",
                kind="server_error",
            )

    def _open_on_feed(
        self, router: ActorHandle, ids: list[int], params: SamplingParams, resume_ids: list[int] | None
    ) -> FeedStream:
        """The request on this router's feed, subscribing to it first if this client has not yet (or its last
        subscription there ended: the router died)."""
        mux = self._feeds.get(router)
        if mux is None or mux.ended:
            self._feeds = {r: m for r, m in self._feeds.items() if not m.ended}  # dead routers' feeds
            mux = self._feeds[router] = FeedMux(router)
        return mux.open(ids, params, resume_ids)

    def release(self, streams: list[ChoiceStream]) -> None:
        """Stop generating (a no-op for finished streams), which frees the cache slots."""
        for s in streams:
            self._live.discard(s)
            self._cancel(s.generator)

    def release_all(self) -> None:
        """Cut every admitted stream (the drain's deadline): each caller's `events` ends with a 503."""
        self.release(list(self._live))

    # --- replacing a dead router ---------------------------------------------------------------------------------

    def restart(self, dead: ActorHandle) -> asyncio.Future:
        """Start a router in place of `dead` in the background: one restart however many requests and health checks
        saw it die; after a failed one, the next caller tries again."""
        seen, task = self._restarting or (None, None)
        if seen is not dead or (task.done() and (task.cancelled() or task.exception() is not None)):
            log.warning("router died; starting a new one")
            task = asyncio.ensure_future(asyncio.to_thread(self._restart, dead))
            task.add_done_callback(_report_restart)
            self._restarting = (dead, task)
        return task

    async def replace(self, dead: ActorHandle) -> None:
        """Wait for the router that replaces `dead` (at most `replace_timeout_s`). A restart that fails (its new
        router died too, say, in a run of overlapping kills) is tried again until then; past it, a 503 naming the
        last reason."""
        deadline = asyncio.get_running_loop().time() + self.replace_timeout_s
        while True:
            left = deadline - asyncio.get_running_loop().time()
            try:
                await asyncio.wait_for(asyncio.shield(self.restart(dead)), timeout=max(left, 0.0))
                return
            except TimeoutError:
                raise router_unavailable(
                    f"the router died and no new one was ready within {self.replace_timeout_s:g} s"
                ) from None
            except Exception as e:  # noqa: BLE001 - tried again while time is left; then the client hears why
                if deadline - asyncio.get_running_loop().time() <= RETRY_RESTART_S:
                    raise router_unavailable(
                        f"the router died and could not be restarted: {type(e).__name__}: {e}"
                    ) from None
                await asyncio.sleep(RETRY_RESTART_S)  # `restart` starts a new attempt: this one failed


async def _first_item(generator: Any) -> Any:
    """The next item of a Ray streaming generator: its ObjectRef, then the value."""
    return await (await generator.__anext__())


def _report_restart(task: asyncio.Future) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("router restart failed: %s: %s", type(task.exception()).__name__, task.exception())
