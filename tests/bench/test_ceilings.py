"""The decode ceiling of each example placement, against bytes counted by hand for Mixtral 8x7B (bf16), and the
decode figures taken from traced steps: a slow prefill cannot move them, and a figure above the ceiling is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.ceilings import (
    ceiling,
    checked_decode_figures,
    decode_rate,
    refused,
    step_reads,
    traces_from_clock,
    uniform_distinct_experts,
)
from cluster.placement_file import load_placement, validate_against_model
from router.step import StepTrace
from shards.config import PRESETS

EXAMPLES = Path(__file__).resolve().parents[2] / "deploy" / "examples"
MIXTRAL = PRESETS["mixtral-8x7b"]
BW = 4.0e12  # bytes/s
CONTEXT = 1000  # below the 4096-token window: every cached token is read

# Mixtral 8x7B in bf16, counted from its shapes: dim 4096, 32 query heads and 8 KV heads of 128, 14336 hidden,
# 8 experts, vocabulary 32000.
ATTENTION = (4096 * 4096 * 2 + 8 * 128 * 4096 * 2 + 2 * 4096 + 8 * 4096) * 2  # q, o; k, v; two norms; the gate
EXPERT = 3 * 4096 * 14336 * 2
HEAD = (32000 * 4096 + 4096) * 2  # output head and final norm
EMBEDDING_ROW = 4096 * 2
KV_LAYER = 2 * 8 * 128 * CONTEXT * 2  # keys and values of one sequence in one layer


def settled(name: str):
    return validate_against_model(load_placement(EXAMPLES / name), MIXTRAL)


def test_one_gpu_batch_1_reads_two_experts_per_layer_and_everything_else_once():
    reads = step_reads(settled("mistral-7b-1gpu.yaml"), MIXTRAL, 1, CONTEXT, 2.0, 2)
    assert [[r.worker for r in row] for row in reads] == [["stage0"]]
    expected = 32 * ATTENTION + 2 * 32 * EXPERT + HEAD + EMBEDDING_ROW + 32 * KV_LAYER
    assert reads[0][0].total == pytest.approx(expected, rel=1e-12)
    c = ceiling(settled("mistral-7b-1gpu.yaml"), MIXTRAL, 1, CONTEXT, 2.0, BW, 2)
    assert c["ceiling_tokens_per_s"] == pytest.approx(BW / expected, rel=1e-12)


def test_two_stages_run_one_after_the_other_so_their_times_add():
    plan = settled("mixtral-2gpu-stages.yaml")
    reads = step_reads(plan, MIXTRAL, 1, CONTEXT, 2.0, 2)
    first = 16 * ATTENTION + 2 * 16 * EXPERT + EMBEDDING_ROW + 16 * KV_LAYER
    last = 16 * ATTENTION + 2 * 16 * EXPERT + HEAD + 16 * KV_LAYER
    assert [[r.total for r in row] for row in reads] == [
        [pytest.approx(first, rel=1e-12), 0],
        [0, pytest.approx(last, rel=1e-12)],
    ]
    c = ceiling(plan, MIXTRAL, 1, CONTEXT, 2.0, BW, 2)
    assert c["step_ms"] == pytest.approx(1000 * (first + last) / BW, rel=1e-12)
    one_gpu = ceiling(settled("mistral-7b-1gpu.yaml"), MIXTRAL, 1, CONTEXT, 2.0, BW, 2)
    assert c["ceiling_tokens_per_s"] == pytest.approx(one_gpu["ceiling_tokens_per_s"], rel=1e-12)


def test_two_expert_groups_read_in_parallel_and_the_slower_gpu_sets_the_step():
    plan = settled("mixtral-2gpu-experts.yaml")
    reads = step_reads(plan, MIXTRAL, 1, CONTEXT, 2.0, 2)
    # GPU 0: the stage (every layer's attention, embedding, head, cache) and experts 0-3; GPU 1: experts 4-7.
    # Two distinct experts of 8 per layer: each group of 4 reads one in expectation.
    gpu0 = 32 * ATTENTION + EMBEDDING_ROW + HEAD + 32 * KV_LAYER + 32 * EXPERT
    gpu1 = 32 * EXPERT
    assert [(r.worker, r.total) for r in reads[0]] == [
        ("stage0+experts0", pytest.approx(gpu0, rel=1e-12)),
        ("experts1", pytest.approx(gpu1, rel=1e-12)),
    ]
    c = ceiling(plan, MIXTRAL, 1, CONTEXT, 2.0, BW, 2)
    assert c["step_ms"] == pytest.approx(1000 * gpu0 / BW, rel=1e-12)
    assert c["slowest_worker_per_stage"] == ["stage0+experts0"]


def test_expert_halves_read_half_of_every_chosen_expert_on_each_gpu():
    """In expectation the same bytes a GPU as two groups of whole experts (the ceiling takes the mean; whole groups
    lose by their variance: both experts of a token in one group, 3 times in 7 at batch 1)."""
    plan = settled("mixtral-2gpu-expert-halves.yaml")
    reads = step_reads(plan, MIXTRAL, 1, CONTEXT, 2.0, 2)
    gpu0 = 32 * ATTENTION + EMBEDDING_ROW + HEAD + 32 * KV_LAYER + 32 * EXPERT  # 8 experts' halves, 2 of 8 chosen
    assert [(r.worker, r.total) for r in reads[0]] == [
        ("stage0+experts0", pytest.approx(gpu0, rel=1e-12)),
        ("experts1", pytest.approx(32 * EXPERT, rel=1e-12)),
    ]


def test_mixed_placement_sums_each_stages_slowest_gpu():
    plan = settled("mixtral-2gpu-mixed.yaml")
    c = ceiling(plan, MIXTRAL, 32, CONTEXT, 8.0, BW, 2)
    kv32 = 2 * 8 * 128 * CONTEXT * 32 * 2
    half_experts = 16 * 4 * EXPERT  # 16 layers, 4 of the 8 experts every one of 32 tokens reaches
    stage0 = 16 * ATTENTION + 32 * 4096 * 2 + 16 * kv32 + half_experts  # GPU 0 while stage 0 runs
    stage1 = 16 * ATTENTION + HEAD + 16 * kv32 + half_experts  # GPU 1 while stage 1 runs
    assert c["step_ms"] == pytest.approx(1000 * (stage0 + stage1) / BW, rel=1e-12)
    assert c["bytes_per_worker"] == {
        "stage0+experts0": round(stage0 + half_experts),
        "stage1+experts1": round(stage1 + half_experts),
    }


def test_the_window_caps_the_cache_read():
    plan = settled("mistral-7b-1gpu.yaml")
    at_window = step_reads(plan, MIXTRAL, 1, 4096, 2.0, 2)[0][0].kv
    assert step_reads(plan, MIXTRAL, 1, 16384, 2.0, 2)[0][0].kv == at_window == 32 * 2 * 8 * 128 * 4096 * 2


def test_uniform_routing_reaches_two_experts_for_one_token_and_nearly_all_for_many():
    assert uniform_distinct_experts(MIXTRAL, 1) == pytest.approx(2.0)
    assert uniform_distinct_experts(MIXTRAL, 2) == pytest.approx(8 * (1 - 0.75**2))
    assert 7.99 < uniform_distinct_experts(MIXTRAL, 32) < 8.0


def _run(batch: int, decode_seconds: list[float], prefill_seconds: float, first_step: int = 0) -> list[StepTrace]:
    """One generate call's traces: a prefill step of 512-token prompts, then decode steps back to back."""
    traces = [StepTrace(first_step, 512 * batch, batch, 1, prefill_seconds, 0.0, prefill_seconds, ())]
    t = prefill_seconds
    for i, s in enumerate(decode_seconds):
        traces.append(StepTrace(first_step + 1 + i, batch, batch, 1, s, t, t + s, ()))
        t += s + 0.001  # the router's work between steps
    return traces


