"""The torch attention kernel against xformers' own definition of each mask (its `materialize`)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from shards.attention import AttentionPlan, decode_bias, packed_attention, prefill_bias

N_HEADS, N_KV, HEAD_DIM = 4, 2, 16


def reference_attention(q, k, v, bias) -> torch.Tensor:
    """Dense float64 softmax attention with xformers' materialised mask, GQA by repeating KV heads."""
    mask = bias.materialize((q.shape[0], k.shape[0]), dtype=torch.float64)
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, dim=1)
    v = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) / HEAD_DIM**0.5 + mask
    return torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), v)


def rand(n: int, heads: int, seed: int) -> torch.Tensor:
    return torch.randn(n, heads, HEAD_DIM, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "q_lens,kv_lens,window",
    [
        ([5, 9, 1], [5, 9, 1], 4),  # first chunks, window shorter than some sequences
        ([5, 9, 1], [5, 9, 1], None),  # full causal attention
        ([4, 1, 6], [20, 13, 6], 8),  # chunks after a cached window, mixed with a decode token
        ([16], [32], 16),  # a chunk equal to the window after a full window of cache
        ([12], [12], None),  # one prompt's first chunk: the plain causal (flash) path
        ([12], [12], 12),  # the same with the window covering the whole chunk
        ([12], [12], 5),  # the window inside the chunk: masked path
        ([4], [12], None),  # a later chunk after cached keys: causal from the bottom right (flash, no mask)
        ([4], [12], 12),  # the same, the window covering every key
        ([4], [12], 8),  # the window inside the keys, a whole window cached: the band's pieces
        ([8], [15], 8),  # a chunk of the window after window - 1 cached keys: one causal piece of the cache
        ([3], [11], 8),  # a short chunk after a whole window: the cache's newest keys whole, the rest causal
        ([1], [9], 8),  # one token after a whole window
        ([8], [14], 8),  # too few cached keys for the band's pieces: the mask
    ],
)
def test_prefill_mask_matches_xformers_definition(q_lens, kv_lens, window):
    bias = prefill_bias(q_lens, kv_lens, window)
    q, k, v = rand(sum(q_lens), N_HEADS, 1), rand(sum(kv_lens), N_KV, 2), rand(sum(kv_lens), N_KV, 3)
    ours = packed_attention(q, k, v, bias, backend="torch")
    assert torch.allclose(ours.double(), reference_attention(q, k, v, bias), atol=1e-5)


@pytest.mark.parametrize(
    "q_lens,kv_lens,window,causal,lower_right,band",
    [
        ([12], [12], None, True, False, None),
        ([12], [12], 12, True, False, None),
        ([12], [12], 11, False, False, None),  # a first chunk longer than the window
        ([4], [12], None, False, True, None),
        ([4], [12], 12, False, True, None),
        ([4], [12], 11, False, False, None),  # 8 cached keys where the band needs 10: the mask
        ([4], [12], 9, False, False, 9),  # 8 cached keys, a window of 9: the band
        ([5, 7], [5, 7], None, False, False, None),
        ([4, 3], [12, 3], None, False, False, None),
        ([4, 3], [12, 11], 8, False, False, None),
    ],
)
def test_only_one_chunk_takes_a_maskless_path(q_lens, kv_lens, window, causal, lower_right, band):
    """Uncached: causal from the top left; after cached keys inside the window: from the bottom right; after a
    whole window of cached keys (but one): the band's pieces; several sequences or too few cached keys: the mask."""
    plan = AttentionPlan.build(prefill_bias(q_lens, kv_lens, window), "cpu")
    assert (plan.causal, plan.lower_right, plan.band) == (causal, lower_right, band)


def test_a_decode_step_over_padded_buffers_never_takes_the_maskless_paths():
    """One sequence's query against its buffer: rows past the filled ones are padding, which only the mask hides."""
    plan = AttentionPlan.build(decode_bias([5], 8), "cpu")
    assert not plan.causal and not plan.lower_right and plan.band is None


@pytest.mark.parametrize("tokens,cached,window", [(64, 64, 64), (64, 63, 64), (17, 64, 64), (64, 200, 64)])
def test_the_band_in_bfloat16_is_the_masked_path_to_rounding(tokens, cached, window):
    """The band's pieces are rounded to bfloat16 before their merge: as close to the float64 reference as the masked
    path over the same bfloat16 inputs (a wrong piece or merge would be off by the size of the values)."""
    bias = prefill_bias([tokens], [cached + tokens], window)
    q = rand(tokens, N_HEADS, 1).bfloat16()
    k, v = rand(cached + tokens, N_KV, 2).bfloat16(), rand(cached + tokens, N_KV, 3).bfloat16()
    plan = AttentionPlan.build(bias, "cpu")
    assert plan.band == window
    ours = packed_attention(q, k, v, bias, backend="torch", plan=plan).double()
    masked = packed_attention(q, k, v, bias, backend="torch", plan=replace(plan, band=None)).double()
    exact = reference_attention(q, k, v, bias)
    assert (ours - exact).abs().max() <= 2 * (masked - exact).abs().max() + 1e-3


def test_decode_mask_with_padded_keys_matches_xformers_definition():
    capacity, kv_lens = 8, [8, 3, 1, 8]
    bias = decode_bias(kv_lens, capacity)
    q = rand(len(kv_lens), N_HEADS, 4)
    k, v = rand(capacity * len(kv_lens), N_KV, 5), rand(capacity * len(kv_lens), N_KV, 6)
    ours = packed_attention(q, k, v, bias, backend="torch")
    assert torch.allclose(ours.double(), reference_attention(q, k, v, bias), atol=1e-5)


def test_padding_rows_beyond_a_sequence_are_never_attended():
    """Garbage in the unused rows of a slot must not change the result."""
    capacity, kv_lens = 8, [3, 5]
    bias = decode_bias(kv_lens, capacity)
    q = rand(2, N_HEADS, 7)
    k, v = rand(16, N_KV, 8), rand(16, N_KV, 9)
    before = packed_attention(q, k, v, bias, backend="torch")
    k[3:8] = 1e4
    v[13:16] = -1e4
    assert torch.equal(packed_attention(q, k, v, bias, backend="torch"), before)


def test_unknown_backend_is_named_in_the_error():
    bias = prefill_bias([1], [1], None)
    x = rand(1, N_HEADS, 0)
    with pytest.raises(ValueError, match="'flash9'"):
        packed_attention(x, x[:, :N_KV], x[:, :N_KV], bias, backend="flash9")
