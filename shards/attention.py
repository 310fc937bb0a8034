"""Attention over packed batches, described by xformers `attn_bias` masks.

A step packs many sequences into one token batch. Which query may see which key is described by an xformers
attention-bias object built once per step (block-diagonal, causal from the bottom right, local window, padded keys).
`packed_attention` runs xformers' fused kernel when it loads on this machine, otherwise torch SDPA computing the same
function from an `AttentionPlan`: the mask object turned into device index tensors and masks once per step, so the
layers themselves copy nothing from the host and never wait for it. A decode step attends over each sequence's
rolling buffer in place.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from shards.host_copy import to_device
from shards.layer_kernels import band_merge, fused_here

# xformers warns at import when its compiled kernels do not match this torch; we only need its mask classes
# there, and `xformers_kernels_available` decides about the kernels, so keep that warning out of the user's way.
logging.getLogger("xformers").setLevel(logging.ERROR)
from xformers.ops import fmha  # noqa: E402 - after the line above
from xformers.ops.fmha import attn_bias as xbias  # noqa: E402

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
        q = torch.randn(1, 4, 1, 64, device="cuda", dtype=torch.float16)
        fmha.memory_efficient_attention_forward(q, q, q)
        return True
    except Exception:  # noqa: BLE001 - any failure to load the extension means "use torch"
        return False


def packed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: AttnBias,
    backend: str = "auto",
    plan: AttentionPlan | None = None,
) -> torch.Tensor:
    """q: (q_tokens, n_heads, head_dim); k, v: (kv_tokens, n_kv_heads, head_dim) -> (q_tokens, n_heads, head_dim).

    For a decode step k, v may also be (seqs, capacity, n_kv_heads, head_dim): each sequence's rolling buffer.
    `plan` is the step's `AttentionPlan` for `bias`; without one it is built here (once per call).
    """
    if backend == "auto":
        backend = "xformers" if xformers_kernels_available(q.device.type) else "torch"
    if backend not in ("xformers", "torch"):
        raise ValueError(f"unknown attention backend {backend!r}; use 'auto', 'xformers' or 'torch'")
    if backend == "torch" and k.dim() == 4 and plan is not None and plan.decode_mask is not None:
        return _decode_attention(q, k, v, plan)
    if k.dim() == 4:
        k, v = k.flatten(0, 1), v.flatten(0, 1)
    if backend == "xformers":
        return _xformers_attention(q, k, v, bias)
    if plan is None or plan.groups is None:
        plan = AttentionPlan.build(bias, q.device)
    return _torch_attention(q, k, v, plan)


def _xformers_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: AttnBias) -> torch.Tensor:
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


def _pad(n: int, multiple: int = 16) -> int:
    """Keys padded to a multiple of 16: the memory-efficient kernel would otherwise pad the mask on every call."""
    return -(-n // multiple) * multiple


@dataclass
class _PaddedGroup:
    """Sequences padded into one (seqs, queries, keys) box: one SDPA call."""

    q_index: torch.Tensor | slice  # (seqs, max_q) packed query rows, or the one sequence's rows
    k_index: torch.Tensor  # (seqs, max_k) packed key rows (padding points at row 0, masked out)
    mask: torch.Tensor  # (seqs, 1, max_q, max_k) bool: which key each query may see
    rows: int  # seqs * max_q: this group's rows in the concatenated output


@dataclass
class AttentionPlan:
    """What the torch kernel needs for one step's mask, built once per step on the device and reused by every layer.

    Decode tokens (one query) and prefill chunks are padded in separate groups, so one long chunk does not pad
    every decode token to its length. A decode step over rolling buffers uses `decode_mask` instead.
    """

    groups: list[_PaddedGroup] | None  # None in a decode plan: only rolling buffers are attended
    out_rows: torch.Tensor | None  # (q_tokens,) row of each packed query in the groups' output; None: identity
    decode_mask: torch.Tensor | None = None  # (seqs, 1, 1, capacity) bool: buffer row < filled rows
    causal: bool = False  # one sequence, no cached keys, inside the window: a plain causal mask (flash, no mask)
    lower_right: bool = False  # one sequence, cached keys before its chunk, all inside the window: causal from the
    # bottom right (flash, no mask)
    band: int | None = None  # the window, where one sequence's chunk follows a whole window of cached keys (a long
    # prompt's later chunks): `_band_attention`, causal pieces with no mask merged by their log-sum-exp
    _cache: dict = field(default_factory=dict)

    @staticmethod
    def build(bias: AttnBias, device: torch.device | str) -> AttentionPlan:
        q_blocks, k_blocks, bottom_right, window = _blocks(bias)
        singles = [i for i, (s, e) in enumerate(q_blocks) if e - s == 1]
        others = [i for i, (s, e) in enumerate(q_blocks) if e - s != 1]
        groups, base = [], 0
        out_rows = [0] * sum(e - s for s, e in q_blocks)
        for members in (singles, others):
            if not members:
                continue
            qb, kb = [q_blocks[i] for i in members], [k_blocks[i] for i in members]
            group = _padded_group(qb, kb, bottom_right, window, torch.device(device))
            max_q = group.rows // len(members)
            for b, (s, e) in enumerate(qb):
                out_rows[s:e] = range(base + b * max_q, base + b * max_q + e - s)
            groups.append(group)
            base += group.rows
        identity = base == len(out_rows) and out_rows == list(range(base))
        rows = None if identity else to_device(out_rows, torch.long, device)
        (q_start, q_end), (k_start, k_end) = q_blocks[0], k_blocks[0]
        one = len(q_blocks) == 1 and (window is None or k_end - k_start <= window)
        causal = one and q_end - q_start == k_end - k_start
        # (unpadded keys only: a decode step's padded buffers hold rows past the filled ones)
        unpadded = isinstance(bias, xbias.BlockDiagonalCausalFromBottomRightMask)
        lower_right = one and unpadded and q_end - q_start < k_end - k_start
        tokens, cached = q_end - q_start, (k_end - k_start) - (q_end - q_start)
        # keys beyond the window (so not `one`), a whole window but one of them cached, a chunk of at most the window
        in_band = len(q_blocks) == 1 and unpadded and not one and window is not None
        band = window if in_band and cached >= window - 1 and tokens <= window else None
        return AttentionPlan(groups, rows, causal=causal, lower_right=lower_right, band=band)

    @staticmethod
    def for_decode(kv_lens: list[int], capacity: int, device: torch.device | str) -> AttentionPlan:
        """A decode step over rolling buffers of `capacity` rows, the first `kv_len` of each filled."""
        lens = to_device(kv_lens, torch.long, device)
        mask = torch.arange(capacity, device=device)[None, :] < lens[:, None]
        return AttentionPlan(None, None, mask[:, None, None, :])

    def additive(self, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """`mask` as 0 / -inf in `dtype`, made by the step's first layer and reused by the others."""
        key = (id(mask), dtype)
        if key not in self._cache:
            self._cache[key] = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
                ~mask, float("-inf")
            )
        return self._cache[key]

    def kv_rows(self, group: _PaddedGroup, n_kv: int, q_per_kv: int) -> torch.Tensor:
        """(seqs, max_k, n_heads) rows of k.view(-1, head_dim): gathers the padded keys and repeats each KV head
        for its `q_per_kv` query heads in one kernel."""
        key = (id(group), n_kv, q_per_kv)
        if key not in self._cache:
            heads = torch.arange(n_kv * q_per_kv, device=group.k_index.device) // q_per_kv
            self._cache[key] = group.k_index[:, :, None] * n_kv + heads
        return self._cache[key]


