"""The whole model in one process: the executor the distributed one must match token for token."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from shards.checkpoint import CheckpointReader, ShardSelection
from shards.compiled_decode import CompiledDecode
from shards.kv_cache import PackedStep, RollingKVCache, StepLayout, cache_capacity
from shards.model import TransformerShard


class TokenStep(PackedStep, Protocol):
    """A step plan with its token ids (`router.step.StepPlan`): what the shard holding the embedding reads, and what
    the head returns: logits of some rows, scores of others."""

    token_ids: np.ndarray | torch.Tensor | None
    score_targets: np.ndarray | None
    score_k: int

    def logit_rows(self) -> Sequence[int]: ...

    def score_rows(self) -> Sequence[int]: ...


# Per scored row: the target's log-probability (rows,), the most likely tokens' ids and log-probabilities (rows, k).
RowScores = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def read_rows(plan: TokenStep) -> list[int] | None:
    """The rows of a step whose last hidden states are read (logits, scores), in order, where that is fewer than
    all: a prompt chunk's last layer computes nothing after attention for the others (`run_layers(rows=)`); none
    for a chunk before a prompt's last, which only fills the cache."""
    kept = sorted(set(plan.logit_rows()) | set(plan.score_rows()))
    return kept if len(kept) < sum(plan.lengths) else None


def kept_positions(rows: Sequence[int], kept: list[int] | None) -> list[int]:
    """A step's `rows` as positions among its `kept` rows (`read_rows`; None: every row was kept)."""
    if kept is None:
        return list(rows)
    at = {r: i for i, r in enumerate(kept)}
    return [at[r] for r in rows]


class LocalEngine:
    """Runs a step plan through every layer and returns the logits the plan asks for."""

    def __init__(
        self,
        checkpoint: str | Path,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        max_seqs: int = 16,
        max_seq_len: int | None = None,
        attention_backend: str = "auto",
        compile_decode: tuple[int, ...] = (),
    ) -> None:
        """`compile_decode`: decode batch sizes whose layers run compiled (`shards/compiled_decode.py`); () none."""
        self.reader = CheckpointReader(checkpoint)
        self.config = self.reader.config
        self.device = torch.device(device)
        self.max_seq_len = min(max_seq_len or self.config.max_seq_len, self.config.max_seq_len)
        self.max_seqs = max_seqs
        self.model = TransformerShard.from_checkpoint(
            self.reader, ShardSelection.whole(self.config), dtype, self.device, attention_backend
        )
        self.cache = RollingKVCache(
            list(range(self.config.n_layers)),
            max_seqs,
            self.cache_capacity,
            self.config.n_kv_heads,
            self.config.head_dim,
            dtype,
            self.device,
        )
        self.compiled = CompiledDecode(self.model, self.cache, compile_decode) if compile_decode else None
        if self.compiled is not None:
            self.compiled.warm_up()  # False, logged, if it failed: the layers then run eagerly

    @property
    def cache_capacity(self) -> int:
        return cache_capacity(self.config.sliding_window, self.max_seq_len)

    def step(self, plan: TokenStep) -> torch.Tensor:
        """(rows wanting logits, vocab) float32 logits, in plan order."""
        return self.run(plan)[0]

    @torch.inference_mode()
    def run(self, plan: TokenStep) -> tuple[torch.Tensor, RowScores | None]:
        """The step's logits (as `step`) and, when the plan scores rows, their scores (None when it does not)."""
        layout = StepLayout.build(
            plan,
            self.cache_capacity,
            self.config.sliding_window,
            self.config.head_dim,
            self.config.rope_theta,
            self.device,
        )
        h = self.model.embed(torch.as_tensor(plan.token_ids).to(self.device))
        kept = None if layout.decode_slots is not None else read_rows(plan)  # a decode step reads every row
        keep = None if kept is None else torch.tensor(kept, dtype=torch.long, device=self.device)
        h = (self.compiled or self.model).run_layers(h, layout, self.cache, rows=keep)
        rows = torch.tensor(kept_positions(plan.logit_rows(), kept), dtype=torch.long, device=self.device)
        logits = self.model.logits(h[rows]).cpu()
        if plan.score_targets is None:
            return logits, None
        scored = torch.tensor(kept_positions(plan.score_rows(), kept), dtype=torch.long, device=self.device)
        targets = torch.as_tensor(plan.score_targets).to(self.device)
        return logits, tuple(t.cpu() for t in self.model.scores(h[scored], targets, plan.score_k))
