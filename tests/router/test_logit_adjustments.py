"""Penalties, logit bias and min-p against independent references: transformers' own logits processors where it
has one (repetition penalty, the temperature/top-k/top-p/min-p warpers), OpenAI's documented formula in numpy where
it has none (frequency and presence penalties), and a greedy loop over transformers' model on the same weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from router.generation import generate
from router.sampling import Sampler, SamplingParams, adjusted_logits
from router.scheduler import Scheduler, SchedulerConfig
from router.step import StepOutput
from shards.engine import LocalEngine
from tests.conftest import random_prompts

VOCAB = 1000


def random_logits(seed: int) -> torch.Tensor:
    return torch.randn(VOCAB, generator=torch.Generator().manual_seed(seed)) * 4


def test_repetition_penalty_matches_transformers():
    prompt, output = [5, 7, 7, 900], [7, 12, 5, 5]
    for r in (0.5, 1.3, 2.0):
        logits = random_logits(1)
        ours = adjusted_logits(logits, SamplingParams(repetition_penalty=r), prompt, output)
        theirs = RepetitionPenaltyLogitsProcessor(penalty=r)(torch.tensor([prompt + output]), logits[None].clone())[0]
        torch.testing.assert_close(ours, theirs)


def test_frequency_presence_and_bias_follow_openais_formula():
    output = [3, 3, 3, 9, 40, 9]
    params = SamplingParams(frequency_penalty=0.7, presence_penalty=-1.1, logit_bias=((3, 5.0), (999, -100.0)))
    logits = random_logits(2)
    expected = logits.numpy().astype(np.float64).copy()
    counts = np.bincount(np.array(output), minlength=VOCAB)
    expected += np.where(np.arange(VOCAB) == 3, 5.0, 0.0) + np.where(np.arange(VOCAB) == 999, -100.0, 0.0)
    expected -= 0.7 * counts + -1.1 * (counts > 0)
    ours = adjusted_logits(logits, params, prompt_ids=[3, 3, 50], output_ids=output)  # the prompt does not count
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize(
    "temperature, top_k, top_p, min_p",
    [(1.0, 0, 1.0, 0.05), (0.7, 50, 1.0, 0.1), (1.3, 0, 0.9, 0.02), (0.5, 20, 0.8, 0.3), (1.0, 0, 1.0, 1.0)],
)
def test_the_sampled_distribution_matches_transformers_warpers(temperature, top_k, top_p, min_p):
    logits = random_logits(3).double()
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    warpers = [TemperatureLogitsWarper(temperature)]
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1:
        warpers.append(TopPLogitsWarper(top_p))
    warpers.append(MinPLogitsWarper(min_p))
    theirs = torch.softmax(
        LogitsProcessorList(warpers)(torch.zeros(1, 1, dtype=torch.long), logits[None].clone())[0], -1
    )
    ours = Sampler(params).distribution(logits)
    torch.testing.assert_close(ours, theirs.double(), rtol=1e-9, atol=1e-12)
    assert int((ours > 0).sum()) >= 1


def test_requests_that_adjust_logits_are_not_picked_on_the_stage():
    scheduler = Scheduler(SchedulerConfig(max_seqs=4).settled(64), 64, eos_id=2)
    for params in (
        SamplingParams(temperature=0),
        SamplingParams(temperature=0, frequency_penalty=1.0),
        SamplingParams(temperature=0, repetition_penalty=1.2),
        SamplingParams(temperature=0, logit_bias=((5, 1.0),)),
    ):
        scheduler.add([1, 2, 3], params)
    step = scheduler.schedule()
    assert step.plan.greedy == (True, False, False, False)


def test_a_biased_token_wins_even_at_temperature_0():
    scheduler = Scheduler(SchedulerConfig(max_seqs=1).settled(64), 64, eos_id=2)
    seq = scheduler.add([1, 2, 3], SamplingParams(temperature=0, max_tokens=1, logit_bias=((77, 100.0),)))
    step = scheduler.schedule()
    scheduler.process(step, StepOutput(random_logits(4)[None], greedy=(False,)))
    assert seq.output_ids == [77]


def test_penalised_greedy_generation_matches_a_loop_over_transformers(checkpoint_factory, hf_model):
    """Token for token against transformers' model on the same weights, with the penalties applied in the loop by
    transformers' repetition processor and numpy's frequency/presence formula."""
    checkpoint = checkpoint_factory("mixtral", seed=11)
    engine = LocalEngine(checkpoint, max_seqs=4)
    model = hf_model(checkpoint)
    prompts = random_prompts([5, 9], seed=12)
    params = SamplingParams(
        max_tokens=12,
        temperature=0,
        ignore_eos=True,
        repetition_penalty=1.5,
        frequency_penalty=0.8,
        presence_penalty=0.3,
        logit_bias=((100, 3.0),),
    )
    ours = generate(engine, prompts, params)
    for prompt, completion in zip(prompts, ours, strict=True):
        tokens = list(prompt)
        for _ in range(params.max_tokens):
            with torch.no_grad():
                logits = model(torch.tensor([tokens])).logits[0, -1].double()
            logits[100] += 3.0  # the bias first, then the penalties: vLLM's order
            logits = RepetitionPenaltyLogitsProcessor(1.5)(torch.tensor([tokens]), logits[None])[0]
            out = np.array(tokens[len(prompt) :], dtype=np.int64)
            counts = torch.from_numpy(np.bincount(out, minlength=logits.numel())).double()
            logits = logits - 0.8 * counts - 0.3 * (counts > 0).double()
            tokens.append(int(logits.argmax()))
        assert completion.token_ids == tokens[len(prompt) :]


def test_a_repetition_penalty_near_zero_still_samples_a_token():
    """Fuzzing found it: repetition_penalty 5e-324 turned the seen tokens' positive logits into inf, and sampling
    into inf - inf. The seen tokens with positive logits must win, among themselves, by chance."""
    logits = random_logits(5)
    seen = [int(i) for i in torch.topk(logits, 3).indices]  # positive logits, all three
    params = SamplingParams(temperature=1.0, repetition_penalty=5e-324, seed=1)
    adjusted = adjusted_logits(logits, params, seen, [])
    assert torch.isfinite(adjusted[seen]).all()
    draws = {Sampler(params).sample(logits, i, seen, [])[0] for i in range(40)}
    assert draws <= set(seen) and len(draws) > 1
