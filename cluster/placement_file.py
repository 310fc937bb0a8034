"""The placement YAML: reading and checking the file, and settling it against its checkpoint.

`load_placement` reads and checks the file on its own; `settle_placement` also makes the embedded default checkpoint
when the file names it and settles the plan against the checkpoint's config (`cluster.placement`). Every error names
the file and the key path, e.g. `placement.yaml: stages[1].layers: ...`. The schema is documented key by key in
deploy/examples/PLACEMENT.md.
"""

from __future__ import annotations

import math
import os
import re
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from cluster.placement import (
    ExpertGroupSpec,
    HiddenCut,
    PlacementError,
    PlacementPlan,
    StageSpec,
    format_ids,
    validate_against_model,
)
from shards.checkpoint import DTYPES
from shards.config import ModelConfig, load_config
from shards.hf_tokenizer_files import write_hf_tokenizer_files
from shards.make_checkpoint import make_checkpoint, make_random_checkpoint, small_config

# The embedded default checkpoint, which deploy/examples/local.yaml names: a small random Mixtral made on first use.
HOME = Path(os.environ.get("MISTRAL_CLUSTER_HOME", "checkpoints"))
DEFAULT_CHECKPOINT = HOME / "small-mixtral"
STRATEGIES = ("pack", "spread", "strict_spread", "strict_pack")
TOP_KEYS = (
    "checkpoint",
    "dtype",
    "strategy",
    "stages",
    "expert_groups",
    "resources",
    "micro_batch_size",
    "token_budget",
    "max_seqs",
    "chunk_size",
    "replay_tokens",
    "max_waiting_steps",
    "waiting_served_ratio",
    "standby",
    "decode_ahead",
    "overlap_min_seqs",
)
STAGE_KEYS = ("layers", "resources")
EXPERT_GROUP_KEYS = ("experts", "layers", "hidden", "resources")
DEFAULT_RESOURCES = {"CPU": 1.0}
MAX_IDS = 1 << 16  # more layers, experts, stages or groups than any model has: a typo, refused before it fills memory


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys; a placement file with a repeated key is a mistake."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:  # a list or mapping as a key: SafeLoader's own check names it
                break
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


