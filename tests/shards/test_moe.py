"""Top-2 routing and expert groups: stacked experts run with grouped GEMMs, each token's choices summed in order."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shards import moe
from shards.moe import ExpertGroup, Gate

DIM, HIDDEN, EXPERTS = 16, 24, 6


def expert_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """Checkpoint-named w1/w3/w2 of every expert of one layer."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for e in range(EXPERTS):
        out[f"experts.{e}.w1.weight"] = torch.randn(HIDDEN, DIM, generator=gen) * 0.3
        out[f"experts.{e}.w3.weight"] = torch.randn(HIDDEN, DIM, generator=gen) * 0.3
        out[f"experts.{e}.w2.weight"] = torch.randn(DIM, HIDDEN, generator=gen) * 0.3
    return out


def make_group(ids, seed=0, dtype=torch.float32) -> ExpertGroup:
    with torch.device("meta"):
        group = ExpertGroup(DIM, HIDDEN, ids, EXPERTS)
    tensors = {k: v.to(dtype) for k, v in expert_weights(seed).items()}
    group.load_experts(tensors, "experts.", dtype, "cpu")
    return group


def routing(tokens: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, DIM, generator=gen)
    first = torch.randint(0, EXPERTS, (tokens,), generator=gen)
    second = (first + 1 + torch.randint(0, EXPERTS - 1, (tokens,), generator=gen)) % EXPERTS  # two distinct experts
    weights = torch.softmax(torch.randn(tokens, 2, generator=gen), dim=-1)
    return x, torch.stack([first, second], dim=1), weights


def reference(x, ids, weights, held, seed=0) -> torch.Tensor:
    """Token by token, choice by choice, with the checkpoint's own w1/w3/w2 (float64)."""
    w = {k: v.double() for k, v in expert_weights(seed).items()}
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if e in held:
                xt = x[t].double()
                h = F.silu(w[f"experts.{e}.w1.weight"] @ xt) * (w[f"experts.{e}.w3.weight"] @ xt)
                out[t] += weights[t, j].double() * (w[f"experts.{e}.w2.weight"] @ h)
    return out


def test_gate_weights_are_a_softmax_over_the_chosen_two():
    gate = Gate(DIM, EXPERTS, 2)
    torch.nn.init.normal_(gate.weight, std=0.5)
    x = torch.randn(10, DIM)
    ids, weights = gate(x)
    logits = x @ gate.weight.T
    expected_ids = torch.topk(logits, 2, dim=-1).indices
    assert torch.equal(ids, expected_ids)
    expected = torch.softmax(torch.gather(logits, 1, expected_ids), dim=-1)
    assert torch.allclose(weights, expected, atol=1e-6)


def test_loading_stacks_experts_in_hugging_face_gate_up_layout_and_frees_the_per_expert_tensors():
    tensors = expert_weights()
    tensors["other"] = torch.zeros(1)
    with torch.device("meta"):
        group = ExpertGroup(DIM, HIDDEN, [4, 1], EXPERTS)
    group.load_experts(tensors, "experts.", torch.float32, "cpu")
    ref = expert_weights()
    assert group.expert_ids == [1, 4]
    assert torch.equal(group.w13[1], torch.cat([ref["experts.4.w1.weight"], ref["experts.4.w3.weight"]]))
    assert torch.equal(group.w2[0], ref["experts.1.w2.weight"])
    assert set(tensors) == {"other"} | {k for k in ref if k.split(".")[1] not in ("1", "4")}


@pytest.mark.parametrize("held", [list(range(EXPERTS)), [0, 1, 2], [1, 3, 4], [5]], ids=["all", "low", "gaps", "one"])
def test_grouped_experts_match_the_token_by_token_mixture_of_the_held_experts(held):
    x, ids, weights = routing(13, seed=len(held))
    ours = make_group(held).forward_grouped(x, ids, weights)
    assert torch.allclose(ours.double(), reference(x, ids, weights, set(held)), atol=1e-5)


@pytest.mark.parametrize("held", [list(range(EXPERTS)), [0, 2, 5]])
def test_grouped_experts_match_the_per_expert_loop(held):
    group = make_group(held, seed=2)
    x, ids, weights = routing(33, seed=3)
    assert torch.allclose(group.forward_grouped(x, ids, weights), group.forward_loop(x, ids, weights), atol=1e-6)


@pytest.mark.parametrize(
    "path,reference_path,tokens,seed",
    [("forward_grouped", "forward_loop", 40, 4), ("forward_dense", "forward_grouped", 24, 11)],
)
def test_each_expert_path_matches_its_reference_path_in_bfloat16(path, reference_path, tokens, seed):
    group = make_group([0, 2, 3, 5], seed=seed, dtype=torch.bfloat16)
    x, ids, weights = routing(tokens, seed=seed + 1)
    x, weights = x.bfloat16(), weights.bfloat16()
    ours, expected = getattr(group, path)(x, ids, weights), getattr(group, reference_path)(x, ids, weights)
    assert ours.dtype == torch.bfloat16
    assert torch.allclose(ours.float(), expected.float(), atol=3e-2, rtol=3e-2)


