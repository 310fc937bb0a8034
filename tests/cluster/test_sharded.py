"""A Mixtral split over a real multi-node Ray cluster (2 stages x 2 expert groups) gives exactly the tokens of one
process and of transformers; every shard sits on the node its YAML names; micro-batches overlap; each expert group
receives only its tokens."""

from __future__ import annotations

import os

import pytest
import ray
import yaml
from ray.cluster_utils import Cluster

from cluster.sharded import ShardedCluster
from router.generation import generate
from router.sampling import SamplingParams
from shards.engine import LocalEngine
from tests.conftest import hf_greedy, random_prompts

WINDOW = 16


@pytest.fixture(scope="module")
def ray_nodes():
    # Stages capture decode steps, and so do expert services; on CPU they replay them on the graphs' static buffers
    # (shards/decode_graphs.py, cluster/expert_server.py), so these tests check that bookkeeping too. The nodes'
    # workers inherit this.
    os.environ["MISTRAL_CLUSTER_CUDA_GRAPHS"] = "eager"
    os.environ["MISTRAL_CLUSTER_SERVER_GRAPHS"] = "eager"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    stage_node = cluster.add_node(num_cpus=2, resources={"stage_node": 2})
    expert_node = cluster.add_node(num_cpus=2, resources={"expert_node": 2})
    ray.init(address=cluster.address)
    yield {"stage_node": stage_node.node_id, "expert_node": expert_node.node_id}
    ray.shutdown()
    cluster.shutdown()
    os.environ.pop("MISTRAL_CLUSTER_CUDA_GRAPHS", None)


@pytest.fixture(scope="module")
def checkpoint(checkpoint_factory):
    return checkpoint_factory("mixtral", seed=21, window=WINDOW)


@pytest.fixture(scope="module")
def sharded(ray_nodes, checkpoint, tmp_path_factory):
    placement = {
        "checkpoint": str(checkpoint),
        "dtype": "float32",
        "strategy": "spread",
        "stages": [
            {"layers": [0, 1], "resources": {"CPU": 0.5, "stage_node": 1}},
            {"layers": [2, 3], "resources": {"CPU": 0.5, "stage_node": 1}},
        ],
        "expert_groups": [
            {"experts": [0, 1], "resources": {"CPU": 0.5, "expert_node": 1}},
            {"experts": [2, 3], "resources": {"CPU": 0.5, "expert_node": 1}},
        ],
        "micro_batch_size": 1,
        "token_budget": 256,
        "max_seqs": 4,
    }
    path = tmp_path_factory.mktemp("placement") / "two-by-two.yaml"
    path.write_text(yaml.safe_dump(placement))
    with ShardedCluster.start(path) as cluster:
        yield cluster


def test_every_shard_runs_on_the_node_its_yaml_names(sharded, ray_nodes):
    where = sharded.locations()
    assert {where["stage0"].node_id, where["stage1"].node_id} == {ray_nodes["stage_node"]}
    assert {where["experts0"].node_id, where["experts1"].node_id} == {ray_nodes["expert_node"]}
    from ray._private.state import actors

    by_pid = {a["Pid"]: a for a in actors().values() if a["State"] == "ALIVE"}
    for loc in where.values():  # Ray's own actor table (GCS) agrees with what each actor reports
        assert by_pid[loc.pid]["Address"]["NodeID"] == loc.node_id


def test_greedy_tokens_equal_one_process_and_transformers(sharded, checkpoint, hf_model):
    prompts = random_prompts([3, WINDOW, 3 * WINDOW + 5, 2 * WINDOW + 1], seed=31)
    params = SamplingParams(max_tokens=2 * WINDOW, ignore_eos=True)
    ours = sharded.generate(prompts, params)
    experts = [h for name, h in sharded.shard_handles().items() if name.startswith("experts")]
    assert all(n > 0 for n in ray.get([h.graph_replays.remote() for h in experts]))  # decode served by replays
    local = generate(LocalEngine(checkpoint, max_seqs=4), prompts, params)
    for prompt, a, b in zip(prompts, ours, local, strict=True):
        assert a.token_ids == b.token_ids, f"prompt of {len(prompt)} tokens"
        assert a.token_ids == hf_greedy(hf_model(checkpoint), prompt, 2 * WINDOW)


def test_stages_work_on_different_microbatches_at_the_same_time(sharded):
    """Micro-batches flow through the stages, and so do steps: with two stages, two steps are in flight, each with
    half the running sequences, so stage0 works on the next micro-batch or step while stage1 works on this one."""
    sharded.take_traces()
    prompts = random_prompts([WINDOW] * 4, seed=41)
    sharded.generate(prompts, SamplingParams(max_tokens=4, ignore_eos=True))
    traces = sharded.take_traces()
    decode = [t for t in traces if t.tokens == t.sequences]
    assert decode and all(t.sequences <= 2 for t in traces)  # 4 sequences, 2 steps in flight: at most 2 a step
    spans = {0: [], 1: []}  # per stage, every micro-batch it ran, in the order it ran them
    for t in sorted(traces, key=lambda t: t.step):
        for stage in t.stages:
            spans[stage.stage] += list(stage.spans)
    first, second = spans[0], spans[1]
    assert len(first) == len(second) == sum(t.microbatches for t in traces)
    overlapped = any(
        nxt.start < cur.end and cur.start < nxt.end for nxt, cur in zip(first[1:], second[:-1], strict=True)
    )
    assert overlapped, "stage0 never worked on the next micro-batch or step while stage1 worked on this one"