def test_decode_rate_is_read_from_decode_steps_so_a_slow_prefill_does_not_move_it():
    fast = decode_rate([_run(4, [0.01] * 10, 0.1)], 4)
    slow = decode_rate([_run(4, [0.01] * 10, 5.0)], 4)
    assert fast["tokens_per_s"] == slow["tokens_per_s"] == pytest.approx(400.0)
    assert fast["runs"][0]["steps"] == 10
    assert fast["cadence_tokens_per_s"] == pytest.approx(4 / 0.011)


def test_decode_rate_gives_the_median_of_runs_and_their_spread():
    runs = [_run(2, [0.02] * 5, 0.1, 0), _run(2, [0.01] * 5, 0.1, 10), _run(2, [0.04] * 5, 0.1, 20)]
    rate = decode_rate(runs, 2)
    assert (rate["tokens_per_s"], rate["tokens_per_s_min"], rate["tokens_per_s_max"]) == pytest.approx(
        (100.0, 50.0, 200.0)
    )


def test_steps_of_another_batch_or_with_prefill_beside_decode_are_left_out():
    traces = _run(4, [0.01] * 3, 0.1) + [
        StepTrace(10, 3, 3, 1, 1.0, 1.0, 2.0, ()),  # three sequences left
        StepTrace(11, 70, 4, 1, 1.0, 2.0, 3.0, ()),  # a prefill chunk beside three decode tokens
    ]
    assert decode_rate([traces], 4)["runs"][0]["steps"] == 3
    assert decode_rate([traces], 8)["tokens_per_s"] is None


