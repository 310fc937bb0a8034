"""Offline generation: run a list of prompts to completion through any executor (one process or the cluster)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from router.sampling import SamplingParams
from router.scheduler import Scheduler
from shards.config import ModelConfig
from shards.kv_cache import StepBatch


class RequestError(ValueError):
    """A request the user sent cannot run; the message names the offending value."""


class Executor(Protocol):
    config: ModelConfig
    max_seqs: int
    max_seq_len: int
    cache_capacity: int

    def step(self, batch: StepBatch) -> torch.Tensor: ...


@dataclass
class Completion:
    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str


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


def default_chunk_size(executor: Executor) -> int:
    """Prefill chunks never exceed the window, so attention per chunk is bounded by 2 x window keys."""
    return min(executor.cache_capacity, 512)


def generate(
    executor: Executor,
    prompts: list[list[int]],
    params: SamplingParams | list[SamplingParams],
    chunk_size: int | None = None,
    token_budget: int | None = None,
) -> list[Completion]:
    """Complete every prompt; all of them run together as one continuously batched workload."""
    per_prompt = params if isinstance(params, list) else [params] * len(prompts)
    for i, (ids, p) in enumerate(zip(prompts, per_prompt)):
        check_prompt(ids, p, executor.max_seq_len, executor.config.vocab_size, i)
    chunk = min(chunk_size or default_chunk_size(executor), executor.cache_capacity)
    scheduler = Scheduler(
        max_seqs=executor.max_seqs,
        token_budget=token_budget or max(chunk, 2048),
        chunk_size=chunk,
        max_seq_len=executor.max_seq_len,
        eos_id=executor.config.eos_token_id,
    )
    seqs = [scheduler.add(ids, p) for ids, p in zip(prompts, per_prompt)]
    while scheduler.has_work():
        step = scheduler.schedule()
        if step is None:
            raise RuntimeError("scheduler has work but scheduled nothing")
        scheduler.process(step, executor.step(step.batch))
    return [Completion(s.prompt_ids, s.output_ids, s.output_logprobs, s.finish_reason or "length") for s in seqs]
