"""Decode ahead: a greedy sequence's next decode step goes before its token is back, the stage feeding in its own
pick. Every request must get exactly the tokens of one step at a time (float32), with requests finishing mid-flight
(EOS, max_tokens, a client gone), joining mid-flight, and sampled ones beside them; no step past `max_tokens`."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
import torch

from router.engine_loop import EngineLoop
from router.generation import generate
from router.sampling import SamplingParams
from router.scheduler import Scheduler, SchedulerConfig
from router.step import FED_BACK, StepOutput, StepPlan
from shards.engine import LocalEngine
from tests.conftest import random_prompts

WINDOW = 16


@pytest.fixture(scope="module")
def engine(checkpoint_factory):
    return LocalEngine(checkpoint_factory("mixtral", seed=73, window=WINDOW), max_seqs=6)


class FakeStage:
    """The one stage as the cluster runs it, in this process: FED_BACK resolved from its own last pick per slot,
    greedy rows picked here, the others' logits returned for the router to sample. Records every plan."""

    def __init__(self, engine: LocalEngine, delay_s: float = 0.005) -> None:
        self.engine, self.delay_s = engine, delay_s
        self.last_pick: dict[int, int] = {}
        self.plans: list[StepPlan] = []
        self.running = 0
        self.peak = 0

    async def __call__(self, plan: StepPlan) -> StepOutput:
        self.plans.append(plan)
        self.running += 1
        self.peak = max(self.peak, self.running)
        await asyncio.sleep(self.delay_s)  # the next step is scheduled and sent while this one runs
        ids, k = plan.token_ids.copy(), 0
        for slot, n in zip(plan.slots, plan.lengths, strict=True):
            for j in range(k, k + n):
                if ids[j] == FED_BACK:
                    ids[j] = self.last_pick[slot]  # a KeyError here: a token fed back that was never picked
            k += n
        logits = self.engine.step(replace(plan, token_ids=ids))
        wanting = [s for s, w in zip(plan.slots, plan.wants(), strict=True) if w]
        greedy = plan.greedy_logit_rows()
        picked = [int(row.argmax()) for row, g in zip(logits, greedy, strict=True) if g]
        logprobs = [float(torch.log_softmax(row, -1).max()) for row, g in zip(logits, greedy, strict=True) if g]
        for slot, token in zip([s for s, g in zip(wanting, greedy, strict=True) if g], picked, strict=True):
            self.last_pick[slot] = token
        sampled = logits[[not g for g in greedy]] if not all(greedy) else logits[:0]
        self.running -= 1
        return StepOutput(sampled, greedy, tuple(picked), tuple(logprobs))


def ahead_loop(engine, stage, decode_ahead=True, max_seqs=None, token_budget=64, chunk=8):
    config = SchedulerConfig(max_seqs or engine.max_seqs, token_budget, chunk, decode_ahead=decode_ahead)
    scheduler = Scheduler(config.settled(engine.cache_capacity), engine.max_seq_len, engine.config.eos_token_id)
    return EngineLoop(stage, scheduler, engine.config.vocab_size, steps_in_flight=2, groups=1)


def test_greedy_requests_get_the_tokens_of_one_step_at_a_time_with_their_next_steps_fed_back(engine):
    prompts = random_prompts([9, 30, 5, 12], seed=21)
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (12, 7, 1, 20)]  # 1: its prefill ends it
    alone = generate(engine, prompts, params)
    stage = FakeStage(engine)

    async def main():
        loop = ahead_loop(engine, stage)
        return await loop.complete(prompts, params)

    ahead = asyncio.run(main())
    assert [c.token_ids for c in ahead] == [c.token_ids for c in alone]
    fed = [p for p in stage.plans if (p.token_ids == FED_BACK).any()]
    assert len(fed) >= 10 and stage.peak == 2  # it really ran ahead, two steps in flight
    # no step past a request's max_tokens: its last token is never fed (4 requests, 6 slots: slot i is request i)
    last_fed = {i: len(p) + sp.max_tokens - 2 for i, (p, sp) in enumerate(zip(prompts, params, strict=True))}
    for plan in stage.plans:
        for slot, start, n in zip(plan.slots, plan.starts, plan.lengths, strict=True):
            assert start + n - 1 <= last_fed[slot], f"slot {slot} fed position {start + n - 1}"


