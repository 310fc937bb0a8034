"""The Triton decode attention (`shards/decode_attention.py`), run by Triton's interpreter on the CPU.

The interpreter executes the kernels' source with numpy: the grouping of query heads (padded where the group is not
a power of two), the runs over a buffer's rows and their merge, rows past the filled ones, buffers that wrapped and
slots out of order are checked against the float32 math, and then through a model: the eager layers and the
compiled ones (the kernel as a custom op inside inductor's function, writing the cache it reads) give transformers'
greedy tokens for two sequences past their window. TRITON_INTERPRET must be set before the kernels are defined, so
the checks run in a fresh interpreter process.
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import hf_greedy, random_prompts
from tests.interpreted import run_interpreted

pytest.importorskip("triton", reason="Triton is a test dependency: pip install -e '.[test]'")

WINDOW, NEW_TOKENS = 8, 12
PROMPTS = random_prompts([5, 7], seed=4)  # prefilled in one chunk: at most the window

CHECKS = r"""
import json, os, sys
import torch
import shards.decode_attention as decode_attention_module
import shards.decode_attention_kernels as kernels
from shards.attention import decode_attention_math
from shards.decode_attention import decode_attention, launch_shape, triton_decode_supported

launches = {"run": 0}
real_run = kernels.run_attention


class Counted:
    def __getitem__(self, grid):
        launches["run"] += 1
        return real_run[grid]


kernels.run_attention = Counted()
assert triton_decode_supported(torch.device("cpu"))
# The programs a step is split into, scaled down (the interpreter's time grows with them): 10 sequences of 8 KV
# heads already take one run each, on both kinds of product.
decode_attention_module.CUDA_CORE_SHAPE = (16, 64, 2)
decode_attention_module.DOT_SHAPE = (64, 64, 4)
gen = torch.Generator().manual_seed(0)
rows = []
# (seqs, n_heads, n_kv, head_dim, capacity, span, slots in the cache)
cases = [
    (1, 8, 2, 16, 64, 64, 2),  # a few runs a head, merged
    (3, 12, 2, 16, 96, 64, 5),  # six query heads a KV head (padded to 8), span under the capacity
    (2, 8, 8, 32, 200, 160, 3),  # a span that is not a multiple of the block
    (10, 8, 8, 16, 40, 40, 12),  # enough programs (80 heads, targets scaled down above): one run, normalised in place
]
for (seqs, n_heads, n_kv, head_dim, capacity, span, max_seqs), dtype, dot in [
    # Triton's interpreter multiplies bf16 in tl.dot as raw bits (numpy has no bf16): the tensor-core path is
    # checked here in float16, and in bf16 on a GPU (bench/decode_profile.py's kernel check)
    (c, t, d) for d in ("0", "1") for c in cases for t in (torch.float32, torch.bfloat16 if d == "0" else torch.float16)
]:
    os.environ["MISTRAL_CLUSTER_DECODE_ATTENTION_DOT"] = dot  # float32 products, or tensor cores
    k_rows = torch.randn(max_seqs * capacity, n_kv, head_dim, generator=gen).to(dtype)
    v_rows = torch.randn(max_seqs * capacity, n_kv, head_dim, generator=gen).to(dtype)
    q = torch.randn(seqs, n_heads, head_dim, generator=gen).to(dtype)
    slots = torch.randperm(max_seqs, generator=gen)[:seqs]
    positions = torch.randint(0, 2 * capacity, (seqs,), generator=gen)  # some wrapped, some not
    positions[0] = 2  # three filled rows: most runs read nothing
    filled = (positions + 1).clamp(max=capacity)
    mask = (torch.arange(span)[None, :] < filled[:, None]).view(seqs, 1, 1, span)
    out = decode_attention(q, k_rows, v_rows, slots, positions, capacity, span)
    view = (-1, capacity, n_kv, head_dim)
    keys = k_rows.double().view(view)[:, :span][slots]
    values = v_rows.double().view(view)[:, :span][slots]
    exact = decode_attention_math(q.double(), keys, values, mask)
    rows.append({
        "shape": [seqs, n_heads, n_kv, head_dim, capacity, span],
        "dtype": str(dtype),
        "dot": dot == "1",
        "runs": launch_shape(seqs, n_kv, span, dot == "1")[1],
        "out_dtype": str(out.dtype),
        "relative_error": float((out.double() - exact).abs().max() / exact.abs().max()),
    })
