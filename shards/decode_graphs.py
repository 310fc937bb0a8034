"""CUDA graphs for a shard's decode step: the layers' kernels launched as one graph instead of one by one.

At batch 1 a Mixtral layer's kernels read its weights in about 0.2 ms of GPU time, but launching its ~70 kernels
from Python took 1.4 ms (bench/NOTES.md): decode was bound by the host, not by memory. A decode step has the same
shapes every time for a given batch size and slot layout, so it is captured once and replayed: each step the host
builds the step's few index tensors as usual, copies them into the graph's own (static) tensors, and launches
one graph. The first step of a new shape runs eagerly (its result is used) and is then captured.

A served batch changes size from step to step as requests come and go, and each new size would run eagerly and be
captured (~2-3 decode steps' time): a scheduler-only simulation of one H200's served levels at 10 requests a second
met 74 sizes in 1050 decode steps, with 16 graphs kept. So a stage whose layers hold all their experts pads a decode
step above 8 sequences to the next multiple of 16 (`padded_batch`, as vLLM pads to its capture sizes), its extra rows
reading and writing a scratch slot of the cache, and keeps the first rows' outputs: the same simulation met 18 keys.

`DecodeGraphs(..., replay="eager")` keeps the same static-buffer bookkeeping but replays by running the layers
on those buffers: what CPU tests use to check that every per-step input reaches the graph. With `compiled` (a
`CompiledDecode`), the layers run, and are captured, as inductor's fused kernels instead of the eager ones.
"""

from __future__ import annotations

import dataclasses
import os
from collections import OrderedDict
from collections.abc import Callable

import torch

from shards.attention import AttentionPlan
from shards.compiled_decode import CompiledDecode
from shards.decode_attention import decodes_in_place
from shards.kv_cache import RollingKVCache, StepLayout
from shards.model import ExpertsFn, TransformerShard

# The per-step tensors of a decode layout: the host refills them before every replay.
_STEP_TENSORS = ("positions", "cos", "sin", "write_rows", "decode_slots")
EXACT_UP_TO = 8  # batch sizes captured as they are; above, every multiple of PADDED_STEP
PADDED_STEP = 16
MAX_GRAPHS = 64  # 16 sizes to 128 sequences x the spans a context meets (`kv_cache.decode_span`)


def pad_decode() -> bool:
    """MISTRAL_CLUSTER_PAD_DECODE=0 runs every decode step at its own batch size (an A/B switch)."""
    return os.environ.get("MISTRAL_CLUSTER_PAD_DECODE", "1") != "0"


