"""Attention over packed batches, described by xformers `attn_bias` masks.

A step packs many sequences into one token batch. Which query may see which key is described by an xformers
attention-bias object built once per step (block-diagonal, causal from the bottom right, local window, padded keys).
`packed_attention` runs xformers' fused kernel when it loads on this machine, otherwise a torch SDPA kernel that
reads the same mask object and computes the same function.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

# xformers warns at import when its compiled kernels do not match this torch; we only need its mask classes
# there, and `xformers_kernels_available` decides about the kernels, so keep that warning out of the user's way.
logging.getLogger("xformers").setLevel(logging.ERROR)
from xformers.ops.fmha import attn_bias as xbias

AttnBias = xbias.AttentionBias


def prefill_bias(q_lens: list[int], kv_lens: list[int], window: int | None) -> AttnBias:
    """Queries are the last `q_len` tokens of each block of `kv_len` keys (cached keys in order, then the new ones)."""
    mask = xbias.BlockDiagonalMask.from_seqlens(q_seqlen=q_lens, kv_seqlen=kv_lens)
    if window is None:
        return mask.make_causal_from_bottomright()
    return mask.make_local_attention_from_bottomright(window)


def decode_bias(kv_lens: list[int], kv_capacity: int) -> AttnBias:
    """One query per sequence against its rolling buffer, used in place: `kv_capacity` slots, the first `kv_len` filled.

    The buffer holds exactly the tokens inside the window, so no window term is needed.
    """
    return xbias.BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens(
        q_seqlen=[1] * len(kv_lens), kv_padding=kv_capacity, kv_seqlen=kv_lens
    )


@functools.cache
def xformers_kernels_available(device_type: str) -> bool:
    """True when xformers' compiled attention runs here (it ships for one torch + CUDA build only)."""
    if device_type != "cuda":
        return False
    try:
        from xformers.ops import fmha

        q = torch.randn(1, 4, 1, 64, device="cuda", dtype=torch.float16)
        fmha.memory_efficient_attention_forward(q, q, q)
        return True
    except Exception:  # noqa: BLE001 - any failure to load the extension means "use torch"
        return False


def packed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: AttnBias, backend: str = "auto"
) -> torch.Tensor:
    """q: (q_tokens, n_heads, head_dim); k, v: (kv_tokens, n_kv_heads, head_dim) -> (q_tokens, n_heads, head_dim)."""
    if backend == "auto":
        backend = "xformers" if xformers_kernels_available(q.device.type) else "torch"
    if backend == "xformers":
        return _xformers_attention(q, k, v, bias)
    if backend == "torch":
        return _torch_attention(q, k, v, bias)
    raise ValueError(f"unknown attention backend {backend!r}; use 'auto', 'xformers' or 'torch'")


def _xformers_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: AttnBias) -> torch.Tensor:
    from xformers.ops import fmha

    group = q.shape[1] // k.shape[1]
    n_kv, head_dim = k.shape[1], k.shape[2]
    # xformers takes grouped-query attention as (B, M, G, H, K) with the KV heads broadcast over the group.
    q5 = q.view(1, q.shape[0], n_kv, group, head_dim)
    k5 = k.view(1, k.shape[0], n_kv, 1, head_dim).expand(-1, -1, -1, group, -1)
    v5 = v.view(1, v.shape[0], n_kv, 1, head_dim).expand(-1, -1, -1, group, -1)
    out = fmha.memory_efficient_attention(q5, k5, v5, attn_bias=bias)
    return out.view(q.shape)


def _blocks(bias: AttnBias) -> tuple[list[tuple[int, int]], list[tuple[int, int]], bool, int | None]:
    """Per-sequence (start, end) of queries and keys, whether causality counts from the bottom right, the window."""
    q_blocks = list(bias.q_seqinfo.intervals())
    k_blocks = list(bias.k_seqinfo.intervals())
    bottom_right = isinstance(
        bias,
        (
            xbias.BlockDiagonalCausalFromBottomRightMask,
            xbias.BlockDiagonalCausalWithOffsetPaddedKeysMask,
            xbias.BlockDiagonalCausalLocalAttentionPaddedKeysMask,
        ),
    )
    causal = isinstance(
        bias,
        (
            xbias.BlockDiagonalCausalMask,
            xbias.BlockDiagonalCausalFromBottomRightMask,
            xbias.BlockDiagonalCausalWithOffsetPaddedKeysMask,
            xbias.BlockDiagonalCausalLocalAttentionPaddedKeysMask,
        ),
    )
    if not causal:
        raise TypeError(f"attention mask {type(bias).__name__} is not a causal block-diagonal mask")
    window = getattr(bias, "_window_size", None)
    return q_blocks, k_blocks, bottom_right, window


def _torch_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: AttnBias) -> torch.Tensor:
    q_blocks, k_blocks, bottom_right, window = _blocks(bias)
    out = torch.empty_like(q)
    # Decode tokens (one query) and prefill chunks are padded in separate groups, so one long chunk
    # does not pad every decode token to its length.
    singles = [i for i, (s, e) in enumerate(q_blocks) if e - s == 1]
    others = [i for i, (s, e) in enumerate(q_blocks) if e - s != 1]
    for group in (singles, others):
        if group:
            _attend_group(q, k, v, out, [q_blocks[i] for i in group], [k_blocks[i] for i in group], bottom_right, window)
    return out


def _attend_group(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    q_blocks: list[tuple[int, int]],
    k_blocks: list[tuple[int, int]],
    bottom_right: bool,
    window: int | None,
) -> None:
    device = q.device
    q_lens = torch.tensor([e - s for s, e in q_blocks], device=device)
    k_lens = torch.tensor([e - s for s, e in k_blocks], device=device)
    q_starts = torch.tensor([s for s, _ in q_blocks], device=device)
    k_starts = torch.tensor([s for s, _ in k_blocks], device=device)
    max_q, max_k = int(q_lens.max()), int(k_lens.max())
    qi = torch.arange(max_q, device=device)
    ki = torch.arange(max_k, device=device)
    q_valid = qi[None, :] < q_lens[:, None]  # (B, max_q)
    k_valid = ki[None, :] < k_lens[:, None]  # (B, max_k)
    q_index = (q_starts[:, None] + qi[None, :]).clamp(max=q.shape[0] - 1)
    k_index = (k_starts[:, None] + ki[None, :]).clamp(max=k.shape[0] - 1)
    qb = q[q_index].transpose(1, 2)  # (B, n_heads, max_q, head_dim)
    kb = k[k_index].transpose(1, 2)  # (B, n_kv_heads, max_k, head_dim)
    vb = v[k_index].transpose(1, 2)
    # Position of each query on the key axis: bottom-right alignment puts the last query on the last key.
    q_pos = qi[None, :] + ((k_lens - q_lens)[:, None] if bottom_right else 0)
    allowed = k_valid[:, None, :] & (ki[None, None, :] <= q_pos[:, :, None])
    if window is not None:
        allowed &= q_pos[:, :, None] - ki[None, None, :] < window
    allowed |= ~q_valid[:, :, None]  # padded query rows: any finite row, discarded below
    o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=allowed[:, None], enable_gqa=qb.shape[1] != kb.shape[1])
    o = o.transpose(1, 2)  # (B, max_q, n_heads, head_dim)
    out[q_index[q_valid]] = o[q_valid]