# The kernel writing the step's own keys and values (WRITE): the cache must end up as two index copies leave it,
# and the output must be the math over that cache.
for (seqs, n_heads, n_kv, head_dim, capacity, span, max_seqs), dot in [(c, d) for d in ("0", "1") for c in cases]:
    os.environ["MISTRAL_CLUSTER_DECODE_ATTENTION_DOT"] = dot
    k_rows = torch.randn(max_seqs * capacity, n_kv, head_dim, generator=gen)
    v_rows = torch.randn(max_seqs * capacity, n_kv, head_dim, generator=gen)
    q = torch.randn(seqs, n_heads, head_dim, generator=gen)
    k_new = torch.randn(seqs, n_kv, head_dim, generator=gen)
    v_new = torch.randn(seqs, n_kv, head_dim, generator=gen)
    slots = torch.randperm(max_seqs, generator=gen)[:seqs]
    positions = torch.randint(0, 2 * capacity, (seqs,), generator=gen)
    positions[0] = 2
    written = slots * capacity + positions % capacity
    k_ref, v_ref = k_rows.clone().index_copy_(0, written, k_new), v_rows.clone().index_copy_(0, written, v_new)
    out = decode_attention(q, k_rows, v_rows, slots, positions, capacity, span, k_new=k_new, v_new=v_new)
    filled = (positions + 1).clamp(max=capacity)
    mask = (torch.arange(span)[None, :] < filled[:, None]).view(seqs, 1, 1, span)
    view = (-1, capacity, n_kv, head_dim)
    exact = decode_attention_math(
        q.double(), k_ref.double().view(view)[:, :span][slots], v_ref.double().view(view)[:, :span][slots], mask
    )
    rows.append({
        "shape": [seqs, n_heads, n_kv, head_dim, capacity, span],
        "dtype": "torch.float32",
        "dot": dot == "1",
        "write": True,
        "cache_written": bool(torch.equal(k_rows, k_ref) and torch.equal(v_rows, v_ref)),
        "runs": launch_shape(seqs, n_kv, span, dot == "1")[1],
        "out_dtype": str(out.dtype),
        "relative_error": float((out.double() - exact).abs().max() / exact.abs().max()),
    })
kernel_launches = launches["run"]
os.environ.pop("MISTRAL_CLUSTER_DECODE_ATTENTION_DOT")

from router.step import StepPlan
from shards.engine import LocalEngine


def greedy(engine, prompts, n):
    plan = StepPlan(list(range(len(prompts))), [0] * len(prompts), [len(p) for p in prompts],
                    torch.tensor([t for p in prompts for t in p]))
    out = [[] for _ in prompts]
    for _ in range(n):
        logits = engine.step(plan)
        for i, row in enumerate(logits):
            out[i].append(int(row.argmax()))
        plan = StepPlan(plan.slots, [s + n for s, n in zip(plan.starts, plan.lengths)], [1] * len(prompts),
                        torch.tensor([o[-1] for o in out]))
    return out