def _padded_group(
    q_blocks: list[tuple[int, int]],
    k_blocks: list[tuple[int, int]],
    bottom_right: bool,
    window: int | None,
    device: torch.device,
) -> _PaddedGroup:
    q_lens, k_lens = [e - s for s, e in q_blocks], [e - s for s, e in k_blocks]
    max_q, max_k = max(q_lens), _pad(max(k_lens))
    starts = [[s for s, _ in q_blocks], [s for s, _ in k_blocks]]
    q_len, k_len, q_start, k_start = to_device([q_lens, k_lens, *starts], torch.long, device)
    qi = torch.arange(max_q, device=device)
    ki = torch.arange(max_k, device=device)
    q_valid = qi[None, :] < q_len[:, None]  # (B, max_q)
    k_valid = ki[None, :] < k_len[:, None]  # (B, max_k)
    if len(q_blocks) == 1:
        q_index: torch.Tensor | slice = slice(q_blocks[0][0], q_blocks[0][1])
    else:
        q_index = torch.where(q_valid, q_start[:, None] + qi[None, :], 0)
    k_index = torch.where(k_valid, k_start[:, None] + ki[None, :], 0)
    # Position of each query on the key axis: bottom-right alignment puts the last query on the last key.
    q_pos = qi[None, :] + ((k_len - q_len)[:, None] if bottom_right else 0)
    allowed = k_valid[:, None, :] & (ki[None, None, :] <= q_pos[:, :, None])
    if window is not None:
        allowed &= q_pos[:, :, None] - ki[None, None, :] < window
    allowed |= ~q_valid[:, :, None]  # padded query rows: any finite row, discarded
    return _PaddedGroup(q_index, k_index, allowed[:, None], len(q_blocks) * max_q)


