"""The placement YAML: which shard holds which layers and experts, and which Ray resources each one reserves.

`load_placement` reads and checks the file on its own; `validate_against_model` checks it against the checkpoint's
`ModelConfig` and settles everything the file leaves to the model (an even split of layers or experts, the default
prefill chunk). Every error names the file and the key path, e.g. `placement.yaml: stages[1].layers: ...`.
The schema is documented key by key in deploy/examples/PLACEMENT.md.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from shards.checkpoint import DTYPES, ShardSelection
from shards.config import ConfigError, ModelConfig

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
)
STAGE_KEYS = ("layers", "resources")
EXPERT_GROUP_KEYS = ("experts", "layers", "resources")
DEFAULT_RESOURCES = {"CPU": 1.0}
DEFAULT_CHUNK = 512  # the prefill chunk when the file gives none, capped by the model's window
MAX_IDS = 1 << 16  # more layers, experts, stages or groups than any model has: a typo, refused before it fills memory


class PlacementError(ConfigError):
    """A placement file is wrong, or cannot be placed on the cluster; the message names the file and the key."""


@dataclass(frozen=True)
class StageSpec:
    """One pipeline stage: a contiguous run of layers (None until an even split is settled against the model)."""

    index: int
    layers: tuple[int, ...] | None
    resources: dict[str, float]

    @property
    def name(self) -> str:
        return f"stage{self.index}"


@dataclass(frozen=True)
class ExpertGroupSpec:
    """Experts held apart from the stages; `None` fields are an even share / all layers, settled against the model."""

    index: int
    experts: tuple[int, ...] | None
    layers: tuple[int, ...] | None
    resources: dict[str, float]

    @property
    def name(self) -> str:
        return f"experts{self.index}"


@dataclass(frozen=True)
class Shard:
    """One actor's share of the model and the Ray bundle it reserves."""

    name: str
    kind: str  # "stage" or "experts"
    selection: ShardSelection
    resources: dict[str, float]


@dataclass(frozen=True)
class PlacementPlan:
    """A checked placement file: the one plan every actor receives. Use the settled plan `validate_against_model`
    returns; before that, counts in the file are still counts (`layers`/`experts` None, `chunk_size` None)."""

    source: str  # the YAML file, for error messages
    checkpoint: str
    dtype: str
    strategy: str
    stages: tuple[StageSpec, ...]
    expert_groups: tuple[ExpertGroupSpec, ...] = ()
    micro_batch_size: int = 4
    token_budget: int = 2048
    max_seqs: int = 32
    chunk_size: int | None = None  # None until settled against the model: min(window, 512)

    @property
    def settled(self) -> bool:
        """True once `validate_against_model` has turned every count into explicit layers and experts."""
        return (
            self.chunk_size is not None
            and all(s.layers is not None for s in self.stages)
            and all(g.experts is not None and g.layers is not None for g in self.expert_groups)
        )

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def _require_settled(self) -> None:
        if not self.settled:
            raise ValueError(f"{self.source}: the plan is not settled yet; use the plan validate_against_model returns")

    def stage_selection(self, i: int, config: ModelConfig) -> ShardSelection:
        """Embedding on the first stage, final norm and head on the last; experts too when no group holds them."""
        self._require_settled()
        stage = self.stages[i]
        experts = {}
        if config.is_moe and not self.expert_groups:
            experts = {layer: tuple(range(config.num_experts)) for layer in stage.layers}
        last = i == len(self.stages) - 1
        return ShardSelection(embedding=i == 0, layers=stage.layers, experts=experts, final_norm=last, head=last)

    def expert_selection(self, g: int, config: ModelConfig) -> ShardSelection:
        """Only the group's experts, for each of its layers (the gates stay with the stages)."""
        self._require_settled()
        group = self.expert_groups[g]
        return ShardSelection(experts={layer: group.experts for layer in group.layers})

    def _in_bundle_order(self) -> list[StageSpec | ExpertGroupSpec]:
        """Stage i beside expert group i. Ray hands out GPU fractions first-fit in bundle order, so with half a GPU
        per shard this puts one stage and one expert group on each GPU, not two expert groups on one."""
        out: list[StageSpec | ExpertGroupSpec] = []
        for i in range(max(len(self.stages), len(self.expert_groups))):
            out += [*self.stages[i : i + 1], *self.expert_groups[i : i + 1]]
        return out

    def shard_names(self) -> list[str]:
        """Shard names in bundle order: stage0, experts0, stage1, experts1, ..."""
        return [spec.name for spec in self._in_bundle_order()]

    def bundles(self) -> list[dict[str, float]]:
        """One Ray bundle per shard, in the order of `shard_names`; amounts of 0 are left out, as Ray wants."""
        return [{k: v for k, v in spec.resources.items() if v > 0} for spec in self._in_bundle_order()]

    def shards(self, config: ModelConfig) -> list[Shard]:
        """Every shard with its selection, in the order of `bundles`."""
        out = []
        for spec in self._in_bundle_order():
            if isinstance(spec, StageSpec):
                out.append(Shard(spec.name, "stage", self.stage_selection(spec.index, config), spec.resources))
            else:
                out.append(Shard(spec.name, "experts", self.expert_selection(spec.index, config), spec.resources))
        return out


