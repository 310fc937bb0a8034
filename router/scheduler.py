"""Which sequences run in the next step, and how many of their tokens: continuous batching under a token budget.

Every sequence keeps all its tokens (prompt + generated) and how many of them the KV cache already holds. A step
feeds each running sequence the next run of tokens the cache lacks: one token once it is decoding, a chunk of at
most `chunk_size` while its prompt is still being prefilled. Decode tokens go first so a long prompt cannot stall
the others; the rest of the budget goes to prefill chunks.

A request that asks for its prompt's log-probabilities (`SamplingParams.prompt_logprobs`, an echo with logprobs)
has its prefill chunks scored on the last stage: each prompt row gets the log-probability of the token after it,
a chunk's last row that of the next chunk's first token. They are complete when its first token comes.

When the shards lose their caches (a fault), a running sequence rebuilds its cache the way it was first built: its
prompt in chunks, then its output tokens one decode step at a time (`SchedulerConfig.replay_tokens`). Prefilling
prompt + output in chunks would be faster, but its matrix shapes differ from the decode steps that first computed
those keys and values, so in bf16 they round differently, and the tokens after the fault can change.

With `decode_ahead` (one pipeline stage: the stage that embeds also picks), a greedy sequence's next decode step is
scheduled before its token is back: its row carries `FED_BACK` instead of a token id, and the stage feeds in its own
pick for that slot from the step before, so the router's round trip (plan out, picks back, processing) overlaps
the device's work instead of leaving it idle between steps. A token a sequence gets past its end (EOS, a stop
string) is dropped; a step is never scheduled past `max_tokens` or the context.

A step that carries new prompts beside decoding sequences cannot replay a decode graph: on an H200 it costs about
2.3 decode steps of Mixtral at 128 sequences, whatever few prompts it carries (its layers run eagerly, host-bound).
Requests that arrive a few steps apart while others decode are therefore held back and started together, as TGI's
router does (`SchedulerConfig.max_waiting_steps`, `waiting_served_ratio`): at most `max_waiting_steps` steps, or
until they are `waiting_served_ratio` of the running sequences, or fill the step; at once when nothing runs. Holding
pays only where requests come close together: it waits only while the median gap between the last few arrivals
(`ARRIVAL_GAPS`) is within `max_waiting_steps`. Under light load a held request would wait alone: at 2 requests a
second on an H200 holding added 0.17 s to the median time to first token and saved nothing (bench/NOTES.md).
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from router.sampling import Sampler, SamplingParams
from router.step import FED_BACK, StepOutput, StepPlan
from router.structured_output import GrammarConstraint, Grammars

DEFAULT_MAX_SEQS = 32
DEFAULT_TOKEN_BUDGET = 2048
DEFAULT_MAX_CHUNK = 512  # the prefill chunk when none is given, capped by the cache capacity and the token budget
DEFAULT_REPLAY_TOKENS = 128  # outputs rebuilt one decode step a token after a fault, at most (longer ones: prefilled)
AHEAD = 2  # steps a sequence may be in at once with `decode_ahead`: the one running, the next one queued
DEFAULT_WAITING_SERVED_RATIO = 0.3  # TGI's default for the same rule
# Arrivals whose gaps (in steps) say whether requests come close together: the median of this many, so that the one
# long gap before a burst (waves of requests ending together) does not hide the burst
ARRIVAL_GAPS = 8


@dataclass(eq=False)  # one request's state: equal only to itself (a field-by-field __eq__ made `list.index`, `in`
class Sequence:  # and `remove` cost O(fields) per element: 2.4 ms a schedule at 128 sequences, 9 ms at 256)
    seq_id: int
    prompt_ids: list[int]
    params: SamplingParams
    sampler: Sampler = field(init=False)
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    output_top_logprobs: list[list[tuple[int, float]] | None] = field(default_factory=list)
    # With `params.prompt_logprobs`: prompt tokens 1.. (the first has no context), filled as prefill chunks finish.
    prompt_logprobs: list[float] = field(default_factory=list)
    prompt_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    slot: int | None = None
    cached: int = 0  # tokens whose keys/values are in the cache
    # Tokens before this position may be prefilled in chunks; from it on, one token a step (decoding, or replaying
    # its outputs after a fault). The prompt's length, or every token when a rebuilt cache is prefilled whole.
    prefill_end: int = 0
    # Steps not yet processed that end at its last token (each will give it a token): the next step waits for them,
    # except with `decode_ahead` for a greedy sequence (up to AHEAD of them, its token fed back on the stage).
    in_flight: int = 0
    finish_reason: str | None = None  # "stop" or "length" once finished
    error: str | None = None  # why it ended with finish_reason "error" (its sampler failed)
    constraint: GrammarConstraint | None = None  # the structured output's matcher, if the request has one
    queued_at_step: int = 0  # the scheduler's step count when it was queued (how long it has been held back)

    def __post_init__(self) -> None:
        self.sampler = Sampler(self.params)

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def n_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token_run(self, start: int, n: int) -> list[int]:
        """tokens[start : start + n] without building `tokens` (a 512-token prompt copied per sequence per step)."""
        lp = len(self.prompt_ids)
        if start >= lp:
            return self.output_ids[start - lp : start - lp + n]
        if start + n <= lp:
            return self.prompt_ids[start : start + n]
        return self.prompt_ids[start:] + self.output_ids[: start + n - lp]

    @property
    def pending(self) -> int:
        """Tokens not yet in the cache: the prompt's remainder, or the one just sampled."""
        return self.n_tokens - self.cached

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def scores_prompt(self) -> bool:
        """Its next prefill chunk is scored: it asked for its prompt's log-probabilities and has no token yet (they
        went out with the first; a request resumed with `output_ids` had them delivered before)."""
        return self.params.prompt_logprobs is not None and not self.output_ids