class _Checker:
    """Type checks that name the file and the key path."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, path: str, message: str) -> PlacementError:
        return PlacementError.at(self.source, path, message)

    def mapping(self, value: Any, path: str, allowed: tuple[str, ...]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(path, f"expected a mapping with keys {', '.join(allowed)}; got {value!r}")
        for key in value:
            if key not in allowed:
                where = f"{path}.{key}" if path else str(key)
                raise self.fail(where, f"unknown key; expected one of {', '.join(allowed)}")
        return value

    def positive_int(self, value: Any, path: str) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise self.fail(path, f"expected a positive integer, got {value!r}")
        return value

    def non_negative_int(self, value: Any, path: str) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise self.fail(path, f"expected a non-negative integer, got {value!r}")
        return value

    def non_negative_number(self, value: Any, path: str) -> float:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < math.inf:
            raise self.fail(path, f"expected a non-negative number, got {value!r}")
        return float(value)

    def count(self, value: int, path: str, what: str) -> int:
        self.positive_int(value, path)
        if value > MAX_IDS:
            raise self.fail(path, f"{value} {what} is more than {MAX_IDS}")
        return value

    def choice(self, value: Any, path: str, choices: tuple[str, ...]) -> str:
        if value not in choices:
            raise self.fail(path, f"expected one of {', '.join(choices)}, got {value!r}")
        return value

    def ids(self, value: Any, path: str, what: str) -> tuple[int, ...]:
        """A list of ids, one id, or a range "a-b" (inclusive), as a sorted tuple without repeats."""
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        if isinstance(value, str):
            m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", value)
            if not m:
                raise self.fail(path, f"expected a list of {what} ids or a range 'a-b', got {value!r}")
            lo, hi = int(m[1]), int(m[2] if m[2] is not None else m[1])
            if hi < lo:
                raise self.fail(path, f"range {value!r} ends before it starts")
            if hi >= MAX_IDS:
                raise self.fail(path, f"range {value!r} goes past {what} {MAX_IDS - 1}")
            return tuple(range(lo, hi + 1))
        if not isinstance(value, list) or not value:
            raise self.fail(path, f"expected a non-empty list of {what} ids or a range 'a-b', got {value!r}")
        for v in value:
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise self.fail(path, f"{what} ids are non-negative integers, got {v!r}")
        dupes = sorted({v for v in value if value.count(v) > 1})
        if dupes:
            raise self.fail(path, f"{what} {dupes[0]} is listed twice")
        return tuple(sorted(value))

    def resources(self, value: Any, path: str) -> dict[str, float]:
        if not isinstance(value, dict) or not value:
            raise self.fail(
                path, f"expected a mapping of Ray resource names to amounts, e.g. {{CPU: 1}}; got {value!r}"
            )
        out = {}
        for name, amount in value.items():
            if not isinstance(name, str) or not name:
                raise self.fail(path, f"resource names are strings, got {name!r}")
            if not isinstance(amount, (int, float)) or isinstance(amount, bool) or not 0 <= amount < math.inf:
                raise self.fail(f"{path}.{name}", f"expected a non-negative number, got {amount!r}")
            try:
                out[name] = float(amount)
            except OverflowError:  # an integer past any float (the fuzzer found one): no cluster has that much
                raise self.fail(f"{path}.{name}", f"{amount} is too large to be an amount of a resource") from None
        if not any(out.values()):
            raise self.fail(path, "a shard must reserve some resource; every amount is 0")
        return out


def load_placement(path: str | Path, checkpoint_override: str | Path | None = None) -> PlacementPlan:
    """Parse and check a placement file on its own; `validate_against_model` then checks it against the checkpoint."""
    source = str(path)
    check = _Checker(source)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise PlacementError(f"{source}: cannot be read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise PlacementError(f"{source}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise PlacementError(f"{source}: not valid YAML{where}: {problem}") from None
    except RecursionError:
        raise PlacementError(f"{source}: not valid YAML: nested too deeply") from None
    except ValueError as e:  # a scalar PyYAML cannot convert, e.g. an integer of over 4300 digits
        raise PlacementError(f"{source}: not valid YAML: {e}") from None
    if data is None:
        raise PlacementError(f"{source}: the file is empty; it needs at least 'checkpoint' and 'stages'")
    data = check.mapping(data, "", TOP_KEYS)

    if checkpoint_override is not None:
        checkpoint = str(checkpoint_override)
    elif "checkpoint" in data:
        checkpoint = data["checkpoint"]
        if not isinstance(checkpoint, str) or not checkpoint:
            raise check.fail("checkpoint", f"expected a directory path, got {checkpoint!r}")
    else:
        raise check.fail("checkpoint", "missing; give the checkpoint directory here or with --checkpoint")

    default_resources = check.resources(data["resources"], "resources") if "resources" in data else DEFAULT_RESOURCES
    if "stages" not in data:
        raise check.fail("stages", "missing; give a number of stages or a list of stages with their layers")
    stages = _parse_stages(check, data["stages"], default_resources)
    groups = _parse_expert_groups(check, data.get("expert_groups"), default_resources)

    numbers = {}
    defaults = {f.name: f.default for f in fields(PlacementPlan)}  # the plan's, which are the scheduler's
    for key in ("micro_batch_size", "token_budget", "max_seqs", "chunk_size"):
        numbers[key] = check.positive_int(data[key], key) if key in data else defaults[key]
    numbers["replay_tokens"] = (
        check.non_negative_int(data["replay_tokens"], "replay_tokens")
        if "replay_tokens" in data
        else defaults["replay_tokens"]
    )
    numbers["overlap_min_seqs"] = (
        check.non_negative_int(data["overlap_min_seqs"], "overlap_min_seqs")
        if "overlap_min_seqs" in data
        else defaults["overlap_min_seqs"]
    )
    if numbers["overlap_min_seqs"] and not groups:
        raise check.fail(
            "overlap_min_seqs",
            f"{numbers['overlap_min_seqs']}: two-batch overlap hides the expert groups' work behind attention; this "
            "placement has no expert_groups",
        )
    waiting = data.get("max_waiting_steps", "auto")
    numbers["max_waiting_steps"] = None if waiting == "auto" else check.non_negative_int(waiting, "max_waiting_steps")
    numbers["waiting_served_ratio"] = (
        check.non_negative_number(data["waiting_served_ratio"], "waiting_served_ratio")
        if "waiting_served_ratio" in data
        else defaults["waiting_served_ratio"]
    )
    numbers["decode_ahead"] = _auto_bool(check, "decode_ahead", data.get("decode_ahead", "auto"))
    if numbers["chunk_size"] is not None and numbers["chunk_size"] > numbers["token_budget"]:
        raise check.fail(
            "chunk_size",
            f"{numbers['chunk_size']} is larger than token_budget ({numbers['token_budget']}); "
            "a prefill chunk must fit in one step",
        )
    plan = PlacementPlan(
        source=source,
        checkpoint=checkpoint,
        dtype=check.choice(data.get("dtype", "float32"), "dtype", tuple(DTYPES)),
        strategy=check.choice(data.get("strategy", "pack"), "strategy", STRATEGIES),
        stages=stages,
        expert_groups=groups,
        standby=_auto_bool(check, "standby", data.get("standby", "auto")),
        **numbers,
    )
    if plan.decode_ahead and len(plan.stages) > 1:
        _check_pipeline_ahead(check, plan)
    return plan


def _check_pipeline_ahead(check: _Checker, plan: PlacementPlan) -> None:
    """A pipeline decoding ahead sends each step's picks from its last stage to its first over their own channel,
    which needs them in different workers (stages sharing a GPU share a worker)."""
    from cluster.workers import group_workers

    first, last = 0, len(plan.stages) - 1
    for worker in group_workers(plan):
        if first in worker.stages and last in worker.stages:
            raise check.fail(
                "decode_ahead",
                f"true on a pipeline needs its first and last stage in different workers; stages {first} and {last} "
                f"share one (their GPU fractions, {plan.stages[first].resources} and {plan.stages[last].resources}, "
                "put them on one GPU)",
            )


def _auto_bool(check: _Checker, key: str, value: Any) -> bool | None:
    """`standby`, `decode_ahead`: true, false, or auto (None: decided by whether the worker holds a GPU)."""
    if isinstance(value, bool):
        return value
    if value == "auto":
        return None
    raise check.fail(key, f"expected true, false or auto, got {value!r}")


def _parse_stages(check: _Checker, value: Any, default_resources: dict[str, float]) -> tuple[StageSpec, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        check.count(value, "stages", "stages")
        return tuple(StageSpec(i, None, default_resources) for i in range(value))
    if not isinstance(value, list) or not value:
        raise check.fail("stages", f"expected a positive number of stages or a non-empty list of stages, got {value!r}")
    stages = []
    for i, item in enumerate(value):
        path = f"stages[{i}]"
        item = check.mapping(item, path, STAGE_KEYS)
        if "layers" not in item:
            raise check.fail(f"{path}.layers", "missing; list the layers this stage runs")
        layers = check.ids(item["layers"], f"{path}.layers", "layer")
        if layers[-1] - layers[0] + 1 != len(layers):
            raise check.fail(f"{path}.layers", f"must be a contiguous run of layers, got {format_ids(layers)}")
        for prev in stages:
            common = set(layers) & set(prev.layers)
            if common:
                raise check.fail(f"{path}.layers", f"layer {min(common)} is also in stages[{prev.index}]")
        if stages and layers[0] < stages[-1].layers[0]:
            raise check.fail(
                f"{path}.layers",
                f"starts at layer {layers[0]}, before stages[{i - 1}]; stages are listed in pipeline order",
            )
        resources = (
            check.resources(item["resources"], f"{path}.resources") if "resources" in item else default_resources
        )
        stages.append(StageSpec(i, layers, resources))
    return tuple(stages)


def _parse_expert_groups(
    check: _Checker, value: Any, default_resources: dict[str, float]
) -> tuple[ExpertGroupSpec, ...]:
    if value is None:
        return ()
    if isinstance(value, int) and not isinstance(value, bool):
        check.count(value, "expert_groups", "groups")
        return tuple(ExpertGroupSpec(g, None, None, default_resources) for g in range(value))
    if not isinstance(value, list) or not value:
        raise check.fail("expert_groups", f"expected a positive number of groups or a non-empty list, got {value!r}")
    groups = []
    for g, item in enumerate(value):
        path = f"expert_groups[{g}]"
        item = check.mapping(item, path, EXPERT_GROUP_KEYS)
        if "experts" not in item:
            raise check.fail(f"{path}.experts", "missing; list the experts this group holds")
        experts = check.ids(item["experts"], f"{path}.experts", "expert")
        layers_value = item.get("layers", "all")
        layers = None if layers_value == "all" else check.ids(layers_value, f"{path}.layers", "layer")
        hidden = _hidden_part(check, item.get("hidden", "all"), f"{path}.hidden")
        for prev in groups:
            common = set(experts) & set(prev.experts)
            shared = _shared_layers(layers, prev.layers)
            if not (common and shared):
                continue
            where = "every layer" if shared == "all" else f"layer {min(shared)}"
            if hidden is None or prev.hidden is None:
                raise check.fail(
                    f"{path}.experts", f"expert {min(common)} of {where} is also in expert_groups[{prev.index}]"
                )
            if hidden.parts and prev.hidden.parts and hidden.parts != prev.hidden.parts:
                raise check.fail(
                    f"{path}.hidden",
                    f"{hidden} and expert_groups[{prev.index}]'s {prev.hidden} "
                    f"cut expert {min(common)} of {where} in different numbers of parts",
                )
            if hidden.parts and hidden == prev.hidden:
                raise check.fail(
                    f"{path}.hidden",
                    f"part {hidden} of expert {min(common)} of {where} is also in expert_groups[{prev.index}]",
                )
        resources = (
            check.resources(item["resources"], f"{path}.resources") if "resources" in item else default_resources
        )
        groups.append(ExpertGroupSpec(g, experts, layers, resources, hidden))
    return tuple(groups)


def _hidden_part(check: _Checker, value: Any, path: str) -> HiddenCut | None:
    """`hidden`: "all" (whole experts), "i/n" (the i-th of n equal runs of every held expert's hidden rows), or
    "start:stop" (those rows; checked against the model's hidden size when the plan is settled)."""
    if value == "all":
        return None
    text = value.replace(" ", "") if isinstance(value, str) else ""
    if re.fullmatch(r"\d+:\d+", text):
        start, stop = (int(v) for v in text.split(":"))
        if start >= stop:
            raise check.fail(path, f"rows {value!r}: expected start < stop, e.g. 0:8064")
        return HiddenCut(start=start, stop=stop)
    if not re.fullmatch(r"\d+/\d+", text):
        raise check.fail(path, f"expected all, a part such as 0/2, or rows such as 0:8064, got {value!r}")
    part, n = (int(v) for v in text.split("/"))
    if not 0 <= part < n or n > MAX_IDS:
        raise check.fail(path, f"part {part} of {n}: expected 0 <= part < n")
    return HiddenCut(part=part, parts=n) if n > 1 else None


def _shared_layers(a: tuple[int, ...] | None, b: tuple[int, ...] | None) -> set[int] | str:
    """The layers two groups both cover; None stands for all layers."""
    if a is None and b is None:
        return "all"
    return set(a if b is None else b if a is None else set(a) & set(b))


# --- the default checkpoint and settling -------------------------------------------------------------------------


def ensure_default_checkpoint(path: Path = DEFAULT_CHECKPOINT) -> Path:
    """The embedded default: a small random Mixtral made on first use. One made before checkpoints carried the
    Hugging Face tokenizer files gets them, so tools that read the tokenizer can be pointed at it."""
    if not (path / "config.json").is_file():
        print(f"making the small default checkpoint in {path} (first run)", file=sys.stderr)
        make_checkpoint(path, small_config("mixtral"), seed=0)
    elif (path / "tokenizer.model").is_file() and not (path / "tokenizer.json").is_file():
        print(f"adding the Hugging Face tokenizer files to {path}", file=sys.stderr)
        write_hf_tokenizer_files(path, model_max_length=load_config(path).max_seq_len)
    return path


def random_checkpoint(shape: str, max_model_len: int | None = None) -> Path:
    """`--random-weights SHAPE`: a checkpoint of that shape with no tensor files (a config, a seed, the tokenizer),
    made on first use under MISTRAL_CLUSTER_HOME; each shard draws its own weights when it loads. `max_model_len`
    shortens the shape's context."""
    name = f"random-{shape}" + (f"-{max_model_len}" if max_model_len is not None else "")
    return make_random_checkpoint((HOME / name).resolve(), shape, max_seq_len=max_model_len)


def settle_placement(
    placement: str | Path | PlacementPlan, checkpoint: str | None = None
) -> tuple[PlacementPlan, ModelConfig]:
    """What every command does with a placement before Ray starts: read the file (or take a plan), make the
    embedded default checkpoint if the plan names it, and check the plan against that checkpoint's config.
    Returns (settled plan, model config)."""
    plan = placement if isinstance(placement, PlacementPlan) else load_placement(placement, checkpoint)
    if Path(plan.checkpoint) == DEFAULT_CHECKPOINT:
        ensure_default_checkpoint()
    config = load_config(plan.checkpoint)
    return validate_against_model(plan, config), config
