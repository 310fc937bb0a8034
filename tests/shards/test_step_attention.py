"""The step's attention plan: built once, reused by every layer, and the decode fast path over rolling buffers."""

from __future__ import annotations

import pytest
import torch

from router.step import StepPlan
from shards.attention import AttentionPlan, packed_attention, prefill_bias
from shards.kv_cache import RollingKVCache, StepLayout
from tests.shards.test_attention import HEAD_DIM, N_HEADS, N_KV, rand, reference_attention

CAPACITY = 8


def build(batch: StepPlan, capacity: int = CAPACITY) -> StepLayout:
    return StepLayout.build(batch, capacity, capacity, HEAD_DIM, 10000.0, torch.device("cpu"))


def filled_cache(max_seqs: int = 4, seed: int = 0) -> RollingKVCache:
    cache = RollingKVCache([0], max_seqs, CAPACITY, N_KV, HEAD_DIM, torch.float32)
    gen = torch.Generator().manual_seed(seed)
    cache.k.copy_(torch.randn(cache.k.shape, generator=gen))
    cache.v.copy_(torch.randn(cache.v.shape, generator=gen))
    return cache


@pytest.mark.parametrize("slots", [[1, 2, 3], [3, 0, 2], [2]], ids=["contiguous", "scattered", "one"])
def test_decode_fast_path_equals_the_packed_path_over_the_same_buffers(slots):
    starts = [2, 30, 7][: len(slots)]  # part-filled, wrapped several times, exactly full
    layout = build(StepPlan(slots, starts, [1] * len(slots)))
    cache = filled_cache()
    q, k_new, v_new = rand(len(slots), N_HEADS, 1), rand(len(slots), N_KV, 2), rand(len(slots), N_KV, 3)
    keys, values = cache.update_and_read(0, k_new, v_new, layout)
    assert keys.shape == (len(slots), CAPACITY, N_KV, HEAD_DIM)
    fast = packed_attention(q, keys, values, layout.bias, "torch", layout.attention)
    packed = packed_attention(q, keys.flatten(0, 1), values.flatten(0, 1), layout.bias, "torch")
    assert torch.allclose(fast, packed, atol=1e-6)
    ref = reference_attention(q, keys.flatten(0, 1), values.flatten(0, 1), layout.bias)
    assert torch.allclose(fast.double(), ref, atol=1e-5)


def test_decode_of_contiguous_slots_reads_the_cache_in_place():
    layout = build(StepPlan([1, 2], [3, 4], [1, 1]))
    cache = filled_cache()
    keys, _ = cache.update_and_read(0, rand(2, N_KV, 1), rand(2, N_KV, 2), layout)
    assert keys.data_ptr() == cache.k[0, CAPACITY:].data_ptr()  # a view of slots 1..2, no copy


def test_decode_after_the_buffer_wraps_attends_over_the_last_window_in_any_row_order():
    """Rows of a wrapped buffer are out of position order; the result is attention over the last window in order."""
    cache = RollingKVCache([0], 2, CAPACITY, N_KV, HEAD_DIM, torch.float32)
    history_k, history_v = [], []
    for position in range(3 * CAPACITY + 3):
        layout = build(StepPlan([1], [position], [1]))
        k, v = rand(1, N_KV, 10 + position), rand(1, N_KV, 100 + position)
        history_k.append(k)
        history_v.append(v)
        keys, values = cache.update_and_read(0, k, v, layout)
    q = rand(1, N_HEADS, 7)
    ours = packed_attention(q, keys, values, layout.bias, "torch", layout.attention)
    in_order = prefill_bias([1], [CAPACITY], CAPACITY)  # one query after CAPACITY keys in position order
    k_window, v_window = torch.cat(history_k[-CAPACITY:]), torch.cat(history_v[-CAPACITY:])
    assert torch.allclose(ours.double(), reference_attention(q, k_window, v_window, in_order), atol=1e-5)


