"""Greedy rows chosen on the last stage, through the step link's result message, give exactly what sampling them from
the logits on the router gives; and a plan survives the wire unchanged."""

from __future__ import annotations

import copy

import pytest
import torch

from cluster.stage_runner import StageRunner, pick_tokens
from cluster.step_wire import decode_plan, decode_result, encode_plan
from router.pipeline import split_microbatches
from router.sampling import SamplingParams
from router.scheduler import Scheduler, SchedulerConfig
from router.step import StepOutput

PARAMS = [
    SamplingParams(max_tokens=8),
    SamplingParams(max_tokens=8, temperature=0.7, seed=3),
    SamplingParams(max_tokens=8, logprobs=2),
    SamplingParams(max_tokens=8),
    SamplingParams(max_tokens=8, logprobs=0),
]


def scheduled():
    scheduler = Scheduler(SchedulerConfig(max_seqs=8, token_budget=64, chunk_size=16), max_seq_len=256, eos_id=2)
    for i, p in enumerate(PARAMS):
        scheduler.add([1, 5 + i, 9], p)
    return scheduler, scheduler.schedule()


@pytest.mark.parametrize("microbatch", [1, 2, 5])
def test_tokens_and_logprobs_match_sampling_every_row_on_the_router(microbatch):
    scheduler, step = scheduled()
    # temperature 0 and no alternatives asked (logprobs=0 reports only the chosen token's, which the stage gives)
    assert step.plan.greedy == (True, False, False, True, True)
    logits = torch.randn(len(PARAMS), 1000, generator=torch.Generator().manual_seed(7)).bfloat16()
    reference, reference_step = copy.deepcopy((scheduler, step))  # the same sequences, apart
    parts, row = [], 0
    for mb in split_microbatches(step.plan, microbatch):
        n = sum(mb.want_logits)
        parts.append(pick_tokens(logits[row : row + n], mb.greedy_logit_rows()))
        row += n
    message = StageRunner._join_picks(parts).numpy()
    out = decode_result(message, step.plan, 1000)
    assert out.logits.shape == (2, 1000) and out.logits.dtype == torch.float32  # only the sampled rows
    ours = scheduler.process(step, out)
    theirs = reference.process(reference_step, StepOutput.from_logits(logits))
    for a, b in zip(ours, theirs, strict=True):
        assert a.output_ids == b.output_ids
        assert a.output_top_logprobs == b.output_top_logprobs
        assert a.output_logprobs == pytest.approx(b.output_logprobs, rel=1e-6)


def test_a_plan_crosses_the_wire_unchanged():
    _, step = scheduled()
    for plan in (step.plan, step.plan.without_tokens()):
        wire = decode_plan(encode_plan(41, plan, 3))
        assert (wire.step, wire.micro_batch_size) == (41, 3)
        assert wire.plan.slots == plan.slots and wire.plan.starts == plan.starts and wire.plan.lengths == plan.lengths
        assert wire.plan.wants() == plan.wants() and wire.plan.greedy == plan.greedy
        if plan.token_ids is None:
            assert wire.plan.token_ids is None
        else:
            expected = [1, 5, 9, 1, 6, 9, 1, 7, 9, 1, 8, 9, 1, 9, 9]  # the five prompts, as `scheduled` added them
            assert wire.plan.token_ids.tolist() == plan.token_ids.tolist() == expected


def test_a_truncated_plan_message_is_refused():
    _, step = scheduled()
    with pytest.raises(ValueError, match="does not hold 5 sequences and 15 tokens"):
        decode_plan(encode_plan(0, step.plan, 1)[:-1])
