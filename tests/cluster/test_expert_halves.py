"""Experts cut in half across two workers (`hidden: 0/2` and `1/2`): every token goes to both groups, each computes
its half of the token's experts, and the stage adds the halves. The cluster's greedy tokens must be transformers'
(float32), with the halves in the stage's worker and in another, eagerly and through the decode graphs' bookkeeping,
and each group must have held exactly its half of the rows."""

from __future__ import annotations

import os

import pytest
import ray
import yaml

from cluster.sharded import ShardedCluster
from router.sampling import SamplingParams
from tests.conftest import hf_greedy, random_prompts

WINDOW = 16


@pytest.fixture(scope="module")
def ray_local():
    os.environ["MISTRAL_CLUSTER_CUDA_GRAPHS"] = "eager"
    os.environ["MISTRAL_CLUSTER_SERVER_GRAPHS"] = "eager"
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()
    os.environ.pop("MISTRAL_CLUSTER_CUDA_GRAPHS", None)
    os.environ.pop("MISTRAL_CLUSTER_SERVER_GRAPHS", None)


def write_placement(tmp_path, checkpoint, cuts: tuple[str, str], **knobs) -> str:
    """One stage of the 4 layers and two expert groups holding all 4 experts cut as `cuts`, float32 on CPUs."""
    placement = {
        "checkpoint": str(checkpoint),
        "dtype": "float32",
        "stages": [{"layers": "0-3", "resources": {"CPU": 0.5}}],
        "expert_groups": [{"experts": "0-3", "hidden": cut, "resources": {"CPU": 0.5}} for cut in cuts],
        "token_budget": 256,
        "max_seqs": 4,
        **knobs,
    }
    path = tmp_path / "placement.yaml"
    path.write_text(yaml.safe_dump(placement))
    return str(path)


def requests_and_reference(model, seed: int) -> tuple[list[list[int]], list[SamplingParams], list[list[int]]]:
    """Three prompts of 7, 19 and 4 tokens asking 14, 6 and 20 greedy tokens, and transformers' tokens for them."""
    prompts = random_prompts([7, 19, 4], seed=seed)
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (14, 6, 20)]
    expected = [hf_greedy(model, p, sp.max_tokens) for p, sp in zip(prompts, params, strict=True)]
    return prompts, params, expected


def test_two_parts_of_every_expert_give_transformers_tokens(ray_local, checkpoint_factory, hf_model, tmp_path):
    """An uneven cut, given as rows (`0:72` and `72:128` of 128): what `i/n` parts settle to as well."""
    checkpoint = checkpoint_factory("mixtral", seed=41, window=WINDOW)
    path = write_placement(tmp_path, checkpoint, ("0:72", "72:128"), micro_batch_size=2)
    model = hf_model(checkpoint)
    prompts, params, expected = requests_and_reference(model, seed=42)
    with ShardedCluster.start(path) as cluster:
        out = cluster.generate(prompts, params)
        shapes = {name: ray.get(handle.expert_shapes.remote()) for name, handle in cluster.shard_handles().items()}
    assert [c.token_ids for c in out] == expected
    hidden, dim = model.config.intermediate_size, model.config.hidden_size
    assert hidden == 128
    # each group's stacked weights: 4 experts x (2 x its rows) x dim, and dim x its rows for w2
    assert shapes["experts0"]["experts0"] == [[4, 2 * 72, dim], [4, dim, 72]]
    assert shapes["experts1"]["experts1"] == [[4, 2 * 56, dim], [4, dim, 56]]


def test_two_overlapped_halves_of_each_decode_step_give_transformers_tokens(
    ray_local, checkpoint_factory, hf_model, tmp_path
):
    """Two-batch overlap (`overlap_min_seqs`): a decode step of 2+ sequences runs as two halves interleaved layer by
    layer, so the far group gets two messages a layer, first half first. The tokens must still be transformers',
    and the far group's messages must show the halves (3 sequences: 2 then 1 tokens)."""
    checkpoint = checkpoint_factory("mixtral", seed=43, window=WINDOW)
    path = write_placement(tmp_path, checkpoint, ("0/2", "1/2"), micro_batch_size=4, overlap_min_seqs=2)
    prompts, params, expected = requests_and_reference(hf_model(checkpoint), seed=44)
    with ShardedCluster.start(path) as cluster:
        cluster.expert_traces()  # what loading sent, if anything
        out = cluster.generate(prompts, params)
        traces = cluster.expert_traces()
    assert [c.token_ids for c in out] == expected
    messages = [(m.layer, m.tokens) for t in traces for m in t.received]
    assert 3 not in {n for _, n in messages}, messages  # no decode step of the 3 sequences went whole
    # each layer of such a step: the first half (2 tokens), then at once the second (1), before the next layer's
    pairs = {layer for i, (layer, n) in enumerate(messages[:-1]) if n == 2 and messages[i + 1] == (layer, 1)}
    assert pairs == {0, 1, 2, 3}, messages
