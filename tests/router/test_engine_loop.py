"""Continuous batching in the router's loop, run against the one-process engine: requests join at step
boundaries, a long prefill does not stall decoding, slots come back when a request ends or is abandoned."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest

from router.engine_core import STEP_KINDS, step_kind
from router.engine_loop import EngineLoop, QueueFullError
from router.generation import RequestError, generate
from router.sampling import SamplingParams
from router.scheduler import Scheduler, SchedulerConfig
from router.step import StepOutput, StepPlan
from shards.engine import LocalEngine
from tests.conftest import random_prompts

WINDOW = 16


@pytest.fixture(scope="module")
def engine(checkpoint_factory):
    return LocalEngine(checkpoint_factory("mixtral", seed=71, window=WINDOW), max_seqs=4)


def make_loop(engine, token_budget=64, chunk=8, max_queued=8, **hold):
    batches = []

    async def execute(plan):
        batches.append(plan)
        await asyncio.sleep(0)
        return StepOutput.from_logits(engine.step(plan))

    config = SchedulerConfig(engine.max_seqs, token_budget, chunk, **hold).settled(engine.cache_capacity)
    scheduler = Scheduler(config, engine.max_seq_len, engine.config.eos_token_id)
    return EngineLoop(execute, scheduler, engine.config.vocab_size, max_queued), batches


def test_requests_joining_mid_flight_get_the_same_tokens_as_alone(engine):
    prompts = random_prompts([30, 5, 12], seed=1)
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    alone = generate(engine, prompts, params)

    async def main():
        loop, batches = make_loop(engine)
        first = asyncio.create_task(loop.generate(prompts[0], params))
        while len(batches) < 3:
            await asyncio.sleep(0)
        later = await asyncio.gather(loop.generate(prompts[1], params), loop.generate(prompts[2], params))
        return [await first] + list(later), batches

    results, batches = asyncio.run(main())
    assert [[e.token_id for e in r] for r in results] == [a.token_ids for a in alone]
    assert any(len(b.slots) == 3 for b in batches)  # the late requests really shared steps with the first


def test_requests_held_back_while_another_decodes_start_together_with_the_same_tokens(engine):
    """`max_waiting_steps`: two requests arriving a step apart while a third decodes wait, then share one step (the
    first arrived 5 steps before the second: within the hold's 6, so arrivals count as close together)."""
    prompts = random_prompts([30, 5, 12], seed=2)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    alone = generate(engine, prompts, params)

    async def main():
        loop, batches = make_loop(engine, max_waiting_steps=6, waiting_served_ratio=3.0)
        first = asyncio.create_task(loop.generate(prompts[0], params))
        while len(batches) < 5:  # its prompt (30 tokens: 4 chunks) and a decode step
            await asyncio.sleep(0)
        second = asyncio.create_task(loop.generate(prompts[1], params))
        while len(batches) < 6:
            await asyncio.sleep(0)
        third = asyncio.create_task(loop.generate(prompts[2], params))
        return [await first, await second, await third], batches

    results, batches = asyncio.run(main())
    assert [[e.token_id for e in r] for r in results] == [a.token_ids for a in alone]
    start = next(i for i, b in enumerate(batches) if len(b.slots) > 1)
    assert batches[start].lengths[0] == 1 and min(batches[start].lengths[1:]) > 1  # both late prompts started there
    assert start >= 10  # the first decoded alone for the 6 steps the second was held


def test_offline_completion_through_the_live_loop_equals_offline_generate(engine):
    prompts = random_prompts([30, 5, 12, 9, 40], seed=4)  # more prompts than the engine's 4 slots: some wait
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (3, 8, 1, 5, 6)]
    offline = generate(engine, prompts, params)

    async def main():
        loop, _ = make_loop(engine)
        return await loop.complete(prompts, params)

    served = asyncio.run(main())
    assert [c.token_ids for c in served] == [c.token_ids for c in offline]
    assert [c.finish_reason for c in served] == [c.finish_reason for c in offline] == ["length"] * 5
    for a, b in zip(served, offline, strict=True):  # batched differently: equal up to float rounding
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)


def test_a_long_prefill_does_not_stall_a_decoding_request(engine):
    params = SamplingParams(max_tokens=40, ignore_eos=True)

    async def main():
        loop, batches = make_loop(engine, token_budget=9, chunk=8)
        short = asyncio.create_task(loop.generate(random_prompts([3], seed=2)[0], params))
        while len(batches) < 2:
            await asyncio.sleep(0)
        long_prompt = random_prompts([10 * WINDOW], seed=3)[0]
        await asyncio.gather(short, loop.generate(long_prompt, SamplingParams(max_tokens=1)))
        return batches

    batches = asyncio.run(main())
    prefill_steps = [b for b in batches if max(b.lengths) > 1 and len(b.slots) == 2]
    assert len(prefill_steps) >= 10  # the long prompt went in chunks of at most 8 tokens ...
    assert all(max(b.lengths) <= 8 and 1 in b.lengths for b in prefill_steps)  # ... each beside a decode token


