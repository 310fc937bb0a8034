"""Captured decode steps: every per-step input reaches the graph's static buffers, so a replay computes exactly
what running the layers does. CPU has no CUDA graphs; `replay="eager"` runs the layers on the static buffers, which
is what a replay reads (a field left stale would show here as different hidden states)."""

from __future__ import annotations

import copy

import pytest
import torch

from router.step import StepPlan
from shards.checkpoint import CheckpointReader, ShardSelection
from shards.decode_graphs import DecodeGraphs
from shards.kv_cache import RollingKVCache, StepLayout, cache_capacity
from shards.model import TransformerShard

WINDOW = 8


@pytest.fixture(scope="module", params=["mixtral", "mistral"])
def shard(request, checkpoint_factory):
    ckpt = checkpoint_factory(request.param, seed=5, window=WINDOW)
    reader = CheckpointReader(ckpt)
    return TransformerShard.from_checkpoint(reader, ShardSelection.whole(reader.config), torch.float32, "cpu")


def test_replays_match_running_the_layers_step_for_step(shard):
    cfg = shard.config
    capacity = cache_capacity(cfg.sliding_window, 256)
    cache = RollingKVCache(list(range(cfg.n_layers)), 4, capacity, cfg.n_kv_heads, cfg.head_dim, torch.float32)
    gen = torch.Generator().manual_seed(0)

    def layout(batch):
        return StepLayout.build(batch, capacity, cfg.sliding_window, cfg.head_dim, cfg.rope_theta, torch.device("cpu"))

    with torch.inference_mode():
        lengths = {0: 5, 1: 3, 2: 6, 3: 2}
        prefill = StepPlan([0, 1, 2, 3], [0] * 4, list(lengths.values()))
        h = torch.randn(sum(lengths.values()), cfg.dim, generator=gen)
        shard.run_layers(h, layout(prefill), cache)
        reference = copy.deepcopy(cache)
        graphs = DecodeGraphs(shard, cache, replay="eager")
        positions = dict(lengths)
        # Batches that change size, start slot, contiguity and order, long enough to wrap every rolling buffer.
        plans = [[0, 1, 2, 3], [1, 2], [0, 2], [3], [0, 1, 2, 3], [1, 2], [2, 0], [0, 2], [3]] * 3
        for slots in plans:
            batch = StepPlan(slots, [positions[s] for s in slots], [1] * len(slots))
            x = torch.randn(len(slots), cfg.dim, generator=gen)
            ours = graphs.run(x.clone(), layout(batch), None)
            expected = shard.run_layers(x.clone(), layout(batch), reference)
            torch.testing.assert_close(ours, expected, rtol=0, atol=0)
            for s in slots:
                positions[s] += 1
        assert torch.equal(cache.k, reference.k) and torch.equal(cache.v, reference.v)
        assert max(positions.values()) > 2 * WINDOW  # the buffers wrapped
        # one capture per (size, first slot of a contiguous run) seen: [2, 0] replays the graph of [0, 2]
        assert graphs.captures == 4 and graphs.replays == len(plans) - 4


def test_only_decode_steps_are_captured(shard):
    cfg = shard.config
    cache = RollingKVCache(list(range(cfg.n_layers)), 1, WINDOW, cfg.n_kv_heads, cfg.head_dim, torch.float32)
    batch = StepPlan([0], [0], [3])
    step = StepLayout.build(batch, WINDOW, cfg.sliding_window, cfg.head_dim, cfg.rope_theta, torch.device("cpu"))
    with pytest.raises(ValueError, match="only decode steps"):
        DecodeGraphs(shard, cache, replay="eager").run(torch.zeros(3, cfg.dim), step, None)


def test_a_context_growing_past_a_span_gets_a_graph_per_span_and_the_same_states(checkpoint_factory):
    """Full attention, 1024 rows a slot: a decode step reads only the rows up to its span (256, 384, 512 as the
    context grows from 250 to 400), each span its own graph, every replay equal to running the layers."""
    reader = CheckpointReader(checkpoint_factory("mixtral", seed=6, window=None))
    shard = TransformerShard.from_checkpoint(reader, ShardSelection.whole(reader.config), torch.float32, "cpu")
    cfg = shard.config
    capacity = 1024
    cache = RollingKVCache(list(range(cfg.n_layers)), 2, capacity, cfg.n_kv_heads, cfg.head_dim, torch.float32)
    gen = torch.Generator().manual_seed(1)

    def layout(batch):
        return StepLayout.build(batch, capacity, None, cfg.head_dim, cfg.rope_theta, torch.device("cpu"))

    with torch.inference_mode():
        prompts = StepPlan([0, 1], [0, 0], [250, 7])
        shard.run_layers(torch.randn(250 + 7, cfg.dim, generator=gen), layout(prompts), cache)
        reference = copy.deepcopy(cache)
        graphs = DecodeGraphs(shard, cache, replay="eager")
        spans = set()
        for step in range(150):
            batch = StepPlan([0, 1], [250 + step, 7 + step], [1, 1])
            spans.add(layout(batch).decode_span)
            x = torch.randn(2, cfg.dim, generator=gen)
            ours = graphs.run(x.clone(), layout(batch), None)
            expected = shard.run_layers(x.clone(), layout(batch), reference)
            torch.testing.assert_close(ours, expected, rtol=0, atol=0)
        assert spans == {256, 384, 512} and graphs.captures == 3 and graphs.replays == 150 - 3


