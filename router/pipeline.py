"""Cutting a step into micro-batches so pipeline stages work on different micro-batches at the same time."""

from __future__ import annotations

import torch

from shards.kv_cache import StepBatch


def split_microbatches(batch: StepBatch, max_seqs_per_microbatch: int) -> list[StepBatch]:
    """Consecutive runs of at most `max_seqs_per_microbatch` sequences; logits come back in the same order."""
    if max_seqs_per_microbatch < 1:
        raise ValueError(f"micro-batch size must be positive, got {max_seqs_per_microbatch}")
    want = batch.want_logits or [True] * len(batch.slots)
    out, token_start = [], 0
    for i in range(0, len(batch.slots), max_seqs_per_microbatch):
        j = min(i + max_seqs_per_microbatch, len(batch.slots))
        n_tokens = sum(batch.lengths[i:j])
        ids = batch.token_ids[token_start : token_start + n_tokens] if batch.token_ids is not None else None
        out.append(StepBatch(batch.slots[i:j], batch.starts[i:j], batch.lengths[i:j], ids, want[i:j]))
        token_start += n_tokens
    return out


def join_logits(parts: list[torch.Tensor | None], vocab: int) -> torch.Tensor:
    kept = [p for p in parts if p is not None and p.numel()]
    return torch.cat(kept).float() if kept else torch.empty(0, vocab)  # shards send them in the weights' dtype