def test_an_abandoned_stream_frees_its_slot(engine):
    async def main():
        loop, _ = make_loop(engine)
        stream = loop.stream(random_prompts([6], seed=4)[0], SamplingParams(max_tokens=500, ignore_eos=True))
        await stream.__anext__()
        assert loop.scheduler.slots_in_use == 1
        await stream.aclose()  # the client went away
        return loop.scheduler.slots_in_use, loop.snapshot().aborted

    assert asyncio.run(main()) == (0, 1)


def test_slots_are_reused_by_later_requests(engine):
    async def main():
        loop, _ = make_loop(engine)
        prompts = random_prompts([4] * 10, seed=5)
        await asyncio.gather(*(loop.generate(p, SamplingParams(max_tokens=3, ignore_eos=True)) for p in prompts))
        return loop.scheduler.slots_in_use, loop.snapshot().finished

    assert asyncio.run(main()) == (0, 10)


def test_queue_full_and_bad_requests_are_refused_at_submit(engine):
    async def main():
        loop, _ = make_loop(engine, max_queued=2)
        with pytest.raises(RequestError, match="prompt 0 is empty"):
            loop.submit([], SamplingParams())
        for p in random_prompts([3] * 6, seed=6):
            loop.submit(p, SamplingParams(max_tokens=2))  # 4 slots + 2 waiting
        loop.scheduler.schedule()  # admits 4 into the running batch
        with pytest.raises(QueueFullError, match="limit 2"):
            loop.submit([1, 2, 3], SamplingParams(max_tokens=2))

    asyncio.run(main())


def test_a_failing_step_ends_every_request_with_an_error_instead_of_hanging(engine):
    async def broken(batch):
        raise ConnectionError("stage1 died")

    async def main():
        scheduler = Scheduler(SchedulerConfig(4, 64, 8), engine.max_seq_len, engine.config.eos_token_id)
        loop = EngineLoop(broken, scheduler, engine.config.vocab_size)
        return await asyncio.wait_for(loop.generate([1, 2, 3], SamplingParams(max_tokens=3)), timeout=10)

    events = asyncio.run(main())
    assert events[-1].error == "ConnectionError: stage1 died"


def test_a_request_whose_sampling_fails_gets_an_error_and_the_loop_serves_the_others(engine):
    """A sampler that raises (found by fuzzing: top_p=3e-300 rounded to 0 emptied the distribution) must end only
    its own request, with an error event; before, the exception ended the loop and every request hung."""

    async def main():
        loop, _ = make_loop(engine)
        bad = SamplingParams(max_tokens=3, temperature=1.0)
        good = SamplingParams(max_tokens=3, temperature=0)
        bad_request = loop.submit([1, 5, 6], bad)
        bad_request.seq.sampler.sample = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("invalid distribution"))

        async def collect():
            return [e async for e in loop.follow(bad_request)]

        events = await asyncio.wait_for(collect(), timeout=30)
        after = await asyncio.wait_for(loop.generate([1, 7, 8, 9], good), timeout=30)
        return events, after

    events, after = asyncio.run(main())
    assert events[-1].error == "sampling failed: RuntimeError: invalid distribution"
    assert len(after) == 3 and after[-1].finish_reason == "length" and all(e.error is None for e in after)


def test_a_top_p_that_rounds_to_zero_keeps_the_most_likely_token():
    import torch

    from router.sampling import Sampler

    logits = torch.randn(32000, generator=torch.Generator().manual_seed(3))
    sampler = Sampler(SamplingParams(max_tokens=1, temperature=1.0, top_p=3.4278214123464904e-300, seed=1))
    assert [sampler.sample(logits, i)[0] for i in range(5)] == [int(logits.argmax())] * 5


@pytest.mark.parametrize("temperature", [3.7986712753662186e-58, 5e-324, 1e-40, 1e-8])
def test_a_tiny_temperature_picks_the_most_likely_token(temperature):
    """Found by fuzzing: logits / 3.8e-58 overflowed to inf in float32 and the softmax of inf is nan, so the
    request failed with a 503. At a temperature this small the distribution is the argmax."""
    import torch

    from router.sampling import Sampler

    logits = torch.randn(32000, generator=torch.Generator().manual_seed(4)) * 10
    for top_k, top_p in ((0, 1.0), (40, 0.9)):
        sampler = Sampler(SamplingParams(max_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p, seed=2))
        assert [sampler.sample(logits, i)[0] for i in range(5)] == [int(logits.argmax())] * 5


def test_temperature_one_draws_from_the_softmax():
    """The shifted float64 scaling is the same distribution: 4000 seeded draws from 8 logits land within 3 standard
    deviations of softmax(logits) for each token."""
    import torch

    from router.sampling import Sampler

    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -2.0, 1.5, 0.2])
    sampler = Sampler(SamplingParams(max_tokens=1, temperature=1.0, seed=5))
    draws = torch.tensor([sampler.sample(logits, i)[0] for i in range(4000)])
    counts = torch.bincount(draws, minlength=8).double()
    expected = torch.softmax(logits.double(), -1) * 4000
    assert ((counts - expected).abs() <= 3 * (expected * (1 - expected / 4000)).sqrt()).all(), (counts, expected)


