"""Reserving a plan: checks against the nodes before anything is reserved, and bundles landing where the YAML says.

The Ray tests share one three-node cluster: a head with 1 CPU, a "stage node" with 2 CPUs and the custom resource
stage_node, an "expert node" with 2 CPUs, expert_node and one logical GPU. Placements are read back from Ray's own
placement_group_table, not from what `reserve` reports.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import ray
from ray.cluster_utils import Cluster
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

from cluster.cli import main
from cluster.placement import PlacementError, validate_against_model
from cluster.placement_file import load_placement
from cluster.reservation import check_against_cluster, lost_bundles, reserve
from shards.kv_cache import RollingKVCache, cache_capacity

EXAMPLES = Path(__file__).resolve().parents[2] / "deploy" / "examples"

PINNED = """\
checkpoint: unused
strategy: spread
stages:
  - layers: 0-1
    resources: {CPU: 1, stage_node: 0.5}
  - layers: 2-3
    resources: {CPU: 1, stage_node: 0.5}
expert_groups:
  - experts: 0-1
    resources: {CPU: 1, expert_node: 0.5}
  - experts: 2-3
    resources: {CPU: 1, expert_node: 0.5}
"""


def plan_from(tmp_path: Path, text: str, config=None):
    path = tmp_path / "placement.yaml"
    path.write_text(text)
    plan = load_placement(path)
    return validate_against_model(plan, config) if config is not None else plan


def node(cpus: float, alive: bool = True, **resources: float) -> dict:
    """One entry of `ray.nodes()`, as far as the check reads it."""
    return {"NodeID": "n", "Alive": alive, "NodeManagerAddress": "10.0.0.1", "Resources": {"CPU": cpus, **resources}}


# --- the check before reserving (no Ray needed) ---------------------------------------------------------------------


def test_a_plan_that_fits_passes_the_check(tmp_path):
    check_against_cluster(plan_from(tmp_path, PINNED), [node(1), node(2, stage_node=1), node(2, expert_node=1)])


def test_a_custom_resource_no_node_has_is_named_with_its_shard(tmp_path):
    with pytest.raises(
        PlacementError, match="shard experts0 asks for expert_node: 0.5, but no node of the cluster has"
    ):
        check_against_cluster(plan_from(tmp_path, PINNED), [node(4, stage_node=1)])


def test_more_gpus_in_all_than_the_cluster_has_names_every_shard_and_the_total(tmp_path):
    plan = plan_from(tmp_path, "checkpoint: c\nstages: 2\nresources: {CPU: 1, GPU: 1}\n")
    with pytest.raises(PlacementError, match=r"ask for 2 GPU in all \(stage0: 1, stage1: 1\), but the cluster has 1"):
        check_against_cluster(plan, [node(4, GPU=1), node(4)])


def test_a_bundle_larger_than_any_node_is_named(tmp_path):
    plan = plan_from(tmp_path, "checkpoint: c\nstages:\n  - layers: 0-3\n    resources: {CPU: 3}\n")
    with pytest.raises(
        PlacementError, match=r"shard stage0 asks for CPU: 3, more than any single node has \(at most 2\)"
    ):
        check_against_cluster(plan, [node(2), node(2)])


def test_a_bundle_whose_resources_are_on_different_nodes_is_named(tmp_path):
    plan = plan_from(tmp_path, "checkpoint: c\nstages:\n  - layers: 0-3\n    resources: {CPU: 1, GPU: 1}\n")
    with pytest.raises(PlacementError, match=r"shard stage0 asks for \{CPU: 1, GPU: 1\}, which no single node has"):
        check_against_cluster(plan, [node(2), node(0, GPU=1)])


def test_strict_spread_needs_a_node_per_shard(tmp_path):
    plan = plan_from(tmp_path, "checkpoint: c\nstrategy: strict_spread\nstages: 3\n")
    with pytest.raises(PlacementError, match="each of the 3 shards on its own node, but the cluster has 2 nodes"):
        check_against_cluster(plan, [node(4), node(4)])


def test_strict_pack_needs_one_node_for_everything(tmp_path):
    plan = plan_from(tmp_path, "checkpoint: c\nstrategy: strict_pack\nstages: 3\n")
    with pytest.raises(PlacementError, match=r"no node has \{CPU: 3\} \(stage0, stage1, stage2 together\)"):
        check_against_cluster(plan, [node(2), node(2)])


def test_dead_nodes_do_not_count(tmp_path):
    plan = plan_from(tmp_path, "checkpoint: c\nstages: 1\nresources: {GPU: 1}\n")
    with pytest.raises(PlacementError, match="no node of the cluster has GPU"):
        check_against_cluster(plan, [node(2), node(2, alive=False, GPU=1)])


# --- a reserved group whose node is lost (no Ray needed) ------------------------------------------------------------


def lost_expert_node(*others: dict) -> list[dict]:
    """The nodes after the expert node died: the stage node, the dead expert node, then `others`."""
    return [{**node(2, stage_node=1), "NodeID": "s"}, {**node(2, alive=False, expert_node=1), "NodeID": "e"}, *others]


def test_a_bundle_that_lost_its_node_names_the_resource_no_alive_node_has(tmp_path):
    table = {"bundles_to_node_id": {0: "s", 1: "", 2: "s", 3: ""}}  # bundle order: stage0, experts0, stage1, ...
    lost = lost_bundles(table, plan_from(tmp_path, PINNED).bundles(), lost_expert_node())
    assert lost == {
        1: "expert_node: 0.5 (no alive node has expert_node)",
        3: "expert_node: 0.5 (no alive node has expert_node)",
    }


def test_a_bundle_that_lost_its_node_is_not_named_while_an_alive_node_can_take_it(tmp_path):
    table = {"bundles_to_node_id": {0: "s", 1: "", 2: "s", 3: ""}}
    spare = {**node(2, expert_node=1), "NodeID": "spare"}
    assert lost_bundles(table, plan_from(tmp_path, PINNED).bundles(), lost_expert_node(spare)) == {}


def test_room_the_groups_placed_bundles_hold_is_not_free_for_a_lost_one(tmp_path):
    table = {"bundles_to_node_id": {0: "s", 1: "", 2: "s", 3: "spare"}}  # experts1 already moved to the spare node
    spare = {**node(2, expert_node=0.5), "NodeID": "spare"}
    lost = lost_bundles(table, plan_from(tmp_path, PINNED).bundles(), lost_expert_node(spare))
    assert lost == {1: "expert_node: 0.5 (alive nodes have at most 0 expert_node beside this model's other shards)"}


# --- on a Ray cluster ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    stage_node = cluster.add_node(num_cpus=2, resources={"stage_node": 1})
    expert_node = cluster.add_node(num_cpus=2, num_gpus=1, resources={"expert_node": 1})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield {"cluster": cluster, "stage_node": stage_node.node_id, "expert_node": expert_node.node_id}
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def small_mixtral(checkpoint_factory):
    from shards.config import load_config

    path = checkpoint_factory("mixtral")  # 4 layers, 4 experts
    return path, load_config(path)


def test_each_bundle_lands_on_the_node_its_custom_resource_names(ray_cluster, small_mixtral, tmp_path):
    _, config = small_mixtral
    reservation = reserve(plan_from(tmp_path, PINNED, config), config, timeout_s=30)
    try:
        table = placement_group_table(reservation.placement_group)
        on = {name: table["bundles_to_node_id"][i] for i, name in enumerate(reservation.plan.shard_names())}
    finally:
        reservation.release()
    assert table["strategy"] == "SPREAD"
    assert on == {
        "stage0": ray_cluster["stage_node"],
        "stage1": ray_cluster["stage_node"],
        "experts0": ray_cluster["expert_node"],
        "experts1": ray_cluster["expert_node"],
    }


def test_reserve_reports_each_shard_with_its_node_layers_experts_and_weight_bytes(ray_cluster, small_mixtral, tmp_path):
    _, config = small_mixtral
    plan = plan_from(tmp_path, PINNED, config)
    reservation = reserve(plan, config, timeout_s=30)
    reservation.release()
    rows = {p.shard: p for p in reservation.placements}
    assert rows["stage1"].layers == (2, 3) and rows["stage1"].experts == {}
    assert rows["experts1"].layers == (0, 1, 2, 3) and rows["experts1"].experts == {i: (2, 3) for i in range(4)}
    assert rows["experts0"].node_id == ray_cluster["expert_node"]
    assert rows["stage0"].weight_bytes == plan.stage_selection(0, config).nbytes(config, plan.torch_dtype)
    capacity = cache_capacity(config.sliding_window, config.max_seq_len)
    cache = RollingKVCache([2, 3], plan.max_seqs, capacity, config.n_kv_heads, config.head_dim, plan.torch_dtype, "cpu")
    assert rows["stage1"].kv_bytes == cache.nbytes and rows["experts1"].kv_bytes == 0  # what the stage allocates


def test_more_gpus_than_the_cluster_has_fails_before_reserving(ray_cluster, small_mixtral, tmp_path):
    _, config = small_mixtral
    plan = plan_from(tmp_path, "checkpoint: c\nstages: 2\nresources: {CPU: 1, GPU: 1}\n", config)
    groups_before = set(placement_group_table())
    with pytest.raises(PlacementError, match=r"ask for 2 GPU in all \(stage0: 1, stage1: 1\), but the cluster has 1"):
        reserve(plan, config, timeout_s=30)
    assert set(placement_group_table()) == groups_before


def test_a_reservation_not_placed_in_time_names_the_waiting_shards_and_is_removed(ray_cluster, small_mixtral, tmp_path):
    _, config = small_mixtral
    plan = plan_from(tmp_path, PINNED, config)
    blocker = placement_group([{"expert_node": 1}])
    ray.get(blocker.ready(), timeout=30)
    groups_before = set(placement_group_table())
    try:
        with pytest.raises(PlacementError) as err:
            reserve(plan, config, timeout_s=1)
    finally:
        remove_placement_group(blocker)
    message = str(err.value)
    assert "not ready after 1 s" in message
    assert "experts0 {CPU: 1, expert_node: 0.5} (expert_node: 0.5 asked, 0 free)" in message
    new = {pg: info for pg, info in placement_group_table().items() if pg not in groups_before}
    assert [info["state"] for info in new.values()] == ["REMOVED"]


def test_plan_command_prints_the_placement_table_for_the_local_example(ray_cluster, small_mixtral, capsys):
    checkpoint, _ = small_mixtral
    status = main(
        [
            "plan",
            "--config",
            str(EXAMPLES / "local.yaml"),
            "--checkpoint",
            str(checkpoint),
            "--address",
            ray_cluster["cluster"].address,
        ]
    )
    out = capsys.readouterr().out.splitlines()
    assert status == 0
    assert out[1].split() == ["shard", "layers", "experts", "node", "ip", "GPU", "weights", "KV"]
    assert out[-3] == "data plane: CPU workers: gloo"
    assert out[-2] == "standbys: none (set `standby: true` for faster restarts)"  # CPU workers: none by default
    assert out[-1] == "steps: 2 in flight, each with 1/2 of the running sequences (one per stage)"
    rows = {line.split()[0]: line.split() for line in out[2:-3]}
    assert rows["stage0"][1:3] == ["0-1", "-"] and rows["experts1"][1:3] == ["0-3", "2-3"]
    assert set(rows) == {"stage0", "stage1", "experts0", "experts1"}
    assert all(pg["state"] == "REMOVED" for pg in placement_group_table().values())


def test_plan_command_says_how_a_one_stage_placement_decoding_ahead_keeps_its_steps(
    ray_cluster, small_mixtral, tmp_path, capsys
):
    import json

    import yaml

    checkpoint, _ = small_mixtral
    spec = yaml.safe_load((EXAMPLES / "local.yaml").read_text())
    spec.update(stages=1, decode_ahead=True)
    path = tmp_path / "ahead.yaml"
    path.write_text(yaml.safe_dump(spec))
    argv = ["plan", "--config", str(path), "--checkpoint", str(checkpoint), "--address", ray_cluster["cluster"].address]
    assert main([*argv, "--json"]) == 0
    steps = json.loads(capsys.readouterr().out)["steps"]
    assert (steps["in_flight"], steps["groups"], steps["decode_ahead"]) == (2, 1, True)
    assert main(argv) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("steps: 2 in flight over every sequence (decode ahead")


def test_plan_command_turns_a_cluster_mismatch_into_one_line_and_status_2(ray_cluster, small_mixtral, tmp_path, capsys):
    checkpoint, _ = small_mixtral
    path = tmp_path / "gpus.yaml"
    path.write_text("checkpoint: c\nstages: 2\nresources: {GPU: 1}\n")
    status = main(["plan", "--config", str(path), "--checkpoint", str(checkpoint)])
    err = capsys.readouterr().err
    assert status == 2
    assert err.count("\n") == 1 and "mistral-cluster plan: error:" in err and "2 GPU in all" in err


def test_a_wrong_address_is_one_line_naming_it_within_seconds(small_mixtral):
    """`plan --address` with nothing listening there: one line and status 2, not minutes of ray.init retries.

    Run as its own process, as a user runs it: inside pytest an earlier test's Ray connection would be reused.
    """
    import subprocess
    import sys
    import time

    from tests.ports import free_port

    checkpoint, _ = small_mixtral
    address = f"127.0.0.1:{free_port()}"
    command = ["plan", "--config", str(EXAMPLES / "local.yaml"), "--checkpoint", str(checkpoint), "--address", address]
    t0 = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "cluster.cli", *command], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 2, done.stderr
    assert time.monotonic() - t0 < 60
    err = done.stderr.strip()
    assert err.count("\n") == 0 and f"--address {address}: no Ray cluster answers there" in err, err


HEAD_WITH_TOKEN = """
import sys
from ray.cluster_utils import Cluster
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
print(cluster.address, flush=True)
sys.stdin.read()  # until the test closes it
cluster.shutdown()
"""


def test_a_cluster_that_refuses_this_machines_token_is_one_line_within_seconds(small_mixtral, tmp_path):
    """Ray 2.60's token authentication: a head started with a token, `plan --address` from a machine without it
    (or with another): one line naming the address and what to do, status 2, in seconds (ray.init retried for 20 s,
    printing a warning a second, and ended with a message that did not say why)."""
    import os
    import subprocess
    import sys
    import time

    checkpoint, _ = small_mixtral
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    head_env = {**clean, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0123456789abcdef" * 4}
    head = subprocess.Popen(
        [sys.executable, "-c", HEAD_WITH_TOKEN], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=head_env
    )
    try:
        address = head.stdout.readline().strip()
        assert address, "the head with a token did not start"
        command = ["plan", "--config", str(EXAMPLES / "local.yaml"), "--checkpoint", str(checkpoint)]
        for given in (None, "f" * 64):
            env = {**clean, "HOME": str(tmp_path)}  # no ~/.ray/auth_token either
            if given:
                env["RAY_AUTH_TOKEN"] = given
            t0 = time.monotonic()
            done = subprocess.run(
                [sys.executable, "-m", "cluster.cli", *command, "--address", address],
                capture_output=True,
                text=True,
                timeout=120,
                env=env,
                check=False,
            )
            err = done.stderr.strip()
            assert done.returncode == 2, err
            assert time.monotonic() - t0 < 15
            assert err.count("\n") == 0 and f"--address {address}: the cluster refused" in err, err
            assert "RAY_AUTH_TOKEN" in err
    finally:
        head.stdin.close()
        head.wait(timeout=60)
