"""The Triton expert GEMV (`shards/expert_gemv.py`), run by Triton's interpreter on the CPU.

The interpreter executes the same kernel source with numpy, so the indexing, the masks at ragged edges, the
skipped experts held elsewhere and the order of the sum are checked here; the GPU run (bench/expert_kernels.py,
bench/gpu_smoke.py) checks the compiled kernel. TRITON_INTERPRET must be set before the kernels are defined, so
the checks run in a fresh interpreter process.
"""

from __future__ import annotations

import pytest

from tests.interpreted import run_interpreted

pytest.importorskip("triton", reason="Triton is a test dependency: pip install -e '.[test]'")


CHECKS = r"""
import copy, json, os, sys
import torch
from shards import moe
from shards.expert_gemv import expert_gemv
from shards.moe import ExpertGroup

E, K = 8, 2


def group(dim, hidden, held, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    g = ExpertGroup(dim, hidden, held, E)
    tensors = {f"e{e}.{n}.weight": (torch.randn(shape, generator=gen) / shape[1] ** 0.5).to(dtype)
               for e in held for n, shape in (("w1", (hidden, dim)), ("w3", (hidden, dim)), ("w2", (dim, hidden)))}
    g.load_experts(tensors, "e", None, "cpu")
    return g


def exact(g, x, ids, weights):
    # The same values in float64 through the one-expert-at-a-time reference path.
    return copy.deepcopy(g).double().forward_loop(x.double(), ids, weights.double())


rows = []
gen = torch.Generator().manual_seed(0)
# (dim, hidden): tile-aligned, and ragged in both (masks at the edges of the row and column tiles)
for dim, hidden in ((64, 128), (80, 100)):
    for held in ([0, 1, 2, 3, 4, 5, 6, 7], [1, 5, 6]):
        for dtype in (torch.float32, torch.bfloat16):
            g = group(dim, hidden, held, dtype, seed=len(rows))
            table = g._local_index(torch.device("cpu"))
            joints = ((1, True), (3, True)) if dim == 80 else ()  # the joint down kernel on the ragged shape
            for tokens, joint in ((1, False), (2, False), (3, False), *joints):
                x = torch.randn(tokens, dim, generator=gen).to(dtype)
                ids = torch.rand(tokens, E, generator=gen).topk(K, dim=-1).indices
                if tokens == 3 and len(held) < E:
                    ids[0] = torch.tensor([0, 7])  # neither held here: that token's row must be exactly 0
                weights = torch.softmax(torch.randn(tokens, K, generator=gen), dim=-1).to(dtype)
                out = expert_gemv(x, table[ids], weights, g.w13, g.w2, down_joint=joint)
                ref = exact(g, x, ids, weights)
                held_rows = [t for t in range(tokens) if set(ids[t].tolist()) & set(held)]
                err = float((out.double() - ref)[held_rows].norm() / ref[held_rows].norm()) if held_rows else 0.0
                rows.append({"dim": dim, "hidden": hidden, "held": held, "dtype": str(dtype), "tokens": tokens,
                             "joint": joint,
                             "shape": list(out.shape), "out_dtype": str(out.dtype), "relative_error": err,
                             "finite": bool(torch.isfinite(out).all()),
                             "zero_rows_exact": all(bool((out[t] == 0).all()) for t in range(tokens)
                                                    if t not in held_rows)})

# ExpertGroup.forward takes the GEMV where it is supported and within gemv_max_tokens(), and not otherwise.
calls = []
g = group(64, 128, [0, 2, 4, 6], torch.float32, seed=99)
original = ExpertGroup.forward_gemv
ExpertGroup.forward_gemv = lambda self, *a: (calls.append(a[0].shape[0]), original(self, *a))[1]
moe.gemv_supported = lambda x: True
x = torch.randn(4, 64, generator=gen)
ids = torch.rand(4, E, generator=gen).topk(K, dim=-1).indices
weights = torch.softmax(torch.randn(4, K, generator=gen), dim=-1)
dispatch = {}
for tokens in (1, 3, 4):
    out = g.forward(x[:tokens], ids[:tokens], weights[:tokens])
    used_gemv = bool(calls) and calls[-1] == tokens
    loop = g.forward_loop(x[:tokens], ids[:tokens], weights[:tokens])
    dispatch[tokens] = {"used_gemv": used_gemv, "max_abs_vs_loop": float((out - loop).abs().max())}
    calls.clear()
os.environ["MISTRAL_CLUSTER_EXPERT_GEMV_MAX_TOKENS"] = "0"
g.forward(x[:1], ids[:1], weights[:1])
dispatch["off"] = {"used_gemv": bool(calls)}
json.dump({"rows": rows, "dispatch": dispatch}, sys.stdout)
"""


@pytest.fixture(scope="module")
def interpreted():
    return run_interpreted(CHECKS, unset=("MISTRAL_CLUSTER_EXPERT_GEMV_MAX_TOKENS",))


def test_the_gemv_computes_the_chosen_experts(interpreted):
    """Both down kernels (a choice at a time, and every choice's tile in one load: JOINT)."""
    rows = interpreted["rows"]
    assert len(rows) == 2 * 2 * 2 * 3 + 2 * 2 * 2
    assert sum(r["relative_error"] > 0 for r in rows) >= 26  # nearly every case has a token whose experts are here
    for row in rows:
        assert row["finite"] and row["shape"] == [row["tokens"], row["dim"]], row
        assert row["out_dtype"] == row["dtype"], row
        # float32 accumulates in float32; bf16 rounds the activations and the output (METHOD.md's 1e-3..1e-2)
        limit = 1e-5 if row["dtype"] == "torch.float32" else 1e-2
        assert row["relative_error"] < limit, row


def test_a_token_whose_experts_are_held_elsewhere_gets_exact_zeros(interpreted):
    partial = [r for r in interpreted["rows"] if len(r["held"]) < 8 and r["tokens"] == 3]
    assert partial and all(r["zero_rows_exact"] for r in partial)


def test_the_group_takes_the_gemv_for_up_to_three_tokens(interpreted):
    dispatch = interpreted["dispatch"]
    assert dispatch["1"]["used_gemv"] and dispatch["3"]["used_gemv"]
    assert not dispatch["4"]["used_gemv"]  # the dense path from 4 tokens on
    assert not dispatch["off"]["used_gemv"]  # MISTRAL_CLUSTER_EXPERT_GEMV_MAX_TOKENS=0 turns it off
    for tokens in ("1", "3", "4"):
        assert dispatch[tokens]["max_abs_vs_loop"] < 1e-5, dispatch
