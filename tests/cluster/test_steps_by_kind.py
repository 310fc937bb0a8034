"""The router profile's steps by kind: pure decode steps apart from those carrying prompt tokens, with the slowest."""

from __future__ import annotations

from cluster.router_actor import steps_by_kind
from router.step import StepTrace


def trace(step: int, tokens: int, sequences: int, ms: float) -> StepTrace:
    return StepTrace(step, tokens, sequences, 1, ms / 1e3, 0.0, 0.0, ())


def test_decode_and_prefill_steps_are_counted_and_timed_apart():
    steps = [trace(i, 128, 128, 40.0) for i in range(9)] + [trace(9, 128, 128, 210.0)]  # a capture among replays
    steps += [trace(10, 128 + 640, 138, 150.0), trace(11, 64, 1, 30.0)]
    found = steps_by_kind(steps)
    decode, prefill = found["decode"], found["with_prefill"]
    assert decode["steps"] == 10 and prefill["steps"] == 2
    assert decode["mean_ms"] == 57.0 and decode["p50_ms"] == 40.0 and decode["max_ms"] == 210.0
    assert decode["slowest"][0] == {"ms": 210.0, "tokens": 128, "sequences": 128}
    assert prefill["mean_ms"] == 90.0 and [r["ms"] for r in prefill["slowest"]] == [150.0, 30.0]


def test_no_step_of_a_kind_is_said_plainly():
    found = steps_by_kind([trace(0, 4, 4, 10.0)])
    assert found["with_prefill"] == {"steps": 0}
