"""The step contracts: every message that crosses a process boundary, as a frozen, typed dataclass.

A decode step, as data (README, "The path of a token"):
- ingress -> router: a prompt and its `SamplingParams`; the router answers with an `Admission`, then one
  `TokenEvent` per sampled token;
- router -> every worker: a `StepPlan` (on the step link, `cluster.step_wire`; the stages cut it into micro-batches,
  each itself a `StepPlan`);
- last stage -> router: the step's `StepOutput` (greedy rows' tokens picked on the device, logits of the others,
  and the `PromptScores` of the rows the plan scores: an echoed prompt's own log-probabilities);
- every stage: a `StageResult` per step, gathered when traces are asked for;
- router -> ingress, metrics, operators: `RouterStats` (engine counters and `RouterHealth`), `StepTrace` and
  `ExpertTrace` for `--profile`, and each shard's `ShardLocation`.

Nothing here imports Ray or a transport: these types are what the pieces promise each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch


def _ints(values) -> tuple[int, ...]:
    return tuple(int(v) for v in values)


def _flags(values) -> tuple[bool, ...] | None:
    return None if values is None else tuple(bool(v) for v in values)


# --- router -> stages ---------------------------------------------------------------------------------------------


# A plan's token id for "the token the stage picked for this cache slot in the step before" (decode ahead: the router
# schedules a greedy sequence's next step before its token is back; `router.scheduler`).
FED_BACK = -1


@dataclass(frozen=True)
class StepPlan:
    """What one forward step computes: for each sequence in the batch, a run of new tokens.

    The whole per-step plan the router publishes; every shard derives its `shards.kv_cache.StepLayout` from it.
    """

    slots: tuple[int, ...]  # cache slot of each sequence
    starts: tuple[int, ...]  # position of the first new token = tokens already in the cache
    lengths: tuple[int, ...]  # new tokens of each sequence (1 when decoding, a chunk when prefilling)
    # (sum(lengths),) int64, numpy: a torch tensor in a Ray call costs ~0.5 ms more to serialise (measured). Only
    # the shard that holds the embedding needs it; later stages get a plan without it.
    token_ids: np.ndarray | None = None
    want_logits: tuple[bool, ...] | None = None  # per sequence: return logits of its last new token (None: all)
    greedy: tuple[bool, ...] | None = None  # per sequence: its token is the argmax, picked on the last stage
    # Per sequence: its new tokens are scored (an echoed prompt's own log-probabilities): each row but a last one
    # that wants logits gets the log-probability of the token after it, and the `score_k` most likely tokens.
    scored: tuple[bool, ...] | None = None
    score_targets: np.ndarray | None = None  # (scored rows,) int64: the token each scored row is followed by
    score_k: int = 0  # alternatives per scored row: the most any scored sequence of the plan asks for

    def __post_init__(self) -> None:
        object.__setattr__(self, "slots", _ints(self.slots))
        object.__setattr__(self, "starts", _ints(self.starts))
        object.__setattr__(self, "lengths", _ints(self.lengths))
        object.__setattr__(self, "want_logits", _flags(self.want_logits))
        object.__setattr__(self, "greedy", _flags(self.greedy))
        object.__setattr__(self, "scored", _flags(self.scored))
        object.__setattr__(self, "score_k", int(self.score_k))
        if self.token_ids is not None:
            object.__setattr__(self, "token_ids", np.asarray(self.token_ids, dtype=np.int64))
        if not len(self.slots) == len(self.starts) == len(self.lengths):
            raise ValueError(
                f"a step plan needs one slot, start and length per sequence; got {len(self.slots)} slots, "
                f"{len(self.starts)} starts, {len(self.lengths)} lengths"
            )
        if self.scored is not None:
            targets = np.asarray(() if self.score_targets is None else self.score_targets, dtype=np.int64)
            object.__setattr__(self, "score_targets", targets)
            if targets.size != sum(self.scored_lengths()):
                raise ValueError(f"a step plan scoring {sum(self.scored_lengths())} rows has {targets.size} targets")
        elif self.score_targets is not None:
            raise ValueError("a step plan with score targets must say which sequences are scored")

    @property
    def n_tokens(self) -> int:
        return sum(self.lengths)

    @property
    def is_decode(self) -> bool:
        return all(n == 1 for n in self.lengths)

    def wants(self) -> tuple[bool, ...]:
        """Per sequence: whether its last new token gets logits (all of them when `want_logits` is not given)."""
        return self.want_logits if self.want_logits is not None else (True,) * len(self.lengths)

    def greedy_logit_rows(self) -> tuple[bool, ...]:
        """Per row of `logit_rows`: whether the last stage picks that sequence's token (greedy) itself."""
        greedy = self.greedy or (False,) * len(self.lengths)
        return tuple(g for g, w in zip(greedy, self.wants(), strict=True) if w)

    def logit_rows(self) -> list[int]:
        """Indexes, in the packed token batch, of the last new token of every sequence that wants logits."""
        rows, end = [], 0
        for n, w in zip(self.lengths, self.wants(), strict=True):
            end += n
            if w:
                rows.append(end - 1)
        return rows

    def scored_lengths(self) -> tuple[int, ...]:
        """Per sequence: how many of its new tokens are scored (the rows before its last, when that one wants
        logits: the last prompt token is followed by the first generated one, which has its own log-probability)."""
        if self.scored is None:
            return (0,) * len(self.lengths)
        return tuple(n - w if s else 0 for n, w, s in zip(self.lengths, self.wants(), self.scored, strict=True))

    def score_rows(self) -> list[int]:
        """Indexes, in the packed token batch, of the scored rows (in the order of `score_targets`)."""
        rows, start = [], 0
        for n, k in zip(self.lengths, self.scored_lengths(), strict=True):
            rows.extend(range(start, start + k))
            start += n
        return rows

    def without_tokens(self) -> StepPlan:
        """The plan as stages after the first get it: they receive hidden states, not token ids."""
        return replace(self, token_ids=None)


