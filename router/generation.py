"""Offline generation: run a list of prompts to completion through any executor (one process or the cluster)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Protocol

import torch

from router.engine_core import EngineCore
from router.sampling import SamplingParams
from router.scheduler import Scheduler, SchedulerConfig, Sequence
from router.step import PromptScores, StepOutput, StepPlan
from router.structured_output import grammars_for
from shards.config import ModelConfig


class RequestError(ValueError):
    """A request the user sent cannot run; the message names the offending value."""


class Executor(Protocol):
    """A model in one process (`shards.engine.LocalEngine`): every wanting row's logits, in plan order, and the
    scored rows' scores (target log-probabilities, top ids, top log-probabilities) when the plan has any."""

    config: ModelConfig
    max_seqs: int
    max_seq_len: int
    cache_capacity: int

    def run(self, plan: StepPlan) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]: ...


@dataclass(frozen=True)
class Completion:
    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    # With `SamplingParams.prompt_logprobs`: prompt tokens 1.. (the first has none), and the top alternatives at each.
    prompt_logprobs: list[float] = field(default_factory=list)
    prompt_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)

    @staticmethod
    def of(seq: Sequence) -> Completion:
        """A finished sequence's result (one that ended with an error raises it: there is no completion)."""
        if seq.error is not None:
            raise RuntimeError(seq.error)
        return Completion(
            seq.prompt_ids,
            seq.output_ids,
            seq.output_logprobs,
            seq.finish_reason or "length",
            seq.prompt_logprobs,
            seq.prompt_top_logprobs,
        )


def check_prompt(
    prompt_ids: list[int], params: SamplingParams, max_seq_len: int, vocab_size: int, index: int = 0
) -> None:
    where = f"prompt {index}"
    if not prompt_ids:
        raise RequestError(f"{where} is empty")
    bad = [t for t in prompt_ids if not 0 <= t < vocab_size]
    if bad:
        raise RequestError(f"{where} has token id {bad[0]} outside the vocabulary (0..{vocab_size - 1})")
    try:
        params.validate()
    except ValueError as e:
        raise RequestError(str(e)) from None
    if len(prompt_ids) + params.max_tokens > max_seq_len:
        raise RequestError(
            f"{where} has {len(prompt_ids)} tokens; with max_tokens {params.max_tokens} that is "
            f"{len(prompt_ids) + params.max_tokens}, over the model's maximum context of {max_seq_len} tokens"
        )


def generate(
    executor: Executor,
    prompts: list[list[int]],
    params: SamplingParams | list[SamplingParams],
    scheduling: SchedulerConfig | None = None,
    tokenizer_path: str | None = None,
) -> list[Completion]:
    """Complete every prompt; all of them run together as one continuously batched workload, through the same
    `EngineCore` step the served loop runs. `scheduling` defaults to `SchedulerConfig` with the executor's slots;
    `tokenizer_path` (the checkpoint's `tokenizer.model`) is needed only by requests with structured output."""
    per_prompt = params if isinstance(params, list) else [params] * len(prompts)
    for i, (ids, p) in enumerate(zip(prompts, per_prompt, strict=True)):
        check_prompt(ids, p, executor.max_seq_len, executor.config.vocab_size, i)
    config = (scheduling or SchedulerConfig(max_seqs=executor.max_seqs)).settled(executor.cache_capacity)
    grammars = (lambda: grammars_for(tokenizer_path)) if tokenizer_path else None
    scheduler = Scheduler(config, executor.max_seq_len, executor.config.eos_token_id, grammars)

    async def execute(plan: StepPlan) -> StepOutput:
        logits, scores = executor.run(plan)
        return StepOutput.from_logits(logits, None if scores is None else PromptScores(*scores))

    core = EngineCore(scheduler, execute)
    seqs = [scheduler.add(ids, p) for ids, p in zip(prompts, per_prompt, strict=True)]
    asyncio.run(core.run_until_done())
    return [Completion.of(s) for s in seqs]
