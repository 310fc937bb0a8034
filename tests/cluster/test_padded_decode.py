"""Decode steps padded to captured batch sizes on a real cluster: one stage holding every expert of its layers
replays decode graphs at 1, 2, 4, 8, 16, ... sequences, its extra rows on a scratch slot of the cache. The tokens
must be transformers', the graphs' sizes only the padded ones, and the expert counts those of the real rows."""

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


def test_padded_decode_steps_give_transformers_tokens_and_count_only_real_rows(
    ray_local, checkpoint_factory, hf_model, tmp_path
):
    checkpoint = checkpoint_factory("mixtral", seed=37, window=WINDOW)
    placement = {
        "checkpoint": str(checkpoint),
        "dtype": "float32",
        "stages": [{"layers": [0, 1, 2, 3], "resources": {"CPU": 0.5}}],
        "micro_batch_size": 8,
        "token_budget": 256,
        "max_seqs": 8,
    }
    path = tmp_path / "one-stage.yaml"
    path.write_text(yaml.safe_dump(placement))
    # five requests ending at different steps: decode batches of 5, 4, 3, 2 and 1 sequences
    prompts = random_prompts([7, 19, 4, 11, 9], seed=38)
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (12, 5, 16, 3, 9)]
    model = hf_model(checkpoint)
    expected = [hf_greedy(model, p, sp.max_tokens) for p, sp in zip(prompts, params, strict=True)]
    with ShardedCluster.start(path) as cluster:
        before = cluster.expert_load()
        out = cluster.generate(prompts, params)
        load = [[a - b for a, b in zip(x, y, strict=True)] for x, y in zip(cluster.expert_load(), before, strict=True)]
        paths = ray.get(cluster.shard_handles()["stage0"].decode_paths.remote())["stage0"]
    assert [c.token_ids for c in out] == expected
    assert paths["graph_batches"] and set(paths["graph_batches"]) <= {1, 2, 4, 8}  # 5 and 3 ran padded
    assert 8 in paths["graph_batches"] and paths["graph_replays"] > 0
    # every token the model took (each prompt, then every output but the last) was routed to 2 experts a layer, and
    # not one more: the padding's rows are not counted. The last layer routes only the rows read: a prompt's last.
    decoded = sum(sp.max_tokens - 1 for sp in params)
    fed = sum(len(p) for p in prompts) + decoded
    assert [sum(row) for row in load] == [2 * fed] * 3 + [2 * (decoded + len(prompts))]
