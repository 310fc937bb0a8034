"""The whole model in one process: the executor the distributed one must match token for token."""

from __future__ import annotations

from pathlib import Path

import torch

from shards.checkpoint import CheckpointReader, ShardSelection
from shards.kv_cache import RollingKVCache, StepBatch, StepLayout, cache_capacity
from shards.model import TransformerShard


class LocalEngine:
    """Runs a `StepBatch` through every layer and returns the logits the batch asks for."""

    def __init__(
        self,
        checkpoint: str | Path,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        max_seqs: int = 16,
        max_seq_len: int | None = None,
        attention_backend: str = "auto",
    ) -> None:
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

    @property
    def cache_capacity(self) -> int:
        return cache_capacity(self.config.sliding_window, self.max_seq_len)

    @torch.inference_mode()
    def step(self, batch: StepBatch) -> torch.Tensor:
        """(rows wanting logits, vocab) float32 logits, in batch order."""
        layout = StepLayout.build(
            batch,
            self.cache_capacity,
            self.config.sliding_window,
            self.config.head_dim,
            self.config.rope_theta,
            self.device,
        )
        h = self.model.embed(batch.token_ids.to(self.device))
        h = self.model.run_layers(h, layout, self.cache)
        rows = torch.tensor(batch.logit_rows(), dtype=torch.long, device=self.device)
        return self.model.logits(h[rows]).cpu()
