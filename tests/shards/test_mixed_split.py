"""A mixed step (running sequences' next tokens beside new prompts) with its running rows read in place by the
decode kernel (`shards.kv_cache.MixedSplit`), in Triton's interpreter on the CPU, against the same step on the
packed path and against a decode-only step of the running sequences."""

from __future__ import annotations

import pytest

from tests.interpreted import run_interpreted

pytest.importorskip("triton")


CHECKS = r"""
import json, os, sys, tempfile
from pathlib import Path
import torch
from router.step import StepPlan
from shards.checkpoint import CheckpointReader, ShardSelection
from shards.kv_cache import RollingKVCache, StepLayout, cache_capacity
from shards.make_checkpoint import small_config
from shards.model import TransformerShard
from shards.random_source import write_random_checkpoint

out = {}
gen = torch.Generator().manual_seed(0)
for model, window in (("mixtral", None), ("mistral", 8)):  # 8: the running sequences' buffers wrapped
    from dataclasses import replace
    cfg = replace(small_config(model), sliding_window=window, max_seq_len=64)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_random_checkpoint(Path(tmp) / "c", cfg, 1, 0.05)
        whole = ShardSelection.whole(cfg)
        shard = TransformerShard.from_checkpoint(CheckpointReader(ckpt), whole, torch.float32, "cpu")
    capacity = cache_capacity(cfg.sliding_window, cfg.max_seq_len)

    def ids(n):
        return torch.randint(3, cfg.vocab_size, (n,), generator=gen)

    def run(cache, plan):
        layout = StepLayout.build(plan, capacity, cfg.sliding_window, cfg.head_dim, cfg.rope_theta, "cpu")
        with torch.inference_mode():
            return shard.run_layers(shard.embed(torch.as_tensor(plan.token_ids)), layout, cache), layout

    # three running sequences (slots 4, 0, 2: not in order) with 11, 5, 13 cached tokens; two prompts arrive
    running, ctx = [4, 0, 2], [11, 5, 13]
    prompts = [(1, 0, 6), (3, 4, 3)]  # (slot, start, tokens): a new prompt, and one's second chunk
    warm = [(s, c) for s, c in zip(running, ctx)] + [(3, 4)]
    cache0 = RollingKVCache(list(range(cfg.n_layers)), 5, capacity, cfg.n_kv_heads, cfg.head_dim, torch.float32)
    for slot, n in warm:  # in chunks the buffer holds
        for start in range(0, n, capacity):
            m = min(capacity, n - start)
            run(cache0, StepPlan([slot], [start], [m], ids(m)))
    decode_ids, prompt_ids = ids(3), ids(9)
    mixed = StepPlan(running + [p[0] for p in prompts], ctx + [p[1] for p in prompts], [1, 1, 1, 6, 3],
                     torch.cat([decode_ids, prompt_ids]))
    results = {}
    for mode in ("1", "0"):
        os.environ["MISTRAL_CLUSTER_SPLIT_MIXED"] = mode
        cache = RollingKVCache(list(range(cfg.n_layers)), 5, capacity, cfg.n_kv_heads, cfg.head_dim, torch.float32)
        cache.k.copy_(cache0.k); cache.v.copy_(cache0.v)
        h, layout = run(cache, mixed)
        results[mode] = (h, cache, layout.split is not None)
    os.environ.pop("MISTRAL_CLUSTER_SPLIT_MIXED")
    cache = RollingKVCache(list(range(cfg.n_layers)), 5, capacity, cfg.n_kv_heads, cfg.head_dim, torch.float32)
    cache.k.copy_(cache0.k); cache.v.copy_(cache0.v)
    alone, _ = run(cache, StepPlan(running, ctx, [1, 1, 1], decode_ids))
    (h1, c1, split1), (h0, c0, split0) = results["1"], results["0"]
    scale = float(h0.abs().max())
    out[model] = {
        "split_taken": split1, "split_off_taken": split0,
        "split_vs_packed": float((h1 - h0).abs().max()) / scale,
        "running_vs_decode_alone": float((h1[:3] - alone).abs().max()) / scale,
        "caches_equal": float(max((c1.k - c0.k).abs().max(), (c1.v - c0.v).abs().max())),
    }
json.dump(out, sys.stdout)
"""


@pytest.fixture(scope="module")
def interpreted():
    return run_interpreted(CHECKS, unset=("MISTRAL_CLUSTER_SPLIT_MIXED",))


@pytest.mark.parametrize("model", ["mixtral", "mistral"])
def test_a_split_mixed_step_computes_what_the_packed_path_computes(interpreted, model):
    row = interpreted[model]
    assert row["split_taken"] and not row["split_off_taken"], row  # MISTRAL_CLUSTER_SPLIT_MIXED=0 turns it off
    assert row["split_vs_packed"] < 1e-5, row  # float32: the same function, another kernel
    assert row["running_vs_decode_alone"] < 1e-5, row  # the running rows as a decode step would give them
    assert row["caches_equal"] < 1e-6, row  # every new key and value written where the packed path writes it
