"""The compiled decode layers (`shards/compiled_decode.py`) compute what the eager layers compute: the same greedy
tokens as the eager engine and as transformers, one compilation for every layer and step, captured by the decode
graphs like the eager layers, and the eager layers wherever compiling failed. Compiling on two CPU cores takes
~10-50 s a model: one small model each."""

from __future__ import annotations

import copy
import logging

import torch
from torch._dynamo.utils import counters

from router.step import StepPlan
from shards.checkpoint import CheckpointReader, ShardSelection
from shards.compiled_decode import CompiledDecode
from shards.decode_graphs import DecodeGraphs
from shards.engine import LocalEngine
from shards.kv_cache import RollingKVCache, StepLayout
from shards.model import TransformerShard
from tests.conftest import hf_greedy, random_prompts

WINDOW, NEW_TOKENS = 8, 16


def test_compiled_mixtral_decode_gives_the_eager_logits_and_transformers_tokens(checkpoint_factory, hf_model):
    """Batch 1 past twice the window (the rolling buffer wraps), top-2 of 4 experts: every step's logits against
    the eager engine's (a tiny random model's tokens hardly depend on its experts; its logits do), then the tokens
    against transformers."""
    ckpt = checkpoint_factory("mixtral", seed=1, window=WINDOW)
    prompt = random_prompts([5], seed=3)[0]
    graphs_before = counters["stats"]["unique_graphs"]
    compiled, eager = LocalEngine(ckpt, max_seqs=1, compile_decode=(1,)), LocalEngine(ckpt, max_seqs=1)
    assert compiled.compiled.compiled == (1,)
    plan, tokens = StepPlan([0], [0], [len(prompt)], torch.tensor(prompt)), []
    for _ in range(NEW_TOKENS):
        ours = compiled.step(plan)[0]
        torch.testing.assert_close(ours, eager.step(plan)[0], rtol=1e-5, atol=1e-5)
        tokens.append(int(ours.argmax()))
        plan = StepPlan([0], [plan.starts[0] + plan.lengths[0]], [1], torch.tensor(tokens[-1:]))
    assert counters["stats"]["unique_graphs"] - graphs_before == 1  # one compilation: every layer, every step
    assert tokens == hf_greedy(hf_model(ckpt), prompt, NEW_TOKENS)


def mistral_shard(checkpoint_factory) -> TransformerShard:
    reader = CheckpointReader(checkpoint_factory("mistral", seed=2, window=WINDOW))
    return TransformerShard.from_checkpoint(reader, ShardSelection.whole(reader.config), torch.float32, "cpu")


def test_decode_graphs_replay_the_compiled_dense_layers_step_for_step(checkpoint_factory):
    """Batches of 2 compiled (slots in order and swapped), batches of 1 eager, against the eager layers."""
    shard = mistral_shard(checkpoint_factory)
    cfg = shard.config
    cache = RollingKVCache(list(range(cfg.n_layers)), 2, WINDOW, cfg.n_kv_heads, cfg.head_dim, torch.float32)
    compiled = CompiledDecode(shard, cache, batches=(2,))
    assert compiled.warm_up() and compiled.compiled == (2,)
    gen = torch.Generator().manual_seed(0)

    def layout(batch):
        return StepLayout.build(batch, WINDOW, cfg.sliding_window, cfg.head_dim, cfg.rope_theta, torch.device("cpu"))

    with torch.inference_mode():
        prefill = StepPlan([0, 1], [0, 0], [3, 6])
        shard.run_layers(torch.randn(9, cfg.dim, generator=gen), layout(prefill), cache)
        reference = copy.deepcopy(cache)
        graphs = DecodeGraphs(shard, cache, replay="eager", compiled=compiled)
        positions = {0: 3, 1: 6}
        for slots in [[0, 1], [1, 0], [1], [0, 1], [1, 0], [0], [0, 1]] * 2:
            batch = StepPlan(slots, [positions[s] for s in slots], [1] * len(slots))
            x = torch.randn(len(slots), cfg.dim, generator=gen)
            ours = graphs.run(x.clone(), layout(batch), None)
            expected = shard.run_layers(x.clone(), layout(batch), reference)
            torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
            for s in slots:
                positions[s] += 1
    torch.testing.assert_close(cache.k, reference.k, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache.v, reference.v, rtol=1e-5, atol=1e-5)
    assert max(positions.values()) > 2 * WINDOW  # the buffers wrapped


def test_a_failed_compile_is_logged_and_the_layers_run_eagerly(checkpoint_factory, caplog):
    shard = mistral_shard(checkpoint_factory)
    cfg = shard.config
    cache = RollingKVCache(list(range(cfg.n_layers)), 1, WINDOW, cfg.n_kv_heads, cfg.head_dim, torch.float32)
    compiled = CompiledDecode(shard, cache, batches=(1,))

    def cannot_compile(*args):
        raise RuntimeError("inductor: no C++ compiler")

    compiled._layer = cannot_compile
    with caplog.at_level(logging.WARNING, logger="shards.compiled_decode"):
        assert not compiled.warm_up()
    assert compiled.compiled == () and "no C++ compiler" in caplog.text and "no C++ compiler" in compiled.error
    step = StepLayout.build(
        StepPlan([0], [0], [1]), WINDOW, cfg.sliding_window, cfg.head_dim, cfg.rope_theta, torch.device("cpu")
    )
    x = torch.randn(1, cfg.dim)
    with torch.inference_mode():
        ours = compiled.run_layers(x, step, cache)
        cache.k.zero_(), cache.v.zero_()
        torch.testing.assert_close(ours, shard.run_layers(x, step, cache), rtol=0, atol=0)


def test_routing_by_max_reductions_is_routing_by_topk():
    """The compiled layers route with `top_k` max reductions (one fused kernel) instead of torch.topk: the same ids
    in the same order and the same weights, for scores without ties."""
    from shards.compiled_decode import route_by_max
    from shards.moe import route

    gen = torch.Generator().manual_seed(3)
    for experts, k in ((8, 2), (4, 2), (8, 1), (16, 4)):
        logits = torch.randn(64, experts, generator=gen)
        for dtype in (torch.float32, torch.bfloat16):
            ids, weights = route(logits, k, dtype)
            ids_max, weights_max = route_by_max(logits, k, dtype)
            assert torch.equal(ids, ids_max), (experts, k)
            assert weights_max.dtype == dtype and torch.equal(weights, weights_max), (experts, k, dtype)
