"""A prompt's own log-probabilities (an echo with logprobs, what lm-eval's loglikelihood reads), scored chunk by chunk
on the last stage: each prompt token's log-probability equals transformers' log-softmax at the position before it,
across chunk boundaries and window rolls, in a batch, and through a lost cache or a resumed request."""

from __future__ import annotations

import asyncio

import pytest
import torch

from router.engine_loop import EngineLoop
from router.generation import generate
from router.sampling import SamplingParams
from router.scheduler import Scheduler, SchedulerConfig
from router.step import PromptScores, StepOutput
from shards.engine import LocalEngine
from tests.conftest import random_prompts

WINDOW = 16
CHUNK = 7  # smaller than the window and than most prompts: scores cross chunk boundaries
LENGTHS = [3 * WINDOW + 5, 5, 2 * CHUNK + 1, 1, CHUNK]
TOP = [1, 3, 0, 2, 5]  # alternatives per prompt: the plan carries the most, each sequence keeps its own


@pytest.fixture(scope="module")
def checkpoint(checkpoint_factory):
    return checkpoint_factory("mixtral", seed=71, window=WINDOW)


@pytest.fixture(scope="module")
def engine(checkpoint):
    return LocalEngine(checkpoint, max_seqs=len(LENGTHS))


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(LENGTHS, seed=81)


@pytest.fixture(scope="module")
def reference(checkpoint, hf_model, prompts):
    """transformers' log-softmax at every position of each prompt, in float64 from its float32 logits."""
    with torch.no_grad():
        return [torch.log_softmax(hf_model(checkpoint)(torch.tensor([p])).logits[0].double(), -1) for p in prompts]


def scheduling(token_budget: int = 3 * CHUNK) -> SchedulerConfig:
    return SchedulerConfig(max_seqs=len(LENGTHS), token_budget=token_budget, chunk_size=CHUNK)


def execute_with(engine):
    async def execute(plan):
        logits, scores = engine.run(plan)
        return StepOutput.from_logits(logits, None if scores is None else PromptScores(*scores))

    return execute


def assert_matches_reference(prompt, ref, logprobs, tops, k):
    """Position i's score is the log-probability of token i + 1 at position i; its alternatives are the k best."""
    assert len(logprobs) == len(tops) == len(prompt) - 1
    expected = ref[:-1].gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
    assert torch.tensor(logprobs, dtype=torch.float64) == pytest.approx(expected, abs=1e-4)
    values, ids = ref[:-1].topk(k, dim=-1)
    for i, top in enumerate(tops):
        assert len(top) == k
        assert [v for _, v in top] == pytest.approx(values[i].tolist(), abs=1e-4)
        assert {t for t, _ in top} == set(ids[i].tolist())  # ties of random weights could swap the order, not the set


def test_prompt_logprobs_equal_transformers_across_chunks_in_a_batch(engine, prompts, reference):
    params = [SamplingParams(max_tokens=2, ignore_eos=True, prompt_logprobs=k) for k in TOP]
    results = generate(engine, prompts, params, scheduling())
    for prompt, ref, result, k in zip(prompts, reference, results, TOP, strict=True):
        assert_matches_reference(prompt, ref, result.prompt_logprobs, result.prompt_top_logprobs, k)
    plain = generate(engine, prompts, SamplingParams(max_tokens=2, ignore_eos=True), scheduling())
    assert [r.token_ids for r in results] == [r.token_ids for r in plain]  # scoring changes no token
    assert all(r.prompt_logprobs == [] for r in plain)


def test_the_plan_scores_each_prompt_row_once_with_the_next_token_as_target(prompts):
    """Every chunk's scored rows and their targets: the token after each, the last row of a chunk that ends inside
    the prompt the next chunk's first token; the prompt's last row (it wants logits) is not scored."""
    scheduler = Scheduler(scheduling().settled(WINDOW), 256, eos_id=2)
    seqs = [
        scheduler.add(p, SamplingParams(max_tokens=1, prompt_logprobs=k)) for p, k in zip(prompts, TOP, strict=True)
    ]
    top = {s.seq_id: k for s, k in zip(seqs, TOP, strict=True)}
    targets: dict[int, list[int]] = {s.seq_id: [] for s in seqs}
    while (step := scheduler.schedule()) is not None:  # no token comes back: each sequence stops at its prompt's end
        plan, at = step.plan, 0
        assert plan.score_k == max(top[s.seq_id] for s in step.sequences)
        for seq, n in zip(step.sequences, plan.scored_lengths(), strict=True):
            targets[seq.seq_id] += plan.score_targets[at : at + n].tolist()
            at += n
    assert [targets[s.seq_id] for s in seqs] == [p[1:] for p in prompts]


def test_a_lost_cache_mid_prompt_scores_it_again_from_the_start(engine, prompts, reference):
    """The shards lose their caches after the first of a prompt's three chunks: it is prefilled and scored again
    from its first token, and the scores are those of an uninterrupted run."""
    prompt, ref = prompts[2], reference[2]
    scheduler = Scheduler(scheduling(token_budget=CHUNK).settled(engine.cache_capacity), engine.max_seq_len, 2)
    seq = scheduler.add(prompt, SamplingParams(max_tokens=1, prompt_logprobs=2))
    execute = execute_with(engine)
    step = scheduler.schedule()
    scheduler.process(step, asyncio.run(execute(step.plan)))
    assert len(seq.prompt_logprobs) == CHUNK
    scheduler.forget_caches()
    assert seq.prompt_logprobs == [] and seq.cached == 0
    while not seq.finished:
        step = scheduler.schedule()
        scheduler.process(step, asyncio.run(execute(step.plan)))
    assert_matches_reference(prompt, ref, seq.prompt_logprobs, seq.prompt_top_logprobs, 2)


def test_a_resumed_request_does_not_score_its_prompt_again(prompts):
    """A request resumed with the tokens it already emitted had its prompt's scores go out with its first token."""
    scheduler = Scheduler(scheduling().settled(WINDOW), 256, eos_id=2)
    scheduler.add(prompts[0], SamplingParams(max_tokens=4, prompt_logprobs=1), output_ids=[5, 6])
    steps = 0
    while (step := scheduler.schedule()) is not None:
        assert step.plan.scored is None and step.plan.score_targets is None and step.plan.score_k == 0
        steps += 1
    assert steps == -(-(len(prompts[0]) + 2) // CHUNK)  # prompt and output prefilled again, unscored


def test_the_first_token_event_carries_the_prompt_scores(engine, prompts, reference):
    """Served through the live loop with two steps in flight: the scores come once, with the first token."""

    async def main():
        config = scheduling().settled(engine.cache_capacity)
        scheduler = Scheduler(config, engine.max_seq_len, engine.config.eos_token_id)
        loop = EngineLoop(execute_with(engine), scheduler, engine.config.vocab_size, steps_in_flight=2)
        params = SamplingParams(max_tokens=3, ignore_eos=True, prompt_logprobs=3)
        return await asyncio.gather(*(loop.generate(p, params) for p in prompts[:3]))

    for prompt, ref, events in zip(prompts, reference, asyncio.run(main()), strict=False):
        first, *rest = events
        assert_matches_reference(prompt, ref, first.prompt_logprobs, first.prompt_top_logprobs, 3)
        assert len(rest) == 2 and all(e.prompt_logprobs is None for e in rest)
