"""The continuous-batching loop: requests join the running batch at step boundaries and leave when they finish.

The loop knows nothing of Ray or of where the model runs: each turn it runs one `EngineCore` step (given an
async `execute` function: the sharded pipeline in the router actor, the one-process engine in tests) and streams
each request's tokens as they come.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from router.engine_core import EngineCore, ExecuteFn, StepFailed
from router.generation import Completion, RequestError, check_prompt
from router.sampling import SamplingParams
from router.scheduler import Scheduler, Sequence
from router.step import EngineStats, StepKindStats, TokenEvent

log = logging.getLogger("mistral_cluster.router")


class QueueFullError(RequestError):
    """More requests are waiting than `max_queued_requests`; the caller should retry later."""

    retry_after_s = 1


class EngineFailure(RuntimeError):
    """A step failed (a shard died or timed out); the requests it carried end with this message."""


@dataclass
class _Request:
    seq: Sequence
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)


@dataclass
class LoopStats:
    tokens_in: int = 0
    tokens_out: int = 0
    finished: int = 0
    aborted: int = 0
    failed_steps: int = 0


class EngineLoop:
    def __init__(
        self,
        execute: ExecuteFn,
        scheduler: Scheduler,
        vocab_size: int,
        max_queued_requests: int = 256,
        recover: Callable[[str], Awaitable[None]] | None = None,
        resume: bool = True,
        steps_in_flight: int = 1,
        groups: int | None = None,
    ) -> None:
        """`recover(reason)` brings the shards back after a failed step (None: every request of the step fails).
        With `resume`, requests in flight continue after recovery, their caches rebuilt; otherwise they end with
        an error and only queued requests go on."""
        self.core = EngineCore(scheduler, execute, steps_in_flight, groups)
        self._recover = recover
        self.resume = resume
        self.scheduler = scheduler
        self.vocab_size = vocab_size
        self.max_queued_requests = max_queued_requests
        self.requests: dict[int, _Request] = {}
        self.stats = LoopStats()
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    def submit(self, prompt_ids: list[int], params: SamplingParams, resume_ids: list[int] | None = None) -> _Request:
        """Validate and queue a request; raises RequestError (bad input) or QueueFullError (try later).

        `resume_ids`: tokens this request already emitted elsewhere (a router that died); it goes on after them.
        """
        check_prompt(prompt_ids, params, self.scheduler.max_seq_len, self.vocab_size)
        queued = len(self.scheduler.waiting) - len(self.scheduler.slots.free)  # those a free slot awaits don't count
        if queued >= self.max_queued_requests:
            raise QueueFullError(
                f"{queued} requests are already waiting for a cache slot (limit {self.max_queued_requests}); "
                "retry later"
            )
        self.start()
        try:
            seq = self.scheduler.add(prompt_ids, params, resume_ids)
        except (ValueError, OSError) as e:  # a structured output the engine cannot compile, or no tokenizer file
            raise RequestError(str(e)) from None
        request = _Request(seq)
        self.requests[seq.seq_id] = request
        self.stats.tokens_in += len(prompt_ids)
        self._wake.set()
        return request

    async def stream(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[TokenEvent]:
        """Tokens of one request as they are sampled. Leaving the loop early (cancel, disconnect) frees its slot."""
        request = self.submit(prompt_ids, params)
        try:
            async for event in self.follow(request):
                yield event
        finally:  # closing this generator does not close `follow`'s: free the slot here too
            self.abort(request.seq)

    async def follow(self, request: _Request) -> AsyncIterator[TokenEvent]:
        try:
            while True:
                event = await request.queue.get()
                yield event
                if event.last:
                    return
        finally:
            self.abort(request.seq)

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> list[TokenEvent]:
        return [event async for event in self.stream(prompt_ids, params)]

    async def complete(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[Completion]:
        """Offline through the live loop: every prompt submitted at once, results in prompt order."""
        requests = [self.submit(p, sp) for p, sp in zip(prompts, params, strict=True)]

        async def until_done(request: _Request) -> None:
            async for _ in self.follow(request):
                pass

        await asyncio.gather(*(until_done(r) for r in requests))
        return [Completion.of(r.seq) for r in requests]

    def abort(self, seq: Sequence) -> None:
        if not seq.finished:
            self.scheduler.finish(seq, "abort")
            self.stats.aborted += 1
        self.requests.pop(seq.seq_id, None)

    async def _run(self) -> None:
        while True:
            try:
                changed = await self.core.step()
            except StepFailed as e:  # every request of the step must hear about it, none may hang
                self.stats.failed_steps += 1
                log.warning("step failed: %s (%d failed so far)", e, self.stats.failed_steps)
                await self._after_failure(str(e))
                continue
            except Exception as e:  # noqa: BLE001 - processing the output failed: the running requests end with it
                log.warning("processing a step's output failed, its running requests end: %s: %s", type(e).__name__, e)
                self._fail(f"{type(e).__name__}: {e}", running_only=True)
                continue
            if changed is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            for seq in changed:
                request = self.requests.get(seq.seq_id)
                if request is not None:
                    request.queue.put_nowait(self._event(seq))

    def _event(self, seq: Sequence) -> TokenEvent:
        """The token `seq` just got (or the error that ended it), counted."""
        if seq.error is not None:
            return TokenEvent.failure(seq.error)
        self.stats.tokens_out += 1
        if seq.finished:
            self.stats.finished += 1
        top = seq.output_top_logprobs[-1]
        with_prompt = len(seq.output_ids) == 1 and seq.params.prompt_logprobs is not None
        return TokenEvent(
            seq.output_ids[-1],
            seq.output_logprobs[-1],
            None if top is None else tuple(top),
            seq.finish_reason,
            prompt_logprobs=tuple(seq.prompt_logprobs) if with_prompt else None,
            prompt_top_logprobs=tuple(tuple(t) for t in seq.prompt_top_logprobs) if with_prompt else None,
        )

    async def _after_failure(self, message: str) -> None:
        if self._recover is None:
            self._fail(message, running_only=False)
            self.scheduler.forget_caches()
            return
        try:
            await self._recover(message)  # calls `shards_lost` before it brings the shards back
        except Exception as e:  # noqa: BLE001 - recovery retries itself; a failure here must not stop the loop
            self._fail(f"{message}; recovery failed: {type(e).__name__}: {e}", running_only=False)
            self.scheduler.forget_caches()

    def shards_lost(self, message: str) -> None:
        """The shards' KV caches can no longer be trusted (however the failure was found): with `resume`, every
        running request prefills its prompt and output again; otherwise running requests end with the error."""
        if not self.resume:
            self._fail(message, running_only=True)
        self.scheduler.forget_caches()

    def _fail(self, message: str, running_only: bool) -> None:
        running = {id(s) for s in self.scheduler.running}
        for request in list(self.requests.values()):
            seq = request.seq
            if running_only and id(seq) not in running:
                continue  # not started: it simply runs after recovery
            if not seq.finished:
                self.scheduler.finish(seq, "error")
            request.queue.put_nowait(TokenEvent.failure(message))

    def snapshot(self) -> EngineStats:
        """What the metrics and health endpoints read."""
        s = self.stats
        return EngineStats(
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting),
            slots_in_use=self.scheduler.slots_in_use,
            slots_total=self.scheduler.slots.n,
            steps=self.core.counters.steps,
            step_seconds=self.core.counters.step_seconds,
            tokens_in=s.tokens_in,
            tokens_out=s.tokens_out,
            finished=s.finished,
            aborted=s.aborted,
            failed_steps=s.failed_steps,
            step_kinds=tuple(
                StepKindStats(kind, c.steps, c.tokens, c.seconds) for kind, c in self.core.counters.by_kind.items()
            ),
        )
