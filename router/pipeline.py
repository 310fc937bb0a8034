"""Cutting a step into micro-batches so pipeline stages work on different micro-batches at the same time."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shards.kv_cache import StepBatch


def split_microbatches(batch: StepBatch, max_seqs_per_microbatch: int) -> list[StepBatch]:
    """Consecutive runs of at most `max_seqs_per_microbatch` sequences; logits come back in the same order."""
    if max_seqs_per_microbatch < 1:
        raise ValueError(f"micro-batch size must be positive, got {max_seqs_per_microbatch}")
    want = batch.wants()
    out, token_start = [], 0
    for i in range(0, len(batch.slots), max_seqs_per_microbatch):
        j = min(i + max_seqs_per_microbatch, len(batch.slots))
        n_tokens = sum(batch.lengths[i:j])
        ids = batch.token_ids[token_start : token_start + n_tokens] if batch.token_ids is not None else None
        greedy = batch.greedy[i:j] if batch.greedy is not None else None
        out.append(StepBatch(batch.slots[i:j], batch.starts[i:j], batch.lengths[i:j], ids, want[i:j], greedy))
        token_start += n_tokens
    return out


@dataclass
class StepOutput:
    """What a step gives back for the sequences that want a token, in order: the greedy ones' tokens, chosen on the
    last stage (an argmax and its log-probability: a few bytes instead of a vocabulary of logits through Ray), and
    logits for the others, which the router samples."""

    logits: torch.Tensor  # (rows the router samples, vocab) float32
    greedy: list[bool] | None  # per wanting row: chosen on the stage; None: every row is in `logits`
    greedy_ids: list[int]
    greedy_logprobs: list[float]


def pick_on_stage(logits: torch.Tensor, greedy: list[bool]) -> dict:
    """The last stage's answer for one micro-batch: logits (weights' dtype) of the rows the router samples, token and
    log-probability of the greedy rows. `greedy` has one flag per row of `logits`."""
    if not any(greedy):
        return {"logits": logits.cpu(), "greedy": greedy, "ids": [], "logprobs": []}
    mask = torch.tensor(greedy, device=logits.device)
    picked = logits[mask]
    ids = picked.argmax(dim=-1)
    logprobs = torch.log_softmax(picked.float(), dim=-1).gather(1, ids[:, None])[:, 0]
    # None when every row is greedy: even an empty torch tensor costs a Ray return ~0.5 ms to serialise.
    rest = logits[~mask].cpu() if not all(greedy) else None
    return {"logits": rest, "greedy": greedy, "ids": ids.tolist(), "logprobs": logprobs.tolist()}


def join_outputs(parts: list[dict], vocab: int) -> StepOutput:
    """The micro-batches' answers as one, in order (logits arrive in the weights' dtype, leave in float32)."""
    kept = [p["logits"] for p in parts if p["logits"] is not None and p["logits"].numel()]
    logits = torch.cat(kept).float() if kept else torch.empty(0, vocab)
    return StepOutput(
        logits,
        [g for p in parts for g in p["greedy"]],
        [i for p in parts for i in p["ids"]],
        [lp for p in parts for lp in p["logprobs"]],
    )
