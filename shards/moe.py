"""Sparse mixture of experts with top-k routing (Mixtral: 8 experts, top-2).

The gate and the experts are separate pieces so that the experts of one layer can live on other GPUs than the
gate: `route` runs where the layer's attention runs, `ExpertGroup` runs wherever its experts were placed.
"""

from __future__ import annotations

import torch
from torch import nn

from shards.layers import Expert


class Gate(nn.Module):
    """Router of one MoE layer: logits over experts, keep the top k, softmax over the chosen k."""

    def __init__(self, dim: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        self.top_k = top_k

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (tokens, dim) -> expert ids (tokens, k) int64 and weights (tokens, k) in x's dtype."""
        logits = torch.nn.functional.linear(x, self.weight)
        # softmax over all experts then renormalise over the chosen k == softmax over the chosen k logits
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return ids, weights.to(x.dtype)


class ExpertGroup(nn.Module):
    """Some of one layer's experts. Runs only the experts that received tokens, on only those tokens."""

    def __init__(self, dim: int, hidden_dim: int, expert_ids: list[int]) -> None:
        super().__init__()
        self.expert_ids = sorted(expert_ids)
        self.experts = nn.ModuleDict({str(e): Expert(dim, hidden_dim) for e in self.expert_ids})

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x: (tokens, dim); ids, weights: (tokens, k). Returns the weighted sum over this group's chosen experts.

        Choices of experts outside the group contribute nothing here; another group adds them.
        """
        out = torch.zeros_like(x)
        for expert_id, token_idx, weight in self.assignments(ids, weights):
            expert = self.experts[str(expert_id)]
            out.index_add_(0, token_idx, expert(x[token_idx]) * weight[:, None])
        return out

    def assignments(self, ids: torch.Tensor, weights: torch.Tensor):
        """(expert id, token indexes, routing weights) for each held expert that at least one token chose."""
        for expert_id in self.expert_ids:
            token_idx, choice = torch.nonzero(ids == expert_id, as_tuple=True)
            if token_idx.numel():
                yield expert_id, token_idx, weights[token_idx, choice]

    def tokens_per_expert(self, ids: torch.Tensor) -> dict[int, int]:
        return {e: int((ids == e).sum()) for e in self.expert_ids}
