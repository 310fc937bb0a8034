"""The fused elementwise passes around the expert GEMMs (`shards/moe_kernels.py`), run by Triton's interpreter on
the CPU against the unfused torch ops they replace, and the expert group through them against its reference loop."""

from __future__ import annotations

import pytest

from tests.interpreted import run_interpreted

pytest.importorskip("triton")


CHECKS = r"""
import json, os, sys
import torch
from shards import moe_kernels
from shards.moe import ExpertGroup

gen = torch.Generator().manual_seed(0)
out = {"silu_mul": [], "combine": [], "group": []}
for dtype in (torch.float32, torch.bfloat16):
    for rows, hidden, scaled in ((5, 40, False), (3, 1100, True), (4, 2 * 3, True)):
        gate_up = (torch.randn(rows, 2 * hidden, generator=gen) * 3).to(dtype)
        scale = torch.rand(rows, generator=gen).to(dtype) if scaled else None
        fused = moe_kernels.silu_mul(gate_up, scale)
        os.environ["TRITON_INTERPRET"] = "0"  # the torch ops
        plain = moe_kernels.silu_mul(gate_up, scale)
        os.environ["TRITON_INTERPRET"] = "1"
        out["silu_mul"].append({"dtype": str(dtype), "shape": list(fused.shape), "want": list(plain.shape),
                                "max_diff": float((fused.float() - plain.float()).abs().max()),
                                "scale": float(plain.float().abs().max())})
    for tokens, k, dim, n_local in ((6, 2, 48, 3), (1, 2, 1030, 8), (5, 3, 16, 2)):
        local = torch.randint(0, n_local + 1, (tokens, k), generator=gen)  # n_local: held elsewhere
        local[0] = n_local  # a token none of whose choices is held here: an exact zero row
        weights = torch.softmax(torch.randn(tokens, k, generator=gen), dim=-1).to(dtype)
        _, order = torch.sort(local.flatten(), stable=True)
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel()))
        ys = torch.randn(tokens * k, dim, generator=gen).to(dtype)
        ys[(local.flatten() == n_local).index_select(0, order)] = float("nan")  # rows no expert here wrote
        fused = moe_kernels.combine_choices(ys, order, inverse, local, weights, n_local)
        os.environ["TRITON_INTERPRET"] = "0"
        plain = moe_kernels.combine_choices(ys, order, inverse, local, weights, n_local)
        os.environ["TRITON_INTERPRET"] = "1"
        out["combine"].append({"dtype": str(dtype), "finite": bool(torch.isfinite(fused).all()),
                               "max_diff": float((fused.float() - plain.float()).abs().max()),
                               "zero_rows": [t for t in range(tokens) if bool((local[t] == n_local).all())],
                               "zero_rows_exact": all(bool((fused[t] == 0).all()) for t in range(tokens)
                                                      if bool((local[t] == n_local).all()))})

# The grouped and dense paths of a group holding some experts, through the fused passes, against the reference loop.
E, K, dim, hidden = 8, 2, 32, 48
held = [1, 2, 5, 6]
g = ExpertGroup(dim, hidden, held, E)
tensors = {f"e{e}.{n}.weight": torch.randn(shape, generator=gen) / shape[1] ** 0.5
           for e in held for n, shape in (("w1", (hidden, dim)), ("w3", (hidden, dim)), ("w2", (dim, hidden)))}
g.load_experts(tensors, "e", None, "cpu")
x = torch.randn(9, dim, generator=gen)
ids = torch.rand(9, E, generator=gen).topk(K, dim=-1).indices
weights = torch.softmax(torch.randn(9, K, generator=gen), dim=-1)
ref = g.forward_loop(x, ids, weights)
for name in ("forward_grouped", "forward_dense"):
    got = getattr(g, name)(x, ids, weights)
    out["group"].append({"path": name, "max_diff": float((got - ref).abs().max()), "scale": float(ref.abs().max())})
json.dump(out, sys.stdout)
"""


@pytest.fixture(scope="module")
def interpreted():
    return run_interpreted(CHECKS)


def test_silu_mul_gives_the_unfused_ops_values(interpreted):
    rows = interpreted["silu_mul"]
    assert len(rows) == 6
    for row in rows:
        assert row["shape"] == row["want"], row
        # float32: exp's last bit at most. bf16: the same roundings, but Triton's interpreter emulates bf16 through
        # numpy (its conversions are not the GPU's round-to-nearest-even): two bf16 ulps (2 x 2^-7 relative)
        limit = 1e-5 if row["dtype"] == "torch.float32" else 1.6e-2
        assert row["max_diff"] <= limit * max(1.0, row["scale"]), row


def test_combine_sums_each_tokens_held_choices_and_never_reads_the_others(interpreted):
    rows = interpreted["combine"]
    assert len(rows) == 6
    assert any(r["zero_rows"] for r in rows)  # some token had no choice held here
    for row in rows:
        assert row["finite"] and row["zero_rows_exact"], row  # NaN rows of experts held elsewhere never leak
        if row["dtype"] == "torch.float32":
            assert row["max_diff"] == 0.0, row  # the same roundings in the same order: the same bits
        else:  # the interpreter's bf16 (see above): two ulps of values of at most ~4
            assert row["max_diff"] <= 2 * 2**-7 * 4, row


def test_the_group_through_the_fused_passes_matches_its_reference_loop(interpreted):
    for row in interpreted["group"]:
        assert row["max_diff"] < 1e-5 * max(1.0, row["scale"]), row
