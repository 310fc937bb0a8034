"""RMSNorm and the rotary embedding as one Triton pass each (`shards/layer_kernels.py`), run by Triton's interpreter
on the CPU against the torch functions they stand for (`shards.layers.rms_norm`, `apply_rotary`)."""

from __future__ import annotations

import pytest

from tests.interpreted import run_interpreted

pytest.importorskip("triton")


CHECKS = r"""
import json, sys
import torch
from shards import layer_kernels, layers

gen = torch.Generator().manual_seed(0)
out = {"norm": [], "rotary": []}
for dtype in (torch.float32, torch.bfloat16):
    for shape in ((7, 64), (3, 80), (2, 3, 48)):  # a dim that is no power of two; leading dims
        x = (torch.randn(shape, generator=gen) * 4).to(dtype)
        w = (1 + torch.randn(shape[-1], generator=gen) * 0.1).to(dtype)
        got, want = layer_kernels.rms_norm(x, w, 1e-5), layers.rms_norm(x, w, 1e-5)
        out["norm"].append({"dtype": str(dtype), "shape": list(got.shape), "want_shape": list(want.shape),
                            "out_dtype": str(got.dtype), "want_dtype": str(want.dtype),
                            "max_diff": float((got.float() - want.float()).abs().max()),
                            "scale": float(want.float().abs().max())})
    for tokens, heads, head_dim, strided in ((5, 4, 16, False), (3, 6, 32, False), (4, 2, 16, True)):
        positions = torch.randint(0, 5000, (tokens,), generator=gen)
        cos, sin = layers.rotary_cos_sin(positions, head_dim, 1e6)
        base = torch.randn(tokens, heads * head_dim * (2 if strided else 1), generator=gen).to(dtype)
        # strided: every other head of a wider projection, as a view (copied first by the wrapper)
        x = base.view(tokens, -1, head_dim)[:, ::2] if strided else base.view(tokens, heads, head_dim)
        got, want = layer_kernels.apply_rotary(x, cos, sin), layers.apply_rotary(x, cos, sin)
        out["rotary"].append({"dtype": str(dtype), "shape": list(got.shape), "want_shape": list(want.shape),
                              "max_diff": float((got.float() - want.float()).abs().max()),
                              "scale": float(want.float().abs().max())})
from dataclasses import replace
from shards.attention import AttentionPlan, packed_attention, prefill_bias
out["band"] = []
for dtype in (torch.float32, torch.bfloat16):
    # (tokens, cached, window, heads, kv heads): one causal piece; a whole piece too; window - 1 cached; 6 heads
    for tokens, cached, window, heads, n_kv in ((16, 16, 16, 4, 2), (5, 20, 16, 4, 2), (16, 15, 16, 4, 2),
                                                (7, 9, 8, 6, 3)):
        bias = prefill_bias([tokens], [cached + tokens], window)
        plan = AttentionPlan.build(bias, "cpu")
        q = torch.randn(tokens, heads, 16, generator=gen).to(dtype)
        k, v = (torch.randn(cached + tokens, n_kv, 16, generator=gen).to(dtype) for _ in range(2))
        got = packed_attention(q, k, v, bias, backend="torch", plan=plan)
        want = packed_attention(q, k, v, bias, backend="torch", plan=replace(plan, band=None))
        out["band"].append({"dtype": str(dtype), "band": plan.band, "shape": list(got.shape),
                            "want_shape": list(want.shape), "max_diff": float((got.float() - want.float()).abs().max()),
                            "scale": float(want.float().abs().max())})
json.dump(out, sys.stdout)
"""


@pytest.fixture(scope="module")
def interpreted():
    return run_interpreted(CHECKS)


def limit(row: dict) -> float:
    # float32: the reduction's order at most; bf16: two bf16 ulps (Triton's interpreter emulates bf16 through numpy,
    # not the GPU's round-to-nearest-even)
    return (1e-6 if row["dtype"] == "torch.float32" else 1.6e-2) * max(1.0, row["scale"])


def test_the_fused_rms_norm_gives_the_torch_functions_values(interpreted):
    assert len(interpreted["norm"]) == 6
    for row in interpreted["norm"]:
        assert row["shape"] == row["want_shape"] and row["out_dtype"] == row["want_dtype"], row
        assert row["max_diff"] <= limit(row), row


def test_the_fused_rotary_gives_the_torch_functions_values(interpreted):
    assert len(interpreted["rotary"]) == 6
    for row in interpreted["rotary"]:
        assert row["shape"] == row["want_shape"], row
        assert row["max_diff"] <= limit(row), row


def test_the_band_merged_in_one_pass_gives_the_masked_paths_values(interpreted):
    """`_band_attention` with its Triton merge (the interpreter makes `fused_here` true) against the masked path."""
    assert len(interpreted["band"]) == 8
    for row in interpreted["band"]:
        assert row["band"] is not None and row["shape"] == row["want_shape"], row
        assert row["max_diff"] <= (1e-5 if row["dtype"] == "torch.float32" else 3e-2) * max(1.0, row["scale"]), row


@pytest.mark.parametrize("name", ["MISTRAL_CLUSTER_FUSED_ELEMENTWISE", "MISTRAL_CLUSTER_SPLIT_MIXED"])
def test_an_on_off_switch_with_another_value_is_named(monkeypatch, name):
    from shards.layer_kernels import switch

    monkeypatch.setenv(name, "no")
    with pytest.raises(ValueError, match=f"{name}='no'"):
        switch(name)
    monkeypatch.setenv(name, "0")
    assert switch(name) is False
    monkeypatch.delenv(name)
    assert switch(name) is True
