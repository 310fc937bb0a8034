"""The step deadline: the full timeout while warming up, then a multiple of what steps of that size have taken."""

from __future__ import annotations

from router.step_deadline import WARM_STEPS, StepDeadline


def test_the_full_timeout_until_enough_steps_are_timed():
    d = StepDeadline(timeout_s=120.0, floor_s=2.0, factor=10.0)
    for _ in range(WARM_STEPS - 1):
        d.record(4, 0.05)
        assert d.for_step(4) == 120.0


def test_then_a_multiple_of_recent_steps_scaled_by_tokens_within_floor_and_ceiling():
    d = StepDeadline(timeout_s=120.0, floor_s=2.0, factor=10.0)
    for _ in range(WARM_STEPS - 1):
        d.record(8, 0.4)  # decode steps of 8 sequences: 0.05 s per token
    d.record(1, 0.02)  # the cheapest step: the fixed cost
    assert d.for_step(8) == 10 * (0.02 + 0.05 * 8)
    assert d.for_step(2048) == 120.0  # a long prefill: capped by the timeout
    fast = StepDeadline(timeout_s=120.0, floor_s=2.0, factor=10.0)
    for _ in range(WARM_STEPS):
        fast.record(1, 0.001)
    assert fast.for_step(1) == 2.0  # never under the floor


def test_a_recovery_starts_the_warm_up_again():
    d = StepDeadline(timeout_s=60.0)
    for _ in range(WARM_STEPS):
        d.record(1, 0.01)
    assert d.for_step(1) < 60.0
    d.reset()
    assert d.for_step(1) == 60.0
