"""The router actor: owns the schedule and the step loop of a sharded model.

It runs `router.engine_loop.EngineLoop` (continuous batching). Each step it cuts the `StepPlan` into micro-batches
(`router.pipeline`) and makes one call per stage; the stages move activations among themselves and to the expert
groups on the transport. The last stage's `StageResult` carries the picked tokens and the logits to sample; the
loop samples and streams the new tokens.
It is an async actor, so requests join and streams flow while a step is in flight.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import torch

from router.engine_loop import EngineLoop, QueueFullError
from router.generation import Completion, RequestError
from router.pipeline import split_microbatches
from router.sampling import SamplingParams
from router.scheduler import Scheduler, SchedulerConfig
from router.step import (
    Admission,
    ExpertTrace,
    RouterHealth,
    RouterStats,
    StageResult,
    StepOutput,
    StepPlan,
    StepTrace,
)
from shards.config import ModelConfig
from shards.kv_cache import cache_capacity


class RouterActor:
    def __init__(
        self,
        supervisor,
        plan,
        config: ModelConfig,
        step_timeout_s: float = 120.0,
        max_queued_requests: int = 256,
        on_shard_failure: str = "resume",
        monitor_interval_s: float = 2.0,
        recover_on_start: bool = False,
    ) -> None:
        if on_shard_failure not in ("resume", "fail"):
            raise ValueError(f"on_shard_failure must be 'resume' or 'fail', got {on_shard_failure!r}")
        self.supervisor, self.plan, self.config = supervisor, plan, config
        self._set_handles(supervisor.handles())
        self.monitor_interval_s = monitor_interval_s
        self.health = RouterHealth(
            healthy=not recover_on_start, reason="router restarted" if recover_on_start else None
        )
        self.generation = 0  # bumped by every recovery
        self._recover_on_start = recover_on_start
        self._started = False
        self.max_seqs = plan.max_seqs
        self.max_seq_len = config.max_seq_len
        self.cache_capacity = cache_capacity(config.sliding_window, config.max_seq_len)
        self.step_timeout_s = step_timeout_s
        self.steps = 0
        self.traces: list[StepTrace] = []
        self.keep_traces = 10_000
        self.expert_load = torch.zeros(config.n_layers, max(config.num_experts, 1), dtype=torch.long)
        scheduling = SchedulerConfig(plan.max_seqs, plan.token_budget, plan.chunk_size).settled(self.cache_capacity)
        scheduler = Scheduler(scheduling, config.max_seq_len, config.eos_token_id)
        self.loop = EngineLoop(
            self.step,
            scheduler,
            config.vocab_size,
            max_queued_requests,
            recover=self._recover_after_step,
            resume=on_shard_failure == "resume",
        )

    def _set_handles(self, handles: list) -> None:
        n = len(self.plan.stages)
        self.shards, self.stages, self.experts = handles, handles[:n], handles[n:]

    # --- health and recovery ---------------------------------------------------------------------------

    async def start(self) -> RouterHealth:
        """Start the engine loop and the shard monitor (and, after a router restart, re-form the group)."""
        if not self._started:
            self._started = True
            self._recovering = asyncio.Lock()
            self._ready = asyncio.Event()
            if self._recover_on_start:
                await self.recover("router restarted", self.generation)
            self._ready.set()
            self.loop.start()
            asyncio.get_running_loop().create_task(self._monitor())
        return self.health

    async def _monitor(self) -> None:
        """Ray tells us an actor died when we call it; this calls every shard every few seconds, so a shard that
        dies while the model is idle turns readiness false at once, not at the next request."""
        while True:
            await asyncio.sleep(self.monitor_interval_s)
            if self._recovering.locked():
                continue
            generation = self.generation
            alive = await asyncio.to_thread(self.supervisor.probe, self.shards)
            if not all(alive):
                down = [n for n, ok in zip(self.supervisor.names, alive, strict=True) if not ok]
                await self.recover(f"shard(s) {', '.join(down)} not answering", generation)

    async def _recover_after_step(self, reason: str) -> None:
        await self.recover(f"step failed: {reason}", self._step_generation)

    async def recover(self, reason: str, seen_generation: int) -> None:
        """Bring every shard back (restart the dead in their bundles, re-form the group); retries until it works."""
        async with self._recovering:
            if self.generation != seen_generation:
                return  # someone already recovered from this failure
            self._ready.clear()
            self.loop.shards_lost(reason)
            self.health = replace(
                self.health, healthy=False, reason=reason, shard_failures=self.health.shard_failures + 1
            )
            t0 = time.monotonic()
            delay = 1.0
            while True:
                try:
                    handles, report = await asyncio.to_thread(self.supervisor.recover, self.shards)
                    break
                except Exception as e:  # noqa: BLE001 - stay unready, say why, try again
                    self.health = replace(self.health, reason=f"{reason}; recovering: {type(e).__name__}: {e}")
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 10.0)
            self._set_handles(handles)
            self.generation += 1
            self.health = replace(
                self.health,
                healthy=True,
                reason=None,
                last_recovery_seconds=round(time.monotonic() - t0, 3),
                recoveries=self.health.recoveries + 1,
                restarted=(*self.health.restarted, tuple(report["restarted"])),
            )
            self._ready.set()

    async def step(self, plan: StepPlan) -> StepOutput:
        """Execute one step: a call to every stage at once, each given the micro-batches; the last one's answer."""
        await self._ready.wait()
        self._step_generation = self.generation
        t0, called = time.perf_counter(), time.time()
        microbatches = split_microbatches(plan, self.plan.micro_batch_size)
        later = [mb.without_tokens() for mb in microbatches]  # only the first stage embeds
        refs = [
            stage.run_step.remote(self.steps, microbatches if i == 0 else later) for i, stage in enumerate(self.stages)
        ]
        results: list[StageResult] = await asyncio.wait_for(asyncio.gather(*refs), timeout=self.step_timeout_s)
        returned = time.time()
        output = StepOutput.join(results[-1].picked, self.config.vocab_size)
        for r in results:
            for layer, counts in r.expert_choices.items():
                self.expert_load[layer] += torch.tensor(counts)
        if len(self.traces) < self.keep_traces:
            stages = tuple(replace(r, picked=None) for r in results)  # a trace keeps no logits
            seconds = time.perf_counter() - t0
            trace = StepTrace(
                self.steps, plan.n_tokens, len(plan.slots), len(microbatches), seconds, called, returned, stages
            )
            self.traces.append(trace)
        self.steps += 1
        return output

    async def stream(self, prompt_ids: list[int], params: SamplingParams, resume_ids: list[int] | None = None):
        """Ray streaming generator. First item: an `Admission`, so the caller can answer 400/429 before it starts a
        response; then one `TokenEvent` per sampled token. Cancelling the generator frees the request's cache slot."""
        await self.start()
        try:
            request = self.loop.submit(prompt_ids, params, resume_ids)
        except QueueFullError as e:
            yield Admission.reject(429, str(e), e.retry_after_s)
            return
        except RequestError as e:
            yield Admission.reject(400, str(e))
            return
        try:
            yield Admission.accept()
            async for event in self.loop.follow(request):
                yield event
        finally:  # cancelled or closed by the caller: the slot must come back either way
            self.loop.abort(request.seq)

    async def generate(
        self, prompts: list[list[int]], params: list[SamplingParams] | SamplingParams
    ) -> list[Completion]:
        """Offline: every prompt through the same continuous-batching loop, results in prompt order."""
        await self.start()
        per_prompt = params if isinstance(params, list) else [params] * len(prompts)
        return await self.loop.complete(prompts, per_prompt)

    async def ping(self) -> bool:
        return True

    async def stats(self) -> RouterStats:
        await self.start()
        load = tuple(tuple(row) for row in self.expert_load.tolist())
        return RouterStats(self.loop.snapshot(), self.health, load)

    async def take_traces(self) -> list[StepTrace]:
        traces, self.traces = self.traces, []
        return traces

    async def expert_traces(self) -> list[ExpertTrace]:
        return await asyncio.gather(*(e.trace.remote() for e in self.experts))

    async def get_expert_load(self) -> list[list[int]]:
        return self.expert_load.tolist()
