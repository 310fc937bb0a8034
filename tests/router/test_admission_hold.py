"""Requests arriving a few steps apart while others decode are held back and started together (`max_waiting_steps`,
`waiting_served_ratio`): a step that starts prompts cannot replay a decode graph and costs ~2.3 decode steps on an
H200 however few prompts it carries. Each rule that starts them at once is checked on its own, and a held request
gets the same tokens as one started at once. Requests that arrive far apart (light load) are not held: holding would
gather none."""

from __future__ import annotations

import pytest
import torch

from router.sampling import SamplingParams
from router.scheduler import Scheduler, SchedulerConfig
from router.step import StepOutput

GREEDY = SamplingParams(max_tokens=40, ignore_eos=True)
LONG = SamplingParams(max_tokens=200, ignore_eos=True)


def next_token_out(plan, vocab=64) -> StepOutput:
    """A deterministic 'model': each row that wants logits picks (its last input token + 1) mod vocab, or 9 for a
    token fed back on the stage."""
    rows = int(sum(plan.wants()))
    logits = torch.zeros(rows, vocab)
    ends = [sum(plan.lengths[: i + 1]) - 1 for i, w in enumerate(plan.wants()) if w]
    for r, end in enumerate(ends):
        last = int(plan.token_ids[end])
        logits[r, (last + 1) % vocab if last >= 0 else 9] = 1.0
    return StepOutput.from_logits(logits)


def scheduler(wait: int, ratio: float = 0.3, budget: int = 256, seqs: int = 16) -> Scheduler:
    cfg = SchedulerConfig(max_seqs=seqs, token_budget=budget, chunk_size=32, max_waiting_steps=wait,
                          waiting_served_ratio=ratio)  # fmt: skip
    return Scheduler(cfg.settled(256), 256, 2)


def run_steps(s: Scheduler, n: int) -> list:
    """`n` steps, each processed before the next; the sequences each step carried."""
    carried = []
    for _ in range(n):
        step = s.schedule()
        assert step is not None
        carried.append(set(step.sequences))
        s.process(step, next_token_out(step.plan))
    return carried


def decoding(s: Scheduler, n: int) -> list:
    """`n` requests started and past their prefill (each has its first token)."""
    seqs = [s.add([1, 3 + i, 4], GREEDY) for i in range(n)]
    run_steps(s, 1)
    assert all(len(q.output_ids) == 1 for q in seqs)
    return seqs


def test_a_request_arriving_while_others_decode_waits_at_most_max_waiting_steps():
    s = scheduler(wait=3, ratio=1.0)
    decoding(s, 4)
    late = s.add([1, 20, 21], GREEDY)  # 1 waiting < 1.0 x 4 running: held
    carried = run_steps(s, 4)
    assert [late in c for c in carried] == [False, False, False, True]
    assert late.slot is not None and len(late.output_ids) == 1


def test_requests_held_start_together_in_one_step():
    s = scheduler(wait=4, ratio=1.0)
    decoding(s, 6)
    first = s.add([1, 20, 21], GREEDY)
    run_steps(s, 2)
    second = s.add([1, 30, 31], GREEDY)
    carried = run_steps(s, 3)
    # the first waited its 4 steps; the second, 2 steps younger, started with it
    assert [first in c for c in carried] == [False, False, True]
    assert [second in c for c in carried] == [False, False, True]


def test_enough_waiting_requests_start_at_once():
    s = scheduler(wait=100, ratio=0.5)
    decoding(s, 4)
    a = s.add([1, 20, 21], GREEDY)
    assert run_steps(s, 1) and a.slot is None  # 1 < 0.5 x 4
    b = s.add([1, 22, 23], GREEDY)  # 2 >= 0.5 x 4
    carried = run_steps(s, 1)
    assert a in carried[0] and b in carried[0]