def test_decode_steps_pad_to_few_captured_sizes():
    from shards.decode_graphs import padded_batch

    assert [padded_batch(n) for n in (1, 2, 3, 5, 8, 9, 16, 17, 100, 128, 129)] == [
        1, 2, 3, 5, 8, 16, 16, 32, 112, 128, 144,
    ]  # fmt: skip
    assert len({padded_batch(n) for n in range(1, 129)}) == 16
    with pytest.raises(ValueError, match="at least one sequence, got 0"):
        padded_batch(0)


def test_a_padded_step_computes_its_real_rows_exactly_and_leaves_every_real_slot_as_unpadded(shard):
    """Rows added at the scratch slot change nothing of the real rows' outputs or of the real slots' caches."""
    from shards.kv_cache import padded_decode

    cfg = shard.config
    capacity = cache_capacity(cfg.sliding_window, 256)

    def layout(batch):
        return StepLayout.build(batch, capacity, cfg.sliding_window, cfg.head_dim, cfg.rope_theta, torch.device("cpu"))

    def cache(scratch):
        return RollingKVCache(list(range(cfg.n_layers)), 3, capacity, cfg.n_kv_heads, cfg.head_dim, torch.float32,
                              scratch=scratch)  # fmt: skip

    gen = torch.Generator().manual_seed(3)
    with torch.inference_mode():
        plain, padded = cache(False), cache(True)
        assert padded.scratch_slot == 3 and padded.k.shape[1] == 4 * capacity and plain.scratch_slot is None
        prompts = StepPlan([0, 1, 2], [0] * 3, [4, 6, 3])
        h = torch.randn(13, cfg.dim, generator=gen)
        shard.run_layers(h.clone(), layout(prompts), plain)
        shard.run_layers(h.clone(), layout(prompts), padded)
        step = StepPlan([0, 2, 1], [4, 3, 6], [1, 1, 1])
        x = torch.randn(3, cfg.dim, generator=gen)
        expected = shard.run_layers(x.clone(), layout(step), plain)
        wide = padded_decode(step, 4, padded.scratch_slot)
        assert wide.slots == (0, 2, 1, 3) and wide.starts == (4, 3, 6, 0) and wide.lengths == (1,) * 4
        ours = shard.run_layers(torch.cat([x, x.new_zeros(1, cfg.dim)]), layout(wide), padded)
        torch.testing.assert_close(ours[:3], expected, rtol=0, atol=0)
        real = slice(0, 3 * capacity)
        assert torch.equal(padded.k[:, real], plain.k[:, real]) and torch.equal(padded.v[:, real], plain.v[:, real])
        with pytest.raises(ValueError, match="only a decode step can be padded, to at least its 3 rows; asked 2"):
            padded_decode(step, 2, 3)


def test_where_the_decode_kernel_reads_slots_by_index_the_first_slot_is_not_part_of_a_graphs_key(shard, monkeypatch):
    import shards.decode_graphs as decode_graphs

    cfg = shard.config
    capacity = cache_capacity(cfg.sliding_window, 256)
    cache = RollingKVCache(list(range(cfg.n_layers)), 4, capacity, cfg.n_kv_heads, cfg.head_dim, torch.float32)

    def layout(slots):
        batch = StepPlan(slots, [1] * len(slots), [1] * len(slots))
        return StepLayout.build(batch, capacity, cfg.sliding_window, cfg.head_dim, cfg.rope_theta, "cpu")

    for by_index, captures in ((False, 2), (True, 1)):
        monkeypatch.setattr(decode_graphs, "decodes_in_place", lambda seqs, device, on=by_index: on)
        graphs = DecodeGraphs(shard, cache, replay="eager", run_layers=lambda h, layout, cache, experts: h)
        for slots in ([0, 1], [2, 3], [0, 1]):  # two contiguous runs of two slots
            graphs.run(torch.zeros(2, cfg.dim), layout(slots), None)
        assert graphs.captures == captures and graphs.batches == [2]
