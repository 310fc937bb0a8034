"""Decode steps padded to captured batch sizes on a real cluster: one stage holding every expert of its layers
replays decode graphs of more than 8 sequences at multiples of 16, its extra rows on a scratch slot of the cache.
The tokens must be transformers', the graphs' sizes only the padded ones, and the expert counts the real rows'."""

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
    os.environ["MISTRAL_CLUSTER_CUDA_GRAPHS"] = "eager"  # the decode graphs' bookkeeping runs on CPU too
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()
    os.environ.pop("MISTRAL_CLUSTER_CUDA_GRAPHS", None)


@pytest.mark.parametrize(
    "stages",
    [[[0, 1, 2, 3]], [[0, 1], [2, 3]]],
    ids=["one stage", "two stages"],  # a pipeline: each stage pads its own rows, the activations between unpadded
)
def test_padded_decode_steps_give_transformers_tokens_and_count_only_real_rows(
    ray_local, checkpoint_factory, hf_model, tmp_path, stages
):
    checkpoint = checkpoint_factory("mixtral", seed=37, window=WINDOW)
    placement = {
        "checkpoint": str(checkpoint),
        "dtype": "float32",
        "stages": [{"layers": layers, "resources": {"CPU": 0.5}} for layers in stages],
        "micro_batch_size": 24,
        "token_budget": 512,
        "max_seqs": 24,
    }
    path = tmp_path / "one-stage.yaml"
    path.write_text(yaml.safe_dump(placement))
    # 22 requests ending four by four: decode batches of 22, 18, 14, 10, 6 and 2 sequences (two stages keep two
    # steps in flight, each with half of them)
    prompts = random_prompts([7, 19, 4, 11, 9, 5, 3, 8, 6, 10, 2] * 2, seed=38)
    params = [SamplingParams(max_tokens=4 + i // 4, ignore_eos=True) for i in range(22)]
    model = hf_model(checkpoint)
    expected = [hf_greedy(model, p, sp.max_tokens) for p, sp in zip(prompts, params, strict=True)]
    with ShardedCluster.start(path) as cluster:
        before = cluster.expert_load()
        out = cluster.generate(prompts, params)
        load = [[a - b for a, b in zip(x, y, strict=True)] for x, y in zip(cluster.expert_load(), before, strict=True)]
        handles = cluster.shard_handles()
        paths = [ray.get(handles[f"stage{s}"].decode_paths.remote())[f"stage{s}"] for s in range(len(stages))]
    assert [c.token_ids for c in out] == expected
    for stage in paths:  # sizes up to 8 as they are, larger ones padded to multiples of 16
        sizes = stage["graph_batches"]
        assert all(n <= 8 or n % 16 == 0 for n in sizes) and max(sizes) > 8 and min(sizes) < 8, sizes
        assert stage["graph_replays"] > 0
    # every token the model took (each prompt, then every output but the last) was routed to 2 experts a layer, and
    # not one more: the padding's rows are not counted. The last layer routes only the rows read: a prompt's last.
    decoded = sum(sp.max_tokens - 1 for sp in params)
    fed = sum(len(p) for p in prompts) + decoded
    assert [sum(row) for row in load] == [2 * fed] * 3 + [2 * (decoded + len(prompts))]
