"""Greedy rows chosen on the last stage, through the step link's result message, give exactly what sampling them from
the logits on the router gives; scored rows (an echoed prompt's) give what scoring their logits on the router gives;
and a plan survives the wire unchanged."""

from __future__ import annotations

import copy

import pytest
import torch

from cluster.stage_runner import StageRunner, pick_tokens
from cluster.step_wire import decode_plan, decode_result, encode_plan
from router.pipeline import split_microbatches
from router.sampling import SamplingParams
from router.scheduler import Scheduler, SchedulerConfig
from router.step import PromptScores, StepOutput
from shards.model import score_logits

PARAMS = [
    SamplingParams(max_tokens=8),
    SamplingParams(max_tokens=8, temperature=0.7, seed=3),
    SamplingParams(max_tokens=8, logprobs=2),
    SamplingParams(max_tokens=8),
    SamplingParams(max_tokens=8, logprobs=0),
    SamplingParams(max_tokens=8, prompt_logprobs=2),  # an echo: its prompt's rows are scored
    SamplingParams(max_tokens=8, temperature=0.5, seed=1, logprobs=1, prompt_logprobs=4),
]
VOCAB = 1000


def scheduled():
    scheduler = Scheduler(SchedulerConfig(max_seqs=8, token_budget=64, chunk_size=16), max_seq_len=256, eos_id=2)
    for i, p in enumerate(PARAMS):
        scheduler.add([1, 5 + i, 9], p)
    return scheduler, scheduler.schedule()


def last_stage(plan, logits, microbatch):
    """What the last stage sends for `plan`, cut into micro-batches, given every token row's logits."""
    parts = []
    for mb, start in zip(split_microbatches(plan, microbatch), microbatch_starts(plan, microbatch), strict=True):
        rows = torch.tensor(mb.logit_rows()) + start
        scored = torch.tensor(mb.score_rows(), dtype=torch.long) + start
        picks = pick_tokens(logits[rows], mb.greedy_logit_rows())
        parts.append((*picks, *score_logits(logits[scored], torch.as_tensor(mb.score_targets), mb.score_k)))
    return StageRunner._join_picks(parts).numpy()


def microbatch_starts(plan, microbatch):
    """The packed-row index each micro-batch starts at."""
    ends = [sum(plan.lengths[: i + microbatch]) for i in range(0, len(plan.lengths), microbatch)]
    return [0, *ends[:-1]]


@pytest.mark.parametrize("microbatch", [1, 2, 7])
def test_tokens_and_logprobs_match_sampling_every_row_on_the_router(microbatch):
    scheduler, step = scheduled()
    # temperature 0 and no alternatives asked (logprobs=0 reports only the chosen token's, which the stage gives)
    assert step.plan.greedy == (True, False, False, True, True, True, False)
    assert step.plan.scored == (False,) * 5 + (True, True) and step.plan.score_k == 4
    logits = torch.randn(step.plan.n_tokens, VOCAB, generator=torch.Generator().manual_seed(7)).bfloat16()
    reference, reference_step = copy.deepcopy((scheduler, step))  # the same sequences, apart
    out = decode_result(last_stage(step.plan, logits, microbatch), step.plan, VOCAB)
    assert out.logits.shape == (3, VOCAB) and out.logits.dtype == torch.float32  # only the sampled rows
    assert len(out.scores) == 4  # two prompts of three tokens: two rows each (the last row wants a token)
    ours = scheduler.process(step, out)
    rows, scored = reference_step.plan.logit_rows(), reference_step.plan.score_rows()
    targets = torch.as_tensor(reference_step.plan.score_targets)
    whole = PromptScores(*score_logits(logits[scored], targets, 4))
    theirs = reference.process(reference_step, StepOutput.from_logits(logits[rows], whole))
    for a, b in zip(ours, theirs, strict=True):
        assert a.output_ids == b.output_ids
        assert a.output_top_logprobs == b.output_top_logprobs
        assert a.output_logprobs == pytest.approx(b.output_logprobs, rel=1e-6)
        assert a.prompt_logprobs == b.prompt_logprobs and a.prompt_top_logprobs == b.prompt_top_logprobs
    assert [len(s.prompt_top_logprobs[0]) for s in ours[5:]] == [2, 4]  # each keeps the alternatives it asked for
    assert reference_step.plan.score_rows() == [15, 16, 18, 19]  # the two prompts' first two rows
    expected = torch.log_softmax(logits[[15, 16]].float(), -1)[[0, 1], [10, 9]]  # `1 10 9`: next tokens 10, 9
    assert ours[5].prompt_logprobs == pytest.approx(expected.tolist(), rel=1e-6)


def test_a_plan_crosses_the_wire_unchanged():
    _, step = scheduled()
    for plan in (step.plan, step.plan.without_tokens()):
        wire = decode_plan(encode_plan(41, plan, 3))
        assert (wire.step, wire.micro_batch_size) == (41, 3)
        assert wire.plan.slots == plan.slots and wire.plan.starts == plan.starts and wire.plan.lengths == plan.lengths
        assert wire.plan.wants() == plan.wants() and wire.plan.greedy == plan.greedy
        assert wire.plan.scored == plan.scored and wire.plan.score_k == plan.score_k == 4
        assert wire.plan.score_targets.tolist() == plan.score_targets.tolist() == [10, 9, 11, 9]
        if plan.token_ids is None:
            assert wire.plan.token_ids is None
        else:
            expected = [1, 5, 9, 1, 6, 9, 1, 7, 9, 1, 8, 9, 1, 9, 9, 1, 10, 9, 1, 11, 9]  # as `scheduled` added them
            assert wire.plan.token_ids.tolist() == plan.token_ids.tolist() == expected


def test_a_truncated_plan_message_is_refused():
    _, step = scheduled()
    with pytest.raises(ValueError, match="does not hold 7 sequences and 21 tokens and 4 score targets"):
        decode_plan(encode_plan(0, step.plan, 1)[:-1])


def test_the_expert_message_unpacks_to_an_aligned_copy_of_the_activations():
    """A view of the packed rows (stride dim + 2k) sent cuBLAS to an align-2 GEMM on an H200 (361 against 233 us at
    32 tokens): the activations come out contiguous, with the ids and weights exact."""
    from cluster.stage_runner import pack_for_experts, unpack_for_experts

    x = torch.randn(5, 64, dtype=torch.bfloat16)
    ids = torch.tensor([[0, 7], [3, 1], [2, 2], [6, 5], [4, 0]])
    weights = torch.rand(5, 2).to(torch.bfloat16)
    got_x, got_ids, got_weights = unpack_for_experts(pack_for_experts(x, ids, weights), 64, 2)
    assert got_x.is_contiguous() and torch.equal(got_x, x)
    assert got_ids.dtype == torch.long and torch.equal(got_ids, ids)
    assert torch.equal(got_weights, weights)