ckpt, prompts, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
launches["run"] = 0
eager = greedy(LocalEngine(ckpt, max_seqs=2), prompts, n)
eager_launches = launches["run"]
launches["run"] = 0
compiled_engine = LocalEngine(ckpt, max_seqs=2, compile_decode=(2,))
compiled = greedy(compiled_engine, prompts, n)
json.dump({
    "rows": rows,
    "kernel_launches": kernel_launches,
    "eager": eager,
    "eager_launches": eager_launches,
    "compiled": compiled,
    "compiled_batches": list(compiled_engine.compiled.compiled),
    "compiled_launches": launches["run"],
}, sys.stdout)
"""


@pytest.fixture(scope="module")
def interpreted(checkpoint_factory):
    ckpt = checkpoint_factory("mixtral", seed=5, window=WINDOW)
    args = (str(ckpt), json.dumps(PROMPTS), str(NEW_TOKENS))
    found = run_interpreted(CHECKS, *args, unset=("MISTRAL_CLUSTER_DECODE_ATTENTION",), timeout=900)
    return {"ckpt": ckpt, **found}


def test_the_kernel_computes_the_float32_math(interpreted):
    rows = interpreted["rows"]
    assert len(rows) == 24 and interpreted["kernel_launches"] == 24
    writes = [r for r in rows if r.get("write")]
    assert len(writes) == 8 and all(r["cache_written"] for r in writes), writes  # every new row, none other
    for dot in (False, True):  # both the in-place normalisation and the merge ran, on both kinds of product
        runs = {r["runs"] for r in rows if r["dot"] == dot}
        assert 1 in runs and max(runs) > 1, runs
    for row in rows:
        assert row["out_dtype"] == row["dtype"], row
        # float32 accumulates in float32; 16-bit types round the inputs, the output and (tensor cores) the weights
        limit = 1e-5 if row["dtype"] == "torch.float32" else 2e-2
        assert row["relative_error"] < limit, row


def test_the_eager_and_compiled_layers_give_transformers_tokens_through_the_kernel(interpreted, hf_model):
    expected = [hf_greedy(hf_model(interpreted["ckpt"]), p, NEW_TOKENS) for p in PROMPTS]
    assert interpreted["eager"] == expected
    assert interpreted["compiled_batches"] == [2]
    assert interpreted["compiled"] == expected
    layers = 4  # small_config: every decode step of every layer took the kernel
    assert interpreted["eager_launches"] == layers * (NEW_TOKENS - 1)
    assert interpreted["compiled_launches"] >= layers * (NEW_TOKENS - 1)
    assert max(len(p) for p in PROMPTS) + NEW_TOKENS > 2 * WINDOW  # the buffers wrapped


def test_which_products_and_which_steps_take_the_kernel(monkeypatch):
    """The rule measured on an H200: float32 products up to CUDA_CORE_MAX_SEQS sequences, tensor cores above, and
    no step too large for the kernels unless the A/B variables say otherwise; a bad value is named."""
    from shards.decode_attention import CUDA_CORE_MAX_SEQS, tensor_cores, triton_max_seqs

    monkeypatch.delenv("MISTRAL_CLUSTER_DECODE_ATTENTION_DOT", raising=False)
    monkeypatch.delenv("MISTRAL_CLUSTER_DECODE_ATTENTION_MAX_SEQS", raising=False)
    assert [tensor_cores(s) for s in (1, CUDA_CORE_MAX_SEQS, CUDA_CORE_MAX_SEQS + 1, 128)] == [False, False, True, True]
    assert triton_max_seqs() >= 1 << 20
    monkeypatch.setenv("MISTRAL_CLUSTER_DECODE_ATTENTION_DOT", "1")
    assert tensor_cores(1)
    monkeypatch.setenv("MISTRAL_CLUSTER_DECODE_ATTENTION_DOT", "0")
    assert not tensor_cores(128)
    monkeypatch.setenv("MISTRAL_CLUSTER_DECODE_ATTENTION_DOT", "yes")
    with pytest.raises(ValueError, match="'yes'"):
        tensor_cores(8)
    monkeypatch.setenv("MISTRAL_CLUSTER_DECODE_ATTENTION_MAX_SEQS", "4")
    assert triton_max_seqs() == 4
