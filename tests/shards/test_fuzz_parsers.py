"""Fuzzed configuration files: the placement YAML and the checkpoint's config.json / params.json.

Whatever the file holds, the parsers either accept it or raise our own `ConfigError` (PlacementError,
CheckpointError) naming the file; no other exception type may come out.
"""

from __future__ import annotations

import json
import math
import os
import re

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.placement import PlacementError, validate_against_model
from cluster.placement_file import EXPERT_GROUP_KEYS, STAGE_KEYS, TOP_KEYS, load_placement
from shards.config import ConfigError, load_config
from shards.make_checkpoint import small_config

# MISTRAL_CLUSTER_FUZZ_SCALE multiplies the examples for a soak run; CI runs the default.
SCALE = int(os.environ.get("MISTRAL_CLUSTER_FUZZ_SCALE", "1"))
FUZZ = settings(max_examples=150 * SCALE, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
MODEL = small_config("mixtral", layers=4, experts=4)

# Values a hand-written file could hold, and some no one would write: huge and negative numbers, NaN and
# infinities, ranges that run backwards or very far, strings where numbers belong, nesting where scalars belong.
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 12),
    st.integers(),
    st.sampled_from([2**63, 10**30, -(10**30), 10**4000]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(
        [
            "all",
            "0-3",
            "2-1",
            "0-999999999999",
            " 1 - 2 ",
            "3",
            "",
            "x",
            "0-",
            "-1",
            "float32",
            "bfloat16",
            "spread",
            "pack",
            "strict_pack",
            "CPU",
            "GPU",
            "checkpoints/x",
        ]
    ),
    st.text(max_size=10),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=6), st.sampled_from(["CPU", "GPU"])), inner, max_size=3),
    ),
    max_leaves=8,
)


def _maybe(keys: tuple[str, ...], values: dict) -> st.SearchStrategy[dict]:
    """Dictionaries over `keys` (and a stray key now and then), each value from `values` or anything."""
    return st.dictionaries(st.sampled_from(keys + ("stray",)), VALUES, max_size=len(keys)).flatmap(
        lambda d: st.fixed_dictionaries({k: st.one_of(values.get(k, VALUES), VALUES) for k in d})
    )


RESOURCES = st.dictionaries(
    st.sampled_from(["CPU", "GPU", "node_a"]),
    st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-2, 4)),
    max_size=3,
)
IDS = st.one_of(
    st.lists(st.integers(-1, 6), max_size=5), st.integers(-1, 6), st.sampled_from(["0-1", "2-3", "0-3", "all", "3-0"])
)
STAGE = _maybe(STAGE_KEYS, {"layers": IDS, "resources": RESOURCES})
GROUP = _maybe(EXPERT_GROUP_KEYS, {"experts": IDS, "layers": IDS, "resources": RESOURCES})
PLACEMENTS = _maybe(
    TOP_KEYS,
    {
        "checkpoint": st.just("checkpoints/small"),
        "stages": st.one_of(st.integers(-1, 6), st.lists(STAGE, max_size=4)),
        "expert_groups": st.one_of(st.integers(-1, 6), st.lists(GROUP, max_size=4)),
        "resources": RESOURCES,
        "dtype": st.sampled_from(["float32", "bfloat16", "float16", "int8"]),
        "strategy": st.sampled_from(["pack", "spread", "strict_spread", "strict_pack", "none"]),
        **{k: st.integers(-2, 4096) for k in ("micro_batch_size", "token_budget", "max_seqs", "chunk_size")},
    },
)


def place(path, text: str | bytes) -> None:
    """Load and settle a placement file; only ConfigError subclasses may come out."""
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    try:
        plan = load_placement(path)
        validate_against_model(plan, MODEL)
    except ConfigError as e:
        assert str(path) in str(e), e


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz-parsers")


@FUZZ
@given(PLACEMENTS)
def test_a_fuzzed_placement_structure_is_a_plan_or_a_placement_error(workdir, data):
    place(workdir / "placement.yaml", yaml.safe_dump(data, allow_unicode=True))


@FUZZ
@given(st.one_of(st.text(max_size=200), st.binary(max_size=200)))
def test_fuzzed_placement_text_is_a_plan_or_a_placement_error(workdir, text):
    place(workdir / "raw.yaml", text)


