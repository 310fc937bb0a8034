"""Which sequences run in the next step, and how many of their tokens: continuous batching under a token budget.

Every sequence keeps all its tokens (prompt + generated) and how many of them the KV cache already holds. A step
feeds each running sequence the next run of tokens the cache lacks: one token once it is decoding, a chunk of at
most `chunk_size` while its prompt is still being prefilled. Decode tokens go first so a long prompt cannot stall
the others; the rest of the budget goes to prefill chunks.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

import torch

from router.pipeline import StepOutput
from router.sampling import Sampler, SamplingParams
from shards.kv_cache import StepBatch


@dataclass
class Sequence:
    seq_id: int
    prompt_ids: list[int]
    params: SamplingParams
    sampler: Sampler = field(init=False)
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    output_top_logprobs: list[list[tuple[int, float]] | None] = field(default_factory=list)
    slot: int | None = None
    cached: int = 0  # tokens whose keys/values are in the cache
    finish_reason: str | None = None  # "stop" or "length" once finished
    error: str | None = None  # why it ended with finish_reason "error" (its sampler failed)

    def __post_init__(self) -> None:
        self.sampler = Sampler(self.params)

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def pending(self) -> int:
        """Tokens not yet in the cache: the prompt's remainder, or the one just sampled."""
        return len(self.prompt_ids) + len(self.output_ids) - self.cached

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class SlotPool:
    """Cache slots: one per running sequence, handed back when it ends."""

    def __init__(self, n: int) -> None:
        self.free = list(range(n - 1, -1, -1))
        self.n = n

    def take(self) -> int | None:
        return self.free.pop() if self.free else None

    def give(self, slot: int) -> None:
        self.free.append(slot)

    @property
    def in_use(self) -> int:
        return self.n - len(self.free)


@dataclass
class ScheduledStep:
    batch: StepBatch
    sequences: list[Sequence]


class Scheduler:
    def __init__(self, max_seqs: int, token_budget: int, chunk_size: int, max_seq_len: int, eos_id: int) -> None:
        if chunk_size < 1 or token_budget < 1:
            raise ValueError(f"chunk_size ({chunk_size}) and token_budget ({token_budget}) must be positive")
        self.slots = SlotPool(max_seqs)
        self.token_budget = token_budget
        self.chunk_size = chunk_size
        self.max_seq_len = max_seq_len
        self.eos_id = eos_id
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._ids = itertools.count()

    def add(self, prompt_ids: list[int], params: SamplingParams, output_ids: list[int] | None = None) -> Sequence:
        """Queue a request; `output_ids` resumes one that already emitted those tokens (its cache is rebuilt by
        prefilling prompt + output, then it goes on from the next token)."""
        seq = Sequence(next(self._ids), list(prompt_ids), params)
        seq.output_ids = list(output_ids or [])
        seq.output_logprobs = [0.0] * len(seq.output_ids)
        seq.output_top_logprobs = [None] * len(seq.output_ids)
        self.waiting.append(seq)
        return seq

    def forget_caches(self) -> None:
        """The shards lost their KV caches: every running sequence prefills prompt + output again, keeping its slot."""
        for seq in self.running:
            seq.cached = 0

    @property
    def slots_in_use(self) -> int:
        return self.slots.in_use

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledStep | None:
        while self.waiting and self.slots.free:
            seq = self.waiting.popleft()
            seq.slot = self.slots.take()
            self.running.append(seq)
        budget = self.token_budget
        chosen: list[tuple[Sequence, int]] = []
        for seq in self.running:  # decode tokens first
            if seq.pending == 1 and budget:
                chosen.append((seq, 1))
                budget -= 1
        for seq in self.running:
            if seq.pending > 1 and budget:
                n = min(seq.pending, self.chunk_size, budget)
                chosen.append((seq, n))
                budget -= n
        if not chosen:
            return None
        chosen.sort(key=lambda sn: self.running.index(sn[0]))
        token_ids = torch.tensor(
            [t for seq, n in chosen for t in seq.tokens[seq.cached : seq.cached + n]], dtype=torch.long
        )
        batch = StepBatch(
            slots=[seq.slot for seq, _ in chosen],
            starts=[seq.cached for seq, _ in chosen],
            lengths=[n for _, n in chosen],
            token_ids=token_ids,
            want_logits=[seq.cached + n == len(seq.tokens) for seq, n in chosen],
            greedy=[seq.params.temperature == 0 and not seq.params.logprobs for seq, _ in chosen],
        )
        for seq, n in chosen:
            seq.cached += n
        return ScheduledStep(batch, [seq for seq, _ in chosen])

    def process(self, step: ScheduledStep, out: torch.Tensor | StepOutput) -> list[Sequence]:
        """Sample a token for every sequence whose step ended at its last token; returns the sequences that changed.

        `out`: logits of every such sequence in order, or a `StepOutput` whose greedy rows come already chosen.
        """
        if isinstance(out, torch.Tensor):
            out = StepOutput(out, None, [], [])
        changed, sampled, chosen = [], iter(out.logits), iter(zip(out.greedy_ids, out.greedy_logprobs))
        wanting = [seq for seq, want in zip(step.sequences, step.batch.want_logits) if want]
        for r, seq in enumerate(wanting):
            picked = next(chosen) if out.greedy is not None and out.greedy[r] else None
            row_logits = next(sampled) if picked is None else None
            if seq.finished:  # ended from outside while the step ran (client gone, stop string)
                continue
            try:
                if picked is not None:
                    token, logprob, top = picked[0], picked[1], None
                else:
                    token, logprob, top = seq.sampler.sample(row_logits, index=len(seq.output_ids))
            except Exception as e:  # noqa: BLE001 - one request's bad sampling must end it, not the loop serving all
                seq.error = f"sampling failed: {type(e).__name__}: {e}"
                self.finish(seq, "error")
                changed.append(seq)
                continue
            seq.output_ids.append(token)
            seq.output_logprobs.append(logprob)
            seq.output_top_logprobs.append(top)
            self._check_finished(seq, token)
            changed.append(seq)
            if seq.finished:
                self.release(seq)
        return changed

    def _check_finished(self, seq: Sequence, token: int) -> None:
        p = seq.params
        if (token == self.eos_id and not p.ignore_eos) or token in p.stop_token_ids:
            seq.finish_reason = "stop"
        elif len(seq.output_ids) >= p.max_tokens or len(seq.tokens) >= self.max_seq_len:
            seq.finish_reason = "length"

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a sequence from outside (a stop string matched, the client went away)."""
        if seq.finish_reason is None:
            seq.finish_reason = reason
        if seq in self.waiting:
            self.waiting.remove(seq)
        self.release(seq)

    def release(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        if seq.slot is not None:
            self.slots.give(seq.slot)
            seq.slot = None