def test_a_request_starts_at_once_when_nothing_runs_or_holding_is_off():
    s = scheduler(wait=100, ratio=10.0)
    only = s.add([1, 2, 3], GREEDY)
    assert only in run_steps(s, 1)[0]
    s = scheduler(wait=0, ratio=10.0)
    decoding(s, 4)
    late = s.add([1, 20, 21], GREEDY)
    assert late in run_steps(s, 1)[0]


def test_prompts_that_fill_the_step_start_at_once():
    s = scheduler(wait=100, ratio=10.0, budget=64)
    decoding(s, 4)  # 60 tokens of the budget left beside the 4 decode rows
    short = s.add(list(range(1, 31)), GREEDY)
    run_steps(s, 1)
    assert short.slot is None  # 30 prompt tokens (one chunk) do not fill 60
    long = s.add(list(range(1, 61)), GREEDY)  # its first chunk (32) + 30 >= 60
    carried = run_steps(s, 1)
    assert short in carried[0] and long in carried[0]


def test_a_held_request_gets_the_tokens_it_would_have_got_at_once():
    outputs = {}
    for wait in (0, 5):
        s = scheduler(wait=wait, ratio=1.0)
        decoding(s, 3)
        late = s.add([1, 40, 41], SamplingParams(max_tokens=6, ignore_eos=True))
        while not late.finished:
            run_steps(s, 1)
        outputs[wait] = list(late.output_ids)
    assert outputs[0] == outputs[5] == [42, 43, 44, 45, 46, 47]


def test_requests_arriving_further_apart_than_the_hold_start_at_once_once_their_gaps_say_so():
    s = scheduler(wait=3, ratio=10.0)
    for i in range(4):
        s.add([1, 3 + i, 4], LONG)
    run_steps(s, 1)  # 4 running, arrived together: gaps 0, 0, 0
    started_after = []
    for k in range(6):
        run_steps(s, 9)
        late = s.add([1, 50 + k, 51], GREEDY)  # 10 steps after the one before
        steps = 0
        while late.slot is None:
            run_steps(s, 1)
            steps += 1
        started_after.append(steps)
    # the median of the gaps (0, 0, 0, then 10s) passes 3 once the 10s are the larger half: from the 4th late
    # request on each starts in the next step; the first three were held 3 steps and started in the 4th
    assert s.sparse and sorted(s.arrival_gaps)[:2] == [0, 0]  # the burst's gaps still remembered
    assert started_after == [4, 4, 4, 1, 1, 1]


def test_a_burst_after_a_quiet_spell_is_still_held_together():
    s = scheduler(wait=4, ratio=10.0)
    for i in range(4):
        s.add([1, 3 + i, 4], LONG)
    run_steps(s, 1)
    for k in range(3):  # a burst: arrivals one step apart
        s.add([1, 10 + k, 11], GREEDY)
        run_steps(s, 1)
    run_steps(s, 40)  # quiet: the burst has started and runs
    first = s.add([1, 60, 61], GREEDY)  # a gap of 41 steps: one long gap among short ones
    run_steps(s, 1)
    second = s.add([1, 62, 63], GREEDY)
    carried = run_steps(s, 4)
    assert not s.sparse and first.slot is not None
    assert [first in c for c in carried] == [False, False, False, True]
    assert [second in c for c in carried] == [False, False, False, True]


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("max_waiting_steps", -1, "max_waiting_steps must be a non-negative integer, got -1"),
        ("max_waiting_steps", 2.5, "max_waiting_steps must be a non-negative integer, got 2.5"),
        ("waiting_served_ratio", -0.1, "waiting_served_ratio must be a non-negative number, got -0.1"),
        ("waiting_served_ratio", "lots", "waiting_served_ratio must be a non-negative number, got 'lots'"),
    ],
)
def test_bad_numbers_are_named(field, value, message):
    with pytest.raises(ValueError, match=message):
        SchedulerConfig(**{field: value}).settled(256)
