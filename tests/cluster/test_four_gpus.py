"""Mixtral 8x22B on four GPUs: the three example placements plan onto a simulated node of four GPUs, one worker per
GPU within an H200's memory, are refused in one line on two GPUs, and run token-exact on CPU at a tiny shape of the
same structure (8 experts, top-2, 6 query heads per KV head, no window) against the one-process engine.

The simulated GPUs are logical: Ray hands them out, and each worker, finding no CUDA, computes on the CPU.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import pytest
import ray
from ray.cluster_utils import Cluster
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from bench.gpu_scale import dry_config, placement_yaml
from cluster.cli import main
from cluster.placement_file import settle_placement
from cluster.reservation import reserve
from cluster.sharded import ShardedCluster
from cluster.workers import group_workers
from router.generation import generate
from router.sampling import SamplingParams
from shards.config import PRESETS
from shards.engine import LocalEngine
from shards.random_source import write_random_checkpoint
from tests.conftest import random_prompts

EXAMPLES = Path(__file__).resolve().parents[2] / "deploy" / "examples"
FOUR_GPU = {
    "four_expert_groups": "mixtral-8x22b-4gpu-experts.yaml",
    "two_by_two": "mixtral-8x22b-4gpu-mixed.yaml",
    "four_stages": "mixtral-8x22b-4gpu-stages.yaml",
}
H200 = 139  # GiB an H200 leaves to a process

# Mixtral 8x22B in bf16, from its shapes: dim 6144, 48 query and 8 KV heads of 128, 16384 hidden, vocabulary 32768.
ATTENTION = (48 * 128 * 6144 * 2 + 8 * 128 * 6144 * 2 + 2 * 6144 + 8 * 6144) * 2  # q, o; k, v; two norms; the gate
EXPERT = 3 * 6144 * 16384 * 2  # one expert of one layer
EMBEDDING = 32768 * 6144 * 2
HEAD = (32768 * 6144 + 6144) * 2  # output head and final norm
KV_SLOT_LAYER = 65536 * 2 * 8 * 128 * 2  # no window: a slot keeps the whole 64k context of one layer, keys and values

# Per GPU, in bundle order: (weights, KV cache at the example's max_seqs).
PER_GPU = {
    "four_expert_groups": [
        (56 * ATTENTION + EMBEDDING + HEAD + 2 * 56 * EXPERT, 4 * 56 * KV_SLOT_LAYER),  # stage0 + experts0
        *[(2 * 56 * EXPERT, 0)] * 3,
    ],
    "two_by_two": [
        (28 * ATTENTION + EMBEDDING + 4 * 28 * EXPERT, 8 * 28 * KV_SLOT_LAYER),  # stage0 + experts 0-3 of its layers
        (28 * ATTENTION + HEAD + 4 * 28 * EXPERT, 8 * 28 * KV_SLOT_LAYER),  # stage1 + experts 0-3 of its layers
        (4 * 28 * EXPERT, 0),  # experts 4-7 of layers 0-27
        (4 * 28 * EXPERT, 0),  # experts 4-7 of layers 28-55
    ],
    "four_stages": [
        (14 * ATTENTION + EMBEDDING + 8 * 14 * EXPERT, 16 * 14 * KV_SLOT_LAYER),
        (14 * ATTENTION + 8 * 14 * EXPERT, 16 * 14 * KV_SLOT_LAYER),
        (14 * ATTENTION + 8 * 14 * EXPERT, 16 * 14 * KV_SLOT_LAYER),
        (14 * ATTENTION + HEAD + 8 * 14 * EXPERT, 16 * 14 * KV_SLOT_LAYER),
    ],
}


@pytest.fixture(scope="module")
def mixtral_8x22b(tmp_path_factory):
    """A random checkpoint at the real shapes: a config and a seed, no tensor files (`plan` loads no weights)."""
    return write_random_checkpoint(tmp_path_factory.mktemp("mixtral-8x22b"), PRESETS["mixtral-8x22b"])


@pytest.fixture(scope="module")
def gpus(request):
    """A Ray cluster of a CPU-only head and one node with `request.param` logical GPUs; tests ask for 2 or 4."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    node = cluster.add_node(num_cpus=6, num_gpus=request.param)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield {"address": cluster.address, "node": node.node_id, "gpus": request.param}
    finally:
        ray.shutdown()
        cluster.shutdown()