# --- stages -> router ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MicrobatchSpan:
    """When one micro-batch ran on a stage (host clock, seconds since the epoch) and how long it waited for input."""

    microbatch: int
    start: float
    end: float
    recv_wait: float


@dataclass(frozen=True)
class TransportTally:
    """Messages a shard moved since the last tally, per kind: seconds waited, bytes, count."""

    seconds: dict[str, float] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    messages: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class StageResult:
    """One stage's part of one step."""

    stage: int
    step: int
    spans: tuple[MicrobatchSpan, ...]
    send_wait: float  # waiting for this stage's sends to the next stage to complete
    transport: TransportTally
    expert_seconds: float  # time inside the expert dispatch
    entered: float  # the call's span in the stage's process, host clock
    left: float
    # On a GPU, from CUDA events on the stage's stream: the step's kernels from its first to its last, and how long
    # the device sat idle on this stream between the previous step's last kernel and this step's first (the host
    # was late with it). None on a CPU, and the gap for a stage's first step.
    device_seconds: float | None = None
    device_gap_seconds: float | None = None


@dataclass(frozen=True)
class PromptScores:
    """The plan's scored rows, in order (`StepPlan.score_rows`): each row's next token's log-probability and the
    most likely tokens there, computed on the last stage so no full-vocabulary row leaves it."""

    logprobs: torch.Tensor  # (scored rows,) float32
    top_ids: torch.Tensor  # (scored rows, score_k) int64, most likely first
    top_logprobs: torch.Tensor  # (scored rows, score_k) float32

    def __len__(self) -> int:
        return self.logprobs.shape[0]


@dataclass(frozen=True)
class StepOutput:
    """What a step gives the scheduler for the sequences that want a token, in order: the greedy ones' tokens,
    already picked, and logits for the others, which the router samples; and the scores of the scored rows."""

    logits: torch.Tensor  # (rows the router samples, vocab) float32
    greedy: tuple[bool, ...] | None  # per wanting row: picked on the stage; None: every row is in `logits`
    greedy_ids: tuple[int, ...] = ()
    greedy_logprobs: tuple[float, ...] = ()
    scores: PromptScores | None = None  # None: the plan scored no row

    @staticmethod
    def from_logits(logits: torch.Tensor, scores: PromptScores | None = None) -> StepOutput:
        """An executor that returns every wanting row's logits (the one-process engine)."""
        return StepOutput(logits.float(), None, scores=scores)


