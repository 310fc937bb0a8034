"""A random checkpoint is made where the model is started and copied to every other node of its placement group:
the nodes need no shared file system. (The nodes of `ray.cluster_utils.Cluster` share this machine's disk, so the
copy shows as files replaced at the same path, with new inodes.)"""

from __future__ import annotations

import os

import ray
from ray.cluster_utils import Cluster
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

from cluster.reservation import Reservation, ShardPlacement
from cluster.sharded import copy_to_bundle_nodes
from shards.make_checkpoint import SMALL_SHAPE, make_random_checkpoint


def test_the_random_checkpoint_reaches_a_node_of_the_placement_that_is_not_this_one(tmp_path):
    root = make_random_checkpoint(tmp_path / "random", SMALL_SHAPE)
    before = {f.name: os.stat(f).st_ino for f in root.iterdir()}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    far = cluster.add_node(num_cpus=1, resources={"far": 1})
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        pg = placement_group([{"CPU": 0.5}, {"far": 1}], strategy="STRICT_SPREAD")
        ray.get(pg.ready(), timeout=60)
        nodes = placement_group_table(pg)["bundles_to_node_id"]
        assert nodes[1] == far.node_id and nodes[0] != far.node_id
        placements = [ShardPlacement(f"s{i}", "stage", (), {}, i, nodes[i], "", 0.0, 0, 0) for i in (0, 1)]
        copy_to_bundle_nodes(root, Reservation(plan=None, placement_group=pg, placements=placements))
        after = {f.name: os.stat(f).st_ino for f in root.iterdir()}
        assert after.keys() == before.keys() == {"config.json", "random_weights.json", "tokenizer.model"}
        assert all(after[name] != before[name] for name in before)  # written again, by the task on the far node
        remove_placement_group(pg)
    finally:
        ray.shutdown()
        cluster.shutdown()
