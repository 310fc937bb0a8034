"""The rolling buffer: bounded by the window, position p in row p mod window, chunks bounded too."""

from __future__ import annotations

import pytest
import torch

from router.generation import generate
from router.sampling import SamplingParams
from router.step import StepPlan
from shards.engine import LocalEngine
from shards.kv_cache import RollingKVCache, StepLayout


def test_cache_memory_stays_flat_as_the_sequence_grows_far_past_the_window(checkpoint_factory):
    window = 16
    engine = LocalEngine(checkpoint_factory("mixtral", seed=0, window=window), max_seqs=1)
    cfg = engine.config
    expected = 2 * cfg.n_layers * 1 * window * cfg.n_kv_heads * cfg.head_dim * 4  # k and v, float32
    pointers = (engine.cache.k.data_ptr(), engine.cache.v.data_ptr())
    sizes = []
    for position in range(12 * window):  # decode one token at a time to 12x the window
        engine.step(StepPlan([0], [position], [1], torch.tensor([5 + position % 100])))
        if (position + 1) % window == 0:
            sizes.append(engine.cache.nbytes)
    assert sizes == [expected] * len(sizes)
    assert (engine.cache.k.data_ptr(), engine.cache.v.data_ptr()) == pointers  # never reallocated


def test_position_p_is_written_at_row_p_mod_window():
    cache = RollingKVCache([0], max_seqs=2, capacity=4, n_kv_heads=1, head_dim=2, dtype=torch.float32)
    layout = StepLayout.build(StepPlan([1], [9], [3]), 4, 4, 2, 10000.0, torch.device("cpu"))
    k = torch.arange(6, dtype=torch.float32).view(3, 1, 2) + 100
    cache.update_and_read(0, k, k.clone(), layout)
    rows = cache.k[0].view(2, 4, 1, 2)
    assert (
        torch.equal(rows[1, 9 % 4], k[0]) and torch.equal(rows[1, 10 % 4], k[1]) and torch.equal(rows[1, 11 % 4], k[2])
    )
    assert torch.count_nonzero(rows[0]) == 0  # the other slot is untouched


def test_a_prompt_ten_times_the_window_never_builds_more_than_two_windows_of_keys(checkpoint_factory, monkeypatch):
    window = 16
    engine = LocalEngine(checkpoint_factory("mistral", seed=0, window=window), max_seqs=1)
    seen = []
    original = StepLayout.build

    def spy(*args, **kwargs):
        layout = original(*args, **kwargs)
        seen.append(layout.n_keys)
        return layout

    monkeypatch.setattr(StepLayout, "build", staticmethod(spy))
    generate(engine, [[1] + list(range(10, 10 + 10 * window))], SamplingParams(max_tokens=2, ignore_eos=True))
    assert len(seen) >= 10 and max(seen) <= 2 * window


def test_chunk_larger_than_the_window_is_refused():
    with pytest.raises(ValueError, match="exceeds the cache capacity 4"):
        StepLayout.build(StepPlan([0], [0], [5]), 4, 4, 2, 10000.0, torch.device("cpu"))


def test_full_attention_cache_refuses_to_roll_past_its_capacity():
    with pytest.raises(ValueError, match="past the cache capacity 8"):
        StepLayout.build(StepPlan([0], [7], [2]), 8, None, 2, 10000.0, torch.device("cpu"))