# --- router -> ingress --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Admission:
    """The router's first answer to a request, before any token: accepted, or refused with an HTTP status."""

    accepted: bool
    status: int = 200  # 400: the request cannot run; 429: the queue is full, retry after `retry_after_s`
    message: str | None = None
    retry_after_s: int | None = None

    @staticmethod
    def accept() -> Admission:
        return Admission(True)

    @staticmethod
    def reject(status: int, message: str, retry_after_s: int | None = None) -> Admission:
        return Admission(False, status, message, retry_after_s)


@dataclass(frozen=True)
class TokenEvent:
    """One sampled token of one request, or the error that ended it."""

    token_id: int
    logprob: float
    top_logprobs: tuple[tuple[int, float], ...] | None
    finish_reason: str | None  # "stop", "length", or None while generating
    error: str | None = None
    # On a request's first token, when it asked for its prompt's log-probabilities: one per prompt token but the
    # first, and the most likely tokens at each.
    prompt_logprobs: tuple[float, ...] | None = None
    prompt_top_logprobs: tuple[tuple[tuple[int, float], ...], ...] | None = None

    @staticmethod
    def failure(message: str) -> TokenEvent:
        return TokenEvent(-1, 0.0, None, None, error=message)

    @property
    def last(self) -> bool:
        """Nothing follows this event on its request's stream."""
        return self.finish_reason is not None or self.error is not None


@dataclass(frozen=True)
class StepKindStats:
    """Steps of one kind ("decode", "mixed", "prefill"; `router.engine_core.step_kind`) since the loop started: how
    many, their new tokens, and their share of the engine's busy wall time (the shares add up to it)."""

    kind: str
    steps: int
    tokens: int
    seconds: float


@dataclass(frozen=True)
class EngineStats:
    """The continuous-batching loop's counters and queue."""

    running: int
    waiting: int
    slots_in_use: int
    slots_total: int
    steps: int
    step_seconds: float
    tokens_in: int
    tokens_out: int
    finished: int
    aborted: int
    failed_steps: int
    step_kinds: tuple[StepKindStats, ...] = ()


@dataclass(frozen=True)
class RouterHealth:
    """Whether every shard answers, and what recovery has done so far."""

    healthy: bool
    reason: str | None = None  # why not healthy
    shard_failures: int = 0
    recoveries: int = 0
    last_recovery_seconds: float | None = None
    restarted: tuple[tuple[str, ...], ...] = ()  # the shards each recovery restarted
    # The last recovery's restarted workers: (worker, ((phase, seconds after the restart was asked for), ...)),
    # phases process (started), init (entered __init__), loaded (weights on the device), joined (data plane).
    last_restart_phases: tuple[tuple[str, tuple[tuple[str, float], ...]], ...] = ()


@dataclass(frozen=True)
class RouterStats:
    """What `/health` and `/metrics` read from the router."""

    engine: EngineStats
    health: RouterHealth
    expert_load: tuple[tuple[int, ...], ...]  # tokens routed to each expert of each layer, since start


# --- traces and locations (operators, `--profile`, benchmarks) ----------------------------------------------------


@dataclass(frozen=True)
class StepTrace:
    """One step as the router saw it, with every stage's result but the logits."""

    step: int
    tokens: int
    sequences: int
    microbatches: int
    seconds: float  # the router's wall time for the step
    called: float  # host clock when the stage calls went out, and when their results were back
    returned: float
    stages: tuple[StageResult, ...]


@dataclass(frozen=True)
class ExpertMessage:
    """One message a worker's expert groups served: which stage and layer, how many tokens, the host time it took
    (the compute itself on a CPU; on a GPU, the time to queue it)."""

    stage: int
    layer: int
    tokens: int
    seconds: float


@dataclass(frozen=True)
class ExpertTrace:
    """What a worker's expert groups served since the last trace."""

    worker: str
    received: tuple[ExpertMessage, ...]
    computed: dict[int, dict[int, int]]  # layer -> held expert -> tokens it computed for
    errors: tuple[str, ...]


@dataclass(frozen=True)
class ShardLocation:
    """Where Ray put a shard actor, from Ray's own runtime context (what placement tests assert on)."""

    shard: str
    node_id: str
    node_ip: str
    pid: int
    gpu_ids: tuple[str, ...]
    device: str
    placement_group: str | None
    device_key: str  # node id / GPU UUID (or "cpu"): equal keys share one device
