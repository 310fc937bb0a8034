"""The placement YAML: what a valid file turns into, and the error each kind of mistake gets (file and key named)."""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

import pytest

from cluster.placement import PlacementError, validate_against_model
from cluster.placement_file import ensure_default_checkpoint, load_placement
from shards.checkpoint import ShardSelection
from shards.config import PRESETS, ConfigError
from shards.hf_tokenizer_files import HF_TOKENIZER_FILES
from shards.make_checkpoint import small_config

EXAMPLES = Path(__file__).resolve().parents[2] / "deploy" / "examples"
MIXTRAL = small_config("mixtral")  # 4 layers, 4 experts, window 32
MISTRAL = small_config("mistral")


@pytest.fixture
def write(tmp_path, monkeypatch):
    """write(text) -> "placement.yaml" in a fresh working directory, so errors start with the bare file name."""
    monkeypatch.chdir(tmp_path)

    def write_file(text: str) -> str:
        Path("placement.yaml").write_text(text)
        return "placement.yaml"

    return write_file


def settle(path: str, config=MIXTRAL, **kwargs):
    return validate_against_model(load_placement(path, **kwargs), config)


# --- what a valid file means ------------------------------------------------------------------------------------


def test_local_example_is_two_stages_and_two_expert_groups_on_one_cpu_each():
    plan = settle(str(EXAMPLES / "local.yaml"))
    assert [s.layers for s in plan.stages] == [(0, 1), (2, 3)]
    assert [(g.experts, g.layers) for g in plan.expert_groups] == [((0, 1), (0, 1, 2, 3)), ((2, 3), (0, 1, 2, 3))]
    assert plan.bundles() == [{"CPU": 1.0}] * 4
    assert (plan.checkpoint, plan.strategy, plan.dtype) == ("checkpoints/small-mixtral", "spread", "float32")


@pytest.mark.parametrize(
    "name, model",
    [
        ("local.yaml", MIXTRAL),
        ("mistral-7b-1gpu.yaml", PRESETS["mistral-7b"]),
        ("mixtral-2gpu-stages.yaml", PRESETS["mixtral-8x7b"]),
        ("mixtral-2gpu-stages-ahead.yaml", PRESETS["mixtral-8x7b"]),
        ("mixtral-2gpu-experts.yaml", PRESETS["mixtral-8x7b"]),
        ("mixtral-2gpu-expert-halves.yaml", PRESETS["mixtral-8x7b"]),
        ("mixtral-2gpu-expert-parts.yaml", PRESETS["mixtral-8x7b"]),
        ("mixtral-2gpu-expert-halves-overlap.yaml", PRESETS["mixtral-8x7b"]),
        ("mixtral-2gpu-mixed.yaml", PRESETS["mixtral-8x7b"]),
        ("mixtral-8gpu-2nodes.yaml", PRESETS["mixtral-8x7b"]),
        ("mixtral-8x22b-4gpu-experts.yaml", PRESETS["mixtral-8x22b"]),
        ("mixtral-8x22b-4gpu-mixed.yaml", PRESETS["mixtral-8x22b"]),
        ("mixtral-8x22b-4gpu-stages.yaml", PRESETS["mixtral-8x22b"]),
    ],
)
def test_every_example_holds_each_tensor_of_its_model_exactly_once(name, model):
    """Counted in elements: an expert cut into parts is held once when its parts add up to it."""
    plan = settle(str(EXAMPLES / name), model)
    held = Counter()
    for shard in plan.shards(model):
        for tensor, shape in shard.selection.tensor_shapes(model).items():
            held[tensor] += math.prod(shape)
    whole = ShardSelection.whole(model).tensor_shapes(model)
    assert held == Counter({tensor: math.prod(shape) for tensor, shape in whole.items()})


def test_expert_halves_hold_every_expert_in_two_parts_of_its_hidden_rows():
    plan = settle(str(EXAMPLES / "mixtral-2gpu-expert-halves.yaml"), PRESETS["mixtral-8x7b"])
    assert [(g.experts, str(g.hidden)) for g in plan.expert_groups] == [
        (tuple(range(8)), "0/2"),
        (tuple(range(8)), "1/2"),
    ]
    selection = plan.expert_selection(1, PRESETS["mixtral-8x7b"])
    assert selection.hidden_rows == (7168, 14336) and selection.expert_rows(PRESETS["mixtral-8x7b"]) == slice(
        7168, 14336
    )


