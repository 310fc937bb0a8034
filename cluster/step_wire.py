"""The step contracts on the wire: a `StepPlan` as one int64 array the router sends every worker, and the last
stage's picked tokens and logits as one float32 array it sends back. No Ray call, no pickling: layouts both ends
derive from the plan itself.

Plan payload (int64): a header (step, sequences, tokens, has token ids, micro-batch size, scores any, scored rows,
alternatives per scored row), then per sequence slot, start, length, wants-a-token, greedy, scored, then the token
ids and the scored rows' targets. Result payload (float32): the greedy rows' token ids and log-probabilities, the
logits of the rows the router samples, then per scored row its target's log-probability, and the ids and the
log-probabilities of its most likely tokens (token ids below 2^24 are exact in float32).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from router.step import PromptScores, StepOutput, StepPlan

_HEADER = 8
_FIELDS = 6  # per sequence


@dataclass(frozen=True)
class WirePlan:
    """A decoded plan message: the step number, the plan and the micro-batch size the stages cut it into."""

    step: int
    plan: StepPlan
    micro_batch_size: int


def encode_plan(step: int, plan: StepPlan, micro_batch_size: int) -> np.ndarray:
    n = len(plan.slots)
    ids = plan.token_ids if plan.token_ids is not None else np.empty(0, np.int64)
    targets = plan.score_targets if plan.score_targets is not None else np.empty(0, np.int64)
    header = (step, n, plan.n_tokens, plan.token_ids is not None, micro_batch_size)
    header += (plan.scored is not None, targets.size, plan.score_k)
    return np.concatenate(
        [
            np.asarray(header, np.int64),
            np.asarray(plan.slots, np.int64),
            np.asarray(plan.starts, np.int64),
            np.asarray(plan.lengths, np.int64),
            np.asarray(plan.wants(), np.int64),
            np.asarray(plan.greedy or (False,) * n, np.int64),
            np.asarray(plan.scored or (False,) * n, np.int64),
            np.asarray(ids, np.int64),
            np.asarray(targets, np.int64),
        ]
    )


def decode_plan(message: np.ndarray) -> WirePlan:
    step, n, t, has_ids, mbs, has_scores, r, k = (int(v) for v in message[:_HEADER])
    fields = [message[_HEADER + i * n : _HEADER + (i + 1) * n] for i in range(_FIELDS)]
    ids_at = _HEADER + _FIELDS * n
    targets_at = ids_at + (t if has_ids else 0)
    if message.size != targets_at + r:
        raise ValueError(
            f"a plan message of {message.size} values does not hold {n} sequences and {t} tokens and {r} score targets"
        )
    plan = StepPlan(
        slots=fields[0].tolist(),
        starts=fields[1].tolist(),
        lengths=fields[2].tolist(),
        token_ids=message[ids_at:targets_at].copy() if has_ids else None,
        want_logits=fields[3].astype(bool).tolist(),
        greedy=fields[4].astype(bool).tolist(),
        scored=fields[5].astype(bool).tolist() if has_scores else None,
        score_targets=message[targets_at:].copy() if has_scores else None,
        score_k=k,
    )
    return WirePlan(step, plan, mbs)


def encode_result(
    ids: torch.Tensor,
    logprobs: torch.Tensor,
    logits: torch.Tensor,
    target_logprobs: torch.Tensor,
    top_ids: torch.Tensor,
    top_logprobs: torch.Tensor,
) -> torch.Tensor:
    """(greedy ids, their log-probabilities, the sampled rows' logits, the scored rows' target log-probabilities,
    their top ids and top log-probabilities) as one float32 tensor, on their device: the worker copies it to the
    host once and sends it."""
    parts = (ids, logprobs, logits, target_logprobs, top_ids, top_logprobs)
    return torch.cat([p.float().flatten() for p in parts])


def decode_result(message: np.ndarray, plan: StepPlan, vocab: int) -> StepOutput:
    greedy = plan.greedy_logit_rows()
    g = sum(greedy)
    sampled = len(greedy) - g
    r, k = sum(plan.scored_lengths()), plan.score_k
    if message.size != 2 * g + sampled * vocab + r * (1 + 2 * k):
        raise ValueError(
            f"a result of {message.size} values for {g} greedy and {sampled} sampled rows and {r} scored rows "
            f"of {k} alternatives"
        )
    at = 2 * g + sampled * vocab
    scores = None
    if plan.scored is not None:
        top = message[at + r :]
        scores = PromptScores(
            logprobs=torch.from_numpy(message[at : at + r].copy()),
            top_ids=torch.from_numpy(top[: r * k].astype(np.int64)).view(r, k),
            top_logprobs=torch.from_numpy(top[r * k :].copy()).view(r, k),
        )
    return StepOutput(
        logits=torch.from_numpy(message[2 * g : at].copy()).view(sampled, vocab),
        greedy=greedy,
        greedy_ids=tuple(int(i) for i in message[:g]),
        greedy_logprobs=tuple(float(x) for x in message[g : 2 * g]),
        scores=scores,
    )
