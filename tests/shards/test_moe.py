"""Top-2 routing and expert groups: only chosen experts run, on only their tokens, combined in token order."""

from __future__ import annotations

import torch

from shards.moe import ExpertGroup, Gate

DIM, HIDDEN, EXPERTS = 16, 24, 6


def make_group(ids, seed=0):
    torch.manual_seed(seed)
    group = ExpertGroup(DIM, HIDDEN, ids)
    for p in group.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return group


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


def test_only_experts_with_tokens_run_and_only_on_their_tokens():
    group = make_group(list(range(EXPERTS)))
    calls = {}
    for e, expert in group.experts.items():
        expert.register_forward_hook(lambda m, inp, out, e=e: calls.setdefault(int(e), []).append(inp[0].shape[0]))
    ids = torch.tensor([[0, 2], [2, 0], [4, 2], [0, 4]])
    weights = torch.full((4, 2), 0.5)
    group(torch.randn(4, DIM), ids, weights)
    assert calls == {0: [3], 2: [3], 4: [2]}  # experts 1, 3, 5 received no token and never ran


def test_groups_split_across_experts_sum_to_the_dense_mixture():
    full = make_group(list(range(EXPERTS)), seed=1)
    low, high = make_group([0, 1, 2]), make_group([3, 4, 5])
    for e in range(EXPERTS):
        part = low if e < 3 else high
        part.experts[str(e)].load_state_dict(full.experts[str(e)].state_dict())
    x = torch.randn(9, DIM)
    ids = torch.randint(0, EXPERTS, (9, 2))
    ids[:, 1] = (ids[:, 0] + 1 + torch.randint(0, EXPERTS - 1, (9,))) % EXPERTS  # two distinct experts per token
    weights = torch.softmax(torch.randn(9, 2), dim=-1)
    dense = torch.stack([
        sum(weights[t, j] * full.experts[str(int(ids[t, j]))](x[t : t + 1])[0] for j in range(2)) for t in range(9)
    ])
    assert torch.allclose(full(x, ids, weights), dense, atol=1e-5)
    assert torch.allclose(low(x, ids, weights) + high(x, ids, weights), dense, atol=1e-5)
