"""The placement plan: which shard holds which layers and experts, and which Ray resources each one reserves.

A `PlacementPlan` comes from a placement file (`cluster.placement_file` reads and checks it); `validate_against_model`
checks it against the checkpoint's `ModelConfig` and settles everything the file leaves to the model (an even
split of layers or experts, the default prefill chunk). Every error names the file and the key path, e.g.
`placement.yaml: stages[1].layers: ...`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch

from router.scheduler import (
    DEFAULT_MAX_SEQS,
    DEFAULT_REPLAY_TOKENS,
    DEFAULT_TOKEN_BUDGET,
    DEFAULT_WAITING_SERVED_RATIO,
    SchedulerConfig,
)
from shards.checkpoint import DTYPES, ShardSelection
from shards.config import ConfigError, ModelConfig

DEFAULT_MICRO_BATCH_SIZE = 4  # sequences per micro-batch moving through the stages
AUTO_WAITING_STEPS = 8  # `max_waiting_steps: auto` where the first stage holds a GPU


class PlacementError(ConfigError):
    """A placement file is wrong, or cannot be placed on the cluster; the message names the file and the key."""

    @classmethod
    def at(cls, source: str, path: str, message: str) -> PlacementError:
        """The error for key `path` of file `source` ("" for the file as a whole)."""
        return cls(f"{source}: {path}: {message}" if path else f"{source}: {message}")


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
class HiddenCut:
    """`hidden:` of an expert group: part `part` of `parts` equal runs of every held expert's hidden rows ("0/2"), or
    the rows [start, stop) ("0:8064"), for cuts that are not even: a GPU that also runs the stage's attention can take
    fewer rows, one that would otherwise wait for the far group's answer more."""

    part: int = 0
    parts: int = 0  # 0: the explicit rows [start, stop)
    start: int = 0
    stop: int = 0

    def rows(self, hidden_dim: int) -> tuple[int, int]:
        if self.parts:
            size = hidden_dim // self.parts
            return self.part * size, (self.part + 1) * size
        return self.start, self.stop

    def __str__(self) -> str:
        return f"{self.part}/{self.parts}" if self.parts else f"{self.start}:{self.stop}"


