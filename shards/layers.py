"""The transformer's building blocks: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU.

Parameter names follow the Hugging Face layout, so a shard's state dict is the checkpoint's tensors as they are
(the MoE experts, stacked per layer, live in `shards.moe`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from shards import layer_kernels
from shards.attention import packed_attention
from shards.decode_attention import decode_attention, decodes_in_place

if TYPE_CHECKING:  # for annotations only: shards.kv_cache imports rotary_cos_sin from here
    from shards.kv_cache import RollingKVCache, StepLayout


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if layer_kernels.fused_here(x):
            return layer_kernels.rms_norm(x, self.weight, self.eps)
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalised in float32 whatever the weights' dtype, as the reference does."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


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

    def forward(
        self, x: torch.Tensor, layer: int, layout: StepLayout, cache: RollingKVCache, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Attention's output projected, for every token or only `rows` (every token's keys go to the cache)."""
        tokens = x.shape[0]
        if hasattr(self, "wqkv"):  # one GEMM (a 4k prompt's k and v GEMMs alone ran at half the tensor cores' rate)
            q_rows, kv_rows = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
            q, k, v = F.linear(x, self.wqkv).split((q_rows, kv_rows, kv_rows), dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(tokens, self.n_heads, self.head_dim)
        k = k.view(tokens, self.n_kv_heads, self.head_dim)
        v = v.view(tokens, self.n_kv_heads, self.head_dim)
        rotary = layer_kernels.apply_rotary if layer_kernels.fused_here(x) else apply_rotary
        q = rotary(q, layout.cos, layout.sin)
        k = rotary(k, layout.cos, layout.sin)
        if layout.decode_slots is not None and decodes_in_place(tokens, q.device):
            out = self._in_place(q, k, v, layer, layout, cache)
        elif layout.split is not None:  # a mixed step: its running sequences in place, its prompts packed
            d, part = layout.split.rows, layout.split.prefill
            keys, values = cache.update_and_read(layer, k[d:], v[d:], part)
            packed = packed_attention(q[d:], keys, values, part.bias, self.backend, part.attention)
            out = torch.cat([self._in_place(q[:d], k[:d], v[:d], layer, layout.split.decode, cache), packed])
        else:
            keys, values = cache.update_and_read(layer, k, v, layout)
            out = packed_attention(q, keys, values, layout.bias, self.backend, layout.attention)
        out = out.reshape(tokens, self.n_heads * self.head_dim)
        if rows is not None and not len(rows):  # nothing read: no kernel sees an empty batch
            return out.new_empty((0, self.o_proj.out_features))
        return self.o_proj(out if rows is None else out[rows])

    @staticmethod
    def _in_place(q, k, v, layer: int, layout: StepLayout, cache: RollingKVCache) -> torch.Tensor:
        """One new token a sequence against its buffer, read in place by the decode kernel, which also writes the
        step's keys and values there."""
        k_rows, v_rows = cache.layer_rows(layer)
        span = layout.decode_span or cache.capacity
        slots, positions = layout.decode_slots, layout.positions
        return decode_attention(q, k_rows, v_rows, slots, positions, cache.capacity, span, k_new=k, v_new=v)

    def fuse_qkv(self) -> torch.Tensor:
        """q, k and v as row blocks of one (q + k + v rows, dim) tensor, for one GEMM (the compiled decode step).
        The three parameters become views of it: the same values and names, no extra memory once loaded."""
        if not hasattr(self, "wqkv"):
            projections = (self.q_proj, self.k_proj, self.v_proj)
            self.register_buffer("wqkv", _fuse_rows(projections), persistent=False)
        return self.wqkv


class FeedForward(nn.Module):
    """Dense SwiGLU feed-forward of Mistral: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "w13"):  # gate and up as one GEMM, then one pass for silu(gate) * up
            from shards.moe_kernels import silu_mul

            return self.down_proj(silu_mul(F.linear(x, self.w13)))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def fuse_gate_up(self) -> torch.Tensor:
        """gate and up as one (2 * hidden, dim) tensor (the experts' w13 layout), their parameters views of it."""
        if not hasattr(self, "w13"):
            self.register_buffer("w13", _fuse_rows((self.gate_proj, self.up_proj)), persistent=False)
        return self.w13


def _fuse_rows(projections: tuple[nn.Linear, ...]) -> torch.Tensor:
    """The projections' weights concatenated by rows; each projection's weight becomes a view of its rows."""
    fused = torch.cat([p.weight.detach() for p in projections])
    start = 0
    for p in projections:
        rows = p.weight.shape[0]
        p.weight = nn.Parameter(fused[start : start + rows], requires_grad=False)  # frees the old tensor
        start += rows
    return fused