HALVES = "checkpoint: c\nstages: 1\nexpert_groups:\n"


@pytest.mark.parametrize(
    "groups, message",
    [
        (
            "  - {experts: 0-3, hidden: 0/2}\n  - {experts: 0-3, hidden: 0/2}\n  - {experts: 0-3, hidden: 1/2}\n",
            "expert_groups[1].hidden: part 0/2 of expert 0 of every layer is also in expert_groups[0]",
        ),
        (
            "  - {experts: 0-3, hidden: 0/2}\n  - {experts: 0-3, hidden: 1/3}\n",
            "expert_groups[1].hidden: 1/3 and expert_groups[0]'s 0/2 cut expert 0 of every layer in different numbers",
        ),
        (
            "  - {experts: 0-3, hidden: 0/2}\n  - {experts: 0-3}\n",
            "expert 0 of every layer is also in expert_groups[0]",
        ),
        (
            "  - {experts: 0-3, hidden: half}\n",
            "expert_groups[0].hidden: expected all, a part such as 0/2, or rows such as 0:8064, got 'half'",
        ),
        ("  - {experts: 0-3, hidden: 2/2}\n", "expert_groups[0].hidden: part 2 of 2: expected 0 <= part < n"),
    ],
)
def test_a_wrong_cut_of_the_experts_is_named(write, groups, message):
    with pytest.raises(PlacementError, match=re.escape(message)):
        load_placement(write(HALVES + groups))


def test_expert_parts_given_as_rows_settle_to_those_rows():
    plan = settle(str(EXAMPLES / "mixtral-2gpu-expert-parts.yaml"), PRESETS["mixtral-8x7b"])
    assert [str(g.hidden) for g in plan.expert_groups] == ["0:8064", "8064:14336"]
    assert [plan.expert_selection(g, PRESETS["mixtral-8x7b"]).hidden_rows for g in (0, 1)] == [(0, 8064), (8064, 14336)]


@pytest.mark.parametrize(
    "groups, message",
    [
        (  # small_config("mixtral"): 4 experts of 128 hidden rows
            ["0:72", "64:128"],
            "expert_groups[1].hidden: rows 64:72 of expert 0 of layer 0 (64:128) are also in expert_groups[0] (0:72)",
        ),
        (["0:72", "80:128"], "rows 72:80 of expert 0 of layer 0 are in no group"),
        (["0:72", "72:100"], "rows 100:128 of expert 0 of layer 0 are in no group"),
        (["0:72", "72:200"], "expert_groups[1].hidden: rows 72:200: the model's experts have 128 hidden rows (0:128)"),
        (["0/2", "64:128"], None),  # parts and rows may be mixed when they tile the rows
        (["0/2", "32:128"], "expert_groups[1].hidden: rows 32:64 of expert 0 of layer 0 (32:128) are also in"),
    ],
)
def test_rows_of_every_expert_must_be_held_exactly_once(write, groups, message):
    path = write(HALVES + "".join(f"  - {{experts: 0-3, hidden: '{g}'}}\n" for g in groups))
    if message is None:
        assert [str(g.hidden) for g in settle(path, MIXTRAL).expert_groups] == groups
        return
    with pytest.raises(PlacementError, match=re.escape(message)):
        settle(path, MIXTRAL)


def test_two_batch_overlap_splits_decode_steps_from_its_threshold(write):
    plan = load_placement(write(HALVES + "  - {experts: 0-1}\n  - {experts: 2-3}\noverlap_min_seqs: 32\n"))
    assert plan.overlap_split(31, True) is None and plan.overlap_split(64, False) is None
    assert plan.overlap_split(32, True) == (16, 16) and plan.overlap_split(33, True) == (17, 16)
    assert load_placement(write(HALVES + "  - {experts: 0-3}\n")).overlap_split(128, True) is None  # off by default
    with pytest.raises(PlacementError, match=re.escape("overlap_min_seqs: 8: two-batch overlap hides the expert")):
        load_placement(write("checkpoint: c\nstages: 1\noverlap_min_seqs: 8\n"))