@dataclass(frozen=True)
class ExpertGroupSpec:
    """Experts held apart from the stages; `None` fields are an even share / all layers, settled against the model."""

    index: int
    experts: tuple[int, ...] | None
    layers: tuple[int, ...] | None
    resources: dict[str, float]
    # The part of every held expert's hidden rows; None: whole experts. Groups holding the same experts in different
    # parts each compute their part of every chosen expert, and the stage adds the parts up.
    hidden: HiddenCut | None = None

    @property
    def name(self) -> str:
        return f"experts{self.index}"

    def rows(self, hidden_dim: int) -> tuple[int, int]:
        """The hidden rows of each held expert this group holds: its cut, or all of them."""
        return self.hidden.rows(hidden_dim) if self.hidden is not None else (0, hidden_dim)


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
    micro_batch_size: int = DEFAULT_MICRO_BATCH_SIZE
    # The scheduler's numbers; their defaults are `router.scheduler.SchedulerConfig`'s, the only place they are set.
    token_budget: int = DEFAULT_TOKEN_BUDGET
    max_seqs: int = DEFAULT_MAX_SEQS
    chunk_size: int | None = None  # None until settled against the model: min(window, 512, token_budget)
    replay_tokens: int = DEFAULT_REPLAY_TOKENS  # outputs a cache rebuilt after a fault replays (SchedulerConfig)
    # Steps a new request may be held back for others to start with it (SchedulerConfig); None (auto): by device,
    # `waiting_steps`.
    max_waiting_steps: int | None = None
    waiting_served_ratio: float = DEFAULT_WAITING_SERVED_RATIO
    # A warm standby process per worker (imports done, CUDA context made), promoted when its worker dies: True,
    # False, or None (the default): one for every worker whose bundle holds a GPU.
    standby: bool | None = None
    # Decode ahead (`router.scheduler`): a greedy sequence's next step sent before its token is back. One stage only
    # (the file refuses it with more). True, False, or None (the default): on where the one stage holds a GPU (two
    # H200s, Mixtral: +11 % at batch 1, +5 % at 128), off on a CPU, which is itself the device and has nothing idle
    # to overlap (-13 % at batch 1). MISTRAL_CLUSTER_DECODE_AHEAD=0/1 overrides both (an A/B switch).
    decode_ahead: bool | None = None
    # Two-batch overlap: a decode micro-batch of at least this many sequences, on a stage with experts on other
    # workers, runs as two halves interleaved layer by layer (the far groups compute one half's experts while the
    # stage runs the other half's attention). 0: off. Both sides of a dispatch read it, so they agree on the order.
    overlap_min_seqs: int = 0

    def overlap_split(self, n_tokens: int, is_decode: bool) -> tuple[int, int] | None:
        """The two halves' sizes for a micro-batch of `n_tokens` (`overlap_min_seqs`), or None when it runs whole."""
        if not (is_decode and self.overlap_min_seqs and n_tokens >= max(2, self.overlap_min_seqs)):
            return None
        first = (n_tokens + 1) // 2
        return first, n_tokens - first

    def wants_standby(self, bundle: dict[str, float]) -> bool:
        """Whether the worker reserving `bundle` gets a standby."""
        return self.standby if self.standby is not None else bundle.get("GPU", 0) > 0

    @property
    def settled(self) -> bool:
        """True once `validate_against_model` has turned every count into explicit layers and experts."""
        return (
            self.chunk_size is not None
            and all(s.layers is not None for s in self.stages)
            and all(g.experts is not None and g.layers is not None for g in self.expert_groups)
        )

    @property
    def scheduling(self) -> SchedulerConfig:
        """The scheduler's part of the plan (the router builds its `Scheduler` from it)."""
        return SchedulerConfig(
            self.max_seqs,
            self.token_budget,
            self.chunk_size,
            self.replay_tokens,
            self.ahead,
            self.waiting_steps,
            self.waiting_served_ratio,
        )

    @property
    def waiting_steps(self) -> int:
        """`max_waiting_steps`, else AUTO_WAITING_STEPS where the first stage holds a GPU (a step starting prompts
        there cannot replay a decode graph: ~2.3 decode steps' time, bench/NOTES.md) and 0 on a CPU, where such a
        step costs about what its tokens do."""
        if self.max_waiting_steps is not None:
            return self.max_waiting_steps
        return AUTO_WAITING_STEPS if self.stages[0].resources.get("GPU", 0) > 0 else 0

    @property
    def ahead(self) -> bool:
        """Whether the router decodes ahead: the file's `decode_ahead`, else on for one stage holding a GPU; the
        environment's MISTRAL_CLUSTER_DECODE_AHEAD=0/1 first (=1 on one stage only). A pipeline decodes ahead only
        where its file says `decode_ahead: true`: its last stage then hands its picks to the first stage itself,
        and all sequences go as one step group (no two groups overlapping in the stages): the shape for few
        sequences, where the router's round trip is what a step waits for."""
        forced = os.environ.get("MISTRAL_CLUSTER_DECODE_AHEAD")
        if forced == "0":
            return False
        if len(self.stages) != 1:
            return self.decode_ahead is True
        if forced == "1":
            return True
        if self.decode_ahead is not None:
            return self.decode_ahead
        return self.stages[0].resources.get("GPU", 0) > 0

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
        rows = group.rows(config.hidden_dim) if group.hidden is not None else None  # None: read whole experts
        return ShardSelection(experts={layer: group.experts for layer in group.layers}, hidden_rows=rows)

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


# --- checking against the model ----------------------------------------------------------------------------------


def validate_against_model(plan: PlacementPlan, config: ModelConfig) -> PlacementPlan:
    """Check the plan against the checkpoint and return it settled: explicit layers and experts, a chunk size."""
    stages = _settle_stages(plan.source, plan.stages, config)
    groups = _settle_expert_groups(plan.source, plan.expert_groups, config)

    window = config.sliding_window or config.max_seq_len
    what = "sliding window" if config.sliding_window else "maximum sequence length"
    chunk = plan.scheduling.settled(window).chunk_size if plan.chunk_size is None else plan.chunk_size
    if chunk > window:
        raise PlacementError.at(plan.source, "chunk_size", f"{chunk} is larger than the model's {what} ({window})")
    return replace(plan, stages=stages, expert_groups=groups, chunk_size=chunk)


def _settle_stages(source: str, stages: tuple[StageSpec, ...], config: ModelConfig) -> tuple[StageSpec, ...]:
    n = config.n_layers
    if stages[0].layers is None:
        if len(stages) > n:
            raise PlacementError.at(
                source, "stages", f"{len(stages)} stages for a model of {n} layers; each stage needs a layer"
            )
        return tuple(replace(s, layers=part) for s, part in zip(stages, _even_split(n, len(stages)), strict=True))
    for s in stages:
        out_of_range = [layer for layer in s.layers if layer >= n]
        if out_of_range:
            raise PlacementError.at(
                source,
                f"stages[{s.index}].layers",
                f"layer {out_of_range[0]} is out of range; the model has {n} layers (0-{n - 1})",
            )
    missing = sorted(set(range(n)) - {layer for s in stages for layer in s.layers})
    if missing:
        raise PlacementError.at(
            source, "stages", f"layers {format_ids(missing)} are in no stage; every layer needs one"
        )
    return stages


