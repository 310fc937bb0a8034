"""The engine step: schedule -> execute -> process, the one step the offline `generate` and the served
`EngineLoop` both run (as vLLM's `EngineCore.step` serves its offline and async front ends).

The core knows nothing of where the model runs: `execute` is given a `StepPlan` and returns its `StepOutput`
(the sharded pipeline in the router actor, the one-process engine offline and in tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from router.scheduler import ScheduledStep, Scheduler, Sequence
from router.step import StepOutput, StepPlan

ExecuteFn = Callable[[StepPlan], Awaitable[StepOutput]]


class StepFailed(RuntimeError):
    """Executing a step failed (a shard died, timed out, or raised); the message says why. An executor may raise
    it itself to say which step and which worker; anything else it raises is wrapped in one."""


STEP_KINDS = ("decode", "mixed", "prefill")


def step_kind(plan: StepPlan) -> str:
    """The step's kind: "decode", one new token a sequence (the steps CUDA graphs replay; outputs replayed after a
    fault too); "prefill", prompt tokens only; "mixed", both. A served run's time splits very differently over them."""
    ones = sum(1 for n in plan.lengths if n == 1)
    if ones == len(plan.lengths):
        return "decode"
    return "mixed" if ones else "prefill"


@dataclass
class KindCounter:
    """Steps of one kind: how many, their new tokens, and their share of the engine's busy wall time."""

    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0


@dataclass
class CoreCounters:
    steps: int = 0
    step_seconds: float = 0.0  # time in `execute`, summed (steps in flight overlap: more than the wall time)
    # The busy wall time split by the kind of step that ended each stretch of it: a step's share is the time from
    # the previous step's end (or from when the engine got work, after idling) to its own end. These add up to the
    # time the engine had a step in flight; the rest of a run's wall time it waited for requests.
    by_kind: dict[str, KindCounter] = field(default_factory=lambda: {k: KindCounter() for k in STEP_KINDS})


class EngineCore:
    def __init__(
        self, scheduler: Scheduler, execute: ExecuteFn, steps_in_flight: int = 1, groups: int | None = None
    ) -> None:
        """`steps_in_flight`: steps executing at once (vLLM keeps one per pipeline stage in flight): step N+1 is sent
        before step N's tokens are back, so with two stages both work at once. Each step's output is processed in
        the order the steps were scheduled. `groups` (default: `steps_in_flight`): how many groups the running
        sequences are split into, one a step (one per stage); one group with two steps in flight is decode ahead
        (`router.scheduler`: the same sequences in consecutive steps, their tokens fed back on the stage)."""
        if steps_in_flight < 1:
            raise ValueError(f"steps_in_flight must be at least 1, got {steps_in_flight}")
        self.scheduler = scheduler
        self.execute = execute
        self.steps_in_flight = steps_in_flight
        self.groups = groups or steps_in_flight
        self.counters = CoreCounters()
        self._in_flight: deque[tuple[ScheduledStep, asyncio.Future, float]] = deque()
        self._busy_since = self._last_done = 0.0  # perf_counter: when the engine last got work; the last step's end

    async def step(self) -> list[Sequence] | None:
        """Run one step; returns the sequences that got a token or ended, or None when there was nothing to run.

        With several steps in flight this schedules up to `steps_in_flight` of them, then waits for the oldest.
        Raises `StepFailed` when an execution failed; every other step in flight is then dropped too. The steps'
        sequences were marked cached up to the tokens they carried, so the caller either recovers
        (`Scheduler.forget_caches` re-prefills them) or ends them.
        """
        while len(self._in_flight) < self.steps_in_flight:
            scheduled = self.scheduler.schedule(self.groups)
            if scheduled is None:
                break
            future = asyncio.ensure_future(self.execute(scheduled.plan))
            now = time.perf_counter()
            if not self._in_flight:
                self._busy_since = now
            self._in_flight.append((scheduled, future, now))
        if not self._in_flight:
            return None
        scheduled, future, t0 = self._in_flight.popleft()
        try:
            out = await future
        except StepFailed:  # the executor named the step and the cause itself
            await self._drop_in_flight()
            raise
        except Exception as e:  # noqa: BLE001 - whatever the executor raised is the step's failure
            await self._drop_in_flight()
            raise StepFailed(f"{type(e).__name__}: {e}") from e
        self._count(scheduled.plan, t0)
        return self.scheduler.process(scheduled, out)

    def _count(self, plan: StepPlan, sent: float) -> None:
        now = time.perf_counter()
        c = self.counters
        c.steps += 1
        c.step_seconds += now - sent
        kind = c.by_kind[step_kind(plan)]
        kind.steps += 1
        kind.tokens += plan.n_tokens
        kind.seconds += now - max(self._last_done, self._busy_since)
        self._last_done = now

    async def _drop_in_flight(self) -> None:
        """Wait for the other steps in flight to end (they fail with the data plane they ran on) and forget them."""
        while self._in_flight:
            _, future, _ = self._in_flight.popleft()
            with contextlib.suppress(Exception):
                await future

    async def run_until_done(self) -> None:
        """Step until no request is left (the offline path: every request was added before)."""
        while self.scheduler.has_work():
            if await self.step() is None:
                raise RuntimeError("the scheduler has work but scheduled nothing")
