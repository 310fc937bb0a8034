"""The load generator's fault arithmetic: a kill's pause is the stall every stream saw, not a gap that happened to
contain the kill's moment (the last tokens of steps already in flight arrive after it)."""

from __future__ import annotations

from bench.serve_load import arrivals, pause_after


def stream(sent_at: float, ttft: float, gaps: list[float]) -> dict:
    return {"sent_at": sent_at, "ttft": ttft, "gaps": gaps}


def test_a_stall_that_starts_just_after_the_kill_is_the_pause():
    # two streams at 20 ms a token; the kill at 2.000 s, their last tokens before the stall at 2.01 and 2.02
    a = stream(0.0, 0.01, [0.02] * 100 + [3.2] + [0.02] * 10)
    b = stream(0.0, 0.02, [0.02] * 100 + [3.1] + [0.02] * 10)
    # silent from b's token at 2.02 to b's next at 5.12 (a's comes at 5.21): neither stream's own gap (3.2, 3.1)
    assert abs(pause_after([a, b], 2.0) - 3.10) < 1e-6
    assert pause_after([a], 5.3) < 0.021  # after the stall only the token cadence is left


def test_a_stream_that_had_not_started_has_no_arrivals():
    assert arrivals({"sent_at": 1.0, "ttft": None, "gaps": []}) == []
    assert arrivals(stream(1.0, 0.5, [0.25, 0.25])) == [1.5, 1.75, 2.0]