def test_a_row_range_must_run_forwards(write):
    with pytest.raises(PlacementError, match=re.escape("expert_groups[0].hidden: rows '72:72': expected start < stop")):
        load_placement(write(HALVES + "  - {experts: 0-3, hidden: '72:72'}\n"))


def test_every_part_of_every_expert_must_be_held(write):
    # small_config("mixtral"): 4 experts of 64 hidden rows
    with pytest.raises(PlacementError, match=re.escape("part 1/2 of expert 0 of layer 0 is in no group")):
        settle(write(HALVES + "  - {experts: 0-3, hidden: 0/2}\n"))
    with pytest.raises(PlacementError, match=re.escape("hidden rows do not cut into 3 equal parts")):
        settle(write(HALVES + "".join(f"  - {{experts: 0-3, hidden: {i}/3}}\n" for i in range(3))), MIXTRAL)


def test_a_stage_count_splits_layers_evenly_with_the_first_stages_taking_the_remainder(write):
    plan = settle(write("checkpoint: c\nstages: 2\n"), small_config("mistral", layers=5))
    assert [s.layers for s in plan.stages] == [(0, 1, 2), (3, 4)]


def test_first_stage_holds_the_embedding_and_last_stage_the_final_norm_and_head(write):
    plan = settle(write("checkpoint: c\nstages: 3\n"), MISTRAL)
    first, middle, last = (plan.stage_selection(i, MISTRAL) for i in range(3))
    assert (first.embedding, first.final_norm, first.head) == (True, False, False)
    assert (middle.embedding, middle.final_norm, middle.head) == (False, False, False)
    assert (last.embedding, last.final_norm, last.head) == (False, True, True)


def test_without_expert_groups_a_stage_holds_every_expert_of_its_layers(write):
    plan = settle(write("checkpoint: c\nstages: 2\n"))
    assert plan.stage_selection(1, MIXTRAL).experts == {2: (0, 1, 2, 3), 3: (0, 1, 2, 3)}


def test_with_expert_groups_a_stage_holds_no_experts_and_a_group_only_its_own(write):
    plan = settle(
        write(
            "checkpoint: c\nstages: 1\nexpert_groups:\n  - experts: [0, 3]\n    layers: 1-2\n"
            "  - experts: 0-3\n    layers: [0, 3]\n  - experts: 1-2\n    layers: 1-2\n"
        )
    )
    assert plan.stage_selection(0, MIXTRAL).experts == {}
    group = plan.expert_selection(0, MIXTRAL)
    assert group == ShardSelection(experts={1: (0, 3), 2: (0, 3)})


def test_a_range_string_and_a_list_name_the_same_layers(write):
    as_range = settle(write("checkpoint: c\nstages:\n  - layers: 0-2\n  - layers: '3'\n"))
    as_list = settle(write("checkpoint: c\nstages:\n  - layers: [0, 1, 2]\n  - layers: [3]\n"))
    assert as_range.stages == as_list.stages


def test_a_shard_without_resources_takes_the_top_level_default(write):
    plan = load_placement(
        write(
            "checkpoint: c\nresources: {CPU: 2, GPU: 0.5}\nstages:\n"
            "  - layers: 0-1\n  - layers: 2-3\n    resources: {CPU: 1}\n"
        )
    )
    assert plan.bundles() == [{"CPU": 2.0, "GPU": 0.5}, {"CPU": 1.0}]


def test_without_a_resources_key_each_shard_reserves_one_cpu(write):
    assert load_placement(write("checkpoint: c\nstages: 2\n")).bundles() == [{"CPU": 1.0}, {"CPU": 1.0}]


def test_bundles_put_stage_i_beside_expert_group_i_so_gpu_fractions_pair_them(write):
    plan = load_placement(write("checkpoint: c\nstages: 2\nexpert_groups: 3\n"))
    assert plan.shard_names() == ["stage0", "experts0", "stage1", "experts1", "experts2"]
    assert [s.name for s in settle("placement.yaml").shards(MIXTRAL)] == plan.shard_names()


def test_bundles_leave_out_resources_of_zero(write):
    plan = load_placement(write("checkpoint: c\nstages: 1\nresources: {CPU: 1, GPU: 0, stage_node: 0.001}\n"))
    assert plan.bundles() == [{"CPU": 1.0, "stage_node": 0.001}]