def test_a_figure_above_its_ceiling_is_refused_and_one_below_is_not():
    errors = refused({"traced": 99.0, "wall_clock": 165.0, "cadence": None}, 100.0)
    assert len(errors) == 1 and "wall_clock" in errors[0] and "1.65x" in errors[0]
    assert refused({"traced": 100.0}, 100.0) == []


def test_one_run_above_the_ceiling_refuses_every_traced_figure_and_says_so(capsys):
    runs = [_run(2, [0.02] * 5, 0.1, 0), _run(2, [0.001] * 5, 0.1, 10)]  # 100 and 2000 tokens/s
    out = checked_decode_figures("two_stages b=2", 2, runs, [0.2, 0.2], 0.1, 6, {"ceiling_tokens_per_s": 500.0})
    assert out["tokens_per_s"] is None and out["tokens_per_s_min"] is None
    assert "run 1 tokens_per_s" in out["error"] and "ours_over_ceiling" not in out
    assert out["wall_tokens_per_s"] == pytest.approx(100.0)  # 2 x 5 / (0.2 - 0.1): below, kept
    assert "!!! two_stages b=2" in capsys.readouterr().out


def test_a_wall_clock_figure_above_the_ceiling_is_refused_alone():
    # A slow 1-token run makes t_n - t_1 small: the old formula reads 1000 tokens/s from 100 tokens/s steps.
    out = checked_decode_figures(
        "one_gpu b=2", 2, [_run(2, [0.02] * 5, 0.1)], [0.11], 0.1, 6, {"ceiling_tokens_per_s": 500.0}
    )
    assert out["wall_tokens_per_s"] is None and "wall_tokens_per_s = 1000.0" in out["error"]
    assert out["tokens_per_s"] == pytest.approx(100.0)
    assert out["ours_over_ceiling"] == pytest.approx(0.2)


def test_clock_readings_after_each_token_become_decode_steps():
    rate = decode_rate([traces_from_clock(4, [0.0, 0.1, 0.3])], 4)
    assert rate["runs"][0]["steps"] == 2
    assert rate["tokens_per_s"] == pytest.approx(4 * 2 / 0.3)