def _torch_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
    n_heads, n_kv, head_dim = q.shape[1], k.shape[1], k.shape[2]
    if plan.causal:
        return _causal_attention(q, k, v)
    if plan.lower_right:
        return _causal_attention(q, k, v, lower_right=True)
    if plan.band is not None:
        return _band_attention(q, k, v, plan.band)
    k_flat, v_flat = k.reshape(-1, head_dim), v.reshape(-1, head_dim)
    outs = []
    for group in plan.groups:
        qb = q[group.q_index]
        qb = qb[None] if isinstance(group.q_index, slice) else qb  # (B, max_q, n_heads, head_dim)
        mask = plan.additive(group.mask, q.dtype)
        if qb.shape[1] == 1:  # one query per sequence: its heads sharing a KV head are that head's query rows
            kb, vb = k[group.k_index].transpose(1, 2), v[group.k_index].transpose(1, 2)  # (B, n_kv, max_k, head_dim)
            o = F.scaled_dot_product_attention(qb.view(qb.shape[0], n_kv, -1, head_dim), kb, vb, attn_mask=mask)
            outs.append(o.reshape(-1, n_heads, head_dim))
            continue
        # Keys expanded to the query heads here rather than `enable_gqa`: the memory-efficient kernel, the one that
        # takes a mask on GPU, has no GQA, and SDPA would fall back to materialising every (head, q, k) score.
        rows = plan.kv_rows(group, n_kv, n_heads // n_kv)
        kb, vb = k_flat[rows], v_flat[rows]  # (B, max_k, n_heads, head_dim)
        o = F.scaled_dot_product_attention(qb.transpose(1, 2), kb.transpose(1, 2), vb.transpose(1, 2), attn_mask=mask)
        outs.append(o.transpose(1, 2).reshape(-1, n_heads, head_dim))  # (B * max_q, n_heads, head_dim)
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return out if plan.out_rows is None else out[plan.out_rows]


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lower_right: bool = False) -> torch.Tensor:
    """One sequence's chunk: causal without a mask takes a flash kernel (a prompt's first chunk of 4k tokens: a 32 MiB
    mask per layer and the memory-efficient kernel otherwise); on a GPU in half precision cuDNN's, called directly so
    that it reads the KV heads as they are. With `lower_right` the chunk follows cached keys (k longer than q; a long
    prompt's later chunks inside the window): causal from the bottom right, which flash also takes without a mask
    (`torch.nn.attention.bias.causal_lower_right`), the KV heads copied out to their query heads."""
    tokens, n_heads, _ = q.shape
    keys = k.shape[0]
    # 4-D (batch of one): with 3-D inputs SDPA takes its math path, 13 ms instead of ~1 for 4k tokens on H200.
    qb, kb, vb = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
    if not lower_right and _cudnn_here(q):
        return _attention_with_lse(qb, kb, vb, causal=True)[0][0].transpose(0, 1)
    kb, vb = _for_query_heads(kb, n_heads), _for_query_heads(vb, n_heads)
    if lower_right:
        from torch.nn.attention.bias import causal_lower_right

        o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=causal_lower_right(tokens, keys))
    else:
        o = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True)
    return o[0].transpose(0, 1)


