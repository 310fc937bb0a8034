"""The step contracts on the wire: a `StepPlan` as one int64 array the router sends every worker, and the last
stage's picked tokens and logits as one float32 array it sends back. No Ray call, no pickling: layouts both ends
derive from the plan itself.

Plan payload (int64): a header (step, sequences, tokens, has token ids, micro-batch size), then per sequence slot,
start, length, wants-a-token, greedy, then the token ids. Result payload (float32): the greedy rows' token ids and
log-probabilities, then the logits of the rows the router samples (token ids below 2^24 are exact in float32).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from router.step import StepOutput, StepPlan

_HEADER = 5


@dataclass(frozen=True)
class WirePlan:
    """A decoded plan message: the step number, the plan and the micro-batch size the stages cut it into."""

    step: int
    plan: StepPlan
    micro_batch_size: int


def encode_plan(step: int, plan: StepPlan, micro_batch_size: int) -> np.ndarray:
    n = len(plan.slots)
    ids = plan.token_ids if plan.token_ids is not None else np.empty(0, np.int64)
    header = (step, n, plan.n_tokens, plan.token_ids is not None, micro_batch_size)
    return np.concatenate(
        [
            np.asarray(header, np.int64),
            np.asarray(plan.slots, np.int64),
            np.asarray(plan.starts, np.int64),
            np.asarray(plan.lengths, np.int64),
            np.asarray(plan.wants(), np.int64),
            np.asarray(plan.greedy or (False,) * n, np.int64),
            np.asarray(ids, np.int64),
        ]
    )


def decode_plan(message: np.ndarray) -> WirePlan:
    step, n, t, has_ids, mbs = (int(v) for v in message[:_HEADER])
    fields = [message[_HEADER + i * n : _HEADER + (i + 1) * n] for i in range(5)]
    ids_at = _HEADER + 5 * n
    if message.size != ids_at + (t if has_ids else 0):
        raise ValueError(f"a plan message of {message.size} values does not hold {n} sequences and {t} tokens")
    plan = StepPlan(
        slots=fields[0].tolist(),
        starts=fields[1].tolist(),
        lengths=fields[2].tolist(),
        token_ids=message[ids_at : ids_at + t].copy() if has_ids else None,
        want_logits=fields[3].astype(bool).tolist(),
        greedy=fields[4].astype(bool).tolist(),
    )
    return WirePlan(step, plan, mbs)


def encode_result(ids: torch.Tensor, logprobs: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """(greedy ids, their log-probabilities, the sampled rows' logits) as one float32 tensor, on their device: the
    worker copies it to the host once and sends it."""
    return torch.cat([ids.float(), logprobs.float(), logits.float().flatten()])


def decode_result(message: np.ndarray, plan: StepPlan, vocab: int) -> StepOutput:
    greedy = plan.greedy_logit_rows()
    g = sum(greedy)
    sampled = len(greedy) - g
    if message.size != 2 * g + sampled * vocab:
        raise ValueError(f"a result of {message.size} values for {g} greedy and {sampled} sampled rows")
    return StepOutput(
        logits=torch.from_numpy(message[2 * g :].copy()).view(sampled, vocab),
        greedy=greedy,
        greedy_ids=tuple(int(i) for i in message[:g]),
        greedy_logprobs=tuple(float(x) for x in message[g : 2 * g]),
    )