def test_the_checkpoint_option_overrides_the_file(write):
    assert load_placement(write("checkpoint: a\nstages: 1\n"), checkpoint_override="b").checkpoint == "b"


def test_a_file_without_checkpoint_is_fine_when_one_is_given_on_the_command_line(write):
    assert load_placement(write("stages: 1\n"), checkpoint_override="b").checkpoint == "b"


def test_replay_tokens_reach_the_scheduler_and_zero_is_allowed(write):
    assert settle(write("checkpoint: c\nstages: 1\n")).scheduling.replay_tokens == 128
    assert settle(write("checkpoint: c\nstages: 1\nreplay_tokens: 0\n")).scheduling.replay_tokens == 0
    assert settle(write("checkpoint: c\nstages: 1\nreplay_tokens: 4096\n")).scheduling.replay_tokens == 4096


def test_decode_ahead_reaches_the_scheduler_on_one_stage_and_the_environment_turns_it_on_only_there(write, monkeypatch):
    monkeypatch.delenv("MISTRAL_CLUSTER_DECODE_AHEAD", raising=False)
    assert not settle(write("checkpoint: c\nstages: 1\n")).scheduling.decode_ahead  # auto, on a CPU: off
    assert settle(write("checkpoint: c\nstages: 1\ndecode_ahead: true\n")).scheduling.decode_ahead
    monkeypatch.setenv("MISTRAL_CLUSTER_DECODE_AHEAD", "1")
    assert settle(write("checkpoint: c\nstages: 1\n")).scheduling.decode_ahead
    assert not settle(write("checkpoint: c\nstages: 2\n")).scheduling.decode_ahead  # the A/B switch skips pipelines
    monkeypatch.setenv("MISTRAL_CLUSTER_DECODE_AHEAD", "0")
    assert not settle(write("checkpoint: c\nstages: 1\ndecode_ahead: true\n")).scheduling.decode_ahead


def test_decode_ahead_auto_is_on_for_one_stage_holding_a_gpu_and_never_for_a_pipeline(write, monkeypatch):
    monkeypatch.delenv("MISTRAL_CLUSTER_DECODE_AHEAD", raising=False)
    gpu = "checkpoint: c\nstages:\n  - layers: 0-3\n    resources: {CPU: 1, GPU: 0.2}\n"
    assert settle(write(gpu)).scheduling.decode_ahead
    assert settle(write(gpu + "decode_ahead: auto\n")).scheduling.decode_ahead
    assert not settle(write(gpu + "decode_ahead: false\n")).scheduling.decode_ahead
    two = "checkpoint: c\nstages:\n" + "".join(f"  - layers: {a}\n    resources: {{GPU: 1}}\n" for a in ("0-1", "2-3"))
    assert not settle(write(two)).scheduling.decode_ahead
    with pytest.raises(PlacementError, match="decode_ahead: expected true, false or auto, got 'sometimes'"):
        load_placement(write("checkpoint: c\nstages: 1\ndecode_ahead: sometimes\n"))


def test_requests_are_held_back_for_others_by_default_only_where_the_first_stage_holds_a_gpu(write):
    gpu = "checkpoint: c\nstages:\n  - layers: 0-3\n    resources: {CPU: 1, GPU: 0.2}\n"
    assert settle(write(gpu)).scheduling.max_waiting_steps == 8
    assert settle(write(gpu + "max_waiting_steps: auto\n")).scheduling.max_waiting_steps == 8
    assert settle(write(gpu + "max_waiting_steps: 0\n")).scheduling.max_waiting_steps == 0
    assert settle(write("checkpoint: c\nstages: 1\n")).scheduling.max_waiting_steps == 0  # a CPU
    cpu = settle(write("checkpoint: c\nstages: 1\nmax_waiting_steps: 3\nwaiting_served_ratio: 0.5\n")).scheduling
    assert (cpu.max_waiting_steps, cpu.waiting_served_ratio) == (3, 0.5)
    assert settle(write("checkpoint: c\nstages: 1\n")).scheduling.waiting_served_ratio == 0.3