def _for_query_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(1, n_kv_heads, n, head_dim) keys or values -> (1, n_heads, n, head_dim), each KV head repeated for its query
    heads (one copy), for the kernels that want as many KV heads as query heads."""
    return x if x.shape[1] == n_heads else x.repeat_interleave(n_heads // x.shape[1], dim=1)


def _cudnn_here(q: torch.Tensor) -> bool:
    """Whether cuDNN's attention runs for `q`: on CUDA in half precision, on a GPU it supports (Ampere and later)
    with SDPA's cuDNN backend enabled. It takes grouped-query attention as it is (8 KV heads for 32 query heads: the
    same output and log-sum-exp as copied heads, in the same time, measured on an H200 with torch 2.11,
    `shard_profile-bandmerge-h200.json`), where the copies cost 0.67 ms a layer of a 16k prompt's later chunk.
    Elsewhere the other kernels take copied heads."""
    if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16):
        return False
    index = q.device.index if q.device.index is not None else torch.cuda.current_device()
    return torch.backends.cuda.cudnn_sdp_enabled() and _cudnn_attention_supported(index)


@functools.cache
def _cudnn_attention_supported(device_index: int) -> bool:
    return torch.backends.cudnn.is_available() and torch.cuda.get_device_capability(device_index)[0] >= 8


def _band_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    """One sequence's chunk of `tokens` queries over `cached` keys (at least window - 1 of them, in position order)
    then its own, under a sliding window: query i (at key cached + i) sees keys cached + i - window + 1 .. cached + i.

    SDPA has no sliding window, and a mask sends it to the memory-efficient kernel: a 16k prompt's later chunks took
    1.64 ms a layer there against 0.25 for a first chunk's causal flash (`attention-lse-ops-h200.json`,
    `shard_profile-later-chunk-split-h200.json`). So the band is cut into pieces that need no mask, each through a
    kernel that also returns its rows' log-sum-exp, merged exactly by those: the own keys, causal (a square);
    the cached keys taken newest first with the queries taken last first, where query r of the first
    q = min(tokens, window - 1) sees the newest d = window - 1 - q cached keys whole, then the next q causally
    (a square again). Only square causal pieces, where every backend's causal alignment agrees.
    """
    tokens, n_heads, _ = q.shape
    cached = k.shape[0] - tokens
    seen = min(tokens, window - 1)  # queries that see some cached key (the later ones see only their own chunk)
    whole = window - 1 - seen  # the newest cached keys every one of those queries sees
    back = torch.arange(cached - 1, cached - window, -1, device=k.device)  # the window - 1 newest cached, newest first
    kr, vr = k[back].transpose(0, 1)[None], v[back].transpose(0, 1)[None]
    qr = q[:seen].flip(0).transpose(0, 1)[None]
    own_k, own_v = k[cached:].transpose(0, 1)[None], v[cached:].transpose(0, 1)[None]
    own = _attention_with_lse(q.transpose(0, 1)[None], own_k, own_v, causal=True)
    pieces = [_attention_with_lse(qr, kr[:, :, whole:], vr[:, :, whole:], causal=True)]
    if whole:
        pieces.append(_attention_with_lse(qr, kr[:, :, :whole], vr[:, :, :whole], causal=False))
    if fused_here(q):
        return band_merge((own[0][0], own[1][0]), [(o[0], lse[0]) for o, lse in pieces], seen)
    return _band_merge_torch(own, pieces, seen, q.dtype)


def _band_merge_torch(
    own: tuple[torch.Tensor, torch.Tensor], pieces: list[tuple[torch.Tensor, torch.Tensor]], seen: int, dtype
) -> torch.Tensor:
    """`shards.layer_kernels.band_merge` in torch's ops (1, heads, n, hd) -> (tokens, heads, hd), for a CPU."""
    o, lse = own
    pieces = [(p.flip(2), p_lse.flip(2)) for p, p_lse in pieces]  # back to the queries' order
    head = _merge_by_lse([(o[:, :, :seen], lse[:, :, :seen]), *pieces], dtype)
    out = head if seen == o.shape[2] else torch.cat([head, o[:, :, seen:]], dim=2)
    return out[0].transpose(0, 1)