def test_expert_groups_compute_exactly_the_gates_choices_from_fixed_size_messages(sharded):
    """Each remote expert group gets every token of a micro-batch (a fixed-size message: no host sync decides who
    gets what), computes only the experts it holds, and only for the tokens whose gate chose them."""
    sharded.take_traces()
    sharded.expert_traces()
    before = sharded.expert_load()
    sharded.generate(random_prompts([20, 7], seed=51), SamplingParams(max_tokens=6, ignore_eos=True))
    after = sharded.expert_load()
    chosen = {
        (layer, e): a - b
        for layer, (row_a, row_b) in enumerate(zip(after, before, strict=True))
        for e, (a, b) in enumerate(zip(row_a, row_b, strict=True))
        if a != b
    }
    steps = sharded.take_traces()
    computed, tokens_served = {}, {}
    for trace in sharded.expert_traces():
        assert trace.errors == ()
        held = {"experts0": {0, 1}, "experts1": {2, 3}}[trace.worker]
        for layer, per_expert in trace.computed.items():
            assert set(per_expert) <= held, f"{trace.worker} computed experts it does not hold"
            for e, n in per_expert.items():
                computed[layer, e] = computed.get((layer, e), 0) + n
        for msg in trace.received:
            key = (trace.worker, msg.stage, msg.layer)
            tokens_served[key] = tokens_served.get(key, 0) + msg.tokens
    assert computed == chosen  # the gates' choices, no more, no less
    all_tokens = sum(t.tokens for t in steps)
    assert len(tokens_served) == 2 * 4  # two groups, each serving every one of the 4 MoE layers
    assert set(tokens_served.values()) == {all_tokens}  # every token of every step, in every layer


def test_router_records_expert_load_per_layer(sharded):
    load = sharded.expert_load()
    assert len(load) == 4 and all(len(row) == 4 for row in load)
    assert all(sum(row) > 0 and sum(row) % 2 == 0 for row in load)  # two choices per token


def test_stages_that_hold_their_experts_count_exactly_the_gates_choices(ray_nodes, checkpoint, tmp_path):
    placement = {
        "checkpoint": str(checkpoint),
        "dtype": "float32",
        "strategy": "spread",
        "stages": [
            {"layers": [0, 1], "resources": {"CPU": 0.5}},  # beside the 2 x 2 cluster, which holds the
            {"layers": [2, 3], "resources": {"CPU": 0.5}},
        ],  # node resources: plain CPUs only
        "micro_batch_size": 2,
        "token_budget": 256,
        "max_seqs": 4,
    }
    path = tmp_path / "two-stages.yaml"
    path.write_text(yaml.safe_dump(placement))
    prompts = random_prompts([9, 2 * WINDOW + 3], seed=61)
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    with ShardedCluster.start(path) as cluster:
        ours = cluster.generate(prompts, params)
        load = cluster.expert_load()
        replays = ray.get([h.graph_replays.remote() for k, h in cluster.shard_handles().items()])
    assert all(n > 0 for n in replays), replays  # decode steps ran as (CPU-replayed) captured graphs
    engine = LocalEngine(checkpoint, max_seqs=4)
    expected = [[0] * engine.config.num_experts for _ in range(engine.config.n_layers)]

    def count(layer):
        def hook(_module, _inputs, out):
            for e in out[0].flatten().tolist():
                expected[layer][e] += 1

        return hook

    for i, layer in engine.model.layers.items():
        layer.block_sparse_moe.gate.register_forward_hook(count(int(i)))
    local = generate(engine, prompts, params)
    assert [c.token_ids for c in ours] == [c.token_ids for c in local]
    assert load == expected


def test_the_routers_profile_counts_the_steps_it_saw_and_names_the_step_loop(sharded):
    """`RouterActor.profile` (bench/router_profile.py): the steps taken while it listened, their cadence beside
    their own time, and the step loop among the functions its event loop ran."""
    prompts = random_prompts([WINDOW] * 4, seed=43)
    running = sharded.router.generate.remote(prompts, SamplingParams(max_tokens=160, ignore_eos=True))
    found = ray.get(sharded.router.profile.remote(0.5))  # half a second alone, then half a second profiled
    done = ray.get(running)
    quiet = found["unprofiled"]
    assert found["steps"] >= 2 and quiet["steps"] >= 2
    assert found["steps"] + quiet["steps"] <= sum(len(c.token_ids) for c in done)
    assert 0 < found["step_ms"] and 0 < found["cadence_ms"] and found["sequences_per_step"] <= 2
    assert 0 < quiet["step_ms"] and 0 < quiet["cadence_ms"]  # two steps in flight: a cadence may be the shorter
    assert "engine_loop.py" in found["profile"] and "(step)" in found["profile"]
    kinds = found["by_kind"]
    assert kinds["decode"]["steps"] + kinds["with_prefill"]["steps"] == found["steps"]