def test_a_pipeline_decodes_ahead_only_when_its_file_says_so_and_its_ends_are_in_different_workers(write, monkeypatch):
    monkeypatch.delenv("MISTRAL_CLUSTER_DECODE_AHEAD", raising=False)
    two = "checkpoint: c\nstages:\n" + "".join(f"  - layers: {a}\n    resources: {{GPU: 1}}\n" for a in ("0-1", "2-3"))
    assert settle(write(two + "decode_ahead: true\n")).scheduling.decode_ahead
    monkeypatch.setenv("MISTRAL_CLUSTER_DECODE_AHEAD", "0")  # the A/B switch turns it off everywhere
    assert not settle(write(two + "decode_ahead: true\n")).scheduling.decode_ahead
    monkeypatch.delenv("MISTRAL_CLUSTER_DECODE_AHEAD")
    shared = "checkpoint: c\nstages:\n" + "".join(
        f"  - layers: {a}\n    resources: {{GPU: 0.5}}\n" for a in ("0-1", "2-3")
    )
    with pytest.raises(PlacementError, match="decode_ahead: true on a pipeline needs its first and last stage in "
                       "different workers; stages 0 and 1 share one"):  # fmt: skip
        load_placement(write(shared + "decode_ahead: true\n"))
    assert not settle(write(shared)).scheduling.decode_ahead  # auto: never for a pipeline, so no error


def test_chunk_size_defaults_to_the_window_capped_at_512(write):
    assert settle(write("checkpoint: c\nstages: 1\n")).chunk_size == 32
    assert settle("placement.yaml", small_config("mixtral", window=4096)).chunk_size == 512
    assert settle("placement.yaml", small_config("mixtral", window=None, max_seq_len=256)).chunk_size == 256


def test_defaults_for_the_batching_keys(write):
    plan = load_placement(write("checkpoint: c\nstages: 1\n"))
    assert (plan.dtype, plan.strategy, plan.micro_batch_size, plan.token_budget, plan.max_seqs) == (
        "float32",
        "pack",
        4,
        2048,
        32,
    )


def test_validating_a_settled_plan_again_changes_nothing(write):
    plan = settle(write("checkpoint: c\nstages: 2\nexpert_groups: 2\n"))
    assert validate_against_model(plan, MIXTRAL) == plan


def test_an_unsettled_plan_refuses_to_give_selections(write):
    with pytest.raises(ValueError, match="validate_against_model"):
        load_placement(write("checkpoint: c\nstages: 2\n")).stage_selection(0, MIXTRAL)


def test_a_placement_error_is_a_config_error_so_the_cli_prints_one_line():
    assert issubclass(PlacementError, ConfigError)


# --- what each mistake is told ----------------------------------------------------------------------------------

TWO_STAGES = "checkpoint: c\nstages:\n  - layers: 0-1\n  - layers: 2-3\n"
GROUPS = "checkpoint: c\nstages: 1\nexpert_groups:\n"

