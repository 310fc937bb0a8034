"""Grouping a layer's tokens by the expert groups their top-k experts live in, and combining the results."""

from __future__ import annotations

import torch


def expert_owners(groups: list[tuple[tuple[int, ...], tuple[int, ...]]], n_layers: int, n_experts: int) -> torch.Tensor:
    """(layers, experts) table of which group holds each expert of each layer, from (experts, layers) per group."""
    owner = torch.full((n_layers, n_experts), -1, dtype=torch.long)
    for g, (experts, layers) in enumerate(groups):
        for layer in layers:
            owner[layer, list(experts)] = g
    if (owner < 0).any():
        layer, expert = (owner < 0).nonzero()[0].tolist()
        raise ValueError(f"expert {expert} of layer {layer} is held by no expert group")
    return owner


def tokens_per_group(ids: torch.Tensor, owner_row: torch.Tensor, n_groups: int) -> list[torch.Tensor]:
    """For each group, the indexes of tokens with at least one chosen expert in that group (ascending)."""
    chosen_groups = owner_row.to(ids.device)[ids]  # (tokens, k)
    return [torch.nonzero((chosen_groups == g).any(dim=-1), as_tuple=True)[0] for g in range(n_groups)]


def combine(partials: list[tuple[torch.Tensor, torch.Tensor]], like: torch.Tensor) -> torch.Tensor:
    """Sum each group's weighted outputs back into token order (groups added in index order: deterministic)."""
    out = torch.zeros_like(like)
    for token_idx, values in partials:
        out.index_add_(0, token_idx, values)
    return out
