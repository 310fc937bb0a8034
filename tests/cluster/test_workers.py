"""Which shards share a process: one worker per GPU, the channels between workers, and when messages must go through
host memory."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.placement import validate_against_model
from cluster.placement_file import load_placement
from cluster.transport import ChannelKey
from cluster.worker_actor import _available_memory, data_channels
from cluster.workers import WorkerMap, busy_workers, data_plane, group_workers
from shards.config import preset

EXAMPLES = Path(__file__).resolve().parents[2] / "deploy" / "examples"
MIXTRAL = preset("mixtral-8x7b")
MIXTRAL_8X22B = preset("mixtral-8x22b")


def plan_of(text: str, tmp_path: Path):
    path = tmp_path / "placement.yaml"
    path.write_text("checkpoint: c\n" + text)
    return validate_against_model(load_placement(path), MIXTRAL)


def example(name: str):
    model = MIXTRAL_8X22B if name.startswith("mixtral-8x22b") else MIXTRAL
    return validate_against_model(load_placement(EXAMPLES / name), model)


def test_a_stage_and_an_expert_group_sharing_a_gpu_are_one_worker_with_one_whole_gpu():
    plan = example("mixtral-2gpu-mixed.yaml")  # every shard asks for half a GPU
    workers = group_workers(plan)
    assert [(w.name, w.bundle) for w in workers] == [
        ("stage0+experts0", {"CPU": 2.0, "GPU": 1.0}),
        ("stage1+experts1", {"CPU": 2.0, "GPU": 1.0}),
    ]
    assert data_channels(plan, WorkerMap(workers)) == [
        ChannelKey("pipe", 0, 1, 0),
        ChannelKey("experts", 0, 1, 0),  # stage0 to the worker holding experts1
        ChannelKey("experts", 1, 0, 1),  # stage1 to the worker holding experts0
    ]


def test_fractions_are_packed_first_fit_in_bundle_order_and_rounded_as_ray_keeps_them():
    plan = example("mixtral-2gpu-experts.yaml")  # stage 0.2, experts 0.8 and 0.8
    workers = group_workers(plan)
    assert [(w.name, w.bundle) for w in workers] == [
        ("stage0+experts0", {"CPU": 2.0, "GPU": 1.0}),  # 0.2 + 0.8, not 1.0000000000000002
        ("experts1", {"CPU": 1.0, "GPU": 0.8}),
    ]
    assert WorkerMap(workers).of_group(1).index == 1 and WorkerMap(workers).of_stage(0).index == 0
    assert data_channels(plan, WorkerMap(workers)) == [ChannelKey("experts", 0, 1, 0)]


def test_whole_gpu_and_cpu_shards_keep_a_process_each(tmp_path):
    stages = example("mixtral-2gpu-stages.yaml")
    assert [w.name for w in group_workers(stages)] == ["stage0", "stage1"]
    local = plan_of("stages: 2\nexpert_groups: 2\nresources: {CPU: 1}\n", tmp_path)
    assert [w.name for w in group_workers(local)] == ["stage0", "experts0", "stage1", "experts1"]


def test_shards_pinned_to_different_nodes_never_share_a_worker(tmp_path):
    plan = plan_of(
        "stages:\n  - layers: 0-31\n    resources: {GPU: 0.5, stage_node: 1}\n"
        "expert_groups:\n  - experts: 0-7\n    resources: {GPU: 0.5, expert_node: 1}\n",
        tmp_path,
    )
    assert [w.name for w in group_workers(plan)] == ["stage0", "experts0"]


@pytest.mark.parametrize(
    "name, concurrent",
    [
        ("mixtral-2gpu-experts.yaml", False),  # each worker runs one loop: NCCL
        ("mixtral-2gpu-stages.yaml", False),
        ("mixtral-2gpu-mixed.yaml", True),  # each worker runs its stage and serves the other: host memory
        ("mixtral-8gpu-2nodes.yaml", True),  # each expert worker serves four stages
        ("mixtral-8x22b-4gpu-experts.yaml", False),
        ("mixtral-8x22b-4gpu-mixed.yaml", False),  # each expert group holds the layers of one stage only
        ("mixtral-8x22b-4gpu-stages.yaml", False),
    ],
)
def test_workers_running_several_message_loops_are_found(name, concurrent):
    plan = example(name)
    busy = busy_workers(plan, group_workers(plan))
    assert bool(busy) is concurrent, busy


def test_a_busy_worker_is_named_with_the_loops_it_runs():
    plan = example("mixtral-2gpu-mixed.yaml")
    assert busy_workers(plan, group_workers(plan)) == [
        "stage0+experts0 (stage0, experts for stage1)",
        "stage1+experts1 (stage1, experts for stage0)",
    ]


@pytest.mark.parametrize(
    "name, workers",
    [
        ("mixtral-8x22b-4gpu-experts.yaml", ["stage0+experts0", "experts1", "experts2", "experts3"]),
        ("mixtral-8x22b-4gpu-mixed.yaml", ["stage0+experts0", "stage1+experts1", "experts2", "experts3"]),
        ("mixtral-8x22b-4gpu-stages.yaml", ["stage0", "stage1", "stage2", "stage3"]),
    ],
)
def test_each_four_gpu_example_is_four_workers_of_one_whole_gpu(name, workers):
    plan = example(name)
    assert [(w.name, w.bundle["GPU"]) for w in group_workers(plan)] == [(w, 1.0) for w in workers]


def test_plan_says_which_placements_go_through_host_memory_and_why():
    mixed = data_plane(example("mixtral-2gpu-mixed.yaml"))
    assert mixed["transport"] == "host"
    assert "stage0+experts0 (stage0, experts for stage1)" in mixed["note"] and "0.2x one GPU" in mixed["note"]
    assert data_plane(example("mixtral-2gpu-experts.yaml"))["transport"] == "nccl"
    assert data_plane(example("local.yaml"))["transport"] == "gloo"


def test_a_standbys_room_for_a_host_copy_is_bounded_by_its_cgroups_limit(tmp_path):
    """In a Kubernetes pod /proc/meminfo shows the whole node: a host copy sized by it would get the pod OOM-killed.
    The cgroup (v2) limit minus what it already uses bounds it; no limit, or no cgroup files, leaves MemAvailable."""
    node = _available_memory(str(tmp_path / "none"))  # no cgroup files: MemAvailable alone
    assert node > 0
    (tmp_path / "memory.max").write_text("max\n")
    (tmp_path / "memory.current").write_text("1000\n")
    assert abs(_available_memory(str(tmp_path)) - node) < 2**30  # unlimited: the node's figure (it moves a little)
    (tmp_path / "memory.max").write_text(f"{2**30 + 1000}\n")
    assert _available_memory(str(tmp_path)) == 2**30  # the limit less what the cgroup uses
    (tmp_path / "memory.current").write_text(f"{2**31}\n")
    assert _available_memory(str(tmp_path)) == 0  # over its limit already: no room at all