def plan_json(capsys, example: str, checkpoint: Path, address: str) -> dict:
    argv = ["plan", "--config", str(EXAMPLES / example), "--checkpoint", str(checkpoint), "--address", address]
    assert main([*argv, "--json", "--gpu-memory", str(H200)]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("gpus", [4], indirect=True)
@pytest.mark.parametrize("name", sorted(FOUR_GPU))
def test_a_four_gpu_example_plans_one_worker_per_gpu_within_an_h200(gpus, mixtral_8x22b, capsys, name):
    printed = plan_json(capsys, FOUR_GPU[name], mixtral_8x22b, gpus["address"])
    by_bundle = defaultdict(list)
    for shard in printed["shards"]:
        by_bundle[shard["bundle_index"]].append(shard)
    assert sorted(by_bundle) == [0, 1, 2, 3]
    assert all(shard["node_id"] == gpus["node"] for shard in printed["shards"])
    per_gpu = []
    for i in range(4):
        shards = by_bundle[i]
        assert sum(s["gpus"] for s in shards) == pytest.approx(1.0)  # a whole GPU each: 1, or 0.2 + 0.8
        per_gpu.append((sum(s["weight_bytes"] for s in shards), sum(s["kv_bytes"] for s in shards)))
    assert per_gpu == PER_GPU[name]
    assert max(w + kv for w, kv in per_gpu) <= H200 * 2**30
    assert printed["data_plane"]["transport"] == "nccl", printed["data_plane"]  # no worker runs two loops
    assert len(printed["standbys"]) == 4  # a standby for each GPU worker, by default
    assert sum(w for w, _ in per_gpu) == 2 * 140_630_071_296  # every parameter once, in bf16


@pytest.mark.parametrize("gpus", [4], indirect=True)
@pytest.mark.parametrize("name", sorted(FOUR_GPU))
def test_each_worker_of_a_four_gpu_example_gets_a_gpu_of_its_own(gpus, mixtral_8x22b, name):
    plan, config = settle_placement(EXAMPLES / FOUR_GPU[name], str(mixtral_8x22b))
    reservation = reserve(plan, config, timeout_s=60)
    try:

        @ray.remote(num_cpus=0)
        def gpu_ids() -> list[str]:
            return [str(i) for i in ray.get_gpu_ids()]

        strategy = PlacementGroupSchedulingStrategy
        refs = [
            gpu_ids.options(
                num_gpus=w.bundle["GPU"],
                scheduling_strategy=strategy(reservation.placement_group, placement_group_bundle_index=w.index),
            ).remote()
            for w in group_workers(plan)
        ]
        ids = ray.get(refs, timeout=120)
    finally:
        reservation.release()
    assert [len(i) for i in ids] == [1, 1, 1, 1]
    assert len({i[0] for i in ids}) == 4


@pytest.mark.parametrize("gpus", [2], indirect=True)
@pytest.mark.parametrize("name", sorted(FOUR_GPU))
def test_a_four_gpu_example_on_two_gpus_is_one_line_and_status_2(gpus, mixtral_8x22b, capsys, name):
    argv = ["--config", str(EXAMPLES / FOUR_GPU[name]), "--checkpoint", str(mixtral_8x22b)]
    assert main(["plan", *argv, "--address", gpus["address"]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "mistral-cluster plan: error:" in err and "4 GPU in all" in err and "the cluster has 2" in err


def test_mixtral_8x22b_on_one_gpu_is_refused_for_its_memory_before_ray_starts(mixtral_8x22b, tmp_path, capsys):
    path = tmp_path / "one-gpu.yaml"
    path.write_text("checkpoint: c\ndtype: bfloat16\nstages: 1\nresources: {CPU: 1, GPU: 1}\nmax_seqs: 1\n")
    assert main(["plan", "--config", str(path), "--checkpoint", str(mixtral_8x22b), "--gpu-memory", "139"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "stage0 holds 261.9 GiB of bfloat16 weights + 14.0 GiB of KV cache (max_seqs 1)" in err
    assert "more than the 139.0 GiB of its 1 GPU" in err


@pytest.mark.parametrize("value", ["0", "-3", "nan", "lots"])
def test_a_bad_gpu_memory_is_one_line_naming_the_flag(mixtral_8x22b, capsys, value):
    argv = ["plan", "--config", str(EXAMPLES / FOUR_GPU["four_stages"]), "--checkpoint", str(mixtral_8x22b)]
    assert main([*argv, "--gpu-memory", value]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--gpu-memory" in err and value in err


# --- the same placements at a tiny shape, run on CPU ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_8x22b(tmp_path_factory):
    """Mixtral 8x22B's structure at gpu_scale's dry-run size: 4 layers, 8 experts top-2, 6/1 heads, no window."""
    config = replace(dry_config(PRESETS["mixtral-8x22b"]), max_seq_len=96)
    return write_random_checkpoint(tmp_path_factory.mktemp("tiny-8x22b"), config, seed=3, std=0.1)


@pytest.mark.parametrize("gpus", [4], indirect=True)
@pytest.mark.parametrize("name", sorted(FOUR_GPU))
def test_the_dry_run_placement_gives_the_tokens_of_one_process(gpus, tiny_8x22b, tmp_path, name):
    """gpu_scale's dry-run YAML (same shards and GPU fractions, layer ranges cut to 4 layers) on the simulated GPUs."""
    path = placement_yaml(name, tiny_8x22b, 4, 32, 4, 128, True, tmp_path)
    prompts = random_prompts([5, 33, 17], seed=7, vocab=32768)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    with ShardedCluster.start(path) as cluster:
        assert len({loc.pid for loc in cluster.locations().values()}) == 4  # one worker per (simulated) GPU
        ours = cluster.generate(prompts, params)
    local = generate(LocalEngine(tiny_8x22b, max_seqs=4), prompts, params)
    assert [c.token_ids for c in ours] == [c.token_ids for c in local]