HOSTILE_PLACEMENTS = {
    "not UTF-8": (b"stages: \xff\xfe", "not UTF-8 text"),
    "nested deeper than the parser recurses": ("[" * 5000 + "]" * 5000, "nested too deeply"),
    "an integer Python refuses to parse": ("stages: " + "9" * 5000, "not valid YAML"),
    "a list as a key": ("? [a, b]\n: 1", "not valid YAML"),
    "a mapping as a key": ("? {a: 1}\n: 1", "not valid YAML"),
    "a repeated key": ("stages: 2\nstages: 3", "duplicate key 'stages'"),
    "a trillion stages": ("checkpoint: c\nstages: 1000000000000", "stages: 1000000000000 stages is more than"),
    "a trillion expert groups": (
        "checkpoint: c\nstages: 1\nexpert_groups: 1000000000000",
        "expert_groups: 1000000000000 groups is more than",
    ),
    "a range of a hundred billion layers": (
        "checkpoint: c\nstages: [{layers: 0-100000000000}]",
        "stages[0].layers: range '0-100000000000' goes past layer",
    ),
    "an infinite resource": (
        "checkpoint: c\nresources: {CPU: .inf}\nstages: 2",
        "resources.CPU: expected a non-negative",
    ),
    "a NaN resource": ("checkpoint: c\nresources: {CPU: .nan}\nstages: 2", "resources.CPU: expected a non-negative"),
    "a Python object tag": ("!!python/object/apply:os.system ['true']", "not valid YAML"),
    "binary where a path belongs": (
        "checkpoint: !!binary aGVsbG8=\nstages: 1",
        "checkpoint: expected a directory path",
    ),
}


@pytest.mark.parametrize("text,message", HOSTILE_PLACEMENTS.values(), ids=HOSTILE_PLACEMENTS)
def test_a_hostile_placement_file_is_a_placement_error_naming_the_key(tmp_path, text, message):
    path = tmp_path / "placement.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(PlacementError, match=f"^{re.escape(str(path))}: .*{re.escape(message)}"):
        validate_against_model(load_placement(path), MODEL)


# --- checkpoint configuration ---------------------------------------------------------------------------

HF_BASE = small_config("mixtral").to_hf_dict()
PARAMS_BASE = small_config("mixtral").to_params_dict()
NUMBERS = st.one_of(SCALARS, st.sampled_from([0, 1, -1, 3, 16, 64, 10**400, 2**64]))


def config_dicts(base: dict) -> st.SearchStrategy[dict]:
    """The base config with some fields changed to odd values, some removed, and maybe a stray one."""
    keys = sorted(base) + ["head_dim", "rope_parameters", "moe", "num_local_experts", "stray"]
    changes = st.dictionaries(st.sampled_from(keys), st.one_of(NUMBERS, VALUES), max_size=4)
    removals = st.sets(st.sampled_from(sorted(base)), max_size=3)
    return st.tuples(changes, removals).map(lambda cr: {k: v for k, v in {**base, **cr[0]}.items() if k not in cr[1]})


def configure(directory, name: str, content: bytes) -> None:
    """Write one config file alone in `directory` and read it; only ConfigError subclasses may come out."""
    for old in directory.glob("*.json"):
        old.unlink()
    (directory / name).write_bytes(content)
    try:
        config = load_config(directory)
    except ConfigError as e:
        assert name in str(e), e
    else:
        assert config.n_layers > 0 and math.isfinite(config.rope_theta)


def dump(data: dict) -> bytes:
    """JSON as Python writes it, NaN and Infinity included: files written by other tools hold them too."""
    return json.dumps(data, ensure_ascii=False).encode("utf-8", "surrogatepass")


@FUZZ
@given(config_dicts(HF_BASE))
def test_a_fuzzed_config_json_is_a_config_or_a_config_error(workdir, data):
    configure(workdir, "config.json", dump(data))


@FUZZ
@given(config_dicts(PARAMS_BASE))
def test_a_fuzzed_params_json_is_a_config_or_a_config_error(workdir, data):
    configure(workdir, "params.json", dump(data))


@FUZZ
@given(
    st.sampled_from(["config.json", "params.json"]),
    st.one_of(st.binary(max_size=100), st.text(max_size=100).map(lambda t: t.encode("utf-8", "surrogatepass"))),
)
def test_fuzzed_config_bytes_are_a_config_or_a_config_error(workdir, name, content):
    configure(workdir, name, content)


HOSTILE_CONFIGS = {
    "not UTF-8": (b'{"hidden_size": "\xff\xfe"}', "not UTF-8 text"),
    "nested deeper than the parser recurses": (b"[" * 5000 + b"]" * 5000, "nested too deeply"),
    "an integer Python refuses to parse": (b'{"hidden_size": ' + b"9" * 5000 + b"}", "not valid JSON"),
    "a number too large for a float": (
        dump({**HF_BASE, "rms_norm_eps": 10**400}),
        "field 'rms_norm_eps' is out of range",
    ),
    "an infinite rope_theta": (
        dump({**HF_BASE, "rope_theta": math.inf}),
        "field 'rope_theta' must be a positive number",
    ),
    "a NaN norm epsilon": (
        dump({**HF_BASE, "rms_norm_eps": math.nan}),
        "norm_eps' must be a small positive number, got nan",
    ),
}


@pytest.mark.parametrize("content,message", HOSTILE_CONFIGS.values(), ids=HOSTILE_CONFIGS)
def test_a_hostile_config_json_is_a_config_error_naming_the_field(tmp_path, content, message):
    (tmp_path / "config.json").write_bytes(content)
    with pytest.raises(ConfigError, match=f"config.json: .*{re.escape(message)}"):
        load_config(tmp_path)