# --- reading the file ------------------------------------------------------------------------------------------


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
        return PlacementError(f"{self.source}: {path}: {message}" if path else f"{self.source}: {message}")

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
            out[name] = float(amount)
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
    for key, default in (("micro_batch_size", 4), ("token_budget", 2048), ("max_seqs", 32), ("chunk_size", None)):
        numbers[key] = check.positive_int(data[key], key) if key in data else default
    if numbers["chunk_size"] is not None and numbers["chunk_size"] > numbers["token_budget"]:
        raise check.fail(
            "chunk_size",
            f"{numbers['chunk_size']} is larger than token_budget ({numbers['token_budget']}); "
            "a prefill chunk must fit in one step",
        )
    return PlacementPlan(
        source=source,
        checkpoint=checkpoint,
        dtype=check.choice(data.get("dtype", "float32"), "dtype", tuple(DTYPES)),
        strategy=check.choice(data.get("strategy", "pack"), "strategy", STRATEGIES),
        stages=stages,
        expert_groups=groups,
        **numbers,
    )


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
        for prev in groups:
            common = set(experts) & set(prev.experts)
            shared = _shared_layers(layers, prev.layers)
            if common and shared:
                where = "every layer" if shared == "all" else f"layer {min(shared)}"
                raise check.fail(
                    f"{path}.experts", f"expert {min(common)} of {where} is also in expert_groups[{prev.index}]"
                )
        resources = (
            check.resources(item["resources"], f"{path}.resources") if "resources" in item else default_resources
        )
        groups.append(ExpertGroupSpec(g, experts, layers, resources))
    return tuple(groups)


def _shared_layers(a: tuple[int, ...] | None, b: tuple[int, ...] | None) -> set[int] | str:
    """The layers two groups both cover; None stands for all layers."""
    if a is None and b is None:
        return "all"
    return set(a if b is None else b if a is None else set(a) & set(b))


# --- checking against the model ----------------------------------------------------------------------------------


def validate_against_model(plan: PlacementPlan, config: ModelConfig) -> PlacementPlan:
    """Check the plan against the checkpoint and return it settled: explicit layers and experts, a chunk size."""
    check = _Checker(plan.source)
    stages = _settle_stages(check, plan.stages, config)
    groups = _settle_expert_groups(check, plan.expert_groups, config)

    window = config.sliding_window or config.max_seq_len
    what = "sliding window" if config.sliding_window else "maximum sequence length"
    chunk = plan.chunk_size if plan.chunk_size is not None else min(window, DEFAULT_CHUNK, plan.token_budget)
    if chunk > window:
        raise check.fail("chunk_size", f"{chunk} is larger than the model's {what} ({window})")
    return replace(plan, stages=stages, expert_groups=groups, chunk_size=chunk)


def _settle_stages(check: _Checker, stages: tuple[StageSpec, ...], config: ModelConfig) -> tuple[StageSpec, ...]:
    n = config.n_layers
    if stages[0].layers is None:
        if len(stages) > n:
            raise check.fail("stages", f"{len(stages)} stages for a model of {n} layers; each stage needs a layer")
        return tuple(replace(s, layers=part) for s, part in zip(stages, _even_split(n, len(stages))))
    for s in stages:
        out_of_range = [layer for layer in s.layers if layer >= n]
        if out_of_range:
            raise check.fail(
                f"stages[{s.index}].layers",
                f"layer {out_of_range[0]} is out of range; the model has {n} layers (0-{n - 1})",
            )
    missing = sorted(set(range(n)) - {layer for s in stages for layer in s.layers})
    if missing:
        raise check.fail("stages", f"layers {format_ids(missing)} are in no stage; every layer needs one")
    return stages


def _settle_expert_groups(
    check: _Checker, groups: tuple[ExpertGroupSpec, ...], config: ModelConfig
) -> tuple[ExpertGroupSpec, ...]:
    if not groups:
        return groups
    if not config.is_moe:
        raise check.fail(
            "expert_groups", f"the checkpoint is a dense {config.arch} model without experts; remove expert_groups"
        )
    n, e = config.n_layers, config.num_experts
    if groups[0].experts is None:
        if len(groups) > e:
            raise check.fail("expert_groups", f"{len(groups)} groups for a model of {e} experts; each group needs one")
        return tuple(
            replace(g, experts=part, layers=tuple(range(n))) for g, part in zip(groups, _even_split(e, len(groups)))
        )
    settled = []
    for g in groups:
        path = f"expert_groups[{g.index}]"
        layers = g.layers if g.layers is not None else tuple(range(n))
        if layers[-1] >= n:
            raise check.fail(
                f"{path}.layers", f"layer {layers[-1]} is out of range; the model has {n} layers (0-{n - 1})"
            )
        if g.experts[-1] >= e:
            raise check.fail(
                f"{path}.experts", f"expert {g.experts[-1]} is out of range; the model has {e} experts (0-{e - 1})"
            )
        settled.append(replace(g, layers=layers))
    covered = {(layer, x) for g in settled for layer in g.layers for x in g.experts}
    for layer in range(n):
        missing = [x for x in range(e) if (layer, x) not in covered]
        if missing:
            raise check.fail(
                "expert_groups",
                f"expert {missing[0]} of layer {layer} is in no group; "
                "with expert groups, every expert of every layer needs one",
            )
    return tuple(settled)


def _even_split(n: int, parts: int) -> list[tuple[int, ...]]:
    """0..n-1 cut into `parts` contiguous runs; the first runs take one more when it does not divide."""
    size, extra = divmod(n, parts)
    out, start = [], 0
    for p in range(parts):
        stop = start + size + (p < extra)
        out.append(tuple(range(start, stop)))
        start = stop
    return out


def format_ids(ids: list[int] | tuple[int, ...]) -> str:
    """Layer or expert ids written compactly, as errors and the placement table show them: 0-3,6,8-9."""
    if not ids:
        return "-"
    runs: list[list[int]] = []
    for i in sorted(ids):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
