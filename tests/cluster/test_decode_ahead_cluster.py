"""Decode ahead on a real cluster: one stage whose MoE layers dispatch to two expert groups in other workers, the
router sending each greedy sequence's next step before its token is back, the stage feeding in its own picks. The
tokens must be transformers' and those of the same cluster without it, and the stage must really have fed tokens."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import ray
import yaml

from cluster.sharded import ShardedCluster
from router.generation import generate
from router.sampling import SamplingParams
from shards.engine import LocalEngine
from tests.conftest import hf_greedy, random_prompts

WINDOW = 16


@pytest.fixture(scope="module")
def checkpoint(checkpoint_factory):
    return checkpoint_factory("mixtral", seed=31, window=WINDOW)


def start(checkpoint, tmp_path, decode_ahead: bool) -> ShardedCluster:
    placement = {
        "checkpoint": str(checkpoint),
        "dtype": "float32",
        "stages": [{"layers": [0, 1, 2, 3], "resources": {"CPU": 0.5}}],
        "expert_groups": [
            {"experts": [0, 1], "resources": {"CPU": 0.5}},
            {"experts": [2, 3], "resources": {"CPU": 0.5}},
        ],
        "micro_batch_size": 4,
        "token_budget": 256,
        "max_seqs": 4,
        "decode_ahead": decode_ahead,
    }
    path = tmp_path / f"one-stage-ahead-{decode_ahead}.yaml"
    path.write_text(yaml.safe_dump(placement))
    return ShardedCluster.start(path)


@pytest.fixture(scope="module")
def ray_local():
    os.environ["MISTRAL_CLUSTER_CUDA_GRAPHS"] = "eager"  # the decode graphs' bookkeeping runs on CPU too
    # the worker's overlapped loop (step N+1 launched before N is finished), as on a GPU: its order of steps
    os.environ["MISTRAL_CLUSTER_OVERLAP_HOST"] = "force"
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()
    os.environ.pop("MISTRAL_CLUSTER_CUDA_GRAPHS", None)
    os.environ.pop("MISTRAL_CLUSTER_OVERLAP_HOST", None)


def test_one_stage_with_remote_experts_decoding_ahead_gives_transformers_tokens(
    ray_local, checkpoint, hf_model, tmp_path
):
    prompts = random_prompts([7, 19, 4, 11, 9], seed=32)  # five requests, four slots: one waits for a slot
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (12, 5, 16, 1, 9)]
    model = hf_model(checkpoint)
    expected = [hf_greedy(model, p, sp.max_tokens) for p, sp in zip(prompts, params, strict=True)]
    with start(checkpoint, tmp_path, decode_ahead=True) as cluster:
        ahead = cluster.generate(prompts, params)
        paths = ray.get(cluster.shard_handles()["stage0"].decode_paths.remote())
    assert [c.token_ids for c in ahead] == expected
    assert paths["stage0"]["fed_back_tokens"] >= 20  # most decode tokens went in without the router
    # every step launched by the stage thread and waited for by its deliver thread (on a CPU a launch computes the
    # step, so none is still undelivered when the next is launched: `overlapped_steps` counts that on a GPU)
    assert paths["stage0"]["launched_ahead_steps"] >= max(sp.max_tokens for sp in params)  # a step a token at least
    with start(checkpoint, tmp_path, decode_ahead=False) as cluster:
        plain = cluster.generate(prompts, params)
        paths = ray.get(cluster.shard_handles()["stage0"].decode_paths.remote())
    assert [c.token_ids for c in plain] == expected and paths["stage0"]["fed_back_tokens"] == 0
    assert paths["stage0"]["overlapped_steps"] == 0  # without decode ahead a step never waits in the queue
    assert paths["stage0"]["launched_ahead_steps"] == 0  # nor is launched by one thread and waited for by another


def test_two_stages_decoding_ahead_hand_the_picks_from_the_last_to_the_first_and_survive_its_kill(
    ray_local, checkpoint, hf_model, tmp_path
):
    """A pipeline with `decode_ahead: true`: the first stage embeds a sequence's next token before the router has
    it, from the table of picks the last stage sends it at the start of that step (a channel of their own). Then
    SIGKILL the last stage, which holds the picks, mid-generation: recovery rebuilds the channel and the caches, and
    every request keeps its tokens."""
    prompts = random_prompts([7, 19, 4, 11], seed=34)
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (12, 5, 16, 9)]
    model = hf_model(checkpoint)
    expected = [hf_greedy(model, p, sp.max_tokens) for p, sp in zip(prompts, params, strict=True)]
    placement = {
        "checkpoint": str(checkpoint),
        "dtype": "float32",
        "stages": [{"layers": [0, 1], "resources": {"CPU": 0.5}}, {"layers": [2, 3], "resources": {"CPU": 0.5}}],
        "micro_batch_size": 4,
        "token_budget": 256,
        "max_seqs": 4,
        "decode_ahead": True,
    }
    path = tmp_path / "two-stages-ahead.yaml"
    path.write_text(yaml.safe_dump(placement))
    # 256 tokens each: ~2 s through the two CPU stages, the kill at 0.6 s lands mid-generation (96 took 0.5 s)
    long = [SamplingParams(max_tokens=256, ignore_eos=True) for _ in prompts]
    expected_long = [c.token_ids for c in generate(LocalEngine(checkpoint, max_seqs=4), prompts, long)]
    with ShardedCluster.start(path) as cluster:
        out = cluster.generate(prompts, params)
        handles = cluster.shard_handles()
        first = ray.get(handles["stage0"].decode_paths.remote())["stage0"]
        last = ray.get(handles["stage1"].decode_paths.remote())["stage1"]
        assert [c.token_ids for c in out] == expected
        assert first["fed_back_tokens"] >= 20 and last["fed_back_tokens"] == 0  # the first embeds, fed by the last
        fed_before = first["fed_back_tokens"]
        killed, health = generate_through_a_kill(cluster, prompts, long, "stage1")
        first = ray.get(cluster.shard_handles()["stage0"].decode_paths.remote())["stage0"]
    assert health.recoveries >= 1 and cluster_restarted(health, "stage1"), health  # the kill landed mid-generation
    assert [r.token_ids for r in killed] == expected_long
    # the first stage went on being fed after the recovery (its count starts anew if it was restarted too)
    assert first["fed_back_tokens"] > (0 if cluster_restarted(health, "stage0") else fed_before), (first, fed_before)


def test_a_killed_stage_decoding_ahead_is_recovered_and_every_token_is_kept(ray_local, checkpoint, tmp_path):
    """SIGKILL the stage (it holds the picks fed back) mid-generation: recovery rebuilds the caches by replay, the
    new stage's picks are its own before any token is fed back again, and every request keeps its tokens."""
    prompts = random_prompts([6, 13, 9, 21], seed=33)
    params = [SamplingParams(max_tokens=96, ignore_eos=True) for _ in prompts]
    expected = [c.token_ids for c in generate(LocalEngine(checkpoint, max_seqs=4), prompts, params)]
    with start(checkpoint, tmp_path, decode_ahead=True) as cluster:
        cluster.generate(prompts[:1], [SamplingParams(max_tokens=4, ignore_eos=True)])  # warm
        out, health = generate_through_a_kill(cluster, prompts, params, "stage0")
        paths = ray.get(cluster.shard_handles()["stage0"].decode_paths.remote())
    assert health.recoveries >= 1 and cluster_restarted(health, "stage0"), health  # the kill landed mid-generation
    assert [r.token_ids for r in out] == expected
    assert paths["stage0"]["fed_back_tokens"] > 0  # the new stage ran ahead too


def generate_through_a_kill(cluster: ShardedCluster, prompts, params, shard: str) -> tuple[list, object]:
    """`cluster.generate` on a thread, `shard`'s process SIGKILLed 0.6 s in: its outputs and the health after."""
    victim = cluster.locations()[shard].pid
    out: dict = {}
    worker = threading.Thread(target=lambda: out.update(r=cluster.generate(prompts, params)))
    worker.start()
    time.sleep(0.6)
    os.kill(victim, signal.SIGKILL)
    worker.join(timeout=240)
    return out["r"], cluster.health().health


def cluster_restarted(health, shard: str) -> bool:
    return any(shard in names for names in health.restarted)
