"""Cache slots stay packed at the bottom and a step's rows go in slot order, so that once every slot is in use a
decode step's slots are one ascending run: the stage then reads each sequence's buffer in place (a view) instead of
gathering every layer's buffers first (`kv_cache.StepLayout.decode_range`). Before, slots came back to a stack and
rows went in admission order: after requests ended and others took their slots, a full step gathered."""

from __future__ import annotations

import torch

from router.sampling import SamplingParams
from router.scheduler import Scheduler, SchedulerConfig, SlotPool
from router.step import StepOutput
from shards.kv_cache import StepLayout


def test_the_lowest_free_slot_goes_first():
    pool = SlotPool(4)
    assert [pool.take() for _ in range(4)] == [0, 1, 2, 3] and pool.take() is None
    pool.give(2)
    pool.give(0)
    assert pool.take() == 0 and pool.take() == 2


def greedy_out(plan, vocab=16) -> StepOutput:
    """Every row that wants logits picks token 5."""
    rows = int(sum(plan.wants()))
    logits = torch.zeros(rows, vocab)
    logits[:, 5] = 1.0
    return StepOutput.from_logits(logits)


def test_after_requests_end_and_others_take_their_slots_a_full_decode_step_is_one_run_of_slots():
    scheduler = Scheduler(SchedulerConfig(max_seqs=4, token_budget=64, chunk_size=16).settled(64), 64, 2)
    lengths = {0: 3, 1: 9, 2: 2, 3: 9}  # requests 0 and 2 end first; 4 and 5 take their slots
    for i in range(6):
        scheduler.add([1, 7, 8], SamplingParams(max_tokens=lengths.get(i, 9), ignore_eos=True))
    full_steps = 0
    while scheduler.has_work():
        step = scheduler.schedule()
        plan = step.plan
        assert list(plan.slots) == sorted(plan.slots)  # rows in slot order
        if all(n == 1 for n in plan.lengths) and len(plan.slots) == 4:
            layout = StepLayout.build(plan, 64, None, 8, 10000.0, torch.device("cpu"))
            assert layout.decode_range == slice(0, 4), plan.slots  # read in place, not gathered
            full_steps += 1
        scheduler.process(step, greedy_out(plan))
    assert full_steps >= 5
    assert sorted(scheduler.slots.free) == [0, 1, 2, 3]  # every slot handed back


def test_with_two_steps_in_flight_each_takes_a_run_of_slots():
    """Two pipeline stages: each step takes half the sequences, the lower slots first, whatever order they came in."""
    scheduler = Scheduler(SchedulerConfig(max_seqs=4, token_budget=64, chunk_size=16).settled(64), 64, 2)
    lengths = {0: 3, 2: 2}
    for i in range(6):
        scheduler.add([1, 7, 8], SamplingParams(max_tokens=lengths.get(i, 12), ignore_eos=True))
    halves, in_flight = 0, []
    while scheduler.has_work():
        while len(in_flight) < 2 and (step := scheduler.schedule(2)) is not None:
            in_flight.append(step)
            plan = step.plan
            if all(n == 1 for n in plan.lengths) and len(plan.slots) == 2:
                layout = StepLayout.build(plan, 64, None, 8, 10000.0, torch.device("cpu"))
                assert layout.decode_range is not None, plan.slots
                halves += 1
        step = in_flight.pop(0)
        scheduler.process(step, greedy_out(step.plan))
    assert halves >= 8