def test_two_stages_with_two_steps_in_flight_can_double_one_gpu():
    """Two groups in flight keep both stages busy: two stages at batch 256 against one GPU at batch 128 read the
    same bytes per group step, and both GPUs work at once, so the ceiling is twice one GPU's (KV and head aside)."""
    stages = ceiling(settled("mixtral-2gpu-stages.yaml"), MIXTRAL, 256, CONTEXT, 8.0, BW, 2, groups=2)
    one_gpu = ceiling(
        settled("mistral-7b-1gpu.yaml"), MIXTRAL, 128, CONTEXT, uniform_distinct_experts(MIXTRAL, 128), BW, 2
    )
    assert stages["ceiling_tokens_per_s"] / one_gpu["ceiling_tokens_per_s"] == pytest.approx(2.0, rel=0.01)
    one_group = ceiling(settled("mixtral-2gpu-stages.yaml"), MIXTRAL, 256, CONTEXT, 8.0, BW, 2)
    assert one_group["ceiling_tokens_per_s"] < stages["ceiling_tokens_per_s"]  # one step at a time: stages take turns


def test_one_gpu_gains_nothing_from_steps_in_flight():
    plan = settled("mistral-7b-1gpu.yaml")
    d = uniform_distinct_experts(MIXTRAL, 64)
    two = ceiling(plan, MIXTRAL, 128, CONTEXT, 8.0, BW, 2, groups=2)["ceiling_tokens_per_s"]
    one = ceiling(plan, MIXTRAL, 64, CONTEXT, d, BW, 2)["ceiling_tokens_per_s"]
    assert two == pytest.approx(one, rel=1e-12)  # the one GPU reads everything twice per cycle


def test_with_steps_in_flight_the_rate_is_the_steady_rate_of_returns():
    # two groups of 2 sequences, overlapping: each step 20 ms, one returning every 10 ms
    traces = [StepTrace(i, 2, 2, 1, 0.02, 0.01 * i, 0.01 * i + 0.02, ()) for i in range(10)]
    rate = decode_rate([traces], 4, groups=2)
    assert rate["tokens_per_s"] == pytest.approx(16 / 0.08)  # steps 2-9: 16 tokens, returned 30 to 110 ms
    assert decode_rate([traces], 4)["tokens_per_s"] is None  # taken as one group: no step of 4 sequences


def test_with_steps_in_flight_the_other_groups_prefill_does_not_count():
    # Group A's first decode step is sent at 0 but waits behind group B's 1 s prefill on the stages; after it the
    # groups return every 10 ms. Counting from its sending would read 2 x 20 / 1.2 s = 33 tokens/s.
    first = StepTrace(0, 2, 2, 1, 1.02, 0.0, 1.02, ())
    rest = [StepTrace(i, 2, 2, 1, 0.02, 1.0 + 0.01 * i, 1.02 + 0.01 * i, ()) for i in range(1, 20)]
    rate = decode_rate([[first, *rest]], 4, groups=2)
    assert rate["tokens_per_s"] == pytest.approx(36 / 0.18)  # steps 2-19 returned from 1.03 to 1.21 s


# Mixtral 8x22B in bf16: dim 6144, 48 query and 8 KV heads of 128, 16384 hidden, 8 experts, vocabulary 32768, 56 layers.
X22 = PRESETS["mixtral-8x22b"]
X22_ATTENTION = (6144 * 6144 * 2 + 8 * 128 * 6144 * 2 + 2 * 6144 + 8 * 6144) * 2
X22_EXPERT = 3 * 6144 * 16384 * 2
X22_HEAD = (32768 * 6144 + 6144) * 2
X22_EMBEDDING_ROW = 6144 * 2
X22_KV_LAYER = 2 * 8 * 128 * CONTEXT * 2  # no window: every cached token is read at any context


def settled_8x22b(name: str):
    return validate_against_model(load_placement(EXAMPLES / name), X22)


def test_four_stages_of_8x22b_read_the_whole_model_one_stage_after_the_other():
    c = ceiling(settled_8x22b("mixtral-8x22b-4gpu-stages.yaml"), X22, 1, CONTEXT, 2.0, BW, 2)
    whole = 56 * (X22_ATTENTION + 2 * X22_EXPERT + X22_KV_LAYER) + X22_EMBEDDING_ROW + X22_HEAD
    assert c["step_ms"] == pytest.approx(1000 * whole / BW, rel=1e-12)
    assert c["groups"] == 1 and len(c["stage_ms"]) == 4