def test_eos_mid_flight_drops_the_token_after_it_and_a_new_request_reuses_the_slot(engine):
    """A request whose EOS comes while its next step is already in flight: that step's token is dropped, its slot
    goes to a waiting request, which must not be fed the old sequence's pick."""
    prompts = random_prompts([11, 6, 14, 8, 10], seed=22)
    free = [SamplingParams(max_tokens=24, ignore_eos=True) for _ in prompts]
    sync = generate(engine, prompts, free)
    # an EOS id each request meets mid-way: its 5th token
    eos_like = [SamplingParams(max_tokens=24, stop_token_ids=[c.token_ids[4]]) for c in sync]
    alone = generate(engine, prompts, eos_like)
    assert all(len(c.token_ids) <= 5 for c in alone)
    stage = FakeStage(engine)

    async def main():
        loop = ahead_loop(engine, stage, max_seqs=2)  # 5 requests, 2 slots: slots are reused
        return await loop.complete(prompts, eos_like)

    assert [c.token_ids for c in asyncio.run(main())] == [c.token_ids for c in alone]
    assert any((p.token_ids == FED_BACK).any() for p in stage.plans)


def test_sampled_requests_wait_for_their_token_and_greedy_ones_run_ahead_beside_them(engine):
    prompts = random_prompts([13, 7, 9], seed=23)
    params = [
        SamplingParams(max_tokens=10, ignore_eos=True),
        SamplingParams(max_tokens=10, ignore_eos=True, temperature=0.9, seed=5),
        SamplingParams(max_tokens=10, ignore_eos=True, logprobs=2),  # not picked on the stage: waits too
    ]
    alone = generate(engine, prompts, params)
    stage = FakeStage(engine)

    async def main():
        return await ahead_loop(engine, stage).complete(prompts, params)

    ahead = asyncio.run(main())
    assert [c.token_ids for c in ahead] == [c.token_ids for c in alone]
    for plan in stage.plans:  # a fed-back row is always a greedy one
        for g, t in zip(
            plan.greedy, plan.token_ids[[sum(plan.lengths[: i + 1]) - 1 for i in range(len(plan.lengths))]], strict=True
        ):
            assert g or t != FED_BACK


def test_requests_joining_mid_flight_and_a_client_gone_leave_the_others_exact(engine):
    prompts = random_prompts([10, 25, 6, 9], seed=24)
    params = SamplingParams(max_tokens=14, ignore_eos=True)
    alone = generate(engine, prompts, params)
    stage = FakeStage(engine)

    async def main():
        loop = ahead_loop(engine, stage)
        first = asyncio.create_task(loop.generate(prompts[0], params))
        while len(stage.plans) < 4:
            await asyncio.sleep(0)
        gone = loop.submit(prompts[3], params)  # leaves after 3 tokens, steps of it in flight
        later = asyncio.gather(loop.generate(prompts[1], params), loop.generate(prompts[2], params))
        got = 0
        async for _ in loop.follow(gone):
            got += 1
            if got == 3:
                break
        return [await first, *await later]

    results = asyncio.run(main())
    assert [[e.token_id for e in r] for r in results] == [a.token_ids for a in alone[:3]]


def test_without_decode_ahead_a_sequence_is_never_in_two_steps(engine):
    stage = FakeStage(engine)

    async def main():
        params = SamplingParams(max_tokens=8, ignore_eos=True)
        return await ahead_loop(engine, stage, decode_ahead=False).complete(
            random_prompts([9, 6], seed=25), [params] * 2
        )

    asyncio.run(main())
    assert not any((p.token_ids == FED_BACK).any() for p in stage.plans)
    assert stage.peak == 2  # two steps in flight all the same: prompt chunks flow into the second


def test_decode_ahead_must_be_a_boolean():
    with pytest.raises(ValueError, match="decode_ahead must be true or false, got 'yes'"):
        SchedulerConfig(decode_ahead="yes").settled(64)
