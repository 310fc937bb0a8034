"""Choosing the next token: the logits adjusted (logit bias, repetition, frequency and presence penalties, a
structured-output grammar), then greedy at temperature 0, otherwise temperature, min-p, top-k and top-p with a
per-request seed.

The reported log-probabilities are the model's own (log-softmax of the raw logits), as OpenAI and vLLM report them.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from router.structured_output import GrammarConstraint, StructuredOutput


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
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from every token already in the output
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per occurrence in the output
    repetition_penalty: float = 1.0  # Hugging Face's: tokens of the prompt or output, logit / r if > 0 else * r
    min_p: float = 0.0  # drop tokens less likely than min_p x the most likely one (after temperature)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    structured: StructuredOutput | None = None  # a JSON schema the output must follow

    @property
    def adjusts_logits(self) -> bool:
        """Whether anything changes the logits before the choice (then even a greedy token is chosen here)."""
        return bool(
            self.presence_penalty
            or self.frequency_penalty
            or self.repetition_penalty != 1.0
            or self.logit_bias
            or self.structured is not None
        )

    @property
    def picked_on_stage(self) -> bool:
        """Whether the last stage may pick this request's tokens itself (plain greedy, no log-probabilities)."""
        return self.temperature == 0 and not self.logprobs and not self.adjusts_logits

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
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and -2 <= value <= 2):
                raise ValueError(f"{name} must be between -2 and 2, got {value!r}")
        r = self.repetition_penalty
        if not (isinstance(r, (int, float)) and math.isfinite(r) and 0 < r <= 2):
            raise ValueError(f"repetition_penalty must be in (0, 2], got {r!r}")
        if not (isinstance(self.min_p, (int, float)) and 0 <= self.min_p <= 1):
            raise ValueError(f"min_p must be between 0 and 1, got {self.min_p!r}")
        for token, bias in self.logit_bias:
            if not isinstance(token, int) or token < 0 or not (math.isfinite(bias) and -100 <= bias <= 100):
                raise ValueError(f"logit_bias entry {token!r}: {bias!r} must map a token id to a bias in [-100, 100]")
        if self.structured is not None and self.ignore_eos:
            raise ValueError("ignore_eos cannot be combined with a structured output format: it ends at its end")
        if self.prompt_logprobs is not None and not (
            isinstance(self.prompt_logprobs, int) and 0 <= self.prompt_logprobs <= 20
        ):
            raise ValueError(f"prompt_logprobs must be an integer between 0 and 20, got {self.prompt_logprobs!r}")
        return self


def adjusted_logits(
    logits: torch.Tensor, params: SamplingParams, prompt_ids: Sequence[int], output_ids: Sequence[int]
) -> torch.Tensor:
    """The logits after the logit bias, then the repetition, frequency and presence penalties (vLLM's order;
    float32, a copy).

    Frequency and presence count the output only (OpenAI's definition); the repetition penalty covers prompt and
    output (Hugging Face's and vLLM's).
    """
    out = logits.float().clone()
    vocab = out.numel()
    if params.logit_bias:
        ids = torch.tensor([t for t, _ in params.logit_bias if t < vocab], dtype=torch.long)
        bias = torch.tensor([b for t, b in params.logit_bias if t < vocab], dtype=torch.float32)
        out.index_add_(0, ids, bias)
    if params.repetition_penalty != 1.0 and (prompt_ids or output_ids):
        seen = torch.tensor(sorted({t for t in (*prompt_ids, *output_ids) if 0 <= t < vocab}), dtype=torch.long)
        values = out[seen]
        r = params.repetition_penalty
        out[seen] = torch.where(values > 0, values / r, values * r)
        # A penalty near 0 (fuzzing sent 5e-324) sends positive logits to inf: keep them the largest finite value,
        # so the choice among them stays a choice and no softmax meets inf - inf.
        out = torch.nan_to_num(out, nan=-math.inf, posinf=torch.finfo(out.dtype).max)
    if (params.frequency_penalty or params.presence_penalty) and output_ids:
        counts = torch.bincount(
            torch.tensor([t for t in output_ids if 0 <= t < vocab], dtype=torch.long), minlength=vocab
        )
        out -= params.frequency_penalty * counts.float() + params.presence_penalty * (counts > 0).float()
    return out


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

    def sample(
        self,
        logits: torch.Tensor,
        index: int = 0,
        prompt_ids: Sequence[int] = (),
        output_ids: Sequence[int] = (),
        constraint: GrammarConstraint | None = None,
    ) -> tuple[int, float, list[tuple[int, float]] | None]:
        """logits: (vocab,) float32 -> (token id, its log-probability under the model, the top alternatives).

        `index` is the position of this token in the request's output; `prompt_ids` and `output_ids` (the tokens
        so far) feed the penalties, `constraint` the structured output's grammar. The alternatives
        (`params.logprobs` of them) are only computed when asked for.
        """
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        p = self.params
        if p.temperature:
            self.generator.manual_seed(draw_seed(self.seed, index))
        chosen_from = logits
        if p.adjusts_logits:
            chosen_from = adjusted_logits(logits, p, prompt_ids, output_ids)
            if constraint is not None:
                chosen_from = constraint.mask(chosen_from, list(output_ids))
        token = self._choose(chosen_from)
        top = None
        if p.logprobs:
            values, ids = torch.topk(logprobs, p.logprobs)
            top = list(zip(ids.tolist(), values.tolist(), strict=True))
        return token, float(logprobs[token]), top

    def _choose(self, logits: torch.Tensor) -> int:
        if self.params.temperature == 0:
            return int(torch.argmax(logits))
        return int(torch.multinomial(self.distribution(logits), 1, generator=self.generator))

    def distribution(self, logits: torch.Tensor) -> torch.Tensor:
        """The probabilities a token is drawn from at temperature > 0 (float64): temperature, then top-k, top-p and
        min-p, in the order Hugging Face applies its warpers."""
        p = self.params
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
        if p.min_p > 0:  # relative to the best token, whose scaled logit is 0: a probability ratio is exp(scaled)
            scaled = scaled.masked_fill(scaled < math.log(p.min_p), -math.inf)
        return torch.softmax(scaled, dim=-1)