@pytest.mark.parametrize(
    "q_lens,kv_lens,window",
    [([4, 1, 6], [20, 13, 6], 8), ([16], [32], 16), ([1, 1], [3, 9], 4), ([9, 8], [9, 8], None)],
)
def test_a_plan_reused_by_every_layer_gives_what_a_plan_per_call_gives(q_lens, kv_lens, window):
    bias = prefill_bias(q_lens, kv_lens, window)
    plan = AttentionPlan.build(bias, "cpu")
    for layer in range(3):
        q = rand(sum(q_lens), N_HEADS, 10 * layer)
        k, v = rand(sum(kv_lens), N_KV, 10 * layer + 1), rand(sum(kv_lens), N_KV, 10 * layer + 2)
        reused = packed_attention(q, k, v, bias, "torch", plan)
        assert torch.equal(reused, packed_attention(q, k, v, bias, "torch"))
        assert torch.allclose(reused.double(), reference_attention(q, k, v, bias), atol=1e-5)


def test_the_plan_pads_keys_to_a_multiple_of_sixteen_with_masked_rows():
    plan = AttentionPlan.build(prefill_bias([3, 5], [7, 21], None), "cpu")
    (group,) = plan.groups
    assert group.k_index.shape == (2, 32) and group.mask.shape == (2, 1, 5, 32)
    assert not group.mask[0, 0, :3, 7:].any() and not group.mask[1, 0, :, 21:].any()  # rows 3, 4 are padding


def test_decode_with_slots_out_of_order_gives_each_sequence_its_own_logits(checkpoint_factory):
    from shards.engine import LocalEngine

    engine = LocalEngine(checkpoint_factory("mixtral", seed=3, window=8), max_seqs=3)
    prompts = {2: [1, 5, 9, 13, 17, 21, 25, 29, 33, 37], 0: [1, 6, 10]}
    for slot, prompt in prompts.items():
        for start in range(0, len(prompt), 8):  # slot 2 goes past the window: its buffer wraps
            chunk = prompt[start : start + 8]
            engine.step(StepPlan([slot], [start], [len(chunk)], torch.tensor(chunk)))
    alone = {
        slot: engine.step(StepPlan([slot], [len(p)], [1], torch.tensor([40 + slot])))[0] for slot, p in prompts.items()
    }
    together = engine.step(StepPlan([2, 0], [len(prompts[2]), len(prompts[0])], [1, 1], torch.tensor([42, 40])))
    assert torch.allclose(together[0], alone[2], atol=1e-5) and torch.allclose(together[1], alone[0], atol=1e-5)


def test_decode_span_is_the_longest_filled_length_at_least_256_rounded_to_a_half_octave():
    from shards.kv_cache import decode_span

    lengths = (1, 64, 256, 257, 300, 385, 513, 1000, 1024)
    assert [decode_span(n, 1024) for n in lengths] == [256, 256, 256, 384, 384, 512, 768, 1024, 1024]
    assert decode_span(5000, 32768) == 6144 and decode_span(700, 512) == 512  # half of 4096; the capacity
    assert decode_span(100, 128) == 128  # never past the capacity, floor or not
    # the spans before (a quarter octave from 64 rows), which the environment can still ask for
    old = [decode_span(n, 1024, floor=64, per_octave=4) for n in (1, 64, 65, 129, 300, 513, 1000, 1024)]
    assert old == [64, 64, 128, 192, 320, 640, 1024, 1024]