def test_choices_of_experts_not_held_contribute_exactly_zero_even_if_the_kernel_leaves_garbage(monkeypatch):
    real = torch._grouped_mm

    def garbage_past_offs(a, b, offs):
        out = real(a, b, offs=offs)
        out[int(offs[-1]) :] = float("nan")  # what an uninitialised tail may hold
        return out

    monkeypatch.setattr(torch, "_grouped_mm", garbage_past_offs)
    group = make_group([1, 3])
    x, _, weights = routing(4, seed=6)
    ids = torch.tensor([[0, 2], [1, 5], [4, 3], [2, 0]])  # tokens 0 and 3 chose no held expert
    out = group.forward_grouped(x, ids, weights)
    assert torch.equal(out[0], torch.zeros(DIM)) and torch.equal(out[3], torch.zeros(DIM))
    assert torch.allclose(out.double(), reference(x, ids, weights, {1, 3}), atol=1e-5)


def test_groups_split_across_experts_sum_to_the_dense_mixture():
    full, low, high = make_group(list(range(EXPERTS))), make_group([0, 2, 4]), make_group([1, 3, 5])
    x, ids, weights = routing(9, seed=7)
    dense = reference(x, ids, weights, set(range(EXPERTS)))
    assert torch.allclose(full(x, ids, weights).double(), dense, atol=1e-5)
    assert torch.allclose((low(x, ids, weights) + high(x, ids, weights)).double(), dense, atol=1e-5)


def test_without_grouped_gemm_the_group_runs_one_expert_at_a_time(monkeypatch):
    monkeypatch.setenv("MISTRAL_CLUSTER_DENSE_EXPERTS_MAX_TOKENS", "0")
    group = make_group([0, 2, 4])
    x, ids, weights = routing(11, seed=8)
    expected = group.forward_grouped(x, ids, weights)
    monkeypatch.delattr(torch, "_grouped_mm")
    assert not moe.grouped_mm_supported(x, HIDDEN)
    assert torch.allclose(group(x, ids, weights), expected, atol=1e-6)


@pytest.mark.parametrize("held", [list(range(EXPERTS)), [0, 1, 2], [1, 3, 4], [5]], ids=["all", "low", "gaps", "one"])
def test_dense_experts_match_the_token_by_token_mixture_of_the_held_experts(held):
    x, ids, weights = routing(7, seed=10 + len(held))
    ours = make_group(held).forward_dense(x, ids, weights)
    assert torch.allclose(ours.double(), reference(x, ids, weights, set(held)), atol=1e-5)


def test_the_dense_path_runs_only_where_every_expert_expects_a_token_and_the_step_is_small(monkeypatch):
    group = make_group(list(range(EXPERTS)))
    assert not group.dense_pays(2, 2)  # 4 choices over 6 experts: most experts would be read for nothing
    assert group.dense_pays(3, 2)
    assert group.dense_pays(128, 2)
    assert not group.dense_pays(129, 2)  # a prefill chunk: 3x the FLOPs would show
    monkeypatch.setenv("MISTRAL_CLUSTER_DENSE_EXPERTS_MAX_TOKENS", "0")
    assert not group.dense_pays(3, 2)


def test_a_group_holding_some_experts_goes_dense_only_up_to_32_tokens(monkeypatch):
    monkeypatch.delenv("MISTRAL_CLUSTER_DENSE_EXPERTS_MAX_TOKENS", raising=False)
    part = make_group(list(range(EXPERTS // 2)))
    assert part.dense_pays(32, 2)
    assert not part.dense_pays(33, 2)  # grouped from here: measured faster for a group of half the experts
    assert make_group(list(range(EXPERTS))).dense_pays(33, 2)
    monkeypatch.setenv("MISTRAL_CLUSTER_DENSE_EXPERTS_MAX_TOKENS", "128")
    assert part.dense_pays(128, 2)


def test_forward_takes_the_dense_path_for_a_decode_sized_batch(monkeypatch):
    group = make_group([1, 2, 4])
    x, ids, weights = routing(5, seed=13)
    calls = []
    monkeypatch.setattr(group, "forward_grouped", lambda *a: calls.append("grouped"))
    out = group(x, ids, weights)
    assert calls == [] and torch.allclose(out.double(), reference(x, ids, weights, {1, 2, 4}), atol=1e-5)


def test_tokens_per_expert_counts_only_held_experts_on_the_device():
    group = make_group([1, 3, 4])
    ids = torch.tensor([[1, 0], [3, 1], [4, 1], [2, 5]])
    counts = group.tokens_per_expert(ids)
    assert isinstance(counts, torch.Tensor) and counts.tolist() == [3, 1, 1]


@pytest.mark.parametrize("pairs,n_local", [(0, 3), (1, 1), (7, 2), (500, 8), (64, 0)])
def test_the_counting_sort_orders_pairs_as_a_stable_sort_does(pairs, n_local):
    """`sort_by_expert` against `torch.sort(stable=True)`: the same order, its inverse, and each expert's row ends."""
    from shards.moe import sort_by_expert

    local = torch.randint(0, n_local + 1, (pairs,), generator=torch.Generator().manual_seed(pairs))
    order, inverse, offs = sort_by_expert(local, n_local)
    values, expected = torch.sort(local, stable=True)
    assert torch.equal(order, expected)
    assert torch.equal(order[inverse], torch.arange(pairs))
    bounds = torch.arange(1, n_local + 1)
    assert offs.dtype == torch.int32 and torch.equal(offs, torch.searchsorted(values, bounds, out_int32=True))
