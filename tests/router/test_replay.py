"""A cache rebuilt after a fault is the cache that was lost, bit for bit, in bf16: the prompt prefilled in the same
chunks, then the outputs replayed one decode step a token (`SchedulerConfig.replay_tokens`). Prefilling prompt +
output in one chunk instead computes the same keys and values with other matrix shapes, which round differently in
bf16: on this CPU too, so the test can tell the two apart."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest
import torch

from router.sampling import SamplingParams
from router.scheduler import Scheduler, SchedulerConfig
from router.step import StepOutput
from shards.engine import LocalEngine
from tests.conftest import random_prompts

TOKENS = 24
FAULT_AFTER = 11  # steps before the shards "lose" their caches: one prefill step, then ten decode steps


@pytest.fixture(scope="module")
def engine(checkpoint_factory):
    ckpt = checkpoint_factory("mixtral", seed=29, window=None, dtype=torch.bfloat16, max_seq_len=128)
    return LocalEngine(ckpt, dtype=torch.bfloat16, max_seqs=2)


def run(
    engine: LocalEngine, replay_tokens: int, fault: bool, lengths: tuple[int, ...] = (13, 9), in_flight: int = 1
) -> tuple[list[list[int]], torch.Tensor, list]:
    """Greedy requests with prompts of `lengths` to the end, `in_flight` steps scheduled ahead of the one processed
    (as `EngineCore` keeps one per pipeline stage; each runs on the engine when scheduled, which is the order the
    stages run them in). With `fault`, after FAULT_AFTER processed steps the caches are wiped (zeroed, the steps in
    flight dropped, the scheduler told). Returns the tokens, the cache's keys and every step's plan."""
    config = SchedulerConfig(max_seqs=2, token_budget=64, chunk_size=32, replay_tokens=replay_tokens)
    scheduler = Scheduler(config.settled(engine.cache_capacity), engine.max_seq_len, engine.config.eos_token_id)
    params = SamplingParams(max_tokens=TOKENS, ignore_eos=True)
    seqs = [scheduler.add(p, params) for p in random_prompts(list(lengths), seed=8)]
    engine.cache.k.zero_()
    engine.cache.v.zero_()
    plans, ahead, processed = [], deque(), 0
    while scheduler.has_work():
        if fault and processed == FAULT_AFTER:
            fault = False
            ahead.clear()
            engine.cache.k.zero_()
            engine.cache.v.zero_()
            scheduler.forget_caches()
        while len(ahead) < in_flight and (step := scheduler.schedule(in_flight)) is not None:
            plans.append(step.plan)
            ahead.append((step, StepOutput.from_logits(engine.step(step.plan))))
        scheduler.process(*ahead.popleft())
        processed += 1
    return [s.output_ids for s in seqs], engine.cache.k.clone(), plans


def same_step(a, b) -> bool:
    return (a.slots, a.starts, a.lengths) == (b.slots, b.starts, b.lengths) and np.array_equal(a.token_ids, b.token_ids)


@pytest.mark.parametrize("lengths", [(13, 9), (13,)])
def test_a_rebuilt_cache_replays_the_steps_that_built_it_and_is_bit_identical_in_bf16(engine, lengths):
    tokens, keys, plans = run(engine, replay_tokens=128, fault=False, lengths=lengths)
    # FAULT_AFTER outputs at the fault: at the limit, still replayed
    after_tokens, after_keys, after_plans = run(engine, replay_tokens=FAULT_AFTER, fault=True, lengths=lengths)
    # FAULT_AFTER tokens were out: the prompt's chunk again, then each of them as the decode step that first fed it
    # (the last one's step gives the next token), wanting no logits before that
    rebuild = after_plans[FAULT_AFTER : 2 * FAULT_AFTER + 1]
    assert all(same_step(a, b) for a, b in zip(plans[: FAULT_AFTER + 1], rebuild, strict=True))
    assert [any(p.wants()) for p in rebuild] == [False] * FAULT_AFTER + [True]
    assert torch.equal(after_keys, keys)
    assert after_tokens == tokens


def test_past_replay_tokens_the_outputs_are_prefilled_and_bf16_rounds_them_otherwise(engine):
    """The faster rebuild (one chunk of prompt + output) that a long output gets: not the same bits. (One request:
    the packed attention of two computes a chunk's rows as its decode steps did, on this CPU.)"""
    _, keys, plans = run(engine, replay_tokens=128, fault=False, lengths=(13,))
    _, after_keys, after_plans = run(engine, replay_tokens=FAULT_AFTER - 1, fault=True, lengths=(13,))
    rebuild = after_plans[FAULT_AFTER]
    assert rebuild.starts == (0,) and rebuild.lengths == (13 + FAULT_AFTER,)
    assert len(after_plans) == len(plans)  # one step rebuilt what eleven built, and gave the next token as they did
    assert not torch.equal(after_keys, keys)


def test_with_two_steps_in_flight_the_replay_takes_turns_as_the_decode_steps_did(engine):
    """Two stages keep two steps in flight, each with half the sequences: a replayed output waits for the step
    carrying the one before it, as a decode token waits for its token, so the rebuilt steps are the first ones."""
    tokens, keys, plans = run(engine, replay_tokens=128, fault=False, in_flight=2)
    after_tokens, after_keys, after_plans = run(engine, replay_tokens=128, fault=True, in_flight=2)
    assert all(len(p.slots) == 1 for p in plans)  # the two requests really took turns
    dropped = [p for p in after_plans[FAULT_AFTER:] if p.starts[0] == 0][0]  # the first step of the rebuild
    start = after_plans.index(dropped, FAULT_AFTER)
    rebuild = after_plans[start:]
    assert all(same_step(a, b) for a, b in zip(plans, rebuild[: 2 * FAULT_AFTER], strict=False))
    assert torch.equal(after_keys, keys) and after_tokens == tokens