def test_decode_reads_only_the_span_and_gives_what_the_whole_capacity_gives():
    """A buffer of 1024 rows whose longest sequence has 300: the step reads 384 rows a sequence (empty ones past 300
    are not read), and attention equals attention over all 1024 rows, masked."""
    import dataclasses

    capacity = 1024
    cache = RollingKVCache([0], 4, capacity, N_KV, HEAD_DIM, torch.float32)
    gen = torch.Generator().manual_seed(3)
    cache.k.copy_(torch.randn(cache.k.shape, generator=gen))  # rows past each length hold garbage: never attended
    cache.v.copy_(torch.randn(cache.v.shape, generator=gen))
    slots, starts = [2, 0, 3], [9, 299, 2]
    layout = build(StepPlan(slots, starts, [1, 1, 1]), capacity)
    whole = dataclasses.replace(layout, decode_span=None)
    q, k_new, v_new = rand(3, N_HEADS, 1), rand(3, N_KV, 2), rand(3, N_KV, 3)
    keys, values = cache.update_and_read(0, k_new, v_new, layout)
    all_keys, all_values = cache.update_and_read(0, k_new, v_new, whole)
    assert layout.decode_span == 384 and keys.shape[1] == 384 and all_keys.shape[1] == capacity
    fast = packed_attention(q, keys, values, layout.bias, "torch", layout.attention)
    full = packed_attention(q, all_keys, all_values, whole.bias, "torch", whole.attention)
    assert torch.allclose(fast, full, atol=1e-6)
    ref = reference_attention(q, keys.flatten(0, 1), values.flatten(0, 1), layout.bias)  # the bias is the span's
    assert torch.allclose(fast.double(), ref, atol=1e-5)


def test_the_environment_sets_the_decode_spans_of_every_shard_process():
    """`MISTRAL_CLUSTER_DECODE_SPAN_FLOOR` / `_SPANS_PER_OCTAVE` reach a fresh process (a shard actor reads them at
    import), so one GPU call can measure two span rules side by side."""
    import os
    import subprocess
    import sys

    env = os.environ | {"MISTRAL_CLUSTER_DECODE_SPAN_FLOOR": "64", "MISTRAL_CLUSTER_DECODE_SPANS_PER_OCTAVE": "4"}
    code = "from shards.kv_cache import decode_span; print([decode_span(n, 1024) for n in (60, 65, 129, 300)])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[64, 128, 192, 320]"


@pytest.mark.parametrize("arch", ["mixtral", "mistral"])
def test_only_the_kept_rows_leave_the_last_layer_and_every_key_reaches_the_cache(checkpoint_factory, arch):
    """`run_layers(rows=)`: a prompt's last token and a scored row, as the whole step gives them; the next chunk,
    which reads the first one's keys from the cache, gives what it gives after the whole step."""
    from shards.checkpoint import CheckpointReader, ShardSelection
    from shards.model import TransformerShard

    path = checkpoint_factory(arch, seed=5, window=8)
    reader = CheckpointReader(path)
    shard = TransformerShard.from_checkpoint(reader, ShardSelection.whole(reader.config), torch.float32, "cpu")
    cfg = reader.config
    outs = []
    for rows in (None, torch.tensor([2, 6]), torch.tensor([], dtype=torch.long)):  # none: a chunk before the last
        cache = RollingKVCache([int(i) for i in shard.layers], 2, 8, cfg.n_kv_heads, cfg.head_dim, torch.float32, "cpu")
        steps = []
        for start, ids in ((0, [1, 5, 9, 13, 17, 21, 25]), (7, [3, 8, 11]), (10, [4])):
            plan = StepPlan([0], [start], [len(ids)], torch.tensor(ids))
            layout = StepLayout.build(plan, 8, cfg.sliding_window, cfg.head_dim, cfg.rope_theta, "cpu")
            with torch.inference_mode():
                steps.append(
                    shard.run_layers(
                        shard.embed(torch.as_tensor(plan.token_ids)), layout, cache, rows=rows if start == 0 else None
                    )
                )
        outs.append(steps)
    (full, *full_rest), (kept, *kept_rest), (none, *none_rest) = outs
    assert kept.shape == (2, cfg.dim) and none.shape == (0, cfg.dim)
    assert torch.allclose(kept, full[[2, 6]], atol=1e-5)
    for a, b, c in zip(full_rest, kept_rest, none_rest, strict=True):  # the cache they left is the whole step's
        assert torch.allclose(a, b, atol=1e-5) and torch.allclose(a, c, atol=1e-5)