def padded_batch(n: int) -> int:
    """The captured batch size a decode step of `n` sequences runs at: its own up to 8, then the next multiple of 16.
    Not below 8: a padded row's zero state ties its gate, which picks experts the real rows may not have chosen, and
    at a few sequences every expert more is weights read (at 9 or more, 2 of 8 experts a row have chosen nearly all).
    """
    if n < 1:
        raise ValueError(f"a decode step has at least one sequence, got {n}")
    if n <= EXACT_UP_TO:
        return n
    return -(-n // PADDED_STEP) * PADDED_STEP


@dataclasses.dataclass
class _Captured:
    h: torch.Tensor  # static input hidden states (batch, dim)
    layout: StepLayout  # static copies of the step's index tensors and mask
    out: torch.Tensor | None = None  # static output, written by every replay
    graph: torch.cuda.CUDAGraph | None = None
    run: Callable[[], torch.Tensor] | None = None  # replay="eager": the layers on the static buffers


class DecodeGraphs:
    """Captured decode steps of one shard, keyed by (batch size, first slot when the slots are one run, rows read)."""

    def __init__(
        self,
        shard: TransformerShard,
        cache: RollingKVCache,
        replay: str = "cuda",
        max_graphs: int = MAX_GRAPHS,
        compiled: CompiledDecode | None = None,
        run_layers: Callable[..., torch.Tensor] | None = None,
    ) -> None:
        """`run_layers` (h, layout, cache, experts): what a step runs and a graph records, when it is not the
        compiled layers' or the shard's own (a stage's two-batch overlap decides per step which it runs)."""
        if replay not in ("cuda", "eager"):
            raise ValueError(f"replay must be 'cuda' or 'eager', got {replay!r}")
        self.shard, self.cache, self.replay, self.max_graphs = shard, cache, replay, max_graphs
        self.run_layers = run_layers or (compiled.run_layers if compiled is not None else shard.run_layers)
        self._graphs: OrderedDict[tuple, _Captured] = OrderedDict()
        self._failed: set[tuple] = set()  # shapes whose capture failed: they stay eager
        self._pool = torch.cuda.graph_pool_handle() if replay == "cuda" else None
        self.captures = 0
        self.replays = 0
        self.capturing = False  # True while the layers run only to be recorded: their values are not real

    @property
    def batches(self) -> list[int]:
        """The batch sizes of the graphs kept now."""
        return sorted({key[0] for key in self._graphs})

    def run(self, h: torch.Tensor, layout: StepLayout, experts: ExpertsFn | None) -> torch.Tensor:
        """The decode step's output hidden states: replayed, or run eagerly (and captured) the first time."""
        if layout.decode_slots is None:
            raise ValueError("only decode steps (one new token per sequence) are captured")
        # Where torch's attention reads a contiguous run of slots as a view, the view's start is part of what was
        # captured; the decode kernel reads every slot's buffer by its index (`decode_slots`, refilled each replay),
        # so there it is not. The span of rows the step reads (`kv_cache.decode_span`) always is.
        in_place = decodes_in_place(h.shape[0], h.device)
        first = layout.decode_range.start if layout.decode_range is not None and not in_place else None
        key = (h.shape[0], first, layout.decode_span)
        graph = self._graphs.get(key)
        if graph is None:
            out = self.run_layers(h, layout, self.cache, experts)
            if key not in self._failed:
                self._capture(key, h, layout, experts)
            return out
        self._graphs.move_to_end(key)
        graph.h.copy_(h)
        for name in _STEP_TENSORS:
            getattr(graph.layout, name).copy_(getattr(layout, name))
        graph.layout.attention.decode_mask.copy_(layout.attention.decode_mask)
        self.replays += 1
        if graph.graph is not None:
            graph.graph.replay()
            return graph.out.clone()  # the next replay overwrites the static output; a send may still read it
        graph.layout.attention._cache.clear()  # masks derived from the old step's (a real graph recomputes them)
        return graph.run()

    def _capture(self, key: tuple, h: torch.Tensor, layout: StepLayout, experts: ExpertsFn | None) -> None:
        static_layout = dataclasses.replace(
            layout,
            **{name: getattr(layout, name).clone() for name in _STEP_TENSORS},
            attention=AttentionPlan(None, None, layout.attention.decode_mask.clone()),
        )
        captured = _Captured(h=h.clone(), layout=static_layout)
        if self.replay == "eager":
            captured.run = lambda: self.run_layers(captured.h, captured.layout, self.cache, experts)
        else:
            graph = torch.cuda.CUDAGraph()
            # Captured on this loop's own stream, thread-local, and with no device-wide synchronisation (which
            # `torch.cuda.graph` does on entry): a worker's other loops keep their streams running meanwhile, and one
            # of them may be waiting on a message that only comes after this step (a two-stage pipeline whose
            # expert groups serve each other's stage deadlocked on that synchronisation).
            torch.cuda.current_stream().synchronize()
            self.capturing = True
            try:
                graph.capture_begin(pool=self._pool, capture_error_mode="thread_local")
                try:
                    captured.out = self.run_layers(captured.h, captured.layout, self.cache, experts)
                finally:
                    graph.capture_end()
            except Exception:  # noqa: BLE001 - a kernel that cannot be captured: this shape stays eager
                self._failed.add(key)
                return
            finally:
                self.capturing = False
            captured.graph = graph
        self._graphs[key] = captured
        self.captures += 1
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