def _attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, heads, n, hd) attention (k, v: (1, kv heads, keys, hd)) and each row's log-sum-exp of its scaled scores
    (1, heads, n), float32. `causal` only for square pieces: the backends differ in how a causal mask aligns
    otherwise (measured on an H200: flash from the bottom right, cuDNN and the memory-efficient kernel from the top
    left)."""
    assert not causal or q.shape[2] == k.shape[2], (q.shape, k.shape)
    n = q.shape[2]
    if _cudnn_here(q):  # KV heads as they are
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False)[:2]
        return out, lse.reshape(*lse.shape[:2], -1)[:, :, :n].float()
    k, v = _for_query_heads(k, q.shape[1]), _for_query_heads(v, q.shape[1])
    if q.device.type == "cuda":  # float32: the memory-efficient kernel (its log-sum-exp padded to 32 rows)
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal)[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal)
    return out, lse.reshape(*lse.shape[:2], -1)[:, :, :n].float()


def _merge_by_lse(parts: list[tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype) -> torch.Tensor:
    """Attention over the union of disjoint key sets from each set's output and log-sum-exp."""
    total = torch.logsumexp(torch.stack([lse for _, lse in parts]), dim=0)
    out = sum(o.float() * torch.exp(lse - total)[..., None] for o, lse in parts)
    return out.to(dtype)


def _decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
    """One query per sequence over its rolling buffer, k, v: (seqs, capacity, n_kv_heads, head_dim).

    The `n_heads // n_kv_heads` query heads sharing a KV head become that head's query rows, so SDPA needs neither
    GQA nor a causal mask: every filled row of the buffer is in the window. The rows are not in position order once
    the buffer wraps, which attention (a weighted set) does not see; the rotary was applied when they were written.
    """
    seqs, span, n_kv, head_dim = k.shape
    qg = q.view(seqs, n_kv, q.shape[1] // n_kv, head_dim)
    # (seqs, 1, 1, capacity); the keys may be the buffers' first `span` rows only (`kv_cache.decode_span`)
    mask = plan.additive(plan.decode_mask, q.dtype)[..., :span]
    o = F.scaled_dot_product_attention(qg, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return o.reshape(q.shape)


def decode_attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`_decode_attention` written out as products, sums and a softmax in float32, for a compiler to generate.

    q: (seqs, n_heads, head_dim); k, v: (seqs, capacity, n_kv_heads, head_dim), each sequence's rolling buffer;
    mask: (seqs, 1, 1, capacity) bool, the filled rows. Inductor turns this into a few reductions that read the
    buffers once, gathered by slot in place; SDPA's fused kernels are built for many queries and, at one query a
    sequence, cost ~24 us a layer to read ~2 MB on an H200 (bench/NOTES.md). gpt-fast decodes through SDPA's math
    path under inductor for the same reason.
    """
    seqs, capacity, n_kv, head_dim = k.shape
    qg = q.view(seqs, 1, n_kv, q.shape[1] // n_kv, head_dim).float() * head_dim**-0.5
    scores = (qg * k.float()[:, :, :, None, :]).sum(-1)  # (seqs, capacity, n_kv, group)
    scores = scores.masked_fill(~mask.view(seqs, capacity, 1, 1), float("-inf"))
    p = torch.softmax(scores, dim=1)
    out = (p[..., None] * v.float()[:, :, :, None, :]).sum(1)  # (seqs, n_kv, group, head_dim)
    return out.view(q.shape).to(q.dtype)
