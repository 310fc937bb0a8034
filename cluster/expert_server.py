"""A worker's expert groups serving one stage that lives on another worker. No Ray here: the worker's serving
loop calls `serve` once per step plan.

The plan says everything: which micro-batches, how many tokens each, and which of the stage's layers this
worker holds experts of. So for every micro-batch and every such layer, in order, one message comes in (the
stage's packed activations, ids and weights, every token) and one goes back (this worker's groups' weighted sum).
No header, no host sync: the same exchanges the stage makes, in the same order, on a channel of their own.
"""

from __future__ import annotations

import time
from collections import deque

import torch

from cluster.stage_runner import local_experts_sum, unpack_for_experts
from cluster.transport import Channel
from router.pipeline import split_microbatches
from router.step import ExpertMessage, StepPlan
from shards.model import ExpertShard

TRACE_LIMIT = 100_000  # expert messages remembered for `--profile`: bounded, so a long-running server does not grow


class ExpertServer:
    def __init__(
        self,
        stage: int,
        stage_layers: tuple[int, ...],
        plan,
        local_groups: dict[int, ExpertShard],
        config,
        device: torch.device,
    ) -> None:
        self.stage = stage
        self.config, self.dtype = config, plan.torch_dtype
        groups = [g for g in plan.expert_groups if g.index in local_groups]
        # The stage's layers this worker holds experts of, each with its groups (group order).
        self.layers = [
            (layer, [local_groups[g.index] for g in groups if layer in g.layers])
            for layer in stage_layers
            if any(layer in g.layers for g in groups)
        ]
        self.channel: Channel | None = None
        self.received: deque[ExpertMessage] = deque(maxlen=TRACE_LIMIT)
        # Tokens each held expert computed for, counted on the device (no host sync per message).
        self.computed = torch.zeros(config.n_layers, max(config.num_experts, 1), dtype=torch.long, device=device)
        self._held = {
            id(g.groups[str(layer)]): torch.tensor(g.groups[str(layer)].expert_ids, dtype=torch.long, device=device)
            for layer, gs in self.layers
            for g in gs
        }

    @property
    def needed(self) -> bool:
        return bool(self.layers)

    @torch.inference_mode()
    def serve(self, plan: StepPlan, micro_batch_size: int) -> None:
        dim, k = self.config.dim, self.config.num_experts_per_tok
        for mb in split_microbatches(plan.without_tokens(), micro_batch_size):
            for layer, groups in self.layers:
                packed = self.channel.recv((mb.n_tokens, dim + 2 * k), self.dtype, "expert_in")
                t0 = time.perf_counter()
                x, ids, weights = unpack_for_experts(packed, dim, k)
                out = local_experts_sum(groups, layer, x, ids, weights)
                self.channel.send(out, "expert_out")
                for g in groups:
                    group = g.groups[str(layer)]
                    held = self._held[id(group)]
                    self.computed[layer].index_add_(0, held, group.tokens_per_expert(ids))
                self.received.append(ExpertMessage(self.stage, layer, mb.n_tokens, time.perf_counter() - t0))

    def take_computed(self) -> dict[int, dict[int, int]]:
        """Tokens each held expert computed for, per layer, since the last call (read on the host: a sync)."""
        counts = self.computed.to("cpu", copy=True)  # a copy on the CPU too: zeroed next
        self.computed.zero_()
        return {
            layer: {e: int(n) for e, n in enumerate(row.tolist()) if n} for layer, row in enumerate(counts) if row.any()
        }
