"""The router actor: owns the schedule and the step loop of a sharded model.

It runs `router.engine_loop.EngineLoop` (continuous batching). Each step it sends the `StepPlan` to every worker
on the step link (`cluster.step_link`: no Ray call on the hot path) and waits for the last stage's picked tokens
and logits; the workers move activations among themselves and to the expert groups on the process group. The loop
samples and streams the new tokens. Ray is the control plane here: the supervisor starts, watches and restarts the
workers, and traces and statistics are gathered by Ray calls when asked for. It is an async actor, so requests
join and streams flow while a step is in flight.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from dataclasses import replace
from pathlib import Path

from cluster.step_link import RouterLink
from cluster.step_wire import decode_result, encode_plan
from cluster.token_feed import FeedHub
from cluster.transport import node_ip
from router.engine_core import StepFailed
from router.engine_loop import EngineLoop, QueueFullError
from router.generation import Completion, RequestError
from router.sampling import SamplingParams
from router.scheduler import Scheduler
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
from router.step_deadline import StepDeadline
from router.structured_output import grammars_for
from shards.config import ModelConfig
from shards.kv_cache import cache_capacity

log = logging.getLogger("mistral_cluster.router")
TRACE_LIMIT = 10_000  # steps remembered for `--profile` and benchmarks


class RouterActor:
    def __init__(
        self,
        supervisor,
        plan,
        config: ModelConfig,
        step_timeout_s: float = 120.0,
        max_queued_requests: int = 256,
        on_shard_failure: str = "resume",
        monitor_interval_s: float = 1.0,
        recover_on_start: bool = False,
        hang_floor_s: float = 5.0,
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
        self.deadline = StepDeadline(step_timeout_s, floor_s=hang_floor_s)
        self.steps = 0
        self.traces: deque[StepTrace] = deque(maxlen=TRACE_LIMIT)  # the router's side; stages joined when taken
        self.link: RouterLink | None = None
        self._expert_load: tuple[tuple[int, ...], ...] = ()
        scheduler = Scheduler(
            plan.scheduling.settled(self.cache_capacity),
            config.max_seq_len,
            config.eos_token_id,
            grammars=lambda: grammars_for(str(Path(plan.checkpoint) / "tokenizer.model")),
        )
        self.loop = EngineLoop(
            self.step,
            scheduler,
            config.vocab_size,
            max_queued_requests,
            recover=self._recover_after_step,
            resume=on_shard_failure == "resume",
            steps_in_flight=steps_in_flight(plan),
            groups=step_groups(plan),
        )
        self.feeds = FeedHub()  # the ingresses' token feeds
        self._send_order = asyncio.Lock()  # plans go out in step order...
        self._read_done: asyncio.Future | None = None  # ...and results are read in the same order

    def _set_handles(self, handles: list) -> None:
        self.workers = handles  # in rank order; None for a worker not (re)started yet, which recovery starts

    # --- health and recovery ---------------------------------------------------------------------------

    async def start(self) -> RouterHealth:
        """Form the data plane (after a router restart: recover it), then start the engine loop and the monitor."""
        if not self._started:
            self._started = True
            self._recovering = asyncio.Lock()
            self._ready = asyncio.Event()
            if self._recover_on_start:
                await self.recover("router restarted", self.generation)
            else:
                self.link = RouterLink(node_ip())
                await asyncio.to_thread(self.supervisor.form_group, self.workers, self.link)
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
            try:
                states = await asyncio.to_thread(self.supervisor.states, self.workers)
            except Exception as e:  # noqa: BLE001 - the monitor must outlive any one probe: it is how hangs are found
                log.warning("probing the workers failed: %s: %s", type(e).__name__, e)
                continue
            down = [
                f"{n} ({state})" for n, state in zip(self.supervisor.names, states, strict=True) if state != "alive"
            ]
            if down:
                await self.recover(f"worker(s) {', '.join(down)} not answering", generation, states)

    async def _recover_after_step(self, reason: str) -> None:
        await self.recover(f"step failed: {reason}", self._step_generation)

    async def recover(self, reason: str, seen_generation: int, states: list[str] | None = None) -> None:
        """Bring every shard back (restart the dead in their bundles, re-form the group); retries until it works.
        `states`: the workers' states as the monitor just probed them (first attempt only)."""
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
                if self.link is not None:
                    self.link.close()  # a step waiting on the old data plane fails now, not at its timeout
                self.link = RouterLink(node_ip())
                try:
                    handles, report = await asyncio.to_thread(self.supervisor.recover, self.workers, self.link, states)
                    break
                except Exception as e:  # noqa: BLE001 - stay unready, say why, try again
                    states = None  # probe afresh: what the monitor saw is stale now
                    self.health = replace(self.health, reason=f"{reason}; recovering: {type(e).__name__}: {e}")
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 10.0)
            self._set_handles(handles)
            self.deadline.reset()
            self.generation += 1
            self.health = replace(
                self.health,
                healthy=True,
                reason=None,
                last_recovery_seconds=round(time.monotonic() - t0, 3),
                recoveries=self.health.recoveries + 1,
                restarted=(*self.health.restarted, tuple(report["restarted"])),
                last_restart_phases=tuple(
                    (worker, tuple(phases.items())) for worker, phases in report.get("phases", {}).items()
                ),
            )
            self._ready.set()

    async def step(self, plan: StepPlan) -> StepOutput:
        """Execute one step: the plan to every worker on the step link, the last stage's picks back. Several steps
        may be in flight (one per stage): each sends in turn, then reads its result after the one sent before."""
        await self._ready.wait()
        self._step_generation = self.generation
        link = self.link
        t0, called = time.perf_counter(), time.time()
        async with self._send_order:
            step = self.steps
            self.steps += 1
            try:
                await asyncio.to_thread(link.send_plan, encode_plan(step, plan, self.plan.micro_batch_size))
            except Exception as e:  # noqa: BLE001 - named below
                raise self._step_failed(step, e, link) from e
            before, done = self._read_done, asyncio.get_running_loop().create_future()
            self._read_done = done
        try:
            if before is not None:
                await asyncio.wait({before})  # its outcome is its own step's: only the order matters here
            last = self.supervisor.last_stage_worker
            waited = time.perf_counter()
            deadline = self.deadline.for_step(plan.n_tokens)
            try:
                message = await asyncio.to_thread(link.recv_result, last, deadline)
            except TimeoutError as e:
                raise TimeoutError(
                    f"step {step} ({plan.n_tokens} tokens) returned nothing within its deadline of {deadline:.1f} s "
                    f"(recent steps: {self.deadline.expected_s(plan.n_tokens) or 0:.3f} s expected): {e}"
                ) from None
            self.deadline.record(plan.n_tokens, time.perf_counter() - waited)
            returned = time.time()
            output = decode_result(message, plan, self.config.vocab_size)
        except Exception as e:  # noqa: BLE001 - named below
            raise self._step_failed(step, e, link) from e
        finally:
            done.set_result(None)
        n_microbatches = -(-len(plan.slots) // self.plan.micro_batch_size)
        seconds = time.perf_counter() - t0
        self.traces.append(
            StepTrace(step, plan.n_tokens, len(plan.slots), n_microbatches, seconds, called, returned, ())
        )
        return output

    def _step_failed(self, step: int, e: Exception, link: RouterLink) -> StepFailed:
        """The failure as the engine loop logs and counts it: the step's number (the workers' logs use the same),
        the worker whose link reported it (the step link sets `worker`), and the cause.

        The step link is closed at once: the steps still in flight behind this one would otherwise each wait out
        their own deadline on a data plane that recovery is about to replace (a wedged stage with two steps in
        flight took 14-44 s to recover instead of 9; tests/cluster/test_faults.py)."""
        link.close()
        worker = getattr(e, "worker", None)
        where = "the router" if worker is None else f"worker {worker} ({self.supervisor.names[worker]})"
        return StepFailed(f"step {step}, reported by {where}: {type(e).__name__}: {e}")

    async def submit(
        self, feed: str, key: int, prompt_ids: list[int], params: SamplingParams, resume_ids: list[int] | None = None
    ) -> Admission:
        """Admit a request (or refuse it: 400, 429) and send its token events on the caller's feed under `key`
        (`cluster.token_feed`: one Ray item per step for all of a caller's requests, not one per token)."""
        await self.start()
        try:
            request = self.loop.submit(prompt_ids, params, resume_ids)
        except QueueFullError as e:
            return Admission.reject(429, str(e), e.retry_after_s)
        except RequestError as e:
            return Admission.reject(400, str(e))
        self.feeds.forward(feed, key, self.loop.follow(request))  # `follow` frees the slot when it ends
        return Admission.accept()

    async def cancel(self, feed: str, key: int) -> None:
        """Stop a request submitted on `feed` (the client went away): its cache slot comes back."""
        self.feeds.cancel(feed, key)

    async def feed(self, feed: str):
        """Ray streaming generator: the token events of every request submitted on `feed`, as `FeedBatch`es (all
        that is new since the last, so one a step under load). Ending the call stops the feed's requests."""
        async for batch in self.feeds.batches(feed):
            yield batch

    async def generate(
        self, prompts: list[list[int]], params: list[SamplingParams] | SamplingParams
    ) -> list[Completion]:
        """Offline: every prompt through the same continuous-batching loop, results in prompt order."""
        await self.start()
        per_prompt = params if isinstance(params, list) else [params] * len(prompts)
        return await self.loop.complete(prompts, per_prompt)

    async def ping(self) -> bool:
        return True

    async def profile(self, seconds: float) -> dict:
        """What this router did for `seconds` of whatever load it has, then `seconds` more under cProfile: its steps'
        cadence (one step's start to the next's) beside their own time (sent to returned), first unprofiled, and
        where its event loop's Python time went (cProfile of the loop's thread, which runs the step loop, the feeds
        and every call). For finding the host work a served step pays that `gpu_scale`'s does not
        (bench/router_profile.py)."""
        import cProfile
        import io
        import pstats

        # First the steps alone (cProfile slows every Python call of the loop 2-5x, and with them the cadence), then
        # the same time again under the profiler.
        quiet_mark = self.steps
        await asyncio.sleep(seconds)
        quiet = [t for t in self.traces if t.step >= quiet_mark]
        mark = self.steps
        profiler = cProfile.Profile()
        profiler.enable()
        try:
            await asyncio.sleep(seconds)
        finally:
            profiler.disable()
        steps = [t for t in self.traces if t.step >= mark]
        text = io.StringIO()
        stats = pstats.Stats(profiler, stream=text)
        stats.sort_stats("tottime").print_stats(30)
        stats.sort_stats("cumulative").print_stats(40)
        out: dict = {"seconds": seconds, **step_figures(steps), "loop_python_s": round(stats.total_tt, 3)}
        if len(steps) > 1:
            out["tokens_per_step"] = round(sum(t.tokens for t in steps) / len(steps), 1)
            out["sequences_per_step"] = round(sum(t.sequences for t in steps) / len(steps), 1)
            out["loop_python_ms_per_step"] = round(1e3 * stats.total_tt / len(steps), 2)
        if len(quiet) > 1:  # the figures to quote: no profiler running
            out["unprofiled"] = step_figures(quiet)
        out["profile"] = text.getvalue()
        return out

    async def stats(self) -> RouterStats:
        await self.start()
        return RouterStats(self.loop.snapshot(), self.health, await self._gather_expert_load())

    async def _gather_expert_load(self) -> tuple[tuple[int, ...], ...]:
        """Tokens per expert per layer, summed over the workers' gates (the last figures if a worker is slow)."""
        try:
            loads = await asyncio.wait_for(asyncio.gather(*(w.expert_load.remote() for w in self.workers if w)), 2.0)
        except Exception:  # noqa: BLE001 - a dead or busy worker: recovery deals with it, statistics wait
            return self._expert_load
        rows = [load for load in loads if load is not None]
        if rows:
            self._expert_load = tuple(tuple(map(sum, zip(*layer, strict=True))) for layer in zip(*rows, strict=True))
        return self._expert_load

    async def take_traces(self) -> list[StepTrace]:
        """The steps since the last call, each with every stage's result (gathered from the workers now)."""
        traces, self.traces = list(self.traces), deque(maxlen=TRACE_LIMIT)
        results: list[list[StageResult]] = await asyncio.gather(*(w.stage_results.remote() for w in self.workers if w))
        by_step: dict[int, list[StageResult]] = {}
        for r in (r for rs in results for r in rs):
            by_step.setdefault(r.step, []).append(r)
        return [replace(t, stages=tuple(sorted(by_step.get(t.step, []), key=lambda r: r.stage))) for t in traces]

    async def expert_traces(self) -> list[ExpertTrace]:
        traces = await asyncio.gather(*(w.expert_traces.remote() for w in self.workers if w))
        return [t for ts in traces for t in ts]

    async def get_expert_load(self) -> list[list[int]]:
        return [list(row) for row in await self._gather_expert_load()]


def step_figures(steps: list[StepTrace]) -> dict:
    """How many steps, and with two or more their mean time (sent to returned), their cadence (one step's sending to
    the next's) and the same by kind (`steps_by_kind`)."""
    out: dict = {"steps": len(steps)}
    if len(steps) > 1:
        out["step_ms"] = round(1e3 * sum(t.seconds for t in steps) / len(steps), 2)
        out["cadence_ms"] = round(1e3 * (steps[-1].called - steps[0].called) / (len(steps) - 1), 2)
        out["by_kind"] = steps_by_kind(steps)
    return out


def steps_by_kind(steps: list[StepTrace]) -> dict:
    """Pure decode steps (one token a sequence: the ones CUDA graphs replay) apart from steps that carry prompt
    tokens (run eagerly): how many, their time, and the slowest five of each. A served step's mean hides both: a few
    eager steps, or decode steps that capture a new graph, among many replays."""
    out = {}
    for kind, rows in (
        ("decode", [t for t in steps if t.tokens == t.sequences]),
        ("with_prefill", [t for t in steps if t.tokens > t.sequences]),
    ):
        ms = sorted(1e3 * t.seconds for t in rows)
        out[kind] = {"steps": len(rows)}
        if ms:
            out[kind] |= {
                "mean_ms": round(sum(ms) / len(ms), 2),
                "p50_ms": round(ms[len(ms) // 2], 2),
                "max_ms": round(ms[-1], 2),
                "slowest": [
                    {"ms": round(1e3 * t.seconds, 2), "tokens": t.tokens, "sequences": t.sequences}
                    for t in sorted(rows, key=lambda t: -t.seconds)[:5]
                ],
            }
    return out


def steps_in_flight(plan) -> int:
    """Steps kept in flight: one per pipeline stage, so every stage has a step to work on (vLLM's batch queue does
    the same); two on one stage with decode ahead (the next step waits on the worker while this one runs).
    MISTRAL_CLUSTER_STEPS_IN_FLIGHT overrides it (1: one step at a time)."""
    default = 2 if plan.scheduling.decode_ahead else len(plan.stages)
    return int(os.environ.get("MISTRAL_CLUSTER_STEPS_IN_FLIGHT", default))


def step_groups(plan) -> int:
    """How many groups the running sequences are split into, one a step: one per step in flight (each stage gets its
    own), except with decode ahead, where every step carries them all."""
    return 1 if plan.scheduling.decode_ahead else steps_in_flight(plan)