BAD_FILES = [
    # unknown keys, at every level
    ("checkpoint: c\nstages: 1\nstagez: 2\n", "stagez: unknown key"),
    ("checkpoint: c\nstages:\n  - layers: 0-3\n    layrs: 1\n", "stages[0].layrs: unknown key"),
    (GROUPS + "  - experts: 0-3\n    expertz: 1\n", "expert_groups[0].expertz: unknown key"),
    # wrong types
    ("checkpoint: c\nstages: two\n", "stages: expected a positive number of stages or a non-empty list"),
    ("checkpoint: c\nstages: [0, 1]\n", "stages[0]: expected a mapping"),
    ("checkpoint: 3\nstages: 1\n", "checkpoint: expected a directory path"),
    ("checkpoint: c\nstages: 1\nresources: 1\n", "resources: expected a mapping of Ray resource names"),
    ("checkpoint: c\nstages: 1\nresources: {CPU: many}\n", "resources.CPU: expected a non-negative number"),
    ("checkpoint: c\nstages: 1\nresources: {CPU: -1}\n", "resources.CPU: expected a non-negative number"),
    ("checkpoint: c\nstages: 1\nresources: {CPU: 0}\n", "resources: a shard must reserve some resource"),
    ("checkpoint: c\nstages:\n  - layers: [0, x]\n", "stages[0].layers: layer ids are non-negative integers"),
    ("checkpoint: c\nstages:\n  - layers: first\n", "stages[0].layers: expected a list of layer ids or a range"),
    ("checkpoint: c\nstages:\n  - layers: 3-1\n", "stages[0].layers: range '3-1' ends before it starts"),
    ("checkpoint: c\nstages:\n  - layers: [0, 0, 1]\n", "stages[0].layers: layer 0 is listed twice"),
    (GROUPS + "  - experts: 0-3\n    layers: some\n", "expert_groups[0].layers: expected a list of layer ids"),
    # missing keys
    ("checkpoint: c\n", "stages: missing"),
    ("stages: 1\n", "checkpoint: missing"),
    ("checkpoint: c\nstages:\n  - resources: {CPU: 1}\n", "stages[0].layers: missing"),
    (GROUPS + "  - layers: all\n", "expert_groups[0].experts: missing"),
    # layers of the pipeline
    ("checkpoint: c\nstages:\n  - layers: 0-1\n  - layers: 1-3\n", "stages[1].layers: layer 1 is also in stages[0]"),
    ("checkpoint: c\nstages:\n  - layers: 0-1\n", "stages: layers 2-3 are in no stage"),
    ("checkpoint: c\nstages:\n  - layers: 0-1\n  - layers: 2-4\n", "stages[1].layers: layer 4 is out of range"),
    (
        "checkpoint: c\nstages:\n  - layers: [0, 2]\n  - layers: [1, 3]\n",
        "stages[0].layers: must be a contiguous run of layers, got 0,2",
    ),
    (
        "checkpoint: c\nstages:\n  - layers: 2-3\n  - layers: 0-1\n",
        "stages[1].layers: starts at layer 0, before stages[0]",
    ),
    ("checkpoint: c\nstages: 5\n", "stages: 5 stages for a model of 4 layers"),
    # experts
    (GROUPS + "  - experts: 0-1\n  - experts: [2]\n", "expert_groups: expert 3 of layer 0 is in no group"),
    (
        GROUPS + "  - experts: 0-2\n  - experts: 2-3\n",
        "expert_groups[1].experts: expert 2 of every layer is also in expert_groups[0]",
    ),
    (
        GROUPS + "  - experts: 0-3\n    layers: 0-1\n  - experts: 0-3\n    layers: 1-3\n",
        "expert_groups[1].experts: expert 0 of layer 1 is also in expert_groups[0]",
    ),
    (GROUPS + "  - experts: 0-1\n  - experts: 2-4\n", "expert_groups[1].experts: expert 4 is out of range"),
    (GROUPS + "  - experts: 0-3\n    layers: 0-7\n", "expert_groups[0].layers: layer 7 is out of range"),
    ("checkpoint: c\nstages: 1\nexpert_groups: 5\n", "expert_groups: 5 groups for a model of 4 experts"),
    # batching
    ("checkpoint: c\nstages: 1\nchunk_size: 64\n", "chunk_size: 64 is larger than the model's sliding window (32)"),
    ("checkpoint: c\nstages: 1\nchunk_size: 64\ntoken_budget: 32\n", "chunk_size: 64 is larger than token_budget (32)"),
    (
        "checkpoint: c\nstages: 1\nstrategy: balanced\n",
        "strategy: expected one of pack, spread, strict_spread, strict_pack",
    ),
    ("checkpoint: c\nstages: 1\ndtype: int8\n", "dtype: expected one of float32, bfloat16, float16, got 'int8'"),
    ("checkpoint: c\nstages: 1\nstandby: sometimes\n", "standby: expected true, false or auto, got 'sometimes'"),
    ("checkpoint: c\nstages: 1\nreplay_tokens: -1\n", "replay_tokens: expected a non-negative integer, got -1"),
    ("checkpoint: c\nstages: 1\nreplay_tokens: all\n", "replay_tokens: expected a non-negative integer, got 'all'"),
    (
        "checkpoint: c\nstages: 1\nmax_waiting_steps: soon\n",
        "max_waiting_steps: expected a non-negative integer, got 'soon'",
    ),
    (
        "checkpoint: c\nstages: 1\nwaiting_served_ratio: -1\n",
        "waiting_served_ratio: expected a non-negative number, got -1",
    ),
    (
        "checkpoint: c\nstages: 1\ndecode_ahead: yes please\n",
        "decode_ahead: expected true, false or auto, got 'yes please'",
    ),
    (
        "checkpoint: c\nstages:\n  - {layers: 0-1, resources: {GPU: 0.5}}\n  - {layers: 2-3, resources: {GPU: 0.5}}\n"
        "decode_ahead: true\n",
        "decode_ahead: true on a pipeline needs its first and last stage in different workers",
    ),
    (
        "checkpoint: c\nstages: 1\nresources: {CPU: 1" + "0" * 309 + "}\n",
        "resources.CPU: 1" + "0" * 309 + " is too large to be an amount of a resource",
    ),
]


