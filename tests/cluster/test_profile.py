"""`generate --profile`'s table: every component of a step, the expert compute by the worker that served it."""

from __future__ import annotations

from cluster.profile import profile_table, summarize
from router.step import ExpertMessage, ExpertTrace


def test_expert_compute_is_summed_per_worker_and_idle_workers_are_left_out():
    traces = [
        ExpertTrace("experts0", (ExpertMessage(0, 1, 8, 0.25), ExpertMessage(1, 2, 4, 0.5)), {}, ()),
        ExpertTrace("stage1+experts1", (ExpertMessage(0, 0, 8, 0.125),), {}, ()),
        ExpertTrace("stage0", (), {}, ()),
    ]
    summary = summarize([], traces)
    assert summary["expert_workers"] == {
        "experts0": {"compute": 0.75, "messages": 2, "tokens": 12},
        "stage1+experts1": {"compute": 0.125, "messages": 1, "tokens": 8},
    }
    table = profile_table([], traces)
    assert "experts0 expert compute" in table and "stage1+experts1 expert compute" in table
    assert "stage0 expert" not in table