def test_four_expert_groups_of_8x22b_read_in_parallel_and_gpu_0_sets_the_step():
    plan = settled_8x22b("mixtral-8x22b-4gpu-experts.yaml")
    reads = step_reads(plan, X22, 1, CONTEXT, 2.0, 2)
    # Two distinct experts of 8 per layer: each group of 2 reads half an expert a layer in expectation.
    gpu0 = 56 * (X22_ATTENTION + X22_KV_LAYER + X22_EXPERT / 2) + X22_EMBEDDING_ROW + X22_HEAD
    others = 56 * X22_EXPERT / 2
    assert [(r.worker, r.total) for r in reads[0]] == [
        ("stage0+experts0", pytest.approx(gpu0, rel=1e-12)),
        ("experts1", pytest.approx(others, rel=1e-12)),
        ("experts2", pytest.approx(others, rel=1e-12)),
        ("experts3", pytest.approx(others, rel=1e-12)),
    ]
    assert ceiling(plan, X22, 1, CONTEXT, 2.0, BW, 2)["step_ms"] == pytest.approx(1000 * gpu0 / BW, rel=1e-12)


def test_two_by_two_of_8x22b_sums_each_stages_slowest_gpu_with_two_steps_in_flight():
    plan = settled_8x22b("mixtral-8x22b-4gpu-mixed.yaml")
    # 32 sequences as 2 steps of 16: a step's 16 tokens reach 8 x (1 - (6/8)^16) distinct experts a layer.
    distinct = 8 * (1 - 0.75**16)
    kv16 = 16 * X22_KV_LAYER
    half = 28 * 4 * X22_EXPERT * distinct / 8  # 28 layers, 4 of their 8 experts
    stage0 = 28 * (X22_ATTENTION + kv16) + 16 * X22_EMBEDDING_ROW + half  # GPU 0; GPU 2 reads `half` meanwhile
    stage1 = 28 * (X22_ATTENTION + kv16) + X22_HEAD + half
    c = ceiling(plan, X22, 32, CONTEXT, 8.0, BW, 2, groups=2)
    assert c["bytes_per_worker"] == {
        "stage0+experts0": round(stage0),
        "stage1+experts1": round(stage1),
        "experts2": round(half),
        "experts3": round(half),
    }
    # A cycle: each step crosses both stages (stage0 + stage1), and GPU 1 reads its share once per step (2 x stage1).
    assert c["step_ms"] == pytest.approx(1000 * max(stage0 + stage1, 2 * stage1) / BW, rel=1e-12)


def test_the_steady_rate_counts_the_routers_work_between_steps_for_one_step_at_a_time():
    # one step in flight: each step 10 ms, 5 ms of router work before the next is sent
    traces = [StepTrace(i, 4, 4, 1, 0.01, 0.015 * i, 0.015 * i + 0.01, ()) for i in range(11)]
    rate = decode_rate([traces], 4)
    assert rate["tokens_per_s"] == pytest.approx(4 / 0.01)  # the steps' own seconds
    assert rate["steady_tokens_per_s"] == pytest.approx(40 / 0.15)  # 10 steps returned over 150 ms


def test_decode_ahead_reads_the_steady_rate_of_one_group_with_two_steps_in_flight():
    """Decode ahead: every step carries all 4 sequences, two in flight, each step's 20 ms including 10 ms of waiting
    behind the one before: the device returns a step every 10 ms, 400 tokens/s, not the 200 the summed seconds say."""
    traces = [StepTrace(i, 4, 4, 1, 0.02, 0.01 * i, 0.01 * i + 0.02, ()) for i in range(10)]
    ahead = decode_rate([traces], 4, groups=1, in_flight=2)
    assert ahead["tokens_per_s"] == pytest.approx(4 * 8 / 0.08)  # steps 2-9 returned from 30 to 110 ms
    assert decode_rate([traces], 4)["tokens_per_s"] == pytest.approx(200.0)  # what one step at a time would read
