"""The engine step: schedule -> execute -> process, the one step the offline `generate` and the served
`EngineLoop` both run (as vLLM's `EngineCore.step` serves its offline and async front ends).

The core knows nothing of where the model runs: `execute` is given a `StepPlan` and returns its `StepOutput`
(the sharded pipeline in the router actor, the one-process engine offline and in tests).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from router.scheduler import Scheduler, Sequence
from router.step import StepOutput, StepPlan

ExecuteFn = Callable[[StepPlan], Awaitable[StepOutput]]


class StepFailed(RuntimeError):
    """Executing a step failed (a shard died, timed out, or raised); the message says why."""


@dataclass
class CoreCounters:
    steps: int = 0
    step_seconds: float = 0.0  # time in `execute`, summed


class EngineCore:
    def __init__(self, scheduler: Scheduler, execute: ExecuteFn) -> None:
        self.scheduler = scheduler
        self.execute = execute
        self.counters = CoreCounters()

    async def step(self) -> list[Sequence] | None:
        """Run one step; returns the sequences that got a token or ended, or None when there was nothing to run.

        Raises `StepFailed` when the execution failed: the step's sequences have been marked cached up to the
        tokens it carried, so the caller either recovers (`Scheduler.forget_caches` re-prefills them) or ends them.
        """
        scheduled = self.scheduler.schedule()
        if scheduled is None:
            return None
        t0 = time.perf_counter()
        try:
            out = await self.execute(scheduled.plan)
        except Exception as e:  # noqa: BLE001 - whatever the executor raised is the step's failure
            raise StepFailed(f"{type(e).__name__}: {e}") from e
        self.counters.steps += 1
        self.counters.step_seconds += time.perf_counter() - t0
        return self.scheduler.process(scheduled, out)

    async def run_until_done(self) -> None:
        """Step until no request is left (the offline path: every request was added before)."""
        while self.scheduler.has_work():
            if await self.step() is None:
                raise RuntimeError("the scheduler has work but scheduled nothing")
