"""Cutting a step into micro-batches so pipeline stages work on different micro-batches at the same time."""

from __future__ import annotations

from router.step import StepPlan


def split_microbatches(plan: StepPlan, max_seqs_per_microbatch: int) -> list[StepPlan]:
    """Consecutive runs of at most `max_seqs_per_microbatch` sequences; logits and scores come back in the same
    order."""
    if max_seqs_per_microbatch < 1:
        raise ValueError(f"micro-batch size must be positive, got {max_seqs_per_microbatch}")
    want = plan.wants()
    scored = plan.scored_lengths()
    out, token_start, score_start = [], 0, 0
    for i in range(0, len(plan.slots), max_seqs_per_microbatch):
        j = min(i + max_seqs_per_microbatch, len(plan.slots))
        n_tokens, n_scored = sum(plan.lengths[i:j]), sum(scored[i:j])
        ids = plan.token_ids[token_start : token_start + n_tokens] if plan.token_ids is not None else None
        greedy = plan.greedy[i:j] if plan.greedy is not None else None
        scores = {}
        if plan.scored is not None:
            targets = plan.score_targets[score_start : score_start + n_scored]
            scores = {"scored": plan.scored[i:j], "score_targets": targets, "score_k": plan.score_k}
        out.append(StepPlan(plan.slots[i:j], plan.starts[i:j], plan.lengths[i:j], ids, want[i:j], greedy, **scores))
        token_start += n_tokens
        score_start += n_scored
    return out