def _settle_expert_groups(
    source: str, groups: tuple[ExpertGroupSpec, ...], config: ModelConfig
) -> tuple[ExpertGroupSpec, ...]:
    if not groups:
        return groups
    if not config.is_moe:
        raise PlacementError.at(
            source,
            "expert_groups",
            f"the checkpoint is a dense {config.arch} model without experts; remove expert_groups",
        )
    n, e = config.n_layers, config.num_experts
    if groups[0].experts is None:
        if len(groups) > e:
            raise PlacementError.at(
                source, "expert_groups", f"{len(groups)} groups for a model of {e} experts; each group needs one"
            )
        return tuple(
            replace(g, experts=part, layers=tuple(range(n)))
            for g, part in zip(groups, _even_split(e, len(groups)), strict=True)
        )
    settled = []
    for g in groups:
        path = f"expert_groups[{g.index}]"
        layers = g.layers if g.layers is not None else tuple(range(n))
        if layers[-1] >= n:
            raise PlacementError.at(
                source, f"{path}.layers", f"layer {layers[-1]} is out of range; the model has {n} layers (0-{n - 1})"
            )
        if g.experts[-1] >= e:
            raise PlacementError.at(
                source,
                f"{path}.experts",
                f"expert {g.experts[-1]} is out of range; the model has {e} experts (0-{e - 1})",
            )
        if g.hidden is not None and g.hidden.parts and config.hidden_dim % g.hidden.parts:
            raise PlacementError.at(
                source,
                f"{path}.hidden",
                f"{config.hidden_dim} hidden rows do not cut into {g.hidden.parts} equal parts",
            )
        if g.hidden is not None and g.hidden.stop > config.hidden_dim:
            raise PlacementError.at(
                source,
                f"{path}.hidden",
                f"rows {g.hidden}: the model's experts have {config.hidden_dim} hidden rows (0:{config.hidden_dim})",
            )
        settled.append(replace(g, layers=layers))
    # (layer, expert) -> the (start, stop, group) runs of its hidden rows that groups hold
    held: dict[tuple[int, int], list[tuple[int, int, ExpertGroupSpec]]] = {}
    for g in settled:
        start, stop = g.rows(config.hidden_dim)
        for layer in g.layers:
            for x in g.experts:
                held.setdefault((layer, x), []).append((start, stop, g))
    for layer in range(n):
        missing = [x for x in range(e) if (layer, x) not in held]
        if missing:
            raise PlacementError.at(
                source,
                "expert_groups",
                f"expert {missing[0]} of layer {layer} is in no group; "
                "with expert groups, every expert of every layer needs one",
            )
        for x in range(e):
            _check_rows_held_once(source, sorted(held[(layer, x)], key=lambda r: r[:2]), x, layer, config.hidden_dim)
    return tuple(settled)


def _check_rows_held_once(
    source: str, runs: list[tuple[int, int, ExpertGroupSpec]], expert: int, layer: int, hidden_dim: int
) -> None:
    """The groups' runs of one expert's hidden rows, sorted, must tile 0..hidden_dim: no row twice, none missing."""
    end, last = 0, None
    for start, stop, g in runs:
        if start > end:
            raise PlacementError.at(source, "expert_groups", _rows_missing(runs, end, start, expert, layer, hidden_dim))
        if start < end:
            raise PlacementError.at(
                source,
                f"expert_groups[{g.index}].hidden",
                f"rows {start}:{min(stop, end)} of expert {expert} of layer {layer} ({g.hidden}) are also in "
                f"expert_groups[{last.index}] ({last.hidden})",
            )
        end, last = stop, g
    if end < hidden_dim:
        raise PlacementError.at(
            source, "expert_groups", _rows_missing(runs, end, hidden_dim, expert, layer, hidden_dim)
        )


def _rows_missing(runs: list, start: int, stop: int, expert: int, layer: int, hidden_dim: int) -> str:
    """Names the first missing run: as a part where the groups cut in equal parts, else as rows."""
    cut = next((g.hidden for _, _, g in runs if g.hidden is not None and g.hidden.parts), None)
    size = hidden_dim // cut.parts if cut is not None else 0
    if size and start % size == 0:
        what = f"part {start // size}/{cut.parts} of expert {expert} of layer {layer} is"
    else:
        what = f"rows {start}:{stop} of expert {expert} of layer {layer} are"
    return f"{what} in no group; groups that cut experts into parts must hold every part"


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
