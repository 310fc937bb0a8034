"""Choosing the next token: greedy at temperature 0, otherwise temperature, top-k and top-p with a per-request seed."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # how many alternatives to report per token; None: none
    prompt_logprobs: int | None = None  # score the prompt too (an echo), with this many alternatives; None: don't

    def validate(self) -> SamplingParams:
        """Raises ValueError naming the field; the edges (CLI, HTTP) turn it into their own error."""
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not (
            isinstance(self.temperature, (int, float))
            and math.isfinite(self.temperature)
            and 0 <= self.temperature <= 2
        ):
            raise ValueError(f"temperature must be between 0 and 2, got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise ValueError(f"top_k must be a non-negative integer, got {self.top_k!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if self.logprobs is not None and not (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20):
            raise ValueError(f"logprobs must be an integer between 0 and 20, got {self.logprobs!r}")
        if self.prompt_logprobs is not None and not (
            isinstance(self.prompt_logprobs, int) and 0 <= self.prompt_logprobs <= 20
        ):
            raise ValueError(f"prompt_logprobs must be an integer between 0 and 20, got {self.prompt_logprobs!r}")
        return self


def draw_seed(seed: int, index: int) -> int:
    """The seed of output token `index` of a request seeded with `seed`."""
    return (seed * 1_000_003 + index * 7_919 + 12_345) % (2**63)


@dataclass
class Sampler:
    """One per request. Token i is drawn with a generator seeded from (seed, i): a request's tokens do not depend on
    what it was batched with, and a request replayed from its prompt and emitted tokens (after a shard or router
    restart) draws exactly what it would have drawn. There is no hidden state to carry across a crash."""

    params: SamplingParams
    seed: int = field(init=False)
    generator: torch.Generator = field(init=False)

    def __post_init__(self) -> None:
        self.seed = self.params.seed if self.params.seed is not None else random.SystemRandom().randrange(2**63)
        self.generator = torch.Generator()

    def sample(self, logits: torch.Tensor, index: int = 0) -> tuple[int, float, list[tuple[int, float]] | None]:
        """logits: (vocab,) float32 -> (token id, its log-probability under the model, the top alternatives).

        `index` is the position of this token in the request's output. The alternatives (`params.logprobs` of
        them) are only computed when asked for.
        """
        logprobs = torch.log_softmax(logits, dim=-1)
        p = self.params
        if p.temperature:
            self.generator.manual_seed(draw_seed(self.seed, index))
        token = self._choose(logits)
        top = None
        if p.logprobs:
            values, ids = torch.topk(logprobs, p.logprobs)
            top = list(zip(ids.tolist(), values.tolist(), strict=True))
        return token, float(logprobs[token]), top

    def _choose(self, logits: torch.Tensor) -> int:
        p = self.params
        if p.temperature == 0:
            return int(torch.argmax(logits))
        # Shifted so the best logit is 0 and divided in float64: a tiny temperature (fuzzing sent 3.8e-58) then sends
        # the rest to -inf instead of overflowing every logit to inf, whose softmax is nan.
        scaled = (logits.double() - logits.max()) / p.temperature
        if p.top_k and p.top_k < scaled.numel():
            kth = torch.topk(scaled, p.top_k).values[-1]
            scaled = scaled.masked_fill(scaled < kth, -math.inf)
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(scaled, descending=True)
            cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
            drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= p.top_p  # keep the smallest set reaching top_p
            drop[0] = False  # the most likely token always stays: a top_p that rounds to 0 in float32 keeps just it
            scaled = scaled.scatter(0, order[drop], -math.inf)
        probs = torch.softmax(scaled, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))