class SlotPool:
    """Cache slots: one per running sequence, handed back when it ends. The lowest free slot goes first, so the slots
    in use stay packed at the bottom: with a step's rows in slot order (`Scheduler.schedule`), a full decode step's
    slots are one ascending run, which the stage reads in place instead of gathering every layer's buffers."""

    def __init__(self, n: int) -> None:
        self.free = list(range(n))  # a heap
        self.n = n

    def take(self) -> int | None:
        return heapq.heappop(self.free) if self.free else None

    def give(self, slot: int) -> None:
        heapq.heappush(self.free, slot)

    @property
    def in_use(self) -> int:
        return self.n - len(self.free)


@dataclass(frozen=True)
class SchedulerConfig:
    """How much one step may carry: the single source of the scheduler's defaults (deploy/examples/PLACEMENT.md
    documents them; the placement file, the CLI and the offline `generate` all build one of these)."""

    max_seqs: int = DEFAULT_MAX_SEQS  # sequences holding a KV cache slot at once
    token_budget: int = DEFAULT_TOKEN_BUDGET  # tokens in one step, decode tokens first
    chunk_size: int | None = None  # prefill chunk; None: min(cache capacity, DEFAULT_MAX_CHUNK, token_budget)
    # After the shards lose their caches, a sequence with at most this many output tokens rebuilds them one decode
    # step a token, exactly as they were first computed (its next tokens are unchanged in bf16 too); one with more
    # prefills prompt + output in chunks (a faster recovery that bf16 may round differently). 0: always prefill.
    replay_tokens: int = DEFAULT_REPLAY_TOKENS
    # Schedule a greedy sequence's next decode step before its token is back (module docstring). Only where the
    # stage that embeds tokens also picks them: one pipeline stage (the router turns it off for more).
    decode_ahead: bool = False
    # While sequences run, a new request waits at most this many steps for others to start with it in one step
    # (module docstring); 0 starts every request at the next step. Placements default it by device (PLACEMENT.md).
    max_waiting_steps: int = 0
    # ...and starts at once when the requests waiting number at least this share of the running sequences.
    waiting_served_ratio: float = DEFAULT_WAITING_SERVED_RATIO

    def settled(self, capacity: int) -> SchedulerConfig:
        """The config with its chunk size fixed for a cache of `capacity` rows per slot (the window, or the whole
        context without one). Raises ValueError naming the field when the numbers cannot work together."""
        for name in ("max_seqs", "token_budget", "chunk_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        replay = self.replay_tokens
        if not isinstance(replay, int) or isinstance(replay, bool) or replay < 0:
            raise ValueError(f"replay_tokens must be a non-negative integer, got {replay!r}")
        if not isinstance(self.decode_ahead, bool):
            raise ValueError(f"decode_ahead must be true or false, got {self.decode_ahead!r}")
        wait = self.max_waiting_steps
        if not isinstance(wait, int) or isinstance(wait, bool) or wait < 0:
            raise ValueError(f"max_waiting_steps must be a non-negative integer, got {wait!r}")
        ratio = self.waiting_served_ratio
        if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0 <= ratio < float("inf"):
            raise ValueError(f"waiting_served_ratio must be a non-negative number, got {ratio!r}")
        chunk = self.chunk_size if self.chunk_size is not None else min(capacity, DEFAULT_MAX_CHUNK, self.token_budget)
        # A chunk past the capacity could not be written to the rolling buffer. The placement refuses a chunk larger
        # than the window; capped here is only the case of a context shorter than the window, where no sequence
        # ever has more tokens than the capacity to prefill, so the cap changes no step.
        chunk = min(chunk, capacity)
        if chunk > self.token_budget:
            raise ValueError(
                f"chunk_size {chunk} is larger than token_budget {self.token_budget}; a prefill chunk must fit in "
                "one step"
            )
        return replace(self, chunk_size=chunk)


@dataclass
class ScheduledStep:
    plan: StepPlan
    sequences: list[Sequence]
    counted: tuple[bool, ...]  # per sequence: this step is one of its `in_flight` (it ends at its last token)


class Scheduler:
    def __init__(
        self, config: SchedulerConfig, max_seq_len: int, eos_id: int, grammars: Callable[[], Grammars] | None = None
    ) -> None:
        """`config` settled (its chunk size fixed): `SchedulerConfig.settled`. `grammars` gives the compiled
        grammars of the model's vocabulary, called the first time a request asks for structured output."""
        if config.chunk_size is None:
            raise ValueError("the scheduler needs a settled SchedulerConfig (chunk_size fixed)")
        self.config = config
        self.slots = SlotPool(config.max_seqs)
        self.token_budget = config.token_budget
        self.chunk_size = config.chunk_size
        self.replay_tokens = config.replay_tokens
        self.decode_ahead = config.decode_ahead
        self.max_waiting_steps = config.max_waiting_steps
        self.waiting_served_ratio = config.waiting_served_ratio
        self.steps = 0  # steps scheduled so far
        self.arrival_gaps: deque[int] = deque(maxlen=ARRIVAL_GAPS)  # steps between consecutive requests' arrivals
        self._last_arrival: int | None = None
        self.max_seq_len = max_seq_len
        self.eos_id = eos_id
        self.grammars = grammars
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._ids = itertools.count()

    def add(self, prompt_ids: list[int], params: SamplingParams, output_ids: list[int] | None = None) -> Sequence:
        """Queue a request; `output_ids` resumes one that already emitted those tokens (its cache is built from its
        prompt and those outputs, replayed as `forget_caches` does, then it goes on from the next token)."""
        seq = Sequence(next(self._ids), list(prompt_ids), params)
        seq.output_ids = list(output_ids or [])
        self._plan_rebuild(seq)
        seq.output_logprobs = [0.0] * len(seq.output_ids)
        seq.output_top_logprobs = [None] * len(seq.output_ids)
        seq.queued_at_step = self.steps
        if self._last_arrival is not None:
            self.arrival_gaps.append(self.steps - self._last_arrival)
        self._last_arrival = self.steps
        if params.structured is not None:
            if self.grammars is None:
                raise ValueError("structured output needs the checkpoint's tokenizer, which this engine was not given")
            seq.constraint = self.grammars().constraint(params.structured)
        self.waiting.append(seq)
        return seq

    def forget_caches(self) -> None:
        """The shards lost their KV caches: every running sequence builds its cache again, keeping its slot: its
        prompt in chunks, then its outputs replayed (or prefilled, past `replay_tokens`). A prompt being scored is
        scored again from its start, with the chunks that now carry it."""
        for seq in self.running:
            seq.cached = 0
            seq.in_flight = 0
            self._plan_rebuild(seq)
            if seq.scores_prompt:
                seq.prompt_logprobs.clear()
                seq.prompt_top_logprobs.clear()

    @property
    def slots_in_use(self) -> int:
        return self.slots.in_use

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, groups: int = 1) -> ScheduledStep | None:
        """The next step. `groups`: how many steps are kept in flight at once (one per pipeline stage); a step then
        takes at most its share of the running sequences, so the others form the next step and every stage has
        work. A sequence in a step in flight has nothing pending (its token is not back), unless it is prefilling:
        its next chunk may go in the next step, which every stage runs after this one."""
        if self._admit_now():
            while self.waiting and self.slots.free:
                seq = self.waiting.popleft()
                seq.slot = self.slots.take()
                self.running.append(seq)
        budget = self.token_budget
        room = -(-len(self.running) // groups)  # ceil: the sequences one step may take
        chosen: list[tuple[Sequence, int]] = []
        for seq in self.running:  # decode tokens first (and outputs being replayed: the same steps as first made)
            one_token = seq.pending == 1 or (seq.pending and seq.cached >= seq.prefill_end)
            if ((one_token and not seq.in_flight) or self._ahead(seq)) and budget and len(chosen) < room:
                chosen.append((seq, 1))
                budget -= 1
        for seq in self.running:
            if seq.pending > 1 and seq.cached < seq.prefill_end and budget and len(chosen) < room:
                n = min(seq.prefill_end - seq.cached, self.chunk_size, budget)
                chosen.append((seq, n))
                budget -= n
        if not chosen:
            return None
        chosen.sort(key=lambda sn: sn[0].slot)  # slot order: a run of slots is read in place (`SlotPool`)
        # A row past the tokens the router has (decode ahead) is fed back on the stage: FED_BACK, and it wants logits.
        token_ids = np.array(
            [t for seq, n in chosen for t in (seq.token_run(seq.cached, n) if seq.pending else [FED_BACK])], np.int64
        )
        want_logits = tuple(seq.cached + n >= seq.n_tokens for seq, n in chosen)
        plan = StepPlan(
            slots=tuple(seq.slot for seq, _ in chosen),
            starts=tuple(seq.cached for seq, _ in chosen),
            lengths=tuple(n for _, n in chosen),
            token_ids=token_ids,
            want_logits=want_logits,
            greedy=tuple(seq.params.picked_on_stage for seq, _ in chosen),
            **_scoring(chosen, want_logits),
        )
        counted = []
        for seq, n in chosen:
            seq.cached += n
            counts = seq.cached >= seq.prefill_end  # its next token waits for this step (chunks may flow)
            seq.in_flight += counts
            counted.append(counts)
        self.steps += 1
        return ScheduledStep(plan, [seq for seq, _ in chosen], tuple(counted))

    def _admit_now(self) -> bool:
        """Whether the waiting requests start in this step (module docstring): they could (a free slot) and either
        nothing runs, holding is off, requests do not come close enough together for another to join (`sparse`),
        they have waited `max_waiting_steps`, they number `waiting_served_ratio` of the running sequences, or their
        prompts fill what the step's token budget leaves beside one token a runner."""
        if not (self.waiting and self.slots.free):
            return False
        if not self.max_waiting_steps or not self.running or self.sparse:
            return True
        if self.steps - self.waiting[0].queued_at_step >= self.max_waiting_steps:
            return True
        if len(self.waiting) >= self.waiting_served_ratio * len(self.running):
            return True
        room = self.token_budget - len(self.running)
        starting = itertools.islice(self.waiting, len(self.slots.free))
        return sum(min(seq.prefill_end, self.chunk_size) for seq in starting) >= room

    @property
    def sparse(self) -> bool:
        """Whether requests arrive too far apart for holding one to gather another: the median gap between the
        last `ARRIVAL_GAPS` arrivals (as many as there were) is longer than `max_waiting_steps`."""
        if not self.arrival_gaps:
            return False
        gaps = sorted(self.arrival_gaps)
        return gaps[(len(gaps) - 1) // 2] > self.max_waiting_steps

    def _ahead(self, seq: Sequence) -> bool:
        """Whether `seq`'s next decode step may go before its token is back: `decode_ahead`, a greedy sequence picked
        on the stage, decoding (not prefilling, not replaying), fewer than AHEAD steps in flight, and the steps in
        flight cannot already have given it its last token (`max_tokens`, the context)."""
        if not (self.decode_ahead and seq.in_flight and seq.pending == 0 and seq.in_flight < AHEAD):
            return False
        if not seq.params.picked_on_stage or seq.scores_prompt:  # (a grammar's sequence is never picked on the stage)
            return False
        coming = len(seq.output_ids) + seq.in_flight  # outputs it will have once the steps in flight are back
        return coming < seq.params.max_tokens and seq.n_tokens + seq.in_flight < self.max_seq_len

    def process(self, step: ScheduledStep, out: StepOutput) -> list[Sequence]:
        """Take a token for every sequence whose step ended at its last token; returns the sequences that changed.

        Greedy rows of `out` come already picked on the last stage; the others are sampled here from their logits.
        """
        _take_scores(step, out)
        for seq, counted in zip(step.sequences, step.counted, strict=True):
            if counted and seq.in_flight:
                seq.in_flight -= 1
        changed: list[Sequence] = []
        wanting = [seq for seq, want in zip(step.sequences, step.plan.wants(), strict=True) if want]
        for seq, pick in zip(wanting, _row_picks(out, len(wanting)), strict=True):
            if seq.finished:  # ended from outside while the step ran (client gone, stop string)
                continue
            try:
                if isinstance(pick, tuple):
                    token, logprob, top = pick[0], pick[1], None
                else:
                    token, logprob, top = seq.sampler.sample(
                        pick, len(seq.output_ids), seq.prompt_ids, seq.output_ids, seq.constraint
                    )
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

    def _plan_rebuild(self, seq: Sequence) -> None:
        """How `seq`'s cache is (re)built from empty: its prompt in chunks, then its outputs (if any: a resumed
        request) one step a token as they were first computed, unless there are more than `replay_tokens` of them."""
        replay = len(seq.output_ids) <= self.replay_tokens
        seq.prefill_end = len(seq.prompt_ids) if replay else seq.n_tokens

    def _check_finished(self, seq: Sequence, token: int) -> None:
        p = seq.params
        if (token == self.eos_id and not p.ignore_eos) or token in p.stop_token_ids:
            seq.finish_reason = "stop"
        elif len(seq.output_ids) >= p.max_tokens or seq.n_tokens >= self.max_seq_len:
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


def _scoring(chosen: list[tuple[Sequence, int]], want_logits: tuple[bool, ...]) -> dict:
    """The plan's scoring fields: which sequences' chunks are scored, each scored row's next token, and the most
    alternatives any of them asks for (none of it when no sequence is scored)."""
    scored = tuple(seq.scores_prompt for seq, _ in chosen)
    if not any(scored):
        return {}
    targets = [
        t
        for (seq, n), s, w in zip(chosen, scored, want_logits, strict=True)
        if s
        for t in seq.prompt_ids[seq.cached + 1 : seq.cached + n + 1 - w]
    ]
    k = max(seq.params.prompt_logprobs for (seq, _), s in zip(chosen, scored, strict=True) if s)
    return {"scored": scored, "score_targets": np.array(targets, np.int64), "score_k": k}


def _take_scores(step: ScheduledStep, out: StepOutput) -> None:
    """Each scored sequence's rows of `out.scores`, in order, onto its prompt's log-probabilities. Rows that do not
    start where its scores end (a step planned before its cache was lost) are left out: the prompt is scored again."""
    lengths = step.plan.scored_lengths()
    if not any(lengths):
        return
    scores = out.scores
    if scores is None or len(scores) != sum(lengths):
        raise ValueError(
            f"the step output has {0 if scores is None else len(scores)} scored rows; the step scored {sum(lengths)}"
        )
    logprobs, top_ids, top_logprobs = scores.logprobs.tolist(), scores.top_ids.tolist(), scores.top_logprobs.tolist()
    row = 0
    for seq, start, n in zip(step.sequences, step.plan.starts, lengths, strict=True):
        if n and not seq.finished and len(seq.prompt_logprobs) == start:
            k = seq.params.prompt_logprobs
            seq.prompt_logprobs.extend(logprobs[row : row + n])
            seq.prompt_top_logprobs.extend(
                list(zip(top_ids[r][:k], top_logprobs[r][:k], strict=True)) for r in range(row, row + n)
            )
        row += n


def _row_picks(out: StepOutput, rows: int) -> list[tuple[int, float] | torch.Tensor]:
    """Per wanting row, in order: (token, log-probability) picked on the stage, or the logits to sample from."""
    greedy = out.greedy if out.greedy is not None else (False,) * rows
    if len(greedy) != rows:
        raise ValueError(f"the step output has {len(greedy)} rows; the step wanted {rows}")
    picked = iter(zip(out.greedy_ids, out.greedy_logprobs, strict=True))
    sampled = iter(out.logits)
    return [next(picked) if g else next(sampled) for g in greedy]