@pytest.mark.parametrize(
    "text, cpu_worker, gpu_worker",
    [
        ("", False, True),
        ("standby: auto\n", False, True),
        ("standby: true\n", True, True),
        ("standby: false\n", False, False),
    ],
)
def test_standby_defaults_to_one_per_gpu_worker(write, text, cpu_worker, gpu_worker):
    plan = settle(write("checkpoint: c\nstages: 1\n" + text))
    assert plan.wants_standby({"CPU": 1}) is cpu_worker
    assert plan.wants_standby({"CPU": 1, "GPU": 1}) is gpu_worker


@pytest.mark.parametrize("text, message", BAD_FILES, ids=[message for _, message in BAD_FILES])
def test_a_mistake_is_named_with_the_file_and_the_key(write, text, message):
    with pytest.raises(PlacementError) as err:
        settle(write(text))
    assert str(err.value).startswith(f"placement.yaml: {message}")


@pytest.mark.parametrize(
    "key, value",
    [
        ("stages", "0"),
        ("micro_batch_size", "0"),
        ("token_budget", "-1"),
        ("max_seqs", "true"),
        ("chunk_size", "1.5"),
        ("expert_groups", "0"),
    ],
)
def test_counts_and_sizes_must_be_positive_integers(write, key, value):
    text = "\n".join(f"{k}: {v}" for k, v in {"checkpoint": "c", "stages": "1", key: value}.items())
    with pytest.raises(PlacementError, match=rf"^placement\.yaml: {key}: expected a positive integer"):
        load_placement(write(text))


def test_expert_groups_for_a_dense_checkpoint_are_refused(write):
    with pytest.raises(
        PlacementError, match=r"^placement\.yaml: expert_groups: the checkpoint is a dense mistral model"
    ):
        settle(write("checkpoint: c\nstages: 1\nexpert_groups: 2\n"), MISTRAL)


def test_malformed_yaml_is_reported_with_its_line(write):
    with pytest.raises(PlacementError, match=r"^placement\.yaml: not valid YAML at line 2"):
        load_placement(write("checkpoint: c\n  stages: 1\n"))


def test_a_key_given_twice_is_refused(write):
    with pytest.raises(PlacementError, match=r"^placement\.yaml: not valid YAML at line 3.*duplicate key 'stages'"):
        load_placement(write("checkpoint: c\nstages: 1\nstages: 2\n"))


def test_an_empty_file_is_refused(write):
    with pytest.raises(PlacementError, match=r"^placement\.yaml: the file is empty"):
        load_placement(write(""))


def test_a_list_at_the_top_level_is_refused(write):
    with pytest.raises(PlacementError, match=r"^placement\.yaml: expected a mapping"):
        load_placement(write("- stages: 1\n"))


def test_a_missing_file_is_refused(tmp_path):
    with pytest.raises(PlacementError, match="cannot be read"):
        load_placement(tmp_path / "nowhere.yaml")


def test_the_default_checkpoint_is_made_once_and_an_older_one_gets_the_tokenizer_files(tmp_path):
    default = tmp_path / "small-mixtral"
    ensure_default_checkpoint(default)
    made = {p.name: p.stat().st_mtime_ns for p in default.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.model", "tokenizer.json"} <= made.keys()
    ensure_default_checkpoint(default)
    assert {p.name: p.stat().st_mtime_ns for p in default.iterdir()} == made

    for name in HF_TOKENIZER_FILES:
        (default / name).unlink()
    ensure_default_checkpoint(default)
    assert {p.name for p in default.iterdir()} == made.keys()
    assert (default / "model.safetensors").stat().st_mtime_ns == made["model.safetensors"]
