"""The transformer's building blocks: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU.

Parameter names follow the Hugging Face layout, so a shard's state dict is the checkpoint's tensors as they are
(the MoE experts, stacked per layer, live in `shards.moe`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from shards.attention import packed_attention

if TYPE_CHECKING:  # for annotations only: shards.kv_cache imports rotary_cos_sin from here
    from shards.kv_cache import RollingKVCache, StepLayout


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 whatever the weights' dtype, as the reference does.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (tokens, head_dim) for the rotate-half convention of the Hugging Face layout, in float32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (tokens, heads, head_dim); rotates each (i, i + head_dim/2) pair by the token's angle."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """Grouped-query attention: `n_heads` query heads share `n_kv_heads` key/value heads."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, backend: str = "auto") -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.backend = backend
        self.q_proj = nn.Linear(dim, n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * head_dim, dim, bias=False)

    def forward(self, x: torch.Tensor, layer: int, layout: StepLayout, cache: RollingKVCache) -> torch.Tensor:
        tokens = x.shape[0]
        q = self.q_proj(x).view(tokens, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(tokens, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(tokens, self.n_kv_heads, self.head_dim)
        q = apply_rotary(q, layout.cos, layout.sin)
        k = apply_rotary(k, layout.cos, layout.sin)
        keys, values = cache.update_and_read(layer, k, v, layout)
        out = packed_attention(q, keys, values, layout.bias, self.backend, layout.attention)
        return self.o_proj(out.reshape(tokens, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    """Dense SwiGLU feed-forward of Mistral: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
