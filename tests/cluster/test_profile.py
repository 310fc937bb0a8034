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


def test_the_step_timeline_says_whether_two_stages_overlap():
    """Two stages, two steps in flight, 10 ms a stage: stage 0 runs step n + 1 while stage 1 runs step n."""
    from cluster.profile import step_timeline
    from router.step import MicrobatchSpan, StageResult, StepTrace, TransportTally

    def stage(k: int, start: float) -> StageResult:
        return StageResult(
            k, 0, (MicrobatchSpan(0, start, start + 0.01, 0.0),), 0.0, TransportTally(), 0.0, start, start + 0.01
        )

    traces = [
        StepTrace(n, 4, 4, 1, 0.02, 0.01 * n, 0.01 * n + 0.02, (stage(0, 0.01 * n), stage(1, 0.01 * n + 0.01)))
        for n in range(10)
    ]
    traces.append(StepTrace(10, 8, 8, 1, 0.02, 0.2, 0.22, ()))  # another size: left out
    timeline = step_timeline(traces, 4, steps=3)
    assert [t["step"] for t in timeline] == [5, 6, 7]
    first, second = timeline[0], timeline[1]
    assert first["sent"] == 0 and first["returned"] == 20
    stage1_of_first, stage0_of_second = first["stages"][1]["ran"][0], second["stages"][0]["ran"][0]
    assert stage0_of_second == [10, 20] and stage1_of_first == [10, 20]  # the same 10 ms on the two GPUs


def test_decode_components_report_the_device_time_and_the_idle_gap_before_each_step():
    """The GPU stage's CUDA-event figures: a step's kernels and the device's idle time before it, spread over steps;
    a stage without them (a CPU) reports none."""
    from cluster.profile import decode_components
    from router.step import MicrobatchSpan, StageResult, StepTrace, TransportTally

    def stage(n: int, device: float | None, gap: float | None) -> StageResult:
        span = (MicrobatchSpan(0, 0.01 * n, 0.01 * n + 0.009, 0.0),)
        return StageResult(0, n, span, 0.0, TransportTally(), 0.0, 0.01 * n, 0.01 * n + 0.01, device, gap)

    gaps = [None, 0.0, 0.0, 0.0002, 0.0, 0.0, 0.0, 0.0, 0.0, 0.001]
    traces = [StepTrace(n, 1, 1, 1, 0.01, 0.01 * n, 0.01 * n + 0.01, (stage(n, 0.009, gaps[n]),)) for n in range(10)]
    found = decode_components(traces, 1)
    assert found["device_ms"] == {"stage0": {"mean": 9.0, "median": 9.0, "p90": 9.0}}
    assert found["device_gap_ms"] == {"stage0": {"mean": 0.133, "median": 0.0, "p90": 1.0}}
    cpu = [StepTrace(n, 1, 1, 1, 0.01, 0.01 * n, 0.01 * n + 0.01, (stage(n, None, None),)) for n in range(3)]
    assert decode_components(cpu, 1)["device_ms"] == {} and decode_components(cpu, 1)["device_gap_ms"] == {}