def test_two_steps_in_flight_split_the_running_sequences_and_give_the_same_tokens(engine):
    """A pipeline keeps one step per stage in flight: each takes half the running sequences, the next is sent
    before the last one's tokens are back, and every request gets exactly the tokens of one step at a time."""
    prompts = random_prompts([30, 5, 12, 9], seed=5)
    params = [SamplingParams(max_tokens=6, ignore_eos=True, temperature=0.8 * (i % 2), seed=i) for i in range(4)]
    alone = generate(engine, prompts, params)
    concurrent, peak, sizes = 0, 0, []

    async def execute(plan):
        nonlocal concurrent, peak
        concurrent += 1
        peak = max(peak, concurrent)
        sizes.append(len(plan.slots))
        await asyncio.sleep(0.01)  # both steps are in flight here
        out = StepOutput.from_logits(engine.step(plan))
        concurrent -= 1
        return out

    async def main():
        config = SchedulerConfig(engine.max_seqs, 64, 8).settled(engine.cache_capacity)
        scheduler = Scheduler(config, engine.max_seq_len, engine.config.eos_token_id)
        loop = EngineLoop(execute, scheduler, engine.config.vocab_size, steps_in_flight=2)
        return await loop.complete(prompts, params)

    together = asyncio.run(main())
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    assert peak == 2 and max(sizes) <= 2  # 4 running sequences: two steps of (at most) two


def test_a_failed_step_drops_the_others_in_flight_and_recovery_resumes_every_request(engine):
    prompts = random_prompts([7, 11, 4, 9], seed=6)
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    alone = generate(engine, prompts, params)
    calls, recovered = 0, []

    async def execute(plan):
        nonlocal calls
        calls += 1
        this = calls  # the next step starts while this one sleeps
        await asyncio.sleep(0.01)
        if this == 3:
            raise ConnectionError("stage1 died")
        return StepOutput.from_logits(engine.step(plan))

    async def recover(reason):
        recovered.append(reason)
        loop.shards_lost(reason)
        engine.cache.k.zero_()  # the shards came back empty: every request re-prefills
        engine.cache.v.zero_()

    async def main():
        nonlocal loop
        config = SchedulerConfig(engine.max_seqs, 64, 8).settled(engine.cache_capacity)
        scheduler = Scheduler(config, engine.max_seq_len, engine.config.eos_token_id)
        loop = EngineLoop(execute, scheduler, engine.config.vocab_size, recover=recover, steps_in_flight=2)
        return await loop.complete(prompts, [params] * 4)

    loop = None
    together = asyncio.run(main())
    assert recovered == ["ConnectionError: stage1 died"]  # one recovery, though two steps were in flight
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]


def test_the_step_ledger_splits_busy_time_by_kind_and_leaves_out_the_idle_wait(engine):
    """Each step's share of the wall time is counted once by its kind, with two steps in flight too (the shares
    add up to the busy time, not to the summed step times), and a wait with no request counts for nothing."""
    plans = []

    async def execute(plan):
        plans.append(plan)
        await asyncio.sleep(0.02)
        return StepOutput.from_logits(engine.step(plan))

    async def main():
        config = SchedulerConfig(engine.max_seqs, 64, 8).settled(engine.cache_capacity)
        scheduler = Scheduler(config, engine.max_seq_len, engine.config.eos_token_id)
        loop = EngineLoop(execute, scheduler, engine.config.vocab_size, steps_in_flight=2)
        prompts = random_prompts([12, 5, 3], seed=8)
        params = SamplingParams(max_tokens=4, ignore_eos=True)
        t0 = time.perf_counter()
        await loop.generate(prompts[0], params)
        await asyncio.sleep(0.5)  # idle: no request
        await asyncio.gather(loop.generate(prompts[1], params), loop.generate(prompts[2], params))
        return loop.snapshot(), time.perf_counter() - t0

    stats, wall = asyncio.run(main())
    kinds = {k.kind: k for k in stats.step_kinds}
    expected = Counter(step_kind(p) for p in plans)
    assert {k: kinds[k].steps for k in STEP_KINDS} == {k: expected[k] for k in STEP_KINDS}
    assert {k: kinds[k].tokens for k in STEP_KINDS} == {
        k: sum(sum(p.lengths) for p in plans if step_kind(p) == k) for k in STEP_KINDS
    }
    assert expected["decode"] >= 3 and expected["prefill"] + expected["mixed"] >= 2
    busy = sum(k.seconds for k in stats.step_kinds)
    assert busy <= wall - 0.45  # the half-second wait is not in it
    assert busy >= 0.02 * len(plans) / 2  # two in flight: at least half the summed step times
    assert busy < stats.step_seconds  # steps overlapped, and their shares did not double-count it
    assert all(k.seconds >= 0.02 * k.steps / 2 for k in stats.step_kinds if k.steps)


def test_a_step_is_decode_only_when_every_sequence_has_one_new_token():
    assert step_kind(StepPlan([0, 1], [5, 9], [1, 1])) == "decode"
    assert step_kind(StepPlan([0, 1], [5, 0], [1, 7])) == "mixed"
    assert step_kind(StepPlan([1], [0], [7])) == "prefill"
